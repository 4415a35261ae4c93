"""A single-node Slurm cluster in a temporary directory, for CI: munged, slurmctld and slurmd as
root with their own socket, ports, state and logs, stopped by process id afterwards."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import re
import subprocess
import time

CONF = """\
ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def available() -> bool:
    return all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def slurm_cluster(directory: str):
    """Start the cluster under ``directory``; yields the environment for sbatch and friends."""
    d = os.path.abspath(directory)
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(host=host, d=d, ctld_port=_free_port(), d_port=_free_port()))
    key = os.path.join(d, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    env = dict(os.environ, SLURM_CONF=conf)
    pid_files = [os.path.join(d, n) for n in ("slurmd.pid", "slurmctld.pid", "munged.pid")]
    try:
        subprocess.run(["munged", "--force", f"--socket={d}/munge.sock", f"--key-file={key}",
                        f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                       check=True, env=env)
        subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
        subprocess.run(["slurmd", "-f", conf], check=True, env=env)
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                           env=env).stdout:
            if time.time() > deadline:
                raise RuntimeError(f"slurm did not come up; see {d}/slurmctld.log and {d}/slurmd.log")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in pid_files:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(open(pid_file).read().strip()), signal.SIGTERM)


def sbatch_and_wait(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``sbatch args`` and wait for the job: the result's returncode is the job's exit code.
    Polls every half second: ``sbatch --wait`` backs off to about 40 s per job on a job that
    finishes in ten."""
    submit = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, timeout=60)
    if submit.returncode != 0:
        return submit
    job = submit.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                               timeout=30).stdout
        state = re.search(r"JobState=(\S+)", shown)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                                             "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"):
            code = int(re.search(r"ExitCode=(\d+)", shown).group(1))
            return subprocess.CompletedProcess(submit.args, code or int(state.group(1) != "COMPLETED"),
                                               submit.stdout, f"job {job} ended {state.group(1)}\n{shown}")
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise TimeoutError(f"slurm job {job} ran past {timeout} s")
