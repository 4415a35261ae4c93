"""How long one rank takes to build its plan (its view, ``build_plan(..., rank=r)``), cold:
every plan, layout and area cache cleared first, as for a new shape or a new batch of documents.

    python benchmarks/plan_build.py [--max-p 4096] [--docs-max-p 512] [--out benchmarks/results/plan_build.json]

Plain causal: P = 8, 16, ..., --max-p for every layout x schedule (the balanced layout cuts the
sequence for a length: 4K tokens a rank, up to --balanced-max-p, since its chunk-pair matrix is
dense). Documents: 4K tokens a rank packed with documents of lognormal lengths (median 2K, mean
8K; seed 0), balanced layout, ring and lightseq, P = 8 .. --docs-max-p: the time per batch. Each
time is the slowest of ranks 0, P/2 and P-1, the best of --repeats (the machine may be shared).
The whole plan's time (every rank's steps, as before per-rank views) is shown up to --whole-max-p
for the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_lightseq.distattn.plan import layout as layout_module, schedules, work  # noqa: E402
from megatron_lightseq.distattn.plan.layout import LAYOUTS  # noqa: E402
from megatron_lightseq.distattn.plan.schedules import SCHEDULES, build_plan  # noqa: E402
from megatron_lightseq.planner.masks import documents  # noqa: E402

TOKENS_PER_RANK = 4096
DOCS = "lognormal:median=2k,mean=8k"
TARGETS = {"plain_p512_s": 0.050, "plain_p4096_s": 1.0, "documents_p128_s": 0.020}


def _clear() -> None:
    for cached in (schedules.rank_plan, schedules.plan_for, schedules._masked_plan, schedules.auto_schedule,
                   layout_module.layout_of, work.chunk_pairs):
        cached.cache_clear()


def _time(build, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _clear()
        start = time.perf_counter()
        build()
        best = min(best, time.perf_counter() - start)
    return best


def _row(p: int, options: dict, repeats: int, whole: bool) -> dict:
    """Seconds for the slowest of three ranks' views, and for the whole plan where asked."""
    ranks = sorted({0, p // 2, p - 1})
    row = {"world_size": p, "rank_s": max(_time(lambda r=r: build_plan(**options, world_size=p, rank=r), repeats)
                                          for r in ranks)}
    if whole:
        row["whole_s"] = _time(lambda: build_plan(**options, world_size=p), repeats)
    return row


def _sizes(top: int) -> list[int]:
    sizes, p = [], 8
    while p <= top:
        sizes.append(p)
        p *= 2
    return sizes


def plain_rows(args) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        for schedule in SCHEDULES:
            for p in _sizes(args.balanced_max_p if layout == "balanced" else args.max_p):
                tokens = TOKENS_PER_RANK * p if layout == "balanced" else None
                options = dict(schedule=schedule, layout=layout, causal=True, tokens=tokens)
                rows.append({"layout": layout, "schedule": schedule,
                             **_row(p, options, args.repeats, p <= args.whole_max_p)})
                _show("plain causal", rows[-1])
    return rows


def documents_rows(args) -> list[dict]:
    rows = []
    for schedule in SCHEDULES:
        for p in _sizes(args.docs_max_p):
            cu = documents(DOCS, TOKENS_PER_RANK * p, 0)
            options = dict(schedule=schedule, layout="balanced", cu_seqlens=cu)
            rows.append({"layout": "balanced", "schedule": schedule, "documents": len(cu) - 1,
                         **_row(p, options, args.repeats, p <= args.whole_max_p)})
            _show("documents", rows[-1])
    return rows


def _show(kind: str, row: dict) -> None:
    whole = row.get("whole_s")
    ratio = f"{whole * 1e3:>10.1f} {whole / row['rank_s']:>7.1f}x" if whole else f"{'':>10} {'':>8}"
    print(f"{kind:<13} {row['layout']:<11} {row['schedule']:<9} {row['world_size']:>5} {row['rank_s'] * 1e3:>10.2f} "
          f"{ratio}", flush=True)


def _target(rows: list[dict], p: int, what: str) -> float | None:
    """The slowest schedule x layout at P = p (None where not measured)."""
    times = [r["rank_s"] for r in rows if r["world_size"] == p and (what == "documents" or r["layout"] != "balanced")]
    return max(times) if times else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-p", type=int, default=4096)
    ap.add_argument("--balanced-max-p", type=int, default=256)
    ap.add_argument("--docs-max-p", type=int, default=512)
    ap.add_argument("--whole-max-p", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "plan_build.json"))
    args = ap.parse_args(argv)
    print(f"{'':<13} {'layout':<11} {'schedule':<9} {'P':>5} {'rank (ms)':>10} {'whole (ms)':>10} {'ratio':>8}")
    result = {"tokens_per_rank": TOKENS_PER_RANK, "documents": DOCS, "plain_causal": plain_rows(args),
              "documents_rows": documents_rows(args), "targets": {}}
    # Targets on the plain layouts (contiguous, zigzag); the balanced layout is a cut for a length.
    checks = {"plain_p512_s": _target(result["plain_causal"], 512, "plain"),
              "plain_p4096_s": _target(result["plain_causal"], 4096, "plain"),
              "documents_p128_s": _target(result["documents_rows"], 128, "documents")}
    for name, value in checks.items():
        if value is None:
            continue
        met = bool(value <= TARGETS[name])
        result["targets"][name] = {"value": value, "target": TARGETS[name], "met": met}
        print(f"target {name}: {value * 1e3:.1f} ms <= {TARGETS[name] * 1e3:.0f} ms: {'met' if met else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
