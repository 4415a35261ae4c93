"""What one rank runs for a call, forward and backward: the plan alone (a flat call), or the
all-to-all around it (a hybrid call, docs/hybrid.md):

    forward:  to_heads(q, k, v) -> the outer plan's forward -> to_tokens(out, lse)
    backward: to_heads(d_out)   -> the outer plan's backward -> to_tokens(dq, dk, dv)

Each is one generator that yields before every wait (executor.py's contract), so the autograd
Function below drives it straight through on real ranks and emulate.py drives every virtual
rank's in lockstep: one pipeline, one executor loop, one trace for flat and hybrid calls. The
backward runs from what the forward saved (q, k, v, out, lse, in the plan's space: by heads for
a hybrid call) and never re-runs the distributed forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels import resolve_kernel
from ...kernels.base import BlockKernel, accum_dtype
from ..plan.call import Call, call_of
from ..plan.mask import Mask
from ..plan.plan import RankPlan
from ..transport.exchange import Exchange
from ..transport.failures import TransferError
from .alltoall import Side, expand_kv, reduce_kv, to_heads, to_tokens
from .executor import backward_steps, drive, forward_steps, kernel_calls


def prepare(q, k, *, mask: Mask, layout: str, schedule: str, softmax_scale, kernel: str, backward: bool,
            world_size: int, inner: int | None, kv_wire: str | None = None) -> tuple[Call, BlockKernel]:
    """The call's description and the kernel object that runs it; ValueError for inputs the
    named kernel cannot take or sizes that do not fit the layout, mask or head split."""
    block_kernel = resolve_kernel(kernel, q, k)
    call = call_of(q, k, mask=mask, layout=layout, schedule=schedule, softmax_scale=softmax_scale,
                   kernel=block_kernel.name, backward=backward, world_size=world_size, inner=inner, kv_wire=kv_wire)
    return call, block_kernel


@dataclass
class RankRun:
    """One rank's part in a call. ``plan_exchange``: the group the plan runs over (a flat call's
    group; a hybrid call's outer group); ``inner``: the all-to-all group's exchange (hybrid)."""

    call: Call
    kernel: BlockKernel
    plan_exchange: Exchange
    inner: Exchange | None = None

    def __post_init__(self) -> None:
        u = self.call.inner
        self.rank = self.plan_exchange.rank if u is None else self.plan_exchange.rank * u + self.inner.rank
        self.view: RankPlan = self.call.view(self.rank)
        for exchange in (self.plan_exchange, self.inner):  # in steady state, transfers say whose call they are
            if exchange is not None:
                exchange.header = self.call.header
        self.side = None
        if u is not None:
            hyb = self.call.hybrid
            self.side = Side(hyb, self.rank, self.inner, self.call.shape.seqlen_local // hyb.layout.chunks_per_rank)

    def settle(self, device: torch.device) -> None:
        """kernel="auto" (CUDA): the same kernel per kind of block on every rank of the plan's group."""
        shape = self.call.shape if self.side is None else self.call.hybrid.outer_shape(self.call.shape,
                                                                                       self.side.inner_rank)
        try:
            self.kernel.settle(kernel_calls(self.view, shape, device, self.call.scale, self.call.backward),
                               self.plan_exchange.agree)
        except TransferError as e:
            raise self.plan_exchange.fail("forward kernel agreement", e) from e

    def forward(self, q, k, v, saved=None, lse_wanted: bool = True):
        """Generator of (out, lse, what the backward needs). ``saved``: the (out, lse) an earlier
        forward of the same inputs returned (remat): the plan then computes and sends nothing.
        ``lse_wanted``: a hybrid call brings the lse back to the tokens only when asked (else None)."""
        if self.side is None:
            if saved is None:
                out, lse = yield from self._plan_forward(q, k, v)
            else:
                out, lse = (t.view_as(t) for t in saved)  # new tensor objects: autograd owns these outputs
            return out, lse, (q, k, v, out, lse)
        s, h = self.side, self.call.shape.nheads
        q_o, k_o, v_o = yield from to_heads(s, [q, k, v], ["q", "kv", "kv"], "forward q, k, v")
        k_o, v_o = expand_kv(s, [k_o, v_o])
        if saved is None:
            out_o, lse_o = yield from self._plan_forward(q_o, k_o, v_o)
            back = [out_o, lse_o] if lse_wanted else [out_o]
            out, *lse = yield from to_tokens(s, back, ["q"] * len(back), [h] * len(back), "forward out, lse")
            lse = lse[0] if lse else None
        else:
            out, lse = saved
            out_o, lse_o = yield from to_heads(s, [out, lse.to(accum_dtype(q.dtype))], ["q", "q"], "saved out, lse")
            out, lse = out.view_as(out), lse.view_as(lse)
        return out, lse, (q_o, k_o, v_o, out_o, lse_o)

    def _plan_forward(self, q, k, v):
        return (yield from forward_steps(self.view, self.kernel, self.call.scale, self.plan_exchange, q, k, v,
                                         kv_wire=self.call.kv_wire))

    def backward(self, kept, dout):
        """Generator of (dq, dk, dv) from what forward() returned for the backward."""
        q, k, v, out, lse = kept
        if self.side is None:
            return (yield from backward_steps(self.view, self.kernel, self.call.scale, self.plan_exchange, dout,
                                              q, k, v, out, lse, kv_wire=self.call.kv_wire))
        s, shape = self.side, self.call.shape
        (dout_o,) = yield from to_heads(s, [dout.contiguous()], ["q"], "backward d_out")
        dq_o, dk_o, dv_o = yield from backward_steps(self.view, self.kernel, self.call.scale, self.plan_exchange,
                                                     dout_o, q, k, v, out, lse, kv_wire=self.call.kv_wire)
        dk_o, dv_o = reduce_kv(s, [dk_o, dv_o])
        return (yield from to_tokens(s, [dq_o, dk_o, dv_o], ["q", "kv", "kv"],
                                     [shape.nheads, shape.nheads_kv, shape.nheads_kv], "backward dq, dk, dv"))


class DistAttnFunction(torch.autograd.Function):
    """Saves what the rank's forward keeps for its backward and nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, run: RankRun, saved, lse_wanted: bool):
        out, lse, kept = drive(run.forward(q, k, v, saved, lse_wanted))
        ctx.save_for_backward(*kept)
        ctx.run = run
        if lse is None:
            return out, None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv = drive(ctx.run.backward(ctx.saved_tensors, dout))
        return dq, dk, dv, None, None, None
