"""dist_attn's own cost per call, outside the kernels and the transfers: input checks and the
ranks' agreement, plan lookup, the executor's Python. Local gloo ranks on CPU, a kernel that
computes nothing and tiny tensors, so what is left is overhead.

    python benchmarks/overhead.py [--world-sizes 2 4 8] [--calls 200] [--out PATH]

Per world size, medians over the calls (forward + backward): the whole call; the time inside
the input checks (with the agreement); the time inside waits for transfers; and the rest, which
is the overhead this measures. Runs against whatever megatron_lightseq is importable, so the same
script measures an older checkout (PYTHONPATH) for a before/after comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Clock:
    """Seconds spent inside wrapped functions (not nested in one another)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)


def _null_kernel():
    from megatron_lightseq.kernels import register_kernel
    from megatron_lightseq.kernels.base import BlockKernel

    class Null(BlockKernel):
        """Computes nothing: zeros for out, lse and grads."""

        name = "null"

        def supports(self, q, k):
            return True

        def forward(self, q, k, v, **block):
            return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

        def forward_into(self, q, k, v, out_acc, lse_acc, **block):
            pass

        def backward(self, dout, q, k, v, out, lse, **block):
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    register_kernel("null", Null)


def _measure(place, calls: int) -> dict:
    import torch.distributed as dist

    import megatron_lightseq as mls
    from megatron_lightseq.distattn import api, checks, exchange

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=place.init_method, rank=place.rank, world_size=place.world_size)
    _null_kernel()
    in_checks, in_waits = _Clock(), _Clock()
    check_name = "checked_call" if hasattr(checks, "checked_call") else "check_inputs"  # after / before
    in_checks.wrap(api, check_name)
    for cls in {exchange.Pending, *exchange.Pending.__subclasses__()}:
        if "wait" in vars(cls):
            in_waits.wrap(cls, "wait")
    q = torch.zeros(1, 2, 1, 8, requires_grad=True)  # two tokens per rank: both layouts split them
    k, v = (torch.zeros(1, 2, 1, 8, requires_grad=True) for _ in range(2))
    rows = []
    for i in range(calls + 10):
        dist.barrier()
        before = (in_checks.seconds, in_waits.seconds)
        start = time.perf_counter()
        out = mls.dist_attn(q, k, v, kernel="null", schedule="lightseq")
        out.sum().backward()
        total = time.perf_counter() - start
        if i >= 10:  # after a warm-up
            rows.append((total, in_checks.seconds - before[0], in_waits.seconds - before[1]))
    return {name: statistics.median(r[i] for r in rows) for i, name in enumerate(("call_s", "checks_s", "waits_s"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--label", default="", help="names this run in the JSON (e.g. before, after)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "overhead_cpu.json"))
    args = p.parse_args(argv)
    from megatron_lightseq.jobs.launch import run_local

    print(f"dist_attn per call (forward + backward), null kernel, 2 tokens per rank, gloo, medians of {args.calls}")
    print(f"{'P':>3} {'call ms':>9} {'checks ms':>10} {'waits ms':>9} {'overhead ms':>12}")
    results = []
    for world_size in args.world_sizes:
        r = run_local(_measure, world_size, args.calls, timeout=900)[0]
        r |= {"world_size": world_size, "overhead_s": r["call_s"] - r["waits_s"]}
        results.append(r)
        print(f"{world_size:>3} {r['call_s'] * 1e3:>9.3f} {r['checks_s'] * 1e3:>10.3f} {r['waits_s'] * 1e3:>9.3f} "
              f"{r['overhead_s'] * 1e3:>12.3f}")
    runs = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            runs = json.load(f).get("runs", {})
    runs[args.label or "latest"] = {"torch": torch.__version__, "rows": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": "cpu (gloo)", "runs": runs}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
