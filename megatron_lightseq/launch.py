"""Where a process stands in the job: from Slurm (srun, one task per GPU), from torchrun, or as
one of N processes this machine starts itself. Everything reads the result, nothing else reads
the environment."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import tempfile
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


def run_everywhere(target, args, local_ranks: int, timeout: float = 3600.0):
    """Call ``target(place, args)`` here if a launcher placed this process, else on ``local_ranks``
    processes started now (spawn, file store). Returns rank 0's result (None on other ranks)."""
    place = from_environment()
    if place is not None:
        return target(place, args)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{os.path.join(tmp, 'store')}"
        parent, child = ctx.Pipe(duplex=False)
        procs = [ctx.Process(target=_child, args=(target, Place(r, local_ranks, r, store), args, child))
                 for r in range(local_ranks)]
        for p in procs:
            p.start()
        child.close()
        result = parent.recv() if parent.poll(timeout) else None
        for p in procs:
            p.join(timeout=60)
    if result is None or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a local rank failed (exit codes {[p.exitcode for p in procs]})")
    return result


def _child(target, place: Place, args, conn) -> None:
    result = target(place, args)
    if place.rank == 0:
        conn.send(result)
