"""dist_attn's own host cost per layer call, outside the kernels and the transfers: the input
checks and agreement, the plan, the executor's Python. P virtual ranks in one process
(distattn/run/emulate.py's exchanges, sends are copies into a mailbox), a kernel that computes
nothing and tiny tensors, so what is timed is the host work each rank does per call: the API's
``agreed_run`` and the rank's pipeline (run/pipeline.py), forward and backward, as dist_attn's
autograd Function drives them; flat calls and hybrid ones (``--hybrid U``: an all-to-all over
U ranks around the plan over P/U).

    python benchmarks/overhead.py [--world-sizes 2 8 32] [--hybrid 2] [--calls 100] [--profile 8] [--out PATH]

Each virtual rank is timed on its own (its checks, then its share of every forward and backward
step of the lockstep), so a rank's time is what one GPU's host thread spends per layer call.
Three workloads: "plain" (zigzag, causal, the same shapes every call: Megatron's steady state),
"packed" (balanced layout, causal, new documents every call: the first layer of every batch,
where the documents' plan is built) and "packed-cached" (the same documents every call: the
other layers of a batch, which find the plan cached). Rows: the
median over calls of the busiest rank's time per call, and per plan step (forward + backward
steps), and per call without the time inside the virtual exchange's copies (the transfers'
share, which NCCL's batch_isend_irecv takes on GPUs), from the quietest of ``--repeats`` runs (the machine may be shared), without a trace
open; then the collectives and host reads per call in steady state (traced apart).
``--profile P`` prints cProfile's top functions for that world size (plain, then packed).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS, HEADDIM = 2, 8  # two heads: the hybrid splits them
WORKLOADS = ["plain", "packed", "packed-cached"]
TOKENS_PER_RANK = 128  # 8 chunks of 16 per rank with documents: the most a rank holds (layout.py)


def _null_kernel():
    from megatron_lightseq.kernels import register_kernel
    from megatron_lightseq.kernels.base import BlockKernel

    class Null(BlockKernel):
        """Computes nothing: zeros for out, lse and grads (allocations only)."""

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


def _documents(world_size: int, call: int) -> tuple[int, ...]:
    """New boundaries every call, the same on every rank: 2-6 documents over the sequence."""
    g = torch.Generator().manual_seed(call)
    tokens = world_size * TOKENS_PER_RANK
    cuts = sorted(set(torch.randint(1, tokens, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()))
    return (0, *cuts, tokens)


class _VirtualGroup:
    """P virtual ranks with their own agreed-signature state, as P processes would have; with
    ``inner`` (hybrid) each also has its all-to-all group's exchange."""

    def __init__(self, world_size: int, inner: int | None = None) -> None:
        from megatron_lightseq.distattn.run.emulate import virtual_exchanges

        self.exchanges, _ = virtual_exchanges(world_size, inner)
        self.seconds = [0.0] * world_size
        self.transport = [0.0] * world_size  # inside the virtual exchange's copies: the transfers' share
        for rank, pair in enumerate(self.exchanges):
            for x in filter(None, pair):
                x._post = self._timed_post(rank, x._post)

    def _timed_post(self, rank: int, post):
        def timed(*args):
            start = time.perf_counter()
            pending = post(*args)
            wait = pending.wait

            def timed_wait():
                begin = time.perf_counter()
                wait()
                self.transport[rank] += time.perf_counter() - begin

            pending.wait = timed_wait
            self.transport[rank] += time.perf_counter() - start
            return pending

        return timed

    def timed(self, rank: int, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[rank] += time.perf_counter() - start

    def lockstep(self, generators) -> list:
        results = [None] * len(generators)
        alive = dict(enumerate(generators))
        while alive:
            for rank, gen in list(alive.items()):
                try:
                    self.timed(rank, next, gen)
                except StopIteration as done:
                    results[rank] = done.value
                    del alive[rank]
        return results


def _one_call(group: _VirtualGroup, inputs, options) -> int:
    """One forward + backward on every virtual rank; the plan's steps (forward + backward)."""
    from megatron_lightseq.distattn.api import agreed_run

    runs = [group.timed(r, lambda r=r: agreed_run(*inputs[r][:3], *group.exchanges[r], True, **options))
            for r in range(len(inputs))]
    with torch.no_grad():  # as inside dist_attn's autograd Function
        fwd = group.lockstep([run.forward(*i[:3]) for run, i in zip(runs, inputs)])
        group.lockstep([run.backward(f[2], i[3]) for run, i, f in zip(runs, inputs, fwd)])
    return len(runs[0].view.forward) + len(runs[0].view.backward)


def _split(world_size: int, inner: int | None) -> str:
    return "flat" if inner is None else f"{inner}x{world_size // inner}"


def measure(world_size: int, workload: str, calls: int, repeats: int = 3,
            profile: cProfile.Profile | None = None, inner: int | None = None) -> dict:
    import megatron_lightseq as mls

    group = _VirtualGroup(world_size, inner)
    inputs = []
    for _ in range(world_size):
        q = torch.zeros(1, TOKENS_PER_RANK, HEADS, HEADDIM, requires_grad=True)
        k, v = (torch.zeros(1, TOKENS_PER_RANK, HEADS, HEADDIM, requires_grad=True) for _ in range(2))
        inputs.append((q, k, v, torch.zeros_like(q)))
    def options(i):
        plain = dict(causal=True, softmax_scale=None, kernel="null", window_size=(-1, -1), cu_seqlens_padded=None)
        if workload == "plain":
            return dict(plain, layout="zigzag", schedule="auto", cu_seqlens=None)
        # packed-cached: the same documents every call (a batch's layers after its first)
        return dict(plain, layout="balanced", schedule="auto",
                    cu_seqlens=_documents(world_size, 0 if workload == "packed-cached" else i))

    warmup = 3
    for i in range(warmup):  # the first batch of the shape agrees (and the caches fill)
        _one_call(group, inputs, options(i))
    with mls.trace() as steady:  # what the steady state makes: counted apart, a trace costs time
        for i in range(warmup, 2 * warmup):
            _one_call(group, inputs, options(i))
    best = None
    for repeat in range(repeats):  # the machine may be shared: the quietest repeat's medians
        rows = []
        if profile is not None and repeat == 0:
            profile.enable()
        for i in range(calls):
            group.seconds, group.transport = [0.0] * world_size, [0.0] * world_size
            steps = _one_call(group, inputs, options(2 * warmup + repeat * calls + i))
            own = [a - b for a, b in zip(group.seconds, group.transport)]
            rows.append((max(group.seconds), statistics.mean(group.seconds), steps, max(own)))
        if profile is not None and repeat == 0:
            profile.disable()
        median = statistics.median(r[0] for r in rows)
        if best is None or median < best[0]:
            best = (median, rows)
    busiest, rows = best
    return {"world_size": world_size, "workload": workload, "split": _split(world_size, inner), "calls": calls,
            "repeats": repeats,
            "call_s": busiest, "mean_rank_call_s": statistics.median(r[1] for r in rows),
            # without the virtual exchange's copies (on NCCL torch's batch_isend_irecv stands there)
            "call_without_transport_s": statistics.median(r[3] for r in rows),
            "step_s": statistics.median(r[0] / r[2] for r in rows), "steps": statistics.median(r[2] for r in rows),
            # per rank and call in steady state (virtual agreements count as collectives)
            "collectives_per_call": steady.collectives / (warmup * world_size),
            "host_reads_per_call": steady.host_reads / (warmup * world_size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    p.add_argument("--hybrid", type=int, default=2, metavar="U",
                   help="also time hybrid calls, U (all-to-all) x P/U (the plan), where U divides P; 0: none")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="runs of --calls calls; the quietest is reported")
    p.add_argument("--profile", type=int, metavar="P", help="print cProfile's top functions at this world size")
    p.add_argument("--label", default="latest", help="names this run in the JSON (e.g. before, after)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "overhead_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    _null_kernel()
    print(f"dist_attn host time per layer call (forward + backward), null kernel, {TOKENS_PER_RANK} tokens per rank, "
          f"virtual ranks in one process, medians of {args.calls} calls, busiest rank")
    print(f"{'P':>3} {'split':>7} {'workload':>13} {'steps':>6} {'ms/call':>8} {'no copies':>10} {'us/step':>8} {'collectives':>12} "
          f"{'host reads':>11}")
    results = []
    for world_size in args.world_sizes:
        hybrid = [args.hybrid] if args.hybrid and world_size % args.hybrid == 0 else []
        for inner, workload in itertools.product([None] + hybrid, args.workloads):
            profile = cProfile.Profile() if args.profile == world_size else None
            r = measure(world_size, workload, args.calls, args.repeats, profile, inner)
            results.append(r)
            print(f"{world_size:>3} {r['split']:>7} {workload:>13} {r['steps']:>6.0f} {r['call_s'] * 1e3:>8.3f} "
                  f"{r['call_without_transport_s'] * 1e3:>10.3f} {r['step_s'] * 1e6:>8.1f} "
                  f"{r['collectives_per_call']:>12.2f} {r['host_reads_per_call']:>11.2f}")
            if profile is not None:
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
                print(text.getvalue())
    runs = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            runs = json.load(f).get("runs", {})
    runs[args.label] = {"torch": torch.__version__, "rows": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": "cpu, virtual ranks in one process", "runs": runs}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
