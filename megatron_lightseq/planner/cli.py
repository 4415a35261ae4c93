"""``python -m megatron_lightseq plan``: traffic, steps, time, memory and the longest sequence per
GPU for LightSeq schedules against Megatron TP(+SP) and Megatron CP, and the flags to use; with
``--docs`` or ``--window``, what packed documents or a sliding window do to each layout's plan.

    python -m megatron_lightseq plan --model llama-7b [--kv-heads 8] --seq 32k..512k --gpus 16 \\
        --gpus-per-node 8 [--docs lognormal:median=2k,mean=8k | --docs lengths.txt] [--window 4k] \\
        [--json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os

from . import hybrid
from .masks import documents, mask_rows, mask_table, masked_choice, token_count
from .model import MODELS, Machine
from .report import lightseq_flags, recommend, rows_for


def parse_tokens(text: str) -> int:
    count = token_count(text)
    if count is None:
        raise argparse.ArgumentTypeError(f"expected a token count like 32k or 32768, got {text.strip().lower()!r}")
    return count


def parse_window(text: str) -> int:
    """A window of >= 0 tokens, or -1: none (flash-attn's convention, as in ``window_size``)."""
    window = parse_tokens(text)
    if window < -1:
        raise argparse.ArgumentTypeError(f"expected a window of >= 0 tokens, or -1 for none, got {text!r}")
    return window


def _positive(kind):
    """An argparse type: ``kind`` (int or float) > 0; a zero or negative count, bandwidth or memory
    would divide by zero or print negative times."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'} > 0, "
                                             f"got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def parse_seq_range(text: str) -> list[int]:
    """'32k..512k' -> 32K, 64K, ..., 512K (doubling); '32k' -> [32K]. HIGH must be LOW times a
    power of two, so that the doubling reaches it rather than stopping short of it."""
    lo, _, hi = text.partition("..")
    lo, hi = parse_tokens(lo), parse_tokens(hi or lo)
    if lo <= 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected LOW..HIGH with 0 < LOW <= HIGH, got {text!r}")
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    if out[-1] != hi:
        raise argparse.ArgumentTypeError(
            f"expected LOW..HIGH with HIGH = LOW x a power of two (the lengths double from LOW), got {text!r}: "
            f"{hi} is not {lo} x 2^n; the nearest ranges end at {out[-1]} or {out[-1] * 2}")
    return out


def parse_args(argv=None):
    # the docstring's first paragraph, not its first line, which stops mid-sentence
    description = " ".join(__doc__.split("\n\n")[0].split()).replace("``", "")
    p = argparse.ArgumentParser(prog="python -m megatron_lightseq plan", description=description)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-7b")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab"):
        p.add_argument(f"--{name}", type=_positive(int), help="override the model's value")
    p.add_argument("--seq", type=parse_seq_range, default=parse_seq_range("32k..512k"), metavar="LEN|LOW..HIGH",
                   help="a sequence length (32k, 32768) or a range LOW..HIGH that doubles from LOW: 32k..128k is "
                        "32K, 64K, 128K; HIGH must be LOW times a power of two (default 32k..512k)")
    p.add_argument("--gpus", type=_positive(int), default=8, help="GPUs in the sequence-parallel (or TP) group")
    p.add_argument("--gpus-per-node", type=_positive(int), default=8)
    p.add_argument("--gpu-memory-gib", type=_positive(float), default=Machine.gpu_memory_gib)
    p.add_argument("--nvlink-gbs", type=_positive(float), default=Machine.nvlink_gbs)
    p.add_argument("--ib-gbs", type=_positive(float), default=Machine.ib_gbs)
    p.add_argument("--fsdp", action="store_true",
                   help="shard params and grads too (Megatron-FSDP), not only the optimizer state")
    p.add_argument("--docs", metavar="SPEC", help="packed documents: a file of lengths, or lognormal:median=2k,"
                                                  "mean=8k, or fixed:4k (planner/masks.py)")
    p.add_argument("--window", type=parse_window, default=-1,
                   help="a sliding window of this many tokens before each token (default -1: none)")
    p.add_argument("--seed", type=int, default=0, help="for synthetic documents")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="PNG", help="draw time and traffic per system with matplotlib")
    args = p.parse_args(argv)
    overrides = {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in
                 ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model = dataclasses.replace(MODELS[args.model], **overrides)
    if overrides.get("kv_heads"):
        model = dataclasses.replace(model, name=f"{args.model} ({model.kv_heads} KV heads)")
    if model.hidden % model.heads:
        p.error(f"hidden ({model.hidden}) must divide by heads ({model.heads})")
    if model.heads % model.kv_heads:
        p.error(f"heads ({model.heads}) must divide by kv-heads ({model.kv_heads})")
    bad = [s for s in args.seq if s % (2 * args.gpus)]
    if bad:
        p.error(f"every sequence length must be a multiple of 2 x gpus = {2 * args.gpus}, got {bad}")
    if args.plot:  # found out before the planning, not after it
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            p.error(f"--plot {args.plot}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            p.error(f"--plot {args.plot}: the folder {folder} is not writable")
        if importlib.util.find_spec("matplotlib") is None:
            p.error("--plot needs matplotlib (pip install matplotlib)")
    args.cu_seqlens = {}
    if args.docs:  # drawn here so that a bad spec is an error before the planning
        try:
            args.cu_seqlens = {seq: documents(args.docs, seq, args.seed) for seq in args.seq}
        except (OSError, ValueError) as e:
            p.error(f"--docs {args.docs}: {e}")
    machine = Machine(gpu_memory_gib=args.gpu_memory_gib, nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs)
    return args, model, machine


def _recommended(rows, args, machine, masked):
    """(system, flags) to recommend, or None when no LightSeq plan fits. With documents or a window
    the layout and schedule are the masked table's choice (masks.masked_choice), not the plain
    causal one; for documents, a balanced choice is given as auto, which is balanced for packed
    data (zigzag would override it)."""
    best = recommend(rows, machine)  # memory does not depend on the layout: the same fits either way
    if best is None or masked is None:
        return best and (best.system, best.flags)
    cu, mask = masked
    pick = masked_choice(mask)
    layout = "auto" if cu and pick.layout == "balanced" else pick.layout
    return (f"lightseq {pick.layout}/{pick.schedule}",
            lightseq_flags(args.gpus, layout, pick.schedule, fsdp=args.fsdp, window=args.window))


def _table(model, args, machine, by_seq, recommended) -> str:
    lines = [f"{model.name}: {model.layers} layers, hidden {model.hidden}, {model.heads} heads, {model.kv_heads} KV "
             f"heads; {args.gpus} GPUs, {args.gpus_per_node} per node; batch 1, bf16, full recompute; "
             f"{'params+grads+optimizer sharded (FSDP)' if args.fsdp else 'optimizer sharded (distributed optimizer)'}",
             f"{'seq':>6} {'system':<26} {'MiB/GPU/layer':>13} {'steps':>5} {'ms/layer':>9} {'GiB/GPU':>8} "
             f"{'max seq':>8}"]
    for seq, rows in by_seq.items():
        for r in rows:
            fits = "" if r.memory_bytes <= machine.budget_bytes else " (OOM)"
            lines.append(f"{seq // 1024:>5}K {r.system:<26} {r.traffic_bytes / 2**20:>13.1f} {r.steps:>5} "
                         f"{r.seconds * 1e3:>9.2f} {r.memory_bytes / 2**30:>8.1f} {r.max_seq // 1024:>7}K{fits}")
        best = recommended[seq]
        if best:
            what = ("documents and window" if args.docs and args.window >= 0 else "documents" if args.docs
                    else "window" if args.window >= 0 else "")
            lines.append(f"{'':>6} -> {best[0]}" + (f" (chosen from the {what} table below)" if what else "") + f": {best[1]}")
        else:
            lines.append(f"{'':>6} -> no LightSeq plan fits {args.gpu_memory_gib:g} GiB per GPU at {seq // 1024}K "
                         f"(max seq: the longest that fits); use more GPUs, a shorter sequence" + ("" if args.fsdp else " or --fsdp"))
    return "\n".join(lines)


def _plot(path: str, by_seq, model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(by_seq)
    systems = [r.system for r in by_seq[seqs[0]]]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(systems):
        ax_t.plot([s // 1024 for s in seqs], [by_seq[s][i].seconds * 1e3 for s in seqs], marker="o", label=name)
        ax_b.plot([s // 1024 for s in seqs], [by_seq[s][i].traffic_bytes / 2**20 for s in seqs], marker="o", label=name)
    for ax, label in ((ax_t, "predicted ms per layer (fwd+bwd)"), (ax_b, "MiB sent per GPU per layer")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (K tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(model.name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args, model, machine = parse_args(argv)
    by_seq = {seq: rows_for(model, seq, args.gpus, args.gpus_per_node, machine, fsdp=args.fsdp) for seq in args.seq}
    masked = {}
    if args.docs or args.window >= 0:
        cus = args.cu_seqlens  # drawn (and checked) by parse_args
        masked = {seq: (cus.get(seq), mask_rows(model, seq, args.gpus, cu_seqlens=cus.get(seq), window=args.window))
                  for seq in args.seq}
    recommended = {seq: _recommended(rows, args, machine, masked.get(seq)) for seq, rows in by_seq.items()}
    # hybrid head x sequence splits (planner/hybrid.py), for plain causal sequences
    hybrid_text, hybrid_data = hybrid.report(model, args.seq, args.gpus, args.gpus_per_node, machine) \
        if not masked else ("", {})
    recommended = {seq: hybrid.overrides(best, by_seq[seq], hybrid_data.get(seq)) for seq, best in recommended.items()}
    if args.json:
        print(json.dumps({"model": dataclasses.asdict(model), "machine": dataclasses.asdict(machine),
                          "gpus": args.gpus, "gpus_per_node": args.gpus_per_node,
                          "rows": [dataclasses.asdict(r) for rows in by_seq.values() for r in rows],
                          "recommended": {seq: best and best[0] for seq, best in recommended.items()},
                          "recommended_flags": {seq: best and best[1] for seq, best in recommended.items()},
                          "masks": {seq: [dataclasses.asdict(r) for r in rows] for seq, (_, rows) in masked.items()},
                          "hybrid": hybrid_data},
                         indent=1))
    else:
        print(_table(model, args, machine, by_seq, recommended))
        if hybrid_text:
            print(hybrid_text)
        for seq, (cu, rows) in masked.items():
            print(mask_table(model, seq, args.gpus, rows, cu, args.window))
    if args.plot:
        _plot(args.plot, by_seq, model)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
