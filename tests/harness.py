"""Run a function on N local gloo ranks and fail if any rank fails.

Workers come from a forkserver that preloads torch before the test process computes anything,
so no child inherits a started thread pool. Each worker sends its verdict (its return value, or
its traceback) through a pipe, passes a barrier and leaves with ``os._exit(0)``: a gloo abort
during teardown cannot turn a pass red, while an error verdict, a missing verdict or a timeout
always fails the test.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "torch.distributed", "megatron_lightseq"])


def _worker(rank, world_size, init_file, fn, args, conn):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        verdict = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the parent reports it
        verdict = ("error", traceback.format_exc())
    conn.send(verdict)
    conn.close()
    try:
        if verdict[0] == "ok":
            dist.barrier()
            dist.destroy_process_group()
    finally:
        os._exit(0)


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on every rank; returns the ranks' results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs, pipes = [], []
        for rank in range(world_size):
            parent, child = _ctx.Pipe(duplex=False)
            p = _ctx.Process(target=_worker, args=(rank, world_size, init_file, fn, args, child))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        verdicts = []
        try:
            for rank, conn in enumerate(pipes):
                if not conn.poll(timeout):
                    raise AssertionError(f"rank {rank} gave no verdict within {timeout:.0f}s (hang?)")
                try:
                    verdicts.append(conn.recv())
                except EOFError:
                    raise AssertionError(f"rank {rank} died without a verdict") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"--- rank {r} ---\n{v[1]}" for r, v in enumerate(verdicts) if v[0] == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [v[1] for v in verdicts]
