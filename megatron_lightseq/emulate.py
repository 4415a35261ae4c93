"""P virtual ranks in one process: the same plans, kernels and executor as dist_attn, with device
copies in place of sends. One GPU cannot run two NCCL ranks, so this is how the compute side of
DistAttn is checked against the oracle and measured on one card.

    out, lse, dq, dk, dv = emulate_dist_attn(q, k, v, dout, world_size=8, layout="zigzag")

Inputs and results are whole-sequence tensors (batch, seqlen, heads, headdim); the ranks run in
lockstep, each step's transfers delivered before any rank waits on them.
"""
from __future__ import annotations

from collections import defaultdict, deque

import torch

from .comm import Pending
from .executor import backward_steps, forward_steps
from .kernels import resolve_kernel
from .layout import shard, unshard
from .plan import Shape
from .schedules import build_plan, choose_schedule
from .trace import count


class _Mailbox:
    """Tensors in flight between virtual ranks, in order per (src, dst) pair."""

    def __init__(self) -> None:
        self.queues: dict[tuple[int, int], deque] = defaultdict(deque)


class _Delivery(Pending):
    def __init__(self, mailbox: _Mailbox, rank: int, recvs) -> None:
        super().__init__([])
        self._mailbox, self._rank, self._recvs = mailbox, rank, recvs

    def wait(self) -> None:
        for peer, buffers in self._recvs:
            for buf in buffers:
                buf.copy_(self._mailbox.queues[peer, self._rank].popleft())
        self._recvs = []


class VirtualExchange:
    """The Exchange interface for one virtual rank: a send is a device copy into the mailbox."""

    def __init__(self, mailbox: _Mailbox, rank: int) -> None:
        self._mailbox, self._rank = mailbox, rank

    def post(self, sends, recvs) -> Pending:
        for peer, tensors in sends:
            for t in tensors:
                self._mailbox.queues[self._rank, peer].append(t.clone())
        count(bytes_sent=sum(t.numel() * t.element_size() for _, ts in sends for t in ts),
              bytes_received=sum(t.numel() * t.element_size() for _, ts in recvs for t in ts))
        return _Delivery(self._mailbox, self._rank, recvs)


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
                      causal: bool = True, softmax_scale: float | None = None, kernel: str = "auto"):
    """(out, lse) of dist_attn over ``world_size`` virtual ranks, plus (dq, dk, dv) when ``dout``
    is given; whole-sequence tensors in, whole-sequence tensors out."""
    b, n, h, d = q.shape
    per = n // world_size
    if schedule == "auto":
        schedule = choose_schedule(layout, world_size, causal, Shape(b, per, h, k.shape[2], d, q.dtype))
    plan = build_plan(schedule, layout=layout, world_size=world_size, causal=causal)
    blocks = resolve_kernel(kernel, q, k)
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    parts = lambda x: [shard(x, layout=layout, rank=r, world_size=world_size) for r in range(world_size)]
    qs, ks, vs = parts(q), parts(k), parts(v)
    mailbox = _Mailbox()
    exchanges = [VirtualExchange(mailbox, r) for r in range(world_size)]
    fwd = _lockstep([forward_steps(plan, r, exchanges[r], blocks, qs[r], ks[r], vs[r], scale=scale)
                     for r in range(world_size)])
    out = unshard([o for o, _ in fwd], layout=layout)
    lse = unshard([l for _, l in fwd], layout=layout, dim=2)
    if dout is None:
        return out, lse
    dos = parts(dout)
    bwd = _lockstep([backward_steps(plan, r, exchanges[r], blocks, dos[r], qs[r], ks[r], vs[r], fwd[r][0], fwd[r][1],
                                    scale=scale) for r in range(world_size)])
    grads = [unshard([g[i] for g in bwd], layout=layout) for i in range(3)]
    assert not any(mailbox.queues.values()), "every sent tensor was received"
    return (out, lse, *grads)
