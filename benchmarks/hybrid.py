"""Hybrid head x sequence parallelism against issue 20's targets, from the planner's model
(planner/hybrid.py; predictions, not timings): Llama-7B (32 heads, head dim 128, bf16) at 128K
tokens on 64 GPUs in 8-GPU nodes (NVLink 450 GB/s each way, InfiniBand 50 GB/s per GPU), MHA,
GQA-8 and MQA: every split's predicted time per layer and cross-node bytes per GPU per layer,
the recommended one and why; and how long the planner takes at P = 512.

    python benchmarks/hybrid.py [--out benchmarks/results/hybrid_planner.json]

Prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_lightseq.planner import hybrid  # noqa: E402
from megatron_lightseq.planner.model import MODELS, Machine  # noqa: E402

SEQ, GPUS, PER_NODE = 128 * 1024, 64, 8
HEADS = {"MHA": 32, "GQA-8": 8, "MQA": 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "hybrid_planner.json"))
    args = p.parse_args(argv)
    machine = Machine()
    results = {"seq": SEQ, "gpus": GPUS, "gpus_per_node": PER_NODE, "machine": dataclasses.asdict(machine),
               "models": {}}
    print(f"Llama-7B, {SEQ // 1024}K tokens, {GPUS} GPUs, {PER_NODE} per node (predicted, per layer fwd+bwd)")
    print(f"{'heads':<6} {'split':<26} {'schedule':<9} {'ms/layer':>9} {'x flat':>7} {'cross-node MiB/GPU':>19} "
          f"{'x fewer':>8} {'K/V copies':>10}")
    for label, kv in HEADS.items():
        model = dataclasses.replace(MODELS["llama-7b"], kv_heads=kv)
        found = hybrid.choices(model, SEQ, GPUS, PER_NODE, machine)
        best, flat = hybrid.recommend(found), found[0]
        for c in found:
            mark = " <-" if c is best else ""
            print(f"{label:<6} {hybrid.name_of(c):<26} {c.schedule:<9} {c.seconds * 1e3:>9.2f} "
                  f"{c.seconds / flat.seconds:>7.2f} {c.cross_node_bytes / 2**20:>19.1f} "
                  f"{flat.cross_node_bytes / max(c.cross_node_bytes, 1):>8.1f} {c.replicated_kv_heads:>10}{mark}")
        results["models"][label] = dict(
            kv_heads=kv, choices=hybrid.as_dicts(found), recommended=hybrid.name_of(best),
            flags=hybrid.flags_of(best, GPUS), why=hybrid.why(model, SEQ, found, best),
            time_vs_flat=best.seconds / flat.seconds,
            cross_node_fewer=flat.cross_node_bytes / max(best.cross_node_bytes, 1),
            target_time_met=best.seconds <= 0.8 * flat.seconds,
            target_bytes_met=best.cross_node_bytes * best.inner <= flat.cross_node_bytes)
        print(f"{'':<6} -> {results['models'][label]['why']}")
    start = time.perf_counter()
    hybrid.choices(MODELS["llama-7b"], 512 * 1024, 512, PER_NODE, machine)
    results["planner_seconds_p512"] = time.perf_counter() - start
    print(f"planner, every split of P = 512 (512K tokens): {results['planner_seconds_p512']:.2f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
