"""The ``plan`` command's arguments: the model (a preset or its sizes), the sequence, the GPUs, the
global batch, the machine, recompute and optimizer sharding; every error is a one-line argparse
message before any planning."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os

from .config import configurations
from .masks import documents, token_count
from .model import MODELS, Machine

MODEL_FIELDS = {"layers": "transformer layers", "hidden": "hidden size", "heads": "attention heads",
                "kv-heads": "K/V heads (fewer than --heads: GQA, 1: MQA)", "ffn": "MLP hidden size",
                "vocab": "vocabulary size"}
MACHINE_FIELDS = {  # flag: (Machine field, unit (the metavar), help[, what the default is])
    "gpu-memory-gib": ("gpu_memory_gib", "GiB", "memory per GPU in GiB, of which {usable:g}%% is planned for (allocator "
                                                "slack, CUDA context, NCCL buffers; --usable-fraction)"),
    "usable-fraction": ("usable_fraction", "SHARE", "share of the memory planned for"),
    "nvlink-gbs": ("nvlink_gbs", "GB/s", "NVLink bandwidth within a node, per GPU and direction, in GB/s = 10^9 "
                                         "bytes/s, not Gb/s"),
    "ib-gbs": ("ib_gbs", "GB/s", "network bandwidth between nodes, per GPU and direction, in GB/s = 10^9 bytes/s, "
                                 "not Gb/s", ", InfiniBand NDR 400 Gb/s"),
    "latency-us": ("latency_us", "us", "latency per transfer or collective step, microseconds"),
    "gemm-tflops": ("gemm_tflops", "TFLOP/s", "sustained bf16 GEMM rate of a layer's matmuls"),
    "peak-tflops": ("peak_tflops", "TFLOP/s", "peak bf16 rate MFU is measured against"),
}


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


def parse_rates(text: str) -> tuple:
    """'1k:120,2k:234' -> ((1024, 120.0), (2048, 234.0)): attention TFLOP/s by block size."""
    try:
        rows = tuple(sorted((parse_tokens(t), float(r)) for t, r in (i.split(":") for i in text.split(","))))
    except (ValueError, argparse.ArgumentTypeError):
        rows = ()
    if not rows or any(t <= 0 or r <= 0 for t, r in rows):
        raise argparse.ArgumentTypeError(f"expected TOKENS:TFLOPS pairs like 1k:120,2k:234, got {text!r}")
    return rows


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


def matplotlib_missing() -> str | None:
    """None when matplotlib imports, else what to install: it is an optional extra (setup.py's
    "plot"), so a plot asked for without it is a one-line message before the work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib, which does not import here ({e}): pip install -e .[plot] in a clone of " \
               "megatron-lightseq, or pip install matplotlib"
    return None


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="llama-7b",
                   help="the model whose sizes the flags below override (default: %(default)s)")
    for name, what in MODEL_FIELDS.items():
        p.add_argument(f"--{name}", type=_positive(int), metavar="N", help=f"{what} (default: the model's)")
    p.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None,
                   help="gated (SwiGLU) MLP, else GeLU (default: the model's)")


def _machine_arguments(p: argparse.ArgumentParser) -> None:
    machine = Machine()
    for flag, (field, unit, what, *note) in MACHINE_FIELDS.items():
        p.add_argument(f"--{flag}", type=_positive(float), default=getattr(machine, field), metavar=unit,
                       help=what.format(usable=machine.usable_fraction * 100) + f" (default: %(default)g{''.join(note)})")
    p.add_argument("--attn-full", type=parse_rates, metavar="T:R,...",
                   help="attention fwd+bwd TFLOP/s of full blocks by block size, e.g. 1k:120,8k:309 (default: "
                        "FA2 on an H200, planner/model.py)")
    p.add_argument("--attn-diag", type=parse_rates, metavar="T:R,...",
                   help="the same for causal diagonal blocks (default: FA2 on an H200)")


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_lightseq plan", description=description)
    _model_arguments(p)
    p.add_argument("--seq", type=parse_seq_range, default="128k", metavar="LEN|LOW..HIGH",
                   help="tokens per sequence (32k, 1.5k, 32768), or a range LOW..HIGH doubling from LOW (HIGH = LOW x "
                        "2^n): 32k..128k is 32K, 64K, 128K, one answer each (default: %(default)s)")
    p.add_argument("--gpus", type=_positive(int), default=8, metavar="N", help="GPUs of the run (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=_positive(int), default=8, metavar="N",
                   help="GPUs per node: transfers between them take NVLink, the others the network (default: "
                        "%(default)s)")
    p.add_argument("--global-batch", type=_positive(int), metavar="N",
                   help="sequences per step (default: the smallest with which the most data-parallel configuration "
                        "that fits uses every GPU, one sequence per replica)")
    for size in ("tp", "cp", "pp"):
        p.add_argument(f"--{size}", type=_positive(int), metavar="N",
                       help=f"hold the {size.upper()} size; --tp, --cp and --pp together: the per-layer table of "
                            "that configuration (default: searched)")
    p.add_argument("--recompute", choices=("full", "none", "both"), default="both",
                   help="activation recompute searched: full (one checkpoint per layer; the plugin's remat skips "
                        "the attention forward in it), none (every activation kept, where it fits), or both, so "
                        "that each system's best is its best either way (default: %(default)s)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard params and grads too (Megatron-FSDP), not only the optimizer state (distributed "
                        "optimizer)")
    _machine_arguments(p)
    p.add_argument("--docs", metavar="SPEC", help="packed documents: a file of lengths, or lognormal:median=2k,"
                                                  "mean=8k, or fixed:4k (planner/masks.py) (default: none)")
    p.add_argument("--window", type=parse_window, default=-1, metavar="TOKENS",
                   help="a sliding window of this many tokens before each token (default: %(default)s, none)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic --docs (default: %(default)s)")
    p.add_argument("--top", type=_positive(int), default=5, metavar="N",
                   help="configurations listed per system (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on stderr past 2 s)")
    p.add_argument("--plot", metavar="PNG", help="also draw tokens/s per GPU and memory per configuration (with "
                                                 "--tp/--cp/--pp: time and bytes per layer) to this PNG (needs "
                                                 "matplotlib: pip install -e .[plot]) (default: none)")
    return p


def _model(p, args):
    overrides = {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in (*MODEL_FIELDS, "swiglu")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model = dataclasses.replace(MODELS[args.model], **overrides)
    if overrides:
        changed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in overrides.items())
        model = dataclasses.replace(model, name=f"{args.model} ({changed})")
    if model.hidden % model.heads:
        p.error(f"hidden ({model.hidden}) must divide by heads ({model.heads})")
    if model.heads % model.kv_heads:
        p.error(f"heads ({model.heads}) must divide by kv-heads ({model.kv_heads})")
    return model


def _check_plot(p, path: str) -> None:
    """Found out before the planning, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        p.error(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        p.error(f"--plot {path}: the folder {folder} is not writable")
    missing = matplotlib_missing()
    if missing:
        p.error(f"--plot needs {missing}")


def _check_sizes(p, args, model) -> None:
    """The fixed sizes and the global batch leave at least one configuration Megatron accepts."""
    fixed = args.fixed
    if args.layer_table:
        group = fixed["tp"] * fixed["cp"] * fixed["pp"]
        if args.gpus % group:
            p.error(f"--tp x --cp x --pp = {group} must divide --gpus {args.gpus}")
        args.global_batch = args.global_batch or args.gpus // group
        bad = [s for s in args.seq if fixed["cp"] > 1 and s % (2 * fixed["cp"])]
        if bad:
            p.error(f"every sequence length must be a multiple of 2 x CP = {2 * fixed['cp']}, got {bad}")
    elif len(args.seq) > 1 and args.plot:
        p.error("--plot draws one search: give one --seq length (or --tp, --cp and --pp for the per-layer plot)")
    batch = args.global_batch or args.gpus
    if not configurations(model, max(args.seq), args.gpus, args.gpus_per_node, batch, **fixed):
        p.error(f"no configuration Megatron accepts for {args.gpus} GPUs ({args.gpus_per_node} per node), "
                f"{max(args.seq)} tokens, global batch {batch}" + (f", {fixed}" if fixed else "") +
                ": TP must divide the heads and the GPUs per node, PP the layers, 2 x CP the sequence, DP the batch")


def parse_args(p: argparse.ArgumentParser, argv=None):
    args = p.parse_args(argv)
    model = _model(p, args)
    args.fixed = {k: getattr(args, k) for k in ("tp", "cp", "pp") if getattr(args, k) is not None}
    args.layer_table = len(args.fixed) == 3
    args.recompute = ("full", "none") if args.recompute == "both" else (args.recompute,)
    _check_sizes(p, args, model)
    if args.plot:
        _check_plot(p, args.plot)
    args.cu_seqlens = {}
    if args.docs:  # drawn here so that a bad spec is an error before the planning
        try:
            args.cu_seqlens = {seq: documents(args.docs, seq, args.seed) for seq in args.seq}
        except (OSError, ValueError) as e:
            p.error(f"--docs {args.docs}: {e}")
    machine = Machine(**{field: getattr(args, flag.replace("-", "_")) for flag, (field, *_) in MACHINE_FIELDS.items()},
                      **{k: getattr(args, k) for k in ("attn_full", "attn_diag") if getattr(args, k)})
    if machine.usable_fraction > 1:
        p.error(f"--usable-fraction must be at most 1, got {machine.usable_fraction:g}")
    return args, model, machine
