"""``dist_attn``: exact attention over a sequence split across the ranks of a process group."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checks import check_inputs
from .comm import Exchange
from .executor import shape_of
from .function import DistAttnFunction
from .kernels import resolve_kernel
from .kernels.base import BlockKernel
from .plan import Plan
from .schedules import build_plan, choose_schedule


@dataclass(frozen=True)
class Call:
    """Everything one dist_attn call runs with, resolved from its arguments."""

    plan: Plan
    rank: int
    exchange: Exchange
    kernel: BlockKernel
    scale: float


def _group_and_rank(group):
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1  # plain single-process use
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def resolve_call(q, k, v, *, group, layout, schedule, causal, softmax_scale, kernel, check: bool = True) -> Call:
    """Check the inputs (on every rank together, unless ``check`` is False) and resolve the options."""
    group, rank, world_size = _group_and_rank(group)
    if check:
        check_inputs(q, k, v, group=group, world_size=world_size, layout=layout, schedule=schedule,
                     causal=causal, softmax_scale=softmax_scale, kernel=kernel)
    if schedule == "auto":
        schedule = choose_schedule(layout, world_size, causal, shape_of(q, k))
    plan = build_plan(schedule, layout=layout, world_size=world_size, causal=causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return Call(plan, rank, Exchange(group), resolve_kernel(kernel, q, k), scale)


def dist_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "contiguous",
              schedule: str = "auto", causal: bool = True, softmax_scale: float | None = None,
              kernel: str = "auto", return_lse: bool = False):
    """Attention of this rank's queries against the keys of the whole sequence.

    q ``(batch, seqlen_local, nheads, headdim)``; k, v ``(batch, seqlen_local, nheads_kv, headdim)``
    with nheads a multiple of nheads_kv (MHA, GQA, MQA): this rank's tokens, placed by ``layout``
    ("contiguous" or "zigzag", see :mod:`megatron_lightseq.layout`). ``group``: the sequence-parallel
    process group (None: the default group, or a single process when torch.distributed is not
    initialised). ``schedule``: "ring", "lightseq" or "auto" (docs/schedules.md). ``kernel``: a
    name from :func:`megatron_lightseq.kernels.kernel_names`. ``softmax_scale`` defaults to
    headdim ** -0.5.

    Returns out shaped like q, or ``(out, lse)`` with ``return_lse``: lse ``(batch, nheads,
    seqlen_local)`` in float32 (float64 for float64 inputs), not differentiable. Differentiable in
    q, k and v; the backward uses the saved out and lse and does not re-run the forward.
    """
    call = resolve_call(q, k, v, group=group, layout=layout, schedule=schedule, causal=causal,
                        softmax_scale=softmax_scale, kernel=kernel)
    out, lse = DistAttnFunction.apply(q, k, v, call, None)
    return (out, lse) if return_lse else out


def dist_attn_from_saved(q, k, v, out, lse, *, group=None, layout: str = "contiguous", schedule: str = "auto",
                         causal: bool = True, softmax_scale: float | None = None, kernel: str = "auto"):
    """``dist_attn``'s ``out`` for inputs whose forward already ran and gave ``(out, lse)``: nothing
    is computed or sent now, and the backward is dist_attn's, from (q, k, v, out, lse). The
    options must be the ones that forward ran with. Rematerialization-aware checkpointing uses it."""
    call = resolve_call(q, k, v, group=group, layout=layout, schedule=schedule, causal=causal,
                        softmax_scale=softmax_scale, kernel=kernel, check=False)
    return DistAttnFunction.apply(q, k, v, call, (out, lse))[0]
