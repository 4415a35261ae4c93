"""What one dist_attn call runs with, resolved from its options: the plan (the layout cut for the
mask and the ``auto`` schedule chosen), the block kernel (``auto`` resolved) and the softmax
scale (its default applied). dist_attn, the emulation and the jobs all resolve through here."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import resolve_kernel
from ..kernels.base import BlockKernel
from ..kernels.mask import Mask
from .layout import layout_of
from .plan import Plan, Shape
from .schedules import auto_schedule, plan_for


@dataclass(frozen=True)
class Call:
    plan: Plan
    kernel: BlockKernel
    scale: float

    @property
    def mask(self) -> Mask:
        return self.plan.mask


def resolve_plan(shape: Shape, *, world_size: int, layout: str, schedule: str, mask: Mask) -> Plan:
    """The plan for local tensors of ``shape``; ValueError if their length does not fit the mask."""
    seqlen = shape.seqlen_local * world_size
    lay = layout_of(layout, world_size, mask, mask.length or seqlen)
    # Only documents pad (a window alone cuts the given length), so a mismatch is theirs.
    if lay.padded_tokens is not None and lay.padded_tokens != seqlen:
        raise ValueError(
            f"cu_seqlens{'_padded' if mask.cu_seqlens_padded else ''} must cover the whole sequence: it ends at "
            f"{lay.tokens}, which the {layout} layout holds as {lay.padded_tokens} tokens over {world_size} ranks, so "
            f"seqlen_local must be {lay.padded_tokens // world_size}, got {shape.seqlen_local} ({seqlen} tokens in all)")
    if schedule == "auto":
        schedule = auto_schedule(lay, mask, shape)
    return plan_for(schedule, lay, mask)


def resolve_call(q: torch.Tensor, k: torch.Tensor, *, world_size: int, layout: str, schedule: str, mask: Mask,
                 softmax_scale: float | None, kernel: str) -> Call:
    plan = resolve_plan(Shape.of(q, k), world_size=world_size, layout=layout, schedule=schedule, mask=mask)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return Call(plan, resolve_kernel(kernel, q, k), scale)
