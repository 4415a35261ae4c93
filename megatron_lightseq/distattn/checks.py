"""Input checks for dist_attn, all before any transfer, and the agreement of the ranks.

Each rank checks its own inputs, resolves the call (call.py) and computes a signature of
everything that shapes the exchange: sizes, dtype, layout, the resolved schedule, the mask
(causal, documents, window), the effective softmax scale, the resolved kernel, and whether a
backward will run. The ranks agree
on it with one small all_gather, then raise together: a rank whose inputs are bad, or ranks that
disagree, never leave the others waiting in a transfer that will not come.

A call whose shapes and options the group has already agreed on is not agreed again: in steady
state a call makes no collective and reads nothing back from the device (trace() counts both).
That key leaves out the documents (cu_seqlens) and the schedule ``auto`` resolves from them:
every rank is given the same batch, so the first batch of a shape agrees on its documents too,
and later batches with new documents are trusted (they would otherwise re-agree every
micro-batch). What that leaves to the deadline is written in docs/reliability.md.
"""
from __future__ import annotations

import math
import zlib

import torch

from ..kernels import kernel_names, unknown_kernel
from ..kernels.mask import Mask, make_mask
from .call import Call, resolve_call
from .exchange import Exchange
from .executor import kernel_calls
from .failures import DistAttnError, TransferError
from .layout import LAYOUTS
from .plan import Shape
from .schedules import SCHEDULE_CHOICES

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# field -> names it can take (None: a number, or this rank's own value); names travel as a CRC32,
# which every rank computes alike
_FIELDS = {"batch": None, "seqlen_local": None, "nheads": None, "nheads_kv": None, "headdim": None,
           "dtype": [str(d) for d in _DTYPES], "layout": LAYOUTS, "schedule": SCHEDULE_CHOICES,
           "causal": None, "cu_seqlens": None, "window_size": None, "softmax_scale": None, "kernel": None,
           "backward": None}
_FAILED = (1.0,) + (0.0,) * len(_FIELDS)


def local_problem(q, k, v, *, layout, schedule, mask: Mask, softmax_scale, kernel, timeout=1.0) -> str | None:
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
    if b < 1 or h < 1 or d < 1:
        return f"batch, nheads and headdim must be positive, got {b}, {h} and {d}"
    if k.shape[2] < 1 or h % k.shape[2]:
        return f"nheads ({h}) must be a multiple of nheads_kv ({k.shape[2]})"
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    if schedule not in SCHEDULE_CHOICES:
        return f"schedule must be one of {SCHEDULE_CHOICES}, got {schedule!r}"
    if kernel not in kernel_names():
        return unknown_kernel(kernel)
    if mask.problem():
        return mask.problem()
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        return f"softmax_scale must be None or a positive finite number, got {softmax_scale!r}"
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        return f"timeout must be a positive number of seconds, got {timeout!r}"
    per_rank = 2 if layout == "zigzag" and mask.plain else 1  # other cuts are checked against the mask's length
    if s == 0 or s % per_rank:
        return (f"the {layout} layout holds {per_rank} equal chunk(s) per rank, so seqlen_local must be a "
                f"positive multiple of {per_rank}, got {s}")
    return None


def _crc(name: str) -> float:
    return float(zlib.crc32(name.encode()))


def _signature(q, k, call: Call, backward: bool) -> tuple[float, ...]:
    """[0 (this rank's checks passed), then one number per _FIELDS entry]."""
    b, s, h, d = q.shape
    plan, mask = call.plan, call.mask
    return (0.0, b, s, h, k.shape[2], d, _crc(str(q.dtype)), _crc(plan.layout.name), _crc(plan.schedule),
            float(mask.causal), _crc(_documents(mask)), _crc(str(mask.window)), call.scale,
            _crc(call.kernel.name), float(backward))


def _steady_key(q, k, call: Call, backward: bool, schedule: str) -> tuple:
    """What a call must share with an agreed one to skip the agreement: the signature, except
    that the documents count only as present (padded or not) and the schedule is the one asked
    for (``auto`` resolves per batch of documents, alike on every rank)."""
    mask = call.mask
    documents = None if mask.cu_seqlens is None else mask.cu_seqlens_padded is not None
    return (tuple(q.shape), k.shape[2], q.dtype, call.plan.layout.name, schedule, mask.causal, documents,
            mask.window, call.scale, call.kernel.name, backward)


def _documents(mask: Mask) -> str:
    padded = f" padded as {mask.cu_seqlens_padded}" if mask.cu_seqlens_padded else ""
    return f"{mask.cu_seqlens}{padded}"


def _show(field: str, value: float, call: Call) -> str:
    mine = {"kernel": call.kernel.name, "cu_seqlens": _documents(call.mask), "window_size": str(call.mask.window)}
    names = {"kernel": (*kernel_names(), mine["kernel"])}.get(field, _FIELDS[field])
    if field in ("cu_seqlens", "window_size"):
        return mine[field] if _crc(mine[field]) == value else "<another>"
    if names is not None:
        return next((str(n) for n in names if _crc(str(n)) == value), f"<unknown name #{value:.0f}>")
    if field in ("causal", "backward"):
        return str(bool(value))
    return f"{value:g}" if field != "softmax_scale" else repr(value)


def refuse_capture(device: torch.device) -> None:
    """dist_attn cannot run inside a CUDA graph capture: its first call of a shape reads the
    agreement back to the host, ``kernel="auto"`` times kernels, the plan's receive buffers are
    allocated per call and the waits of a failing group are watched from the host. Say so before
    any of that fails obscurely (or, worse, is captured and replayed with stale buffers)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("dist_attn cannot be captured in a CUDA graph (the current stream is capturing): run "
                           "the attention layers outside the graph (Megatron: leave --enable-cuda-graph / "
                           "--external-cuda-graph off, or exclude the attention with --cuda-graph-scope)")


def checked_call(q, k, v, *, exchange: Exchange, layout, schedule, causal, cu_seqlens=None, window_size=(-1, -1),
                 cu_seqlens_padded=None, softmax_scale, kernel, backward: bool | None = None) -> Call:
    """The resolved call, once every rank of the exchange's group has passed its checks and all
    agree on the signature; else ValueError on every rank together. ``backward``: whether a
    backward will run from this call's results (None: grad mode and requires_grad say)."""
    if isinstance(q, torch.Tensor):
        refuse_capture(q.device)
    call, problem = None, None
    try:
        mask = make_mask(causal, cu_seqlens, window_size, cu_seqlens_padded)
    except (TypeError, ValueError) as e:
        problem = f"cu_seqlens must be a sequence of ints and window_size a pair of ints, got {cu_seqlens!r} and " \
                  f"{window_size!r} ({e})"
    if problem is None:
        problem = local_problem(q, k, v, layout=layout, schedule=schedule, mask=mask, softmax_scale=softmax_scale,
                                kernel=kernel, timeout=exchange.timeout)
    if problem is None and backward is not None and not isinstance(backward, bool):
        problem = f"backward must be None, True or False, got {backward!r}"
    if problem is None:
        try:
            call = resolve_call(q, k, world_size=exchange.world_size, layout=layout, schedule=schedule, mask=mask,
                                softmax_scale=softmax_scale, kernel=kernel)
        except ValueError as e:  # the named kernel cannot take these inputs, the length does not fit the mask
            problem = str(e)
    if exchange.world_size == 1:
        if problem:
            raise ValueError(problem)
        return call
    if exchange.failure:
        raise DistAttnError(f"dist_attn: this group failed earlier ({exchange.failure}); it cannot be used")
    if backward is None:
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = None if problem else _steady_key(q, k, call, backward, schedule)
    if key is not None and key in exchange.agreed:
        return call  # steady state: agreed before, no collective
    signature = _FAILED if problem else _signature(q, k, call, backward)
    if problem and exchange.agreed:
        # Peers whose inputs match an agreed signature skip the agreement and go on to the
        # transfers: tell them through the failure protocol rather than leave them to the deadline.
        exchange.fail("forward input checks", ValueError(problem))
        raise ValueError(problem)
    try:
        rows = exchange.agree(signature)
    except TransferError as e:  # some rank never joined: it skipped, so it thinks it agreed before
        raise exchange.fail("forward input agreement", e) from e
    if exchange.failure:  # NCCL: the watcher aborted the gather (a peer failed or never came): rows are void
        raise DistAttnError(f"dist_attn: this group failed during the input agreement ({exchange.failure})")
    if problem:
        raise ValueError(problem)
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"dist_attn: rank(s) {bad} of the group rejected their inputs (see their error)")
    if any(tuple(row) != signature for row in rows):
        diffs = [f"{name}: " + ", ".join(f"rank {r}={_show(name, row[i + 1], call)}" for r, row in enumerate(rows))
                 for i, name in enumerate(_FIELDS) if len({row[i + 1] for row in rows}) > 1]
        raise ValueError("dist_attn: every rank must pass the same sizes and options; expected equal, got "
                         + "; ".join(diffs))
    settle = getattr(call.kernel, "settle", None)  # kernel="auto" on CUDA: the same choices on every rank
    if settle is not None:
        try:
            settle(kernel_calls(call, Shape.of(q, k), q.device, backward), exchange.agree)
        except TransferError as e:
            raise exchange.fail("forward kernel agreement", e) from e
    exchange.agreed.add(key)
    return call
