"""P virtual ranks in one process: the same plans, kernels and executor as dist_attn, with device
copies in place of sends (exchange.VirtualExchange). One GPU cannot run two NCCL ranks, so this is
how the compute side of DistAttn is checked against the oracle and measured on one card.

    out, lse, dq, dk, dv = emulate_dist_attn(q, k, v, dout, world_size=8, layout="zigzag")

Inputs and results are whole-sequence tensors (batch, seqlen, heads, headdim); the ranks run in
lockstep, each step's transfers delivered before any rank waits on them.
"""
from __future__ import annotations

from ..kernels.mask import make_mask
from .call import resolve_call
from .executor import backward_steps, forward_steps
from .exchange import Mailbox, VirtualExchange
from .layout import shard, unshard


def _lockstep(generators) -> list:
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


def emulate_dist_attn(q, k, v, dout=None, *, world_size: int, layout: str = "contiguous", schedule: str = "auto",
                      causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None,
                      softmax_scale: float | None = None, kernel: str = "auto"):
    """(out, lse) of dist_attn over ``world_size`` virtual ranks, plus (dq, dk, dv) when ``dout``
    is given; whole-sequence tensors in, whole-sequence tensors out."""
    mask = dict(causal=causal, cu_seqlens=cu_seqlens, window_size=window_size, cu_seqlens_padded=cu_seqlens_padded)
    parts = lambda x, dim=1: [shard(x, layout=layout, rank=r, world_size=world_size, dim=dim, **mask)
                              for r in range(world_size)]
    whole = lambda xs, dim=1: unshard(xs, layout=layout, dim=dim, **mask)
    qs, ks, vs = parts(q), parts(k), parts(v)
    call = resolve_call(qs[0], ks[0], world_size=world_size, layout=layout, schedule=schedule,
                        mask=make_mask(**mask), softmax_scale=softmax_scale, kernel=kernel)
    mailbox = Mailbox()
    exchanges = [VirtualExchange(mailbox, r, world_size) for r in range(world_size)]
    fwd = _lockstep([forward_steps(call, exchanges[r], qs[r], ks[r], vs[r]) for r in range(world_size)])
    out = whole([o for o, _ in fwd])
    lse = whole([l for _, l in fwd], dim=2)
    if dout is None:
        return out, lse
    dos = parts(dout)
    bwd = _lockstep([backward_steps(call, exchanges[r], dos[r], qs[r], ks[r], vs[r], *fwd[r])
                     for r in range(world_size)])
    grads = [whole([g[i] for g in bwd]) for i in range(3)]
    assert mailbox.empty(), "every sent tensor was received"
    return (out, lse, *grads)
