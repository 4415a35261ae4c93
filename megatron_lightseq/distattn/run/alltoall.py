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

Pieces: between two members of a group only whole tensors travel, one per x and peer: a sender
takes the peer's heads of its tokens (to_heads) or the peer's tokens of its heads (to_tokens, one
index_select where they are several stretches of the outer tokens); a receiver places a piece
with one copy (into the rows of its result, or receives straight into them where they are one
contiguous stretch) or one index_copy_. So the host ops per call do not grow with the runs of
chunks a balanced layout makes. Legend: B batch, S tokens, H heads, D head dim; the lse is [B, H, S].
"""
from __future__ import annotations

import torch

from ..transport.exchange import Exchange
from ..plan.hybrid import HybridPlan
from .rows import Rows, pick, place, rows_of, seq_dim

COUNTERS = ("a2a_bytes_sent", "a2a_bytes_received")  # trace(): intra-group bytes, apart from the plan's


def _head_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() == 3 else 2


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

    def rows(self, j: int, device: torch.device) -> Rows:
        """Inner rank j's tokens, in its local order, among the outer rank's."""
        return rows_of(self.hyb.member_runs(self.member(j)), self.chunk_len, device)

    def heads(self, kind: str, j: int) -> tuple[int, int]:
        return self.hyb.split.q_heads(j) if kind == "q" else self.hyb.split.kv_heads(j)

    def exchange_pieces(self, sends, recvs, what: str):
        """Post, yield once (module doc), wait: the generator both directions end with."""
        pending = self.exchange.post(sends, recvs, what, counters=COUNTERS)
        yield
        try:
            pending.wait()
        except Exception as e:  # noqa: BLE001 - re-raised, named
            raise self.exchange.fail(f"all-to-all ({what})", e) from e


def to_heads(side: Side, xs: list[torch.Tensor], kinds: list[str], what: str):
    """Each local x (kind "q": split by query heads, "kv": by the K/V heads each rank needs) as its
    outer rank's tokens in the outer layout's order, this rank's heads. Generator (module doc)."""
    me, device = side.inner_rank, xs[0].device
    outs = []
    for x, kind in zip(xs, kinds):
        span = side.heads(kind, me)
        shape = _with(_with(x, seq_dim(x), x.shape[seq_dim(x)] * side.hyb.inner), _head_dim(x), span[1] - span[0])
        outs.append(torch.empty(shape, dtype=x.dtype, device=device))
    sends, recvs, later = [], [], []
    for j in range(side.hyb.inner):
        rows = side.rows(j, device)
        if j == me:
            for x, kind, out in zip(xs, kinds, outs):
                place(out, rows, _heads(x, side.heads(kind, me)))
            continue
        sends.append((j, tuple(_heads(x, side.heads(kind, j)).contiguous() for x, kind in zip(xs, kinds))))
        bufs = []
        for x, out in zip(xs, outs):
            target = pick(out, rows) if isinstance(rows, tuple) else None
            if target is None or not target.is_contiguous():  # receive apart, placed after the wait
                target = torch.empty(_with(out, seq_dim(out), x.shape[seq_dim(x)]), dtype=out.dtype, device=device)
                later.append((out, rows, target))
            bufs.append(target)
        recvs.append((j, tuple(bufs)))
    yield from side.exchange_pieces(sends, recvs, what)
    for out, rows, buf in later:
        place(out, rows, buf)
    return outs


def to_tokens(side: Side, xs: list[torch.Tensor], kinds: list[str], totals: list[int], what: str):
    """The reverse of to_heads: each outer-space x back to this rank's tokens, all ``totals`` heads
    (H for "q", G for "kv"). "kv" pieces (K/V gradients) are summed: a head that several ranks
    received comes back from each. Generator (module doc)."""
    me, device = side.inner_rank, xs[0].device
    local_len = xs[0].shape[seq_dim(xs[0])] // side.hyb.inner
    outs = []
    for x, kind, total in zip(xs, kinds, totals):
        shape = _with(_with(x, seq_dim(x), local_len), _head_dim(x), total)
        outs.append((torch.zeros if kind == "kv" else torch.empty)(shape, dtype=x.dtype, device=device))

    def land(out, kind, j, piece):  # this rank's tokens, inner rank j's heads
        target = _heads(out, side.heads(kind, j))
        target.add_(piece) if kind == "kv" else target.copy_(piece)

    sends, recvs, later = [], [], []
    for j in range(side.hyb.inner):
        rows = side.rows(j, device)
        if j == me:
            for x, kind, out in zip(xs, kinds, outs):
                land(out, kind, me, pick(x, rows))
            continue
        sends.append((j, tuple(pick(x, rows).contiguous() for x in xs)))
        bufs = [torch.empty(_with(_with(x, seq_dim(x), local_len), _head_dim(x), side.heads(kind, j)[1]
                                  - side.heads(kind, j)[0]), dtype=x.dtype, device=device) for x, kind in zip(xs, kinds)]
        later.extend((out, kind, j, buf) for out, kind, buf in zip(outs, kinds, bufs))
        recvs.append((j, tuple(bufs)))
    yield from side.exchange_pieces(sends, recvs, what)
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
