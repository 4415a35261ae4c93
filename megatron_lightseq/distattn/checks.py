"""Input checks for dist_attn, all before any transfer.

Each rank first checks its own inputs and, instead of raising at once, joins one small
all_gather of a signature (sizes, dtype, options, and whether its own checks failed). Then
every rank raises the same kind of error together: a rank whose inputs are bad, or ranks that
disagree, never leave the others waiting in a transfer that will not come.
"""
from __future__ import annotations

import math

import torch

from ..kernels import kernel_names, resolve_kernel
from .exchange import Exchange
from .layout import LAYOUTS, chunks_per_rank
from .schedules import SCHEDULE_CHOICES

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_FIELDS = ("batch", "seqlen_local", "nheads", "nheads_kv", "headdim", "dtype", "layout", "schedule",
           "causal", "softmax_scale")


def local_problem(q, k, v, *, layout, schedule, causal, softmax_scale, kernel) -> str | None:
    """What is wrong with this rank's own inputs, as a message, or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D (batch, seqlen_local, heads, headdim), got shape {tuple(t.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in _DTYPES:
        return f"dtype must be one of {[str(d) for d in _DTYPES]}, got {q.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    b, s, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        return (f"k/v must match q in batch, seqlen_local and headdim: expected ({b}, {s}, *, {d}), "
                f"got {tuple(k.shape)}")
    if k.shape[2] < 1 or h % k.shape[2]:
        return f"nheads ({h}) must be a multiple of nheads_kv ({k.shape[2]})"
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    if schedule not in SCHEDULE_CHOICES:
        return f"schedule must be one of {SCHEDULE_CHOICES}, got {schedule!r}"
    if kernel not in kernel_names():
        return f"kernel must be one of {kernel_names()}, got {kernel!r}"
    if not isinstance(causal, bool):
        return f"causal must be a bool, got {causal!r}"
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        return f"softmax_scale must be None or a positive finite number, got {softmax_scale!r}"
    per_rank = chunks_per_rank(layout)
    if s == 0 or s % per_rank:
        return (f"the {layout} layout holds {per_rank} equal chunk(s) per rank, so seqlen_local must be a "
                f"positive multiple of {per_rank}, got {s}")
    try:
        resolve_kernel(kernel, q, k)
    except ValueError as e:
        return str(e)
    return None


def _signature(q, k, problem, *, layout, schedule, causal, softmax_scale) -> list[float]:
    """[failed, then one number per _FIELDS entry]: what every rank must agree on."""
    if problem:
        return [1.0] + [0.0] * len(_FIELDS)
    b, s, h, d = q.shape
    return [0.0, b, s, h, k.shape[2], d, _DTYPES.index(q.dtype), LAYOUTS.index(layout),
            SCHEDULE_CHOICES.index(schedule), float(causal), float(softmax_scale or 0.0)]


def _show(field: str, value: float) -> str:
    names = {"dtype": _DTYPES, "layout": LAYOUTS, "schedule": SCHEDULE_CHOICES}.get(field)
    return str(names[int(value)]) if names else f"{value:g}"


def check_inputs(q, k, v, *, exchange: Exchange, layout, schedule, causal, softmax_scale, kernel) -> None:
    """Raise ValueError, on every rank of the exchange's group together, if any rank's inputs are bad."""
    problem = local_problem(q, k, v, layout=layout, schedule=schedule, causal=causal,
                            softmax_scale=softmax_scale, kernel=kernel)
    if exchange.world_size == 1:
        if problem:
            raise ValueError(problem)
        return
    sig = _signature(q, k, problem, layout=layout, schedule=schedule, causal=causal, softmax_scale=softmax_scale)
    rows = exchange.agree(sig)
    if problem:
        raise ValueError(problem)
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"dist_attn: rank(s) {bad} of the group rejected their inputs (see their error)")
    if any(row != rows[0] for row in rows):
        diffs = [f"{name}: " + ", ".join(f"rank {r}={_show(name, row[i + 1])}" for r, row in enumerate(rows))
                 for i, name in enumerate(_FIELDS) if len({row[i + 1] for row in rows}) > 1]
        raise ValueError("dist_attn: every rank must pass the same sizes and options; expected equal, got "
                         + "; ".join(diffs))
