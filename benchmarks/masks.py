"""Documents and windows in the plans, against issue 13's targets: work balance, padding, bytes,
window traffic, plan build time. Plans only (no attention runs): the numbers are exact counts.

    python benchmarks/masks.py [--seeds 8] [--out benchmarks/results/masks.json]

Sequences of 128K tokens packed with documents of lognormal lengths (median 2K, mean 8K), one
draw per seed, at P = 8 and 16. The masked plan is the one dist_attn runs (schedule auto) on the
balanced layout; "plain causal" is the plan for the same sequence without documents (auto on
zigzag, Megatron's layout). Bytes: the busiest rank's, forward and backward, Llama shapes
(32 heads, 8 KV heads, head dim 128, bf16).
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

from megatron_lightseq.distattn.plan.plan import Shape  # noqa: E402
from megatron_lightseq.distattn.plan.schedules import build_plan, choose_schedule  # noqa: E402
from megatron_lightseq.planner.masks import documents, megatron_thd_padding  # noqa: E402

TOKENS = 128 * 1024
DOCS = "lognormal:median=2k,mean=8k"
TARGETS = {"balance": 1.05, "bytes_vs_causal": 0.75, "window_bytes_vs_causal": 1 / 8, "build_p8_s": 0.010,
           "build_p64_s": 1.0}


def _shape(p: int) -> Shape:
    return Shape(1, TOKENS // p, 32, 8, 128, torch.bfloat16)


def _busiest_bytes(plan, shape) -> int:
    return max(plan.traffic(r, shape) for r in range(plan.world_size))


def _balance(plan) -> float:
    work = [float(plan.work.area[list(plan.owned(r))].sum()) for r in range(plan.world_size)]
    return max(work) / (sum(work) / len(work))


def _causal_bytes(p: int) -> int:
    shape = _shape(p)
    return _busiest_bytes(build_plan(choose_schedule("zigzag", p, True, shape), layout="zigzag", world_size=p), shape)


def documents_rows(p: int, seeds: int) -> list[dict]:
    rows, causal = [], _causal_bytes(p)
    for seed in range(seeds):
        cu = documents(DOCS, TOKENS, seed)
        schedule = choose_schedule("balanced", p, True, _shape(p), cu_seqlens=cu)
        plan = build_plan(schedule, layout="balanced", world_size=p, cu_seqlens=cu)
        zigzag = build_plan("ring", layout="zigzag", world_size=p, cu_seqlens=cu)
        rows.append({"seed": seed, "documents": len(cu) - 1, "longest": max(b - a for a, b in zip(cu, cu[1:])),
                     "schedule": schedule, "balance": _balance(plan), "balance_zigzag": _balance(zigzag),
                     "padding": plan.layout.padded_tokens - TOKENS, "chunk_tokens": TOKENS // plan.chunk_count,
                     "padding_megatron_thd": megatron_thd_padding(cu, p),
                     "bytes_vs_causal": _busiest_bytes(plan, _shape(p)) / causal})
    return rows


def window_row(p: int, window: int) -> dict:
    shape = _shape(p)
    schedule = choose_schedule("contiguous", p, True, shape, window_size=(window, 0))
    plan = build_plan(schedule, layout="contiguous", world_size=p, window_size=(window, 0), tokens=TOKENS)
    return {"world_size": p, "window": window, "schedule": schedule, "steps": plan.compute_steps,
            "bytes_vs_causal": _busiest_bytes(plan, shape) / _causal_bytes(p)}


def build_times(p: int, seeds: int) -> dict:
    """CPU seconds to build a plan for a new batch (nothing cached), 128K tokens of a few hundred
    documents (lognormal, median 256, mean 512)."""
    times = []
    for seed in range(seeds):
        cu = documents("lognormal:median=256,mean=512", TOKENS, 1000 + seed)
        start = time.process_time()
        build_plan("ring", layout="balanced", world_size=p, cu_seqlens=cu)
        times.append(time.process_time() - start)
    return {"world_size": p, "documents": len(cu) - 1, "median_s": statistics.median(times), "max_s": max(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "masks.json"))
    args = ap.parse_args(argv)
    result = {"tokens": TOKENS, "documents": DOCS, "docs": {}, "targets": {}}
    print(f"{TOKENS // 1024}K tokens, {DOCS}, {args.seeds} draws; masked plan: balanced layout, auto schedule")
    print(f"{'P':>3} {'balance':>8} {'(zigzag)':>9} {'padding':>8} {'(THD)':>7} {'bytes/causal':>13} {'worst':>6}")
    for p in (8, 16):
        rows = documents_rows(p, args.seeds)
        result["docs"][p] = rows
        mean = lambda key: statistics.mean(r[key] for r in rows)
        print(f"{p:>3} {max(r['balance'] for r in rows):>8.3f} {mean('balance_zigzag'):>9.2f} "
              f"{max(r['padding'] for r in rows):>8} {mean('padding_megatron_thd'):>7.0f} "
              f"{mean('bytes_vs_causal'):>13.2f} {max(r['bytes_vs_causal'] for r in rows):>6.2f}")
    result["window"] = window_row(8, 4096)
    w = result["window"]
    print(f"4K window, P=8, contiguous/{w['schedule']}: {w['steps']} steps, bytes {w['bytes_vs_causal']:.3f} of causal")
    result["build"] = [build_times(p, 3) for p in (8, 16, 64)]
    for b in result["build"]:
        print(f"plan build, P={b['world_size']}, {b['documents']} documents: median {b['median_s'] * 1e3:.1f} ms, "
              f"max {b['max_s'] * 1e3:.1f} ms (CPU time)")
    docs = [r for rows in result["docs"].values() for r in rows]
    checks = {
        "balance": (max(r["balance"] for r in docs), TARGETS["balance"]),
        "padding_within_one_chunk": (max(r["padding"] - r["chunk_tokens"] for r in docs), 0),
        "bytes_vs_causal (mean)": (statistics.mean(r["bytes_vs_causal"] for r in docs), TARGETS["bytes_vs_causal"]),
        "bytes_vs_causal (worst draw)": (max(r["bytes_vs_causal"] for r in docs), TARGETS["bytes_vs_causal"]),
        "window_bytes_vs_causal": (w["bytes_vs_causal"], TARGETS["window_bytes_vs_causal"]),
        "build_p8_s": (result["build"][0]["median_s"], TARGETS["build_p8_s"]),
        "build_p64_s": (result["build"][2]["median_s"], TARGETS["build_p64_s"]),
    }
    for name, (value, target) in checks.items():
        value, met = float(value), bool(value <= target)
        result["targets"][name] = {"value": value, "target": target, "met": met}
        print(f"target {name}: {value:.4g} <= {target:.4g}: {'met' if met else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
