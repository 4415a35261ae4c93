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
import json
import math
import os

from . import hybrid
from .masks import documents, mask_rows, mask_table, masked_choice, token_count
from .model import MODELS, Machine
from .report import assumptions, lightseq_flags, recommend, rows_for


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


MODEL_FIELDS = {"layers": "transformer layers", "hidden": "hidden size", "heads": "attention heads",
                "kv-heads": "K/V heads (fewer than --heads: GQA, 1: MQA)", "ffn": "MLP hidden size (SwiGLU)",
                "vocab": "vocabulary size"}


def matplotlib_missing() -> str | None:
    """None when matplotlib imports, else what is missing and how to install it, to follow "needs":
    it is an optional extra (setup.py's "plot"), so a plot asked for without it is a one-line
    message before the work, not a traceback after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib, which does not import here ({e}): pip install -e .[plot] in a clone of " \
               "megatron-lightseq, or pip install matplotlib"
    return None


def build_parser() -> argparse.ArgumentParser:
    # the docstring's first paragraph, not its first line, which stops mid-sentence
    description = " ".join(__doc__.split("\n\n")[0].split()).replace("``", "")
    machine = Machine()
    p = argparse.ArgumentParser(prog="python -m megatron_lightseq plan", description=description)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-7b", help="the model whose sizes the flags below override (default: %(default)s)")
    for name, what in MODEL_FIELDS.items():
        p.add_argument(f"--{name}", type=_positive(int), metavar="N", help=f"{what} (default: the model's)")
    p.add_argument("--seq", type=parse_seq_range, default="32k..512k", metavar="LEN|LOW..HIGH",
                   help="tokens per sequence: a length (32k, 32768) or a range LOW..HIGH that doubles from LOW: "
                        "32k..128k is 32K, 64K, 128K; HIGH must be LOW times a power of two (default: %(default)s)")
    p.add_argument("--gpus", type=_positive(int), default=8, metavar="N",
                   help="GPUs that split the sequence (the CP size); TP uses the largest degree up to N that divides "
                        "the heads (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=_positive(int), default=8, metavar="N",
                   help="GPUs per node: transfers between them take NVLink, the others the network (default: "
                        "%(default)s)")
    p.add_argument("--gpu-memory-gib", type=_positive(float), default=machine.gpu_memory_gib, metavar="GiB",
                   help=f"memory per GPU in GiB, of which {machine.usable_fraction * 100:g}%% is planned for (allocator "
                        "slack, CUDA context, NCCL buffers) (default: %(default)g)")
    p.add_argument("--nvlink-gbs", type=_positive(float), default=machine.nvlink_gbs, metavar="GB/s",
                   help="NVLink bandwidth within a node, per GPU and direction, in GB/s = 10^9 bytes/s, not Gb/s "
                        "(default: %(default)g)")
    p.add_argument("--ib-gbs", type=_positive(float), default=machine.ib_gbs, metavar="GB/s",
                   help="network bandwidth between nodes, per GPU and direction, in GB/s = 10^9 bytes/s, not Gb/s "
                        "(default: %(default)g, InfiniBand NDR 400 Gb/s)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard params and grads too (Megatron-FSDP), not only the optimizer state")
    p.add_argument("--docs", metavar="SPEC", help="packed documents: a file of lengths, or lognormal:median=2k,"
                                                  "mean=8k, or fixed:4k (planner/masks.py) (default: none)")
    p.add_argument("--window", type=parse_window, default=-1, metavar="TOKENS",
                   help="a sliding window of this many tokens before each token (default: %(default)s, none)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic --docs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="PNG", help="also draw time and traffic per system to this PNG (needs matplotlib: "
                                                 "pip install -e .[plot]) (default: none)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    overrides = {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in MODEL_FIELDS}
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
        missing = matplotlib_missing()
        if missing:
            p.error(f"--plot needs {missing}")
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
    lines = [*assumptions(model, args.gpus, args.gpus_per_node, machine, fsdp=args.fsdp),
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


# Every series gets its own marker and dash pattern (and colour), whatever series the rows hold:
# two with equal values (zigzag/ring and zigzag/lightseq at long sequences) still both show.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">")
DASHES = ("-", "--", ":", "-.")


def _tokens_label(k: int) -> str:
    return f"{k // 1024}M" if k >= 1024 and k % 1024 == 0 else f"{k}K"


def _plot(path: str, by_seq, model, machine, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _figure(by_seq, model, machine, args)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _figure(by_seq, model, machine, args):
    """Predicted time and bytes per layer against the sequence length, one series per system."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    seqs = list(by_seq)
    ks = [s // 1024 for s in seqs]
    systems = [r.system for r in by_seq[seqs[0]]]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    for i, name in enumerate(systems):
        rows = [by_seq[s][i] for s in seqs]
        oom = [r.seq // 1024 for r in rows if r.memory_bytes > machine.budget_bytes]
        label = name + (f" (OOM from {_tokens_label(oom[0])})" if oom else "")
        style = dict(marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)], markerfacecolor="none",
                     markersize=7, color=f"C{i % 10}", label=label)
        ax_t.plot(ks, [r.seconds * 1e3 for r in rows], **style)
        ax_b.plot(ks, [r.traffic_bytes / 2**20 for r in rows], **style)
    for ax, label in ((ax_t, "predicted ms per layer, forward + backward"),
                      (ax_b, "MiB sent per GPU per layer, forward + backward")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [_tokens_label(k) for k in ks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 1 else f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model.name} on {args.gpus} GPUs ({args.gpus_per_node} per node): {machine.gpu_memory_gib:g} GiB "
                 f"per GPU, NVLink {machine.nvlink_gbs:g} GB/s, network {machine.ib_gbs:g} GB/s, GEMMs "
                 f"{machine.gemm_tflops:g} TFLOP/s; batch 1, full recompute", fontsize=10)
    fig.tight_layout()
    return fig


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
        _plot(args.plot, by_seq, model, machine, args)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
