"""The hybrid split's compute side on one device (issue 20's emulation target): P = 8 virtual
ranks as flat, as U = 2 (2 x 4) and U = 4 (4 x 2), and the flat plan over P/U ranks, which has
the hybrid's outer blocks (the same block count and sizes, all heads), through
emulate_dist_attn (the same plans, kernels and all-to-all code as dist_attn; copies instead of
sends), zigzag, causal, forward + backward.

    python benchmarks/hybrid_emulate.py [--tokens 32k] [--kernel auto] [--smoke] [--out PATH]

Per run: wall seconds (median of --repeats), seconds inside the block kernels, and the rest
(merges, the all-to-all's copies, Python). The target: a hybrid run's total within 5% of the
flat P/U run's, i.e. the all-to-all adds no copies beyond the unavoidable ones. Its numbers mean
something on a GPU only; on CPU (--smoke) it checks that the script runs.
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
sys.path.insert(0, ROOT)

from megatron_lightseq.distattn.run.emulate import emulate_dist_attn  # noqa: E402
from megatron_lightseq.kernels import resolve_kernel  # noqa: E402


class _KernelClock:
    """Seconds inside a kernel's forward, forward_into and backward (synchronised on CUDA)."""

    def __init__(self, kernel) -> None:
        self.seconds, self.kernel, self.depth = 0.0, kernel, 0
        for name in ("forward", "forward_into", "backward"):
            setattr(kernel, name, self._timed(getattr(kernel, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):  # the outermost call only: forward_into may call forward
            self.depth += 1
            if self.depth == 1:
                _sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    _sync()
                    self.seconds += time.perf_counter() - start
        return timed

    def undo(self) -> None:
        for name in ("forward", "forward_into", "backward"):
            delattr(self.kernel, name)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32 * 1024)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "hybrid_emulate.json"))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, heads, dim = (256, 8, 32) if args.smoke else (args.tokens, args.heads, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(1, tokens, heads, dim, generator=g).to(device, dtype) for _ in range(4))
    kernel = resolve_kernel(args.kernel, q, k)
    runs = [("flat P=8", 8, None), ("hybrid 2x4 (U=2)", 8, 2), ("flat P=4", 4, None),
            ("hybrid 4x2 (U=4)", 8, 4), ("flat P=2", 2, None)]
    rows = []
    for name, world, u in runs:
        walls, inside = [], []
        for i in range(args.repeats + 1):  # the first run warms up (kernel choice, allocator)
            clock = _KernelClock(kernel)
            _sync()
            start = time.perf_counter()
            emulate_dist_attn(q, k, v, dout, world_size=world, layout="zigzag", causal=True, kernel=kernel.name,
                              heads_group=u)
            _sync()
            wall = time.perf_counter() - start
            clock.undo()
            if i:
                walls.append(wall)
                inside.append(clock.seconds)
        rows.append(dict(run=name, world_size=world, heads_group=u, wall_s=statistics.median(walls),
                         kernel_s=statistics.median(inside)))
    by = {r["run"]: r for r in rows}
    targets = {f"{h} vs {f}": by[h]["wall_s"] / by[f]["wall_s"]
               for h, f in (("hybrid 2x4 (U=2)", "flat P=4"), ("hybrid 4x2 (U=4)", "flat P=2"))}
    print(f"{device}, {kernel.name}, {tokens} tokens, {heads} heads x {dim}, {dtype}, zigzag causal fwd+bwd")
    print(f"{'run':<18} {'wall ms':>9} {'kernels ms':>11} {'rest ms':>9}")
    for r in rows:
        print(f"{r['run']:<18} {r['wall_s'] * 1e3:>9.2f} {r['kernel_s'] * 1e3:>11.2f} "
              f"{(r['wall_s'] - r['kernel_s']) * 1e3:>9.2f}")
    for name, ratio in targets.items():
        print(f"{name}: {ratio:.3f} (target <= 1.05)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=device, kernel=kernel.name, tokens=tokens, heads=heads, headdim=dim, dtype=str(dtype),
                       smoke=args.smoke, rows=rows, ratios=targets), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
