"""The autograd Function over the executor: it saves (q, k, v, out, lse) and nothing else, and
its backward runs the plan's backward from them (never the distributed forward again)."""
from __future__ import annotations

import torch

from .executor import run_backward, run_forward


class DistAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call, exchange, saved):
        """``saved``: None to run the forward, or the (out, lse) an earlier forward of the same
        inputs returned, which are then used as they are."""
        if saved is None:
            out, lse = run_forward(call, exchange, q, k, v)
        else:
            out, lse = (t.view_as(t) for t in saved)  # new tensor objects: autograd owns these outputs
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.exchange = call, exchange
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = run_backward(ctx.call, ctx.exchange, dout, q, k, v, out, lse)
        return dq, dk, dv, None, None, None
