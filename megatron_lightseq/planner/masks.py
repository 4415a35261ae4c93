"""What documents and windows do to the plans: work balance, steps, bytes and padding per layout
and schedule, next to the plain causal plan on the same sequence and to Megatron's THD padding.

Documents come from a file of lengths or a named synthetic distribution:
``lognormal:median=2k,mean=8k`` (seeded), ``fixed:4k`` (all one length).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace

from ..distattn import Shape, build_plan, choose_schedule
from .model import ModelSpec
from .traffic import attention_shape

MASKED_VARIANTS = [(layout, schedule) for layout in ("balanced", "zigzag", "contiguous")
                   for schedule in ("ring", "lightseq")]


DISTRIBUTIONS = {"lognormal": ("median", "mean"), "fixed": ()}  # kind -> its key=value parameters


def token_count(text: str) -> int | None:
    """'4k' -> 4096, '1m' -> 1048576, '300' -> 300; None for anything else (each caller says why)."""
    text = text.strip().lower()
    try:
        return int(float(text.rstrip("km")) * {"k": 1024, "m": 1024**2}.get(text[-1:], 1))
    except (ValueError, OverflowError):  # OverflowError: 'inf'
        return None


def _tokens(text: str, what: str) -> int:
    """A token count; ValueError naming ``what`` (e.g. 'lognormal: median') on anything else."""
    count = token_count(text)
    if count is None:
        raise ValueError(f"{what}: expected a token count like 2k or 2048, got {text.strip().lower()!r}")
    return count


def _options(kind: str, params: str) -> dict[str, str]:
    """'median=2k,mean=8k' -> {'median': '2k', 'mean': '8k'}, only the keys ``kind`` takes."""
    allowed = DISTRIBUTIONS[kind]
    options = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq or "=" in value or not key:
            raise ValueError(f"{kind}: expected key=value pairs separated by commas, got {item!r}")
        if key not in allowed:
            raise ValueError(f"{kind}: unknown parameter {key!r}; it takes {', '.join(allowed)}")
        options[key] = value
    return options


def _file_lengths(path: str) -> list[int]:
    lengths = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            for word in line.split():
                try:
                    length = int(word)
                except ValueError:
                    length = 0
                if length < 1:
                    raise ValueError(f"{path}, line {number}: expected positive integer document lengths "
                                     f"separated by whitespace, got {word!r}")
                lengths.append(length)
    if not lengths:
        raise ValueError(f"{path}: expected positive integer document lengths, the file has none")
    return lengths


def documents(spec: str, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """cu_seqlens of a ``tokens``-long sequence packed with documents from ``spec``: a file of
    lengths (whitespace separated, used in turn from the start, cycling), or a distribution. The
    last document is cut at the sequence's end, as packing does. A bad spec is a ValueError (a
    missing file an OSError) before any document is drawn."""
    kind, colon, params = spec.partition(":")
    rng = random.Random(seed)
    if kind == "lognormal":
        options = _options(kind, params)
        median = _tokens(options.get("median", "2k"), "lognormal: median")
        mean = _tokens(options.get("mean", "8k"), "lognormal: mean")
        if median < 1:  # log(median) below
            raise ValueError(f"lognormal: the median must be >= 1 token, got {median}")
        if mean < median:  # sigma^2 = 2 log(mean / median) must not be negative
            raise ValueError(f"lognormal: the mean ({mean}) must be at least the median ({median})")
        sigma, mu = math.sqrt(2 * math.log(mean / median)), math.log(median)
        draw = lambda: max(1, int(rng.lognormvariate(mu, sigma)))
    elif kind == "fixed":
        length = _tokens(params, "fixed: length")
        if length < 1:  # a length of 0 would never fill the sequence
            raise ValueError(f"fixed: length must be >= 1 token, got {length}")
        draw = lambda: length
    else:
        try:
            lengths = _file_lengths(spec)
        except FileNotFoundError:
            if not colon:
                raise
            # 'kind:params' with an unknown kind is more likely a typo than a file's name
            raise ValueError(f"unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)}), "
                             f"and no file named {spec!r}") from None
        draw = iter(lengths * (tokens // sum(lengths) + 1)).__next__
    cu = [0]
    while cu[-1] < tokens:
        cu.append(min(tokens, cu[-1] + draw()))
    return tuple(cu)


def megatron_thd_padding(cu_seqlens: tuple[int, ...], gpus: int) -> int:
    """Tokens Megatron's THD context parallelism adds: every document padded to a multiple of 2 CP."""
    return sum(-(-(b - a) // (2 * gpus)) * 2 * gpus - (b - a) for a, b in zip(cu_seqlens, cu_seqlens[1:]))


@dataclass(frozen=True)
class MaskRow:
    layout: str
    schedule: str
    balance: float  # max / mean unmasked area a rank computes
    steps: int
    bytes_per_gpu: int  # the busiest GPU's, per layer, forward and backward
    padding: int  # tokens added to the sequence
    build_seconds: float


def _row(plan, layout: str, schedule: str, shape: Shape, seconds: float, tokens: int) -> MaskRow:
    work = [0.0] * plan.world_size
    for step in plan.forward:
        for rank, rs in enumerate(step):
            work[rank] += sum(plan.block_work(b) for b in rs.blocks)
    mean = sum(work) / len(work)
    padded = plan.layout.padded_tokens or tokens
    shape = replace(shape, seqlen_local=padded // plan.world_size)  # what each rank holds, padding too
    return MaskRow(layout, schedule, max(work) / mean if mean else 1.0, plan.compute_steps,
                   max(plan.traffic(r, shape) for r in range(plan.world_size)), padded - tokens, seconds)


def mask_rows(model: ModelSpec, seq: int, gpus: int, *, cu_seqlens=None, window: int = -1) -> list[MaskRow]:
    """A row for the plain causal plan the mask replaces (auto on zigzag), then one per masked
    layout and schedule."""
    shape = attention_shape(model, seq, gpus)
    plain = choose_schedule("zigzag", gpus, True, shape)
    rows = [_row(build_plan(plain, layout="zigzag", world_size=gpus), "zigzag (plain causal)", plain, shape, 0.0,
                 seq)]
    mask = dict(cu_seqlens=cu_seqlens, window_size=(window, 0))
    for layout, schedule in MASKED_VARIANTS:
        start = time.process_time()
        plan = build_plan(schedule, layout=layout, world_size=gpus, tokens=seq, **mask)
        seconds = time.process_time() - start
        rows.append(_row(plan, layout, schedule, shape, seconds, seq))
    return rows


def mask_table(model: ModelSpec, seq: int, gpus: int, rows: list[MaskRow], cu_seqlens, window: int) -> str:
    what = []
    if cu_seqlens:
        lengths = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
        what.append(f"{len(lengths)} documents (median {sorted(lengths)[len(lengths) // 2]}, longest {max(lengths)})")
    if window >= 0:
        what.append(f"window {window}")
    lines = [f"{seq // 1024}K tokens, {gpus} GPUs, causal, " + ", ".join(what) +
             (f"; Megatron THD would pad {megatron_thd_padding(cu_seqlens, gpus)} tokens" if cu_seqlens else ""),
             f"  {'layout':<24} {'schedule':<9} {'balance':>8} {'steps':>5} {'MiB/GPU/layer':>13} {'padding':>7}"]
    for r in rows:
        lines.append(f"  {r.layout:<24} {r.schedule:<9} {r.balance:>8.3f} {r.steps:>5} "
                     f"{r.bytes_per_gpu / 2**20:>13.1f} {r.padding:>7}")
    return "\n".join(lines)


def masked_choice(rows: list[MaskRow]) -> MaskRow:
    """The masked layout and schedule to recommend: of those whose busiest rank's work is within
    5% of the most even (compute waits for the busiest rank; the balanced layout aims at 1.05),
    the fewest bytes, then the fewest steps (for a window alone, typically contiguous, which talks
    only within the window's reach)."""
    candidates = rows[1:]  # rows[0]: plain causal
    even = min(r.balance for r in candidates)
    return min((r for r in candidates if r.balance <= 1.05 * even), key=lambda r: (r.bytes_per_gpu, r.steps, r.balance))
