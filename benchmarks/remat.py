"""Rematerialization-aware checkpointing, measured: attention forwards, bytes sent and bytes kept
per layer for one training step under Megatron's full recompute, with and without remat.

    python benchmarks/remat.py [--cp 2] [--layers 4] [--out benchmarks/results/remat_cpu.json]

On CPU it runs a tiny GPTModel on local gloo ranks (with the CPU stand-ins of
megatron_lightseq/jobs/cpu_shims.py); the per-layer memory table for Llama-7B shapes follows from the
same formulas the measurement checks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _measure(rank, world_size, layers):
    import dataclasses

    import megatron_lightseq as mls
    from gpt_cases import Case, build_model, full_batch, init_parallel, setup_rank, total_loss

    base = Case(cp=world_size, layers=layers, recompute="uniform", recompute_layers=1)
    mlm = setup_rank(base)
    rows = {}
    for name, case in {"full recompute + remat": base,
                       "full recompute, --lightseq-no-remat": dataclasses.replace(base, remat=False),
                       "no recompute": dataclasses.replace(base, recompute=None)}.items():
        init_parallel(case, case.cp)
        model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
        batch = mlm.get_batch_on_this_cp_rank(full_batch(), layout=case.layout)
        with mls.trace() as t:
            loss = total_loss(model, batch)
            stashes = [layer.self_attention.core_attention.stash for layer in model.decoder.layers]
            kept = sum(out.numel() * out.element_size() + lse.numel() * lse.element_size()
                       for s in stashes for _, out, lse in s._waiting)
            loss.backward()
        rows[name] = dict(t.as_dict(), stash_bytes_per_layer=kept // layers)
    return rows


def llama7b_memory(seq: int, cp: int, dtype_bytes: int = 2) -> dict:
    """Bytes kept per layer per microbatch between forward and backward (batch 1, hidden 4096,
    32 heads): Megatron's full recompute keeps the layer input; remat adds out and the fp32 lse."""
    tokens = seq // cp
    hidden = tokens * 4096 * dtype_bytes
    out, lse = tokens * 4096 * dtype_bytes, 32 * tokens * 4
    return {"seq": seq, "cp": cp, "full_recompute_bytes": hidden, "remat_bytes": hidden + out + lse,
            "ratio": (hidden + out + lse) / hidden}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "remat_cpu.json"))
    args = p.parse_args(argv)
    from harness import run_ranks

    rows = run_ranks(args.cp, _measure, args.layers)[0]
    print(f"one training step, tiny GPT, {args.layers} layers, CP={args.cp} (rank 0)")
    print(f"{'':<38} {'attn fwd':>8} {'attn bwd':>8} {'bytes sent':>11} {'kept/layer (out+lse)':>21}")
    for name, r in rows.items():
        print(f"{name:<38} {r['forward_calls']:>8} {r['backward_calls']:>8} {r['bytes_sent']:>11} "
              f"{r['stash_bytes_per_layer']:>21}")
    memory = [llama7b_memory(seq, cp) for seq, cp in ((32768, 1), (32768, 8), (131072, 8), (524288, 16))]
    print("\nLlama-7B, bytes kept per layer per microbatch under full recompute (bf16, batch 1):")
    for m in memory:
        print(f"  {m['seq'] // 1024}K tokens, CP={m['cp']}: Megatron {m['full_recompute_bytes'] / 2**20:.0f} MiB, "
              f"with remat {m['remat_bytes'] / 2**20:.0f} MiB ({m['ratio']:.2f}x)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": "cpu (gloo)", "torch": torch.__version__, "layers": args.layers, "cp": args.cp,
                   "step": rows, "llama7b_memory_per_layer": memory}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
