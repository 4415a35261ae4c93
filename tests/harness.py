"""Run a function on N local gloo ranks and fail if any rank fails: the project's launcher
(megatron_lightseq/jobs/launch.py, which reports every rank's error, death or hang), with a gloo
group per run.

Workers come from a forkserver that preloads torch before the test process computes anything,
so no child inherits a started thread pool.
"""
from __future__ import annotations

import multiprocessing as mp

from megatron_lightseq.jobs.launch import run_local

mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "megatron_lightseq"])


def _in_gloo_group(place, fn, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=place.init_method, rank=place.rank, world_size=place.world_size)
    return fn(place.rank, place.world_size, *args)


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on every rank; returns the ranks' results in rank order."""
    return run_local(_in_gloo_group, world_size, fn, args, timeout=timeout, start_method="forkserver")
