"""Where a process stands in the job, and the one way this project starts local processes.

A process is placed by Slurm (srun, one task per GPU), by torchrun, or by :func:`run_local`, which
starts N processes on this machine (the jobs without a launcher, and the tests). Everything reads
the :class:`Place`, nothing else reads the environment.

run_local's workers send their verdict (return value, or traceback) through a pipe, wait until
every rank has sent its own (so that none leaves while a peer still needs it; through a file
store of the launcher's, which works whatever state the job left its process groups in), and
leave with ``os._exit``: a gloo abort during teardown cannot turn a pass into a failure, while
an error, a missing verdict or a timeout always fails the run, naming the rank. Verdicts are
pickled by value (torch's multiprocessing pickler would share tensors through the worker, which
is gone by the time they are read).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    rank: int
    world_size: int
    local_rank: int
    init_method: str  # for torch.distributed.init_process_group


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise ValueError("under Slurm, expected MASTER_ADDR or SLURM_JOB_NODELIST to be set; got neither")
    return subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def from_environment() -> Place | None:
    """This process's place when a launcher started it (Slurm task or torchrun), else None."""
    env = os.environ
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # an srun task
        addr = env.get("MASTER_ADDR") or _first_slurm_host()
        # A port from the job id, so two jobs on one node do not collide.
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return Place(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                     f"tcp://{addr}:{port}")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return Place(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "env://")
    return None


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its launch (torchrun's RANK, srun's SLURM_PROCID; a process
    that no launcher started is). Messages meant for the user print there only, once."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


class RanksFailed(RuntimeError):
    """Some local rank raised, died or hung; the message has each one's story."""


def _worker(target, place: Place, args: tuple, conn, done_path: str) -> None:
    try:
        verdict = ("ok", target(place, *args))
    except BaseException:  # noqa: BLE001 - the parent reports it
        verdict = ("error", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(verdict))
        conn.close()
        from torch.distributed import FileStore

        done = FileStore(done_path, place.world_size)
        done.add("verdicts", 1)
        while done.add("verdicts", 0) < place.world_size:  # the parent kills us if a rank never gets here
            time.sleep(0.01)
    finally:
        os._exit(0)


def run_local(target, world_size: int, *args, timeout: float = 3600.0, start_method: str = "spawn") -> list:
    """``target(place, *args)`` on ``world_size`` new local processes (rendezvous through a file
    store); their return values in rank order. Raises :class:`RanksFailed` if any rank raises, dies
    or gives no verdict within ``timeout`` seconds."""
    ctx = mp.get_context(start_method)
    with tempfile.TemporaryDirectory() as tmp:
        store, done = f"file://{os.path.join(tmp, 'store')}", os.path.join(tmp, "done")
        procs, pipes = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(target, Place(rank, world_size, rank, store), args, child, done))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        verdicts = []
        try:
            for rank, conn in enumerate(pipes):
                if not conn.poll(timeout):
                    raise RanksFailed(f"rank {rank} gave no verdict within {timeout:.0f}s (hang?)")
                try:
                    verdicts.append(pickle.loads(conn.recv_bytes()))
                except EOFError:
                    procs[rank].join(5)
                    raise RanksFailed(f"rank {rank} died without a verdict (exit code {procs[rank].exitcode})") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"--- rank {r} ---\n{v[1]}" for r, v in enumerate(verdicts) if v[0] == "error"]
    if errors:
        raise RanksFailed("\n".join(errors))
    return [v[1] for v in verdicts]


def run_everywhere(target, args, local_ranks: int, timeout: float = 3600.0):
    """Call ``target(place, args)`` here if a launcher placed this process, else on ``local_ranks``
    processes started now. Returns rank 0's result (None on other ranks)."""
    place = from_environment()
    if place is not None:
        return target(place, args)
    return run_local(target, local_ranks, args, timeout=timeout)[0]
