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

from ..kernels import resolve_kernel
from ..kernels.mask import make_mask
from .alltoall import Side, expand_kv, reduce_kv, to_heads, to_tokens
from .call import Call, resolve_call
from .executor import backward_steps, forward_steps
from .exchange import Mailbox, VirtualExchange
from .hybrid import resolve_hybrid
from .layout import shard, unshard
from .plan import Shape


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
                      softmax_scale: float | None = None, kernel: str = "auto", heads_group: int | None = None):
    """(out, lse) of dist_attn over ``world_size`` virtual ranks, plus (dq, dk, dv) when ``dout``
    is given; whole-sequence tensors in, whole-sequence tensors out. ``heads_group``: the size U
    of the all-to-all groups of a hybrid split (module docstring)."""
    mask = dict(causal=causal, cu_seqlens=cu_seqlens, window_size=window_size, cu_seqlens_padded=cu_seqlens_padded)
    parts = lambda x, dim=1: [shard(x, layout=layout, rank=r, world_size=world_size, dim=dim, **mask)
                              for r in range(world_size)]
    whole = lambda xs, dim=1: unshard(xs, layout=layout, dim=dim, **mask)
    qs, ks, vs = parts(q), parts(k), parts(v)
    if heads_group is not None:
        results = _emulate_hybrid(qs, ks, vs, None if dout is None else parts(dout), heads_group, layout=layout,
                                  schedule=schedule, mask=make_mask(**mask), softmax_scale=softmax_scale, kernel=kernel)
        return tuple(whole(r, dim=2 if i == 1 else 1) for i, r in enumerate(results))
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


def _emulate_hybrid(qs, ks, vs, dos, inner: int, *, layout, schedule, mask, softmax_scale, kernel):
    """Per-rank (out, lse[, dq, dk, dv]) lists of the hybrid split (emulate_dist_attn)."""
    p = len(qs)
    shape = Shape.of(qs[0], ks[0])
    hyb = resolve_hybrid(shape, world_size=p, inner=inner, layout=layout, schedule=schedule, mask=mask)
    q_count = p // inner
    scale = qs[0].shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    call = Call(hyb.outer, resolve_kernel(kernel, qs[0], ks[0]), scale)
    chunk = shape.seqlen_local // hyb.layout.chunks_per_rank
    inner_boxes = [Mailbox() for _ in range(q_count)]
    sides = [Side(hyb, r, VirtualExchange(inner_boxes[r // inner], r % inner, inner), chunk) for r in range(p)]
    outer_boxes = [Mailbox() for _ in range(inner)]
    outer_ex = [VirtualExchange(outer_boxes[r % inner], r // inner, q_count) for r in range(p)]

    def outer_lockstep(make) -> list:
        """Each head group's outer plan over its P/U ranks; results by P-rank."""
        found = [None] * p
        for j in range(inner):
            members = [o * inner + j for o in range(q_count)]
            for r, result in zip(members, _lockstep([make(r) for r in members])):
                found[r] = result
        return found

    heads = _lockstep([to_heads(sides[r], [qs[r], ks[r], vs[r]], ["q", "kv", "kv"], "q, k, v") for r in range(p)])
    heads = [(q_o, *expand_kv(sides[r], [k_o, v_o])) for r, (q_o, k_o, v_o) in enumerate(heads)]
    fwd = outer_lockstep(lambda r: forward_steps(call, outer_ex[r], *heads[r]))
    back = lambda xs, kinds, totals, what: _lockstep([to_tokens(sides[r], xs[r], kinds, totals, what) for r in range(p)])
    out = [o for (o,) in back([[o] for o, _ in fwd], ["q"], [shape.nheads], "out")]
    lse = [l for (l,) in back([[l] for _, l in fwd], ["q"], [shape.nheads], "lse")]
    if dos is None:
        return out, lse
    dout_o = [d for (d,) in _lockstep([to_heads(sides[r], [dos[r]], ["q"], "d_out") for r in range(p)])]
    bwd = outer_lockstep(lambda r: backward_steps(call, outer_ex[r], dout_o[r], *heads[r], *fwd[r]))
    bwd = [(dq, *reduce_kv(sides[r], [dk, dv])) for r, (dq, dk, dv) in enumerate(bwd)]
    grads = back([list(g) for g in bwd], ["q", "kv", "kv"], [shape.nheads, shape.nheads_kv, shape.nheads_kv],
                 "dq, dk, dv")
    assert all(box.empty() for box in inner_boxes + outer_boxes), "every sent tensor was received"
    return out, lse, *zip(*grads)
