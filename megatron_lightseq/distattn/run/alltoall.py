"""The all-to-all of hybrid DistAttn inside one inner group (hybrid.py says what goes where).

Two directions, both point-to-point ops over the inner group's exchange (what NCCL's
all-to-all is made of), so waits have deadlines and failures travel as in the plan's own
transfers (failures.py), and virtual ranks run them with copies (emulate.py):
- :func:`to_heads`: this rank's tokens, all heads -> its outer rank's tokens, its own heads
  (q, k, v forward; d_out backward);
- :func:`to_tokens`: the reverse (out, lse forward; dq, dk, dv backward, K/V gradients of
  heads that several ranks received summed into their owner's).
Both are generators that yield once, after posting and before waiting, like the executor's
step loop, so emulated ranks can run them in lockstep.

Copies: a sender copies its slice of the heads into a contiguous buffer (unavoidable: heads are
the innermost but one dimension); with batch 1 a receiver receives straight into the rows of
its result, so the to_heads side makes no second copy, and the to_tokens side writes each piece
into its head slice once. Legend: B batch, S tokens, H heads, D head dim; the lse is [B, H, S].
"""
from __future__ import annotations

import torch

from ..transport.exchange import Exchange
from ..plan.hybrid import HybridPlan

COUNTERS = ("a2a_bytes_sent", "a2a_bytes_received")  # trace(): intra-group bytes, apart from the plan's


def _seq_dim(x: torch.Tensor) -> int:
    return 2 if x.dim() == 3 else 1  # lse [B, H, S]; the rest [B, S, H, D]


def _head_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() == 3 else 2


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return x.narrow(_seq_dim(x), start, stop - start)


def _heads(x: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return x.narrow(_head_dim(x), span[0], span[1] - span[0])


def _with(x, dim: int, size: int) -> list[int]:
    """The shape of ``x`` (a tensor or a shape) with ``size`` at ``dim``."""
    shape = list(x.shape if isinstance(x, torch.Tensor) else x)
    shape[dim] = size
    return shape


class Side:
    """One rank's part in its inner group's all-to-all: the plan, where it sits, its exchange."""

    def __init__(self, hyb: HybridPlan, rank: int, exchange: Exchange, chunk_len: int) -> None:
        self.hyb, self.rank, self.exchange, self.chunk_len = hyb, rank, exchange, chunk_len
        self.outer_rank, self.inner_rank = hyb.place(rank)
        assert exchange.rank == self.inner_rank and exchange.world_size == hyb.inner, "inner group mismatch"

    def member(self, j: int) -> int:
        return self.outer_rank * self.hyb.inner + j

    def heads(self, kind: str, j: int) -> tuple[int, int]:
        return self.hyb.split.q_heads(j) if kind == "q" else self.hyb.split.kv_heads(j)

    def _wait(self, pending, what: str) -> None:
        try:
            pending.wait()
        except Exception as e:  # noqa: BLE001 - re-raised, named
            raise self.exchange.fail(f"all-to-all ({what})", e) from e


def to_heads(side: Side, xs: list[torch.Tensor], kinds: list[str], what: str):
    """Each local x (kind "q": split by query heads, "kv": by the K/V heads each rank needs) as its
    outer rank's tokens in the outer layout's order, this rank's heads. Generator (module doc)."""
    c, me = side.chunk_len, side.inner_rank
    mine_runs = side.hyb.member_runs(side.rank)
    outs = []
    for x, kind in zip(xs, kinds):
        span = side.heads(kind, me)
        shape = _with(_with(x, _seq_dim(x), x.shape[_seq_dim(x)] * side.hyb.inner), _head_dim(x), span[1] - span[0])
        outs.append(torch.empty(shape, dtype=x.dtype, device=x.device))
    direct = xs[0].shape[0] == 1  # batch 1: the rows of a result are contiguous, receive into them
    sends, recvs, later = [], [], []
    for j in range(side.hyb.inner):
        theirs = side.hyb.member_runs(side.member(j))
        if j == me:
            for x, kind, out in zip(xs, kinds, outs):
                for a, b, n in mine_runs:
                    _rows(out, b * c, (b + n) * c).copy_(_rows(_heads(x, side.heads(kind, me)), a * c, (a + n) * c))
            continue
        sends.append((j, tuple(_rows(_heads(x, side.heads(kind, j)), a * c, (a + n) * c).contiguous()
                               for x, kind in zip(xs, kinds) for a, _, n in mine_runs)))
        bufs = []
        for out in outs:
            for _, b, n in theirs:
                target = _rows(out, b * c, (b + n) * c)
                buf = target if direct else torch.empty(target.shape, dtype=out.dtype, device=out.device)
                bufs.append(buf)
                if not direct:
                    later.append((target, buf))
        recvs.append((j, tuple(bufs)))
    pending = side.exchange.post(sends, recvs, what, counters=COUNTERS)
    yield
    side._wait(pending, what)
    for target, buf in later:
        target.copy_(buf)
    return outs


def to_tokens(side: Side, xs: list[torch.Tensor], kinds: list[str], totals: list[int], what: str):
    """The reverse of to_heads: each outer-space x back to this rank's tokens, all ``totals`` heads
    (H for "q", G for "kv"). "kv" pieces (K/V gradients) are summed: a head that several ranks
    received comes back from each. Generator (module doc)."""
    c, me = side.chunk_len, side.inner_rank
    mine_runs = side.hyb.member_runs(side.rank)
    local_len = sum(n for _, _, n in mine_runs) * c
    outs = []
    for x, kind, total in zip(xs, kinds, totals):
        shape = _with(_with(x, _seq_dim(x), local_len), _head_dim(x), total)
        outs.append((torch.zeros if kind == "kv" else torch.empty)(shape, dtype=x.dtype, device=x.device))

    def land(out, kind, j, a, n, piece):
        target = _rows(_heads(out, side.heads(kind, j)), a * c, (a + n) * c)
        target.add_(piece) if kind == "kv" else target.copy_(piece)

    sends, recvs, later = [], [], []
    for j in range(side.hyb.inner):
        theirs = side.hyb.member_runs(side.member(j))
        if j == me:
            for x, kind, out in zip(xs, kinds, outs):
                for a, b, n in mine_runs:
                    land(out, kind, me, a, n, _rows(x, b * c, (b + n) * c))
            continue
        sends.append((j, tuple(_rows(x, b * c, (b + n) * c).contiguous() for x in xs for _, b, n in theirs)))
        bufs = []
        for x, kind, out in zip(xs, kinds, outs):
            span = side.heads(kind, j)
            for a, _, n in mine_runs:
                buf = torch.empty(_with(_with(x, _seq_dim(x), n * c), _head_dim(x), span[1] - span[0]),
                                  dtype=x.dtype, device=x.device)
                bufs.append(buf)
                later.append((out, kind, j, a, n, buf))
        recvs.append((j, tuple(bufs)))
    pending = side.exchange.post(sends, recvs, what, counters=COUNTERS)
    yield
    side._wait(pending, what)
    for args in later:
        land(*args)
    return outs


def expand_kv(side: Side, ks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Received K/V heads repeated one per local query head where the split needs it (hybrid.py)."""
    index = side.hyb.split.expand(side.inner_rank)
    if index is None:
        return ks
    idx = torch.tensor(index, device=ks[0].device)
    return [k.index_select(2, idx) for k in ks]


def reduce_kv(side: Side, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """expand_kv's adjoint: gradients of repeated heads summed back onto the received ones."""
    index = side.hyb.split.expand(side.inner_rank)
    if index is None:
        return grads
    idx = torch.tensor(index, device=grads[0].device)
    n = side.hyb.split.kv_count(side.inner_rank)
    return [torch.zeros(_with(g, 2, n), dtype=g.dtype, device=g.device).index_add_(2, idx, g) for g in grads]
