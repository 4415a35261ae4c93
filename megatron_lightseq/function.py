"""The autograd Function over the executor: it saves (q, k, v, out, lse) and nothing else, and
its backward runs the plan's backward from them (never the distributed forward again)."""
from __future__ import annotations

import torch

from .comm import Exchange
from .executor import run_backward, run_forward
from .kernels.base import BlockKernel
from .plan import Plan


class DistAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, rank: int, exchange: Exchange, kernel: BlockKernel, scale: float):
        out, lse = run_forward(plan, rank, exchange, kernel, q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (plan, rank, exchange, kernel, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, rank, exchange, kernel, scale = ctx.setup
        dq, dk, dv = run_backward(plan, rank, exchange, kernel, dout, q, k, v, out, lse, scale=scale)
        return dq, dk, dv, None, None, None, None, None
