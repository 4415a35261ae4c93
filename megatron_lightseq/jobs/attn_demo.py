"""dist_attn alone, without Megatron: every layout and schedule on local gloo ranks, checked
against a float64 oracle, with the plan's traffic measured and predicted.

    python -m megatron_lightseq attn-demo [--world-size 4] [--tokens 2048] ...
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ..distattn.plan.schedules import SCHEDULE_CHOICES
from ..kernels import OPTIONAL, kernel_names, unknown_kernel
from .launch import Place, RanksFailed, run_local


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_lightseq attn-demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, metavar="N", help="local gloo ranks (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="whole sequence length, a multiple of 2 x --world-size "
                                                            "(default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=2, help="K/V heads: fewer than --heads is GQA, 1 is MQA "
                                                           "(default: %(default)s)")
    p.add_argument("--headdim", type=int, default=64, help="channels per head (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                   help="inputs' dtype; the oracle is float64 whatever it is (default: %(default)s)")
    absent = [f"{name}, which needs {needs}" for name, needs in OPTIONAL.items() if name not in kernel_names()]
    p.add_argument("--kernel", default="auto", help="the block kernel: " + ", ".join(kernel_names())
                   + (f"; not here: {'; '.join(absent)}" if absent else "")
                   + " (default: %(default)s: torch on CPU, on CUDA the fastest per kind of block, measured)")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full attention, not causal")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("world_size", "tokens", "heads", "kv_heads", "headdim"):  # before any process starts
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tokens % (2 * args.world_size):
        p.error(f"--tokens ({args.tokens}) must be a multiple of {2 * args.world_size}: the zigzag layout cuts it "
                f"into 2 x --world-size chunks")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.kernel not in kernel_names():
        p.error(f"--{unknown_kernel(args.kernel)}")
    return args


def _oracle(args, dtype):
    """Inputs (in ``dtype``) and the float64 whole-sequence (out, dq, dk, dv), same on every rank."""
    from ..distattn import Mask
    from ..kernels.math import MathKernel

    g = torch.Generator().manual_seed(0)
    n, h, hkv, d = args.tokens, args.heads, args.kv_heads, args.headdim
    q, dout = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))  # the oracle sees what we see
    whole = dict(q_span=((0, n),), k_span=((0, n),), mask=Mask(causal=args.causal), scale=d ** -0.5)
    out, lse = MathKernel().forward(q, k, v, **whole)
    grads = MathKernel().backward(dout, q, k, v, out, lse, **whole)
    return (q, k, v, dout), (out, *grads)


def _rank_main(place: Place, args) -> list[dict]:
    import megatron_lightseq as mls
    from ..distattn import Mask, Shape
    from ..distattn.plan.call import resolve_plan

    rank = place.rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=place.init_method, rank=rank, world_size=place.world_size)
    dtype = getattr(torch, args.dtype)
    inputs, expected = _oracle(args, dtype)
    rows = []
    for layout in ("contiguous", "zigzag"):
        local = lambda x: mls.shard(x, layout=layout, rank=rank, world_size=args.world_size)
        q, k, v, dout = (local(x).to(dtype) for x in inputs)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        for schedule in SCHEDULE_CHOICES:
            for _ in range(2):  # the first call also opens gloo's connections between new pairs
                dist.barrier()
                start = time.perf_counter()
                with mls.trace() as t:
                    out = mls.dist_attn(q, k, v, layout=layout, schedule=schedule, causal=args.causal,
                                        kernel=args.kernel)
                    grads = torch.autograd.grad(out, (q, k, v), dout)
                seconds = time.perf_counter() - start
            errors = [(a.double() - local(b)).abs().max().item() for a, b in zip((out, *grads), expected)]
            plan = resolve_plan(Shape.of(q, k), world_size=args.world_size, layout=layout, schedule=schedule,
                                mask=Mask(causal=args.causal))
            predicted = plan.bytes_sent(rank, batch=1, seqlen_local=q.shape[1], nheads=args.heads,
                                        nheads_kv=args.kv_heads, headdim=args.headdim, dtype=dtype)
            rows.append(dict(layout=layout, schedule=schedule if schedule != "auto" else f"auto={plan.schedule}",
                             steps=plan.compute_steps, err_out=errors[0], err_grad=max(errors[1:]),
                             sent=t.bytes_sent, predicted=predicted, seconds=seconds))
    return rows


def _table(per_rank: list[list[dict]], args) -> str:
    """One row per layout and schedule; the bytes each rank sent get a column per rank, then
    whether every rank's equal the plan's prediction."""
    ranks = range(args.world_size)
    sent_width = max(6, len(f"{max(r[i]['sent'] for r in per_rank for i in range(len(r))) / 1024:.0f}") + 1)
    rank_cols = " ".join(f"{f'r{rank}':>{sent_width}}" for rank in ranks)
    head = f"{'layout':<11} {'schedule':<16} {'steps':>5} {'err out':>9} {'err grads':>9} "
    lines = [f"dist_attn on {args.world_size} gloo ranks: {args.tokens} tokens, heads {args.heads}/{args.kv_heads} "
             f"x {args.headdim}, {args.dtype}, causal={args.causal}, kernel={args.kernel}",
             "err out, err grads: max |value - float64 oracle| over all ranks, of out and of dq, dk, dv",
             "r0, r1, ...: KiB each rank sent, forward + backward, counted by trace(); = plan: every rank's bytes "
             "equal the plan's prediction",
             "steps: the plan's steps per pass; fwd+bwd s: the slowest rank's seconds for one forward + backward "
             "(the second call: the first also opens gloo's connections)",
             f"{'':<{len(head)}}{'KiB sent by rank':^{len(rank_cols)}}".rstrip(),
             f"{head}{rank_cols} {'= plan':>6} {'fwd+bwd s':>10}"]
    for i, row in enumerate(per_rank[0]):
        sent = [rank_rows[i]["sent"] for rank_rows in per_rank]
        predicted = [rank_rows[i]["predicted"] for rank_rows in per_rank]
        lines.append(
            f"{row['layout']:<11} {row['schedule']:<16} {row['steps']:>5} "
            f"{max(r[i]['err_out'] for r in per_rank):>9.2e} {max(r[i]['err_grad'] for r in per_rank):>9.2e} "
            f"{' '.join(f'{s / 1024:>{sent_width}.0f}' for s in sent)} "
            f"{'yes' if sent == predicted else 'NO':>6} {max(r[i]['seconds'] for r in per_rank):>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        per_rank = run_local(_rank_main, args.world_size, args, timeout=600)
    except RanksFailed as e:
        print(f"attn-demo failed:\n{e}")
        return 1
    print(_table(per_rank, args))
    return 0
