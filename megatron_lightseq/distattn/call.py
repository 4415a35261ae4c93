"""What one dist_attn call runs with, resolved from its options: the plan (the ``auto`` schedule
chosen), the block kernel (``auto`` resolved) and the softmax scale (its default applied).
dist_attn, the emulation and the jobs all resolve through here."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import resolve_kernel
from ..kernels.base import BlockKernel
from .plan import Plan, Shape
from .schedules import build_plan, choose_schedule


@dataclass(frozen=True)
class Call:
    plan: Plan
    kernel: BlockKernel
    scale: float


def resolve_plan(shape: Shape, *, world_size: int, layout: str, schedule: str, causal: bool) -> Plan:
    if schedule == "auto":
        schedule = choose_schedule(layout, world_size, causal, shape)
    return build_plan(schedule, layout=layout, world_size=world_size, causal=causal)


def resolve_call(q: torch.Tensor, k: torch.Tensor, *, world_size: int, layout: str, schedule: str, causal: bool,
                 softmax_scale: float | None, kernel: str) -> Call:
    plan = resolve_plan(Shape.of(q, k), world_size=world_size, layout=layout, schedule=schedule, causal=causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return Call(plan, resolve_kernel(kernel, q, k), scale)
