"""One dist_attn call, described once: the value every rank of a group must hold alike.

:class:`Call` holds what shapes the exchange (local sizes and dtype, layout, schedule, mask,
softmax scale, kernel, whether a backward follows, the group sizes, the form K/V travel in) and gives the plan a rank
runs, flat or hybrid. The ranks agree on its :meth:`Call.signature` (transport/agreement.py)
before any transfer, once per :meth:`Call.steady_key`: the key leaves the documents out (only
whether there are any, padded or not) and keeps the schedule as asked, since ``auto`` resolves
per batch of documents alike on every rank. Flat calls, hybrid calls and ``kernel="auto"``'s
settlement all agree through it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cached_property

import torch

from ...kernels import kernel_names
from .hybrid import HybridPlan, resolve_hybrid, split_problem
from .layout import LAYOUTS, Layout, fitted_layout
from .mask import Mask
from .plan import KV_WIRES, Plan, RankPlan, Shape, kv_wire_problem
from .schedules import SCHEDULE_CHOICES, auto_schedule, plan_for, rank_plan

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The signature's fields after its first number (0: this rank's checks passed); names travel as a CRC32.
FIELDS = ("batch", "seqlen_local", "nheads", "nheads_kv", "headdim", "dtype", "layout", "schedule", "causal",
          "cu_seqlens", "window_size", "softmax_scale", "kernel", "backward", "all-to-all size", "outer size",
          "kv_wire")
HEADER_NAMES = ("its options (dtype, layout, schedule, mask, softmax scale, kernel, backward, group sizes or kv_wire)",
                "batch", "seqlen_local", "nheads", "nheads_kv", "headdim")
_NAMED = {"dtype": [str(d) for d in DTYPES], "layout": LAYOUTS, "schedule": SCHEDULE_CHOICES,
          "kv_wire": [str(w) for w in KV_WIRES]}


def crc(name: str) -> float:
    return float(zlib.crc32(name.encode()))


@dataclass(frozen=True)
class Call:
    shape: Shape  # this rank's local q/k sizes and dtype, and the form K/V travel in (shape.kv_wire)
    layout: str
    schedule: str  # as asked ("auto" included)
    mask: Mask
    scale: float  # the softmax scale, its default applied
    kernel: str  # the resolved kernel's name (kernels.resolve_kernel)
    backward: bool  # a backward will run from this call's results
    world_size: int  # P, the ranks the layout spans
    inner: int | None = None  # the all-to-all group's size (hybrid), None for a flat call

    @property
    def kv_wire(self) -> str | None:
        """None, or "int8": every kv payload travels quantized (plan.py, run/wire.py)."""
        return self.shape.kv_wire

    @cached_property
    def hybrid(self) -> HybridPlan | None:
        if self.inner is None:
            return None
        return resolve_hybrid(self.shape, world_size=self.world_size, inner=self.inner, layout=self.layout,
                              schedule=self.schedule, mask=self.mask)

    @cached_property
    def plan_schedule(self) -> str:
        """The named schedule the plan runs ("auto" resolved)."""
        if self.hybrid is not None:
            return self.hybrid.schedule
        return _named_schedule(self.shape, self.world_size, self.layout, self.schedule, self.mask)[1]

    def view(self, rank: int) -> RankPlan:
        """The plan rank ``rank`` (of the P) walks: its own view, or its outer rank's of the outer plan."""
        if self.hybrid is not None:
            return self.hybrid.outer_view(rank // self.inner)
        return resolve_plan(self.shape, world_size=self.world_size, layout=self.layout, schedule=self.schedule,
                            mask=self.mask, rank=rank)

    def signature(self) -> tuple[float, ...]:
        """0, then one number per FIELDS entry."""
        s, mask = self.shape, self.mask
        inner = 1 if self.inner is None else self.inner
        return (0.0, s.batch, s.seqlen_local, s.nheads, s.nheads_kv, s.headdim, crc(str(s.dtype)), crc(self.layout),
                crc(self.plan_schedule), float(mask.causal), crc(_documents(mask)), crc(str(mask.window)), self.scale,
                crc(self.kernel), float(self.backward), inner, self.world_size // inner, crc(str(s.kv_wire)))

    @cached_property
    def steady_key(self) -> tuple:
        mask = self.mask
        documents = None if mask.cu_seqlens is None else mask.cu_seqlens_padded is not None
        return (self.shape, self.layout, self.schedule, mask.causal, documents, mask.window, self.scale, self.kernel,
                self.backward, self.world_size, self.inner)

    @cached_property
    def header(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """What every transfer of this call carries in steady state (transport/exchange.py): a
        checksum of the steady-state key, then the local sizes, named for the error message."""
        s = self.shape
        return HEADER_NAMES, (crc(repr(self.steady_key)), s.batch, s.seqlen_local, s.nheads, s.nheads_kv, s.headdim)

    def show(self, field: str, value: float) -> str:
        """A signature value for an error message: names decoded, this rank's own documents and
        window shown, another rank's named as such."""
        mine = {"kernel": self.kernel, "cu_seqlens": _documents(self.mask), "window_size": str(self.mask.window)}
        if field in ("cu_seqlens", "window_size"):
            return mine[field] if crc(mine[field]) == value else "<another>"
        names = {"kernel": (*kernel_names(), mine["kernel"])}.get(field, _NAMED.get(field))
        if names is not None:
            return next((str(n) for n in names if crc(str(n)) == value), f"<unknown name #{value:.0f}>")
        if field in ("causal", "backward"):
            return str(bool(value))
        return f"{value:g}" if field != "softmax_scale" else repr(value)


def _named_schedule(shape: Shape, world_size: int, layout: str, schedule: str, mask: Mask) -> tuple[Layout, str]:
    lay = fitted_layout(layout, world_size, mask, shape.seqlen_local)
    return lay, auto_schedule(lay, mask, shape) if schedule == "auto" else schedule


def resolve_plan(shape: Shape, *, world_size: int, layout: str, schedule: str, mask: Mask,
                 rank: int | None = None) -> Plan | RankPlan:
    """The plan a flat call with local tensors of ``shape`` runs (the layout cut for the mask,
    "auto" resolved as dist_attn resolves it): rank ``rank``'s view, or the whole plan without it.
    ValueError if the length does not fit the mask."""
    lay, named = _named_schedule(shape, world_size, layout, schedule, mask)
    return plan_for(named, lay, mask) if rank is None else rank_plan(named, lay, mask, rank)


def _documents(mask: Mask) -> str:
    padded = f" padded as {mask.cu_seqlens_padded}" if mask.cu_seqlens_padded else ""
    return f"{mask.cu_seqlens}{padded}"


def local_problem(q, k, v, *, layout, schedule, softmax_scale, timeout=1.0, kv_wire=None) -> str | None:
    """What is wrong with this rank's own tensors and options (the kernel and mask apart), or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D (batch, seqlen_local, heads, headdim), got shape {tuple(t.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in DTYPES:
        return f"dtype must be one of {[str(d) for d in DTYPES]}, got {q.dtype}"
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
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        return f"softmax_scale must be None or a positive finite number, got {softmax_scale!r}"
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        return f"timeout must be a positive number of seconds, got {timeout!r}"
    return kv_wire_problem(kv_wire)


def call_of(q, k, *, mask: Mask, layout: str, schedule: str, softmax_scale, kernel: str, backward: bool,
            world_size: int, inner: int | None, kv_wire: str | None = None) -> Call:
    """The Call for checked tensors; ValueError when the sizes do not fit the layout, the mask or
    the head split (the plan is resolved here, so that every such error comes before any transfer)."""
    s = q.shape[1]
    per_rank = 2 if layout == "zigzag" and mask.plain else 1  # other cuts are checked against the mask's length
    if s == 0 or s % per_rank:
        raise ValueError(f"the {layout} layout holds {per_rank} equal chunk(s) per rank, so seqlen_local must be a "
                         f"positive multiple of {per_rank}, got {s}")
    if inner is not None:
        problem = split_problem(world_size, inner, q.shape[2], k.shape[2])
        if problem:
            raise ValueError(problem)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    call = Call(Shape.of(q, k, kv_wire), layout, schedule, mask, scale, kernel, backward, world_size, inner)
    call.plan_schedule  # resolves the layout for the mask (and the head split): their errors now
    return call
