"""P virtual ranks in one process: the same plans, kernels and executor as dist_attn, with device
copies in place of sends (exchange.VirtualExchange). One GPU cannot run two NCCL ranks, so this is
how the compute side of DistAttn is checked against the oracle and measured on one card.

    out, lse, dq, dk, dv = emulate_dist_attn(q, k, v, dout, world_size=8, layout="zigzag")

Inputs and results are whole-sequence tensors (batch, seqlen, heads, headdim); the ranks run in
lockstep, each step's transfers delivered before any rank waits on them.

With ``heads_group=U`` the ranks are split as U (all-to-all) x P/U (the plan), as dist_attn's
``heads_group`` splits them (hybrid.py): each inner group's all-to-all runs through
alltoall.py on virtual ranks, then each head group's outer plan over its P/U ranks, then the
all-to-all back; the backward likewise.
"""
from __future__ import annotations

from ..plan.layout import shard, unshard
from ..plan.mask import mask_of
from ..transport.exchange import Mailbox, VirtualExchange
from .pipeline import RankRun, prepare


def lockstep(generators) -> list:
    """Advance every rank to its next wait, round after round; each rank's return value."""
    results = [None] * len(generators)
    alive = dict(enumerate(generators))
    while alive:
        for rank, gen in list(alive.items()):
            try:
                next(gen)
            except StopIteration as done:
                results[rank] = done.value
                del alive[rank]
    return results


def virtual_exchanges(world_size: int, inner: int | None) -> tuple[list[tuple], list[Mailbox]]:
    """Every virtual rank's (plan exchange, all-to-all exchange or None), numbered as dist_attn's
    groups number them (rank = outer rank x U + inner rank), and the mailboxes behind them."""
    if inner is None:
        box = Mailbox()
        return [(VirtualExchange(box, r, world_size), None) for r in range(world_size)], [box]
    outer = world_size // inner
    inner_boxes, outer_boxes = [Mailbox() for _ in range(outer)], [Mailbox() for _ in range(inner)]
    return [(VirtualExchange(outer_boxes[r % inner], r // inner, outer),
             VirtualExchange(inner_boxes[r // inner], r % inner, inner)) for r in range(world_size)], \
        inner_boxes + outer_boxes


def emulate_dist_attn(q, k, v, dout=None, *, world_size: int, layout: str = "contiguous", schedule: str = "auto",
                      causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None,
                      softmax_scale: float | None = None, kernel: str = "auto", heads_group: int | None = None,
                      kv_wire: str | None = None):
    """(out, lse) of dist_attn over ``world_size`` virtual ranks, plus (dq, dk, dv) when ``dout``
    is given; whole-sequence tensors in, whole-sequence tensors out. ``heads_group``: the size U
    of the all-to-all groups of a hybrid split (module docstring); ``kv_wire`` as in dist_attn."""
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    keywords = dict(causal=causal, cu_seqlens=cu_seqlens, window_size=window_size,
                    cu_seqlens_padded=cu_seqlens_padded)
    parts = lambda x: [shard(x, layout=layout, rank=r, world_size=world_size, **keywords) for r in range(world_size)]
    whole = lambda xs, dim=1: unshard(xs, layout=layout, dim=dim, **keywords)
    qs, ks, vs = parts(q), parts(k), parts(v)
    call, block_kernel = prepare(qs[0], ks[0], mask=mask, layout=layout, schedule=schedule,
                                 softmax_scale=softmax_scale, kernel=kernel, backward=dout is not None,
                                 world_size=world_size, inner=heads_group, kv_wire=kv_wire)
    exchanges, boxes = virtual_exchanges(world_size, heads_group)
    runs = [RankRun(call, block_kernel, *pair) for pair in exchanges]
    fwd = lockstep([run.forward(qs[r], ks[r], vs[r]) for r, run in enumerate(runs)])
    out, lse = whole([o for o, _, _ in fwd]), whole([l for _, l, _ in fwd], dim=2)
    if dout is None:
        return out, lse
    dos = parts(dout)
    bwd = lockstep([run.backward(fwd[r][2], dos[r]) for r, run in enumerate(runs)])
    assert all(box.empty() for box in boxes), "every sent tensor was received"
    return (out, lse, *(whole([g[i] for g in bwd]) for i in range(3)))
