"""The sbatch scripts' own checks, without Slurm (bash alone, milliseconds): outside a job they say
what is missing; CONFIGS is never glob-expanded; a copy run from Slurm's spool finds the repository
from the job's Command. tests/test_slurm.py submits them to a real Slurm from outside the repository."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("lightseq.sbatch", "tp_baseline.sbatch")
IN_A_JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2", "MODE": "cpu"}


def _bash(script, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("REPO", "MEGATRON_LM")}
    return subprocess.run(["bash", script], cwd=cwd, env=dict(clean, **env), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_outside_slurm_says_what_is_missing(script, tmp_path):
    done = _bash(os.path.join(ROOT, "scripts", script), tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {script} runs inside a Slurm job (SLURM_JOB_ID, SLURM_JOB_NODELIST and "
                                   f"SLURM_NTASKS are not all set): submit it with sbatch (README, On a cluster); "
                                   f"without Slurm, start the same launch with torchrun (README, With Megatron-LM)")


def test_configs_are_names_not_globs(tmp_path):
    (tmp_path / "llama7b").write_text("")  # what a glob would find in the submit directory
    done = _bash(os.path.join(ROOT, "scripts", "lightseq.sbatch"), tmp_path, CONFIGS="*", **IN_A_JOB)
    assert done.returncode == 2
    assert done.stderr.startswith('error: no config configs/*.sh (CONFIGS="*"): CONFIGS names files under '
                                  f'{ROOT}/configs without .sh'), done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_spool_copy_finds_the_repository_from_the_jobs_command(script, tmp_path):
    spool, bin_ = tmp_path / "spool", tmp_path / "bin"
    spool.mkdir()
    bin_.mkdir()
    copy = spool / "slurm_script"  # where slurmd runs the batch script: no scripts/ beside it
    copy.write_text(open(os.path.join(ROOT, "scripts", script)).read())
    scontrol = bin_ / "scontrol"  # Slurm's answer to `scontrol show job`, its Command= field
    scontrol.write_text(f"#!/bin/sh\necho 'JobId=7 JobName=x Command={ROOT}/scripts/{script} WorkDir={tmp_path}'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = dict(IN_A_JOB, CONFIGS="nope", PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}")
    done = _bash(str(copy), tmp_path, **env)
    assert done.returncode == 2 and done.stderr.startswith(
        f'error: no config configs/nope.sh (CONFIGS="nope"): CONFIGS names files under {ROOT}/configs'), done.stderr
    lost = _bash(str(copy), tmp_path, **dict(env, PATH=os.environ["PATH"]))  # no scontrol: nothing names the original
    assert lost.returncode == 2 and lost.stderr.strip().endswith(
        f"error: no scripts/common.sh in REPO={tmp_path}: set REPO to the checkout"), lost.stderr
