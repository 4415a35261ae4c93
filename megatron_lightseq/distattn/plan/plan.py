"""The plan: a DistAttn schedule as plain data, checked and costed without any process.

``plan.forward[t][rank]`` (and ``plan.backward``) is a :class:`RankStep`: the blocks ``rank``
computes at step t, and the transfers it posts at step t. The executor runs, on every rank::

    post(step 0 transfers)
    for t: wait(step t transfers); post(step t+1 transfers); compute(step t blocks)

so step t+1's transfers travel while step t computes (double buffering). It follows that a
block of step t may use what arrived at steps <= t, and a transfer of step s may send what
arrived at steps <= s-1 or what blocks of steps <= s-2 produced. The trailing steps of a plan
may carry transfers only: they return the last partial results.

A running rank builds only its own rows, a :class:`RankPlan` (``build_plan(..., rank=r)``): the
same steps as the whole plan's ``forward[t][r]`` (every step, empty ones included), built from
the work that touches r alone (schedules.py). The whole :class:`Plan` is for the checks
(check.py), describe() and the tests.

Payload kinds (what travels; ``owner`` is the rank whose tokens they are):
  forward  ``kv``  k and v of ``chunks``               (to a rank that computes with them)
           ``q``   q of ``chunks``                     (to a helper)
           ``o``   partial out and lse of ``chunks``   (from a helper back to the owner)
  backward ``kv``  as in forward
           ``qg``  q, out, lse, d_out of ``chunks``    (to a helper)
           ``dq``  partial dq                           (helper -> owner)
           ``dkv`` partial dk and dv                    (back to the kv owner)

``Shape.kv_wire`` "int8" makes every ``kv`` payload travel as int8 with float32 scales (one per
(batch, head, channel) of K over the payload's tokens, one per (batch, token, head) of V); every
other payload keeps the inputs' dtype (docs/kv_wire.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch

from ...kernels.base import accum_dtype
from ...kernels.wire_form import SCALE_DTYPE as WIRE_SCALE
from .mask import Mask
from .layout import Layout, as_count, check_place

KV_WIRES = (None, "int8")  # how kv payloads travel: None, in the inputs' dtype; "int8", quantized
INPUT_KINDS = ("kv", "q", "qg")  # the rest (o, dq, dkv) are partial results, sent home once
PHASES = ("forward", "backward", "both")


# The plan's parts are named tuples: a P = 64 plan for documents has ten thousand of them, built
# per batch, and tuples hash, compare and construct in C.
class Payload(NamedTuple):
    kind: str
    owner: int
    chunks: tuple[int, ...]


class Transfer(NamedTuple):
    src: int
    dst: int
    payload: Payload


class Block(NamedTuple):
    """One kernel call: queries of ``q_chunks`` (owned by q_owner) against keys of ``kv_chunks``."""

    q_owner: int
    q_chunks: tuple[int, ...]
    kv_owner: int
    kv_chunks: tuple[int, ...]


class RankStep(NamedTuple):
    blocks: tuple[Block, ...] = ()
    sends: tuple[Transfer, ...] = ()
    recvs: tuple[Transfer, ...] = ()


Steps = tuple[tuple[RankStep, ...], ...]


@dataclass(frozen=True)
class Shape:
    """The sizes that turn a plan's payloads into bytes (per rank's local tensors)."""

    batch: int
    seqlen_local: int
    nheads: int
    nheads_kv: int
    headdim: int
    dtype: torch.dtype
    kv_wire: str | None = None  # one of KV_WIRES: the form kv payloads travel in

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, kv_wire: str | None = None) -> "Shape":
        b, s, h, d = q.shape
        return cls(batch=b, seqlen_local=s, nheads=h, nheads_kv=k.shape[2], headdim=d, dtype=q.dtype, kv_wire=kv_wire)

    @staticmethod
    def problem(shape) -> str | None:
        """What is wrong with ``shape`` as a Shape a user gave, or None."""
        if not isinstance(shape, Shape):
            return f"shape must be a Shape(batch, seqlen_local, nheads, nheads_kv, headdim, dtype), got {shape!r}"
        sizes = (shape.batch, shape.seqlen_local, shape.nheads, shape.nheads_kv, shape.headdim)
        if not all(as_count(x) is not None and x >= 1 for x in sizes):
            return f"batch, seqlen_local, nheads, nheads_kv and headdim must be positive ints, got {sizes}"
        if shape.nheads % shape.nheads_kv:
            return f"nheads ({shape.nheads}) must be a multiple of nheads_kv ({shape.nheads_kv})"
        if not isinstance(shape.dtype, torch.dtype):
            return f"dtype must be a torch.dtype, got {shape.dtype!r}"
        return kv_wire_problem(shape.kv_wire)


def kv_wire_problem(kv_wire) -> str | None:
    """What is wrong with ``kv_wire`` as a user gave it, or None."""
    if not any(kv_wire is w or (isinstance(kv_wire, str) and kv_wire == w) for w in KV_WIRES):
        return f"kv_wire must be one of {KV_WIRES}, got {kv_wire!r}"
    return None


class PairWork:
    """The share of a full chunk-by-chunk block each (query chunk, key chunk) pair computes, 0
    where the mask hides all of it (nothing computed, nothing sent). Plain masks: 1, or half for
    a causal diagonal; other masks: the exact unmasked area of the pairs with any (work.py), from
    which the rank-pair sums and the blocks come in O(pairs with work), never a dense matrix."""

    def __init__(self, layout: Layout, mask: Mask) -> None:
        self.causal, self.layout = mask.causal, layout
        self.pairs = None  # work.ChunkPairs, where the layout was cut for a length
        if layout.padded_tokens is not None:
            from .work import chunk_pairs

            self._full = (layout.padded_tokens // layout.chunk_count) ** 2
            self.pairs = chunk_pairs(mask, layout.padded_tokens, layout.chunk_count)

    @cached_property
    def counts(self):
        """numpy int64 [chunks, chunks], query-key pairs (layouts cut for a length), else None:
        dense, for the whole plans' checks and the tests."""
        return None if self.pairs is None else self.pairs.dense()

    @cached_property
    def area(self):
        """numpy [chunks, chunks] in full chunk pairs (layouts cut for a length), else None."""
        return None if self.counts is None else self.counts / self._full

    @cached_property
    def _rows(self) -> list:
        return self.area.tolist()  # Python floats: one lookup per pair for the checks' loops

    def __call__(self, q_chunk: int, kv_chunk: int) -> float:
        if self.pairs is not None:
            return self._rows[q_chunk][kv_chunk]
        if not self.causal or kv_chunk < q_chunk:
            return 1.0
        return 0.5 if kv_chunk == q_chunk else 0.0

    def size(self, block: "Block") -> float:
        """The block's work in full chunk pairs. Sums exact integers, then divides once: the rank
        pair sums (:attr:`pair_sizes`) give the very same floats, whatever the order."""
        if self.pairs is None:
            return sum(self(qc, kc) for qc in block.q_chunks for kc in block.kv_chunks)
        return int(self.counts[list(block.q_chunks)][:, list(block.kv_chunks)].sum()) / self._full

    @cached_property
    def _by_pair(self):
        """(rank pair id x * P + y of each chunk pair with work, its query and key chunks' places
        in x's and y's chunks) (layouts cut for a length)."""
        import numpy as np

        p, m = self.layout.world_size, self.layout.chunks_per_rank
        owned = np.array(self.layout.owners).ravel()
        rank, place = np.empty(len(owned), dtype=np.int64), np.empty(len(owned), dtype=np.int64)
        rank[owned], place[owned] = np.repeat(np.arange(p), m), np.tile(np.arange(m), p)
        rows, cols = self.pairs.rows, self.pairs.cols
        return rank[rows] * p + rank[cols], place[rows], place[cols]

    @cached_property
    def pair_sizes(self):
        """numpy [P, P] (layouts cut for a length only): the work between rank x's queries and
        rank y's keys, equal to ``size(blocks[x, y])`` (chunks left out of a block have none);
        0 where the pair has no block."""
        import numpy as np

        p = self.layout.world_size
        pair, _, _ = self._by_pair
        # exact: integer counts summed in float64 stay integers far below 2**53
        return np.bincount(pair, weights=self.pairs.counts, minlength=p * p).reshape(p, p) / self._full

    @cached_property
    def _needs(self):
        """(rank pair ids with work, sorted; [pairs, m] bool twice: which of x's query chunks and
        of y's key chunks have work in the pair)."""
        import numpy as np

        pair, q_place, kv_place = self._by_pair
        ids = np.flatnonzero(self.pair_sizes.ravel())
        index = np.empty(self.pair_sizes.size, dtype=np.int64)
        index[ids] = np.arange(len(ids))
        at, m = index[pair], self.layout.chunks_per_rank
        q_need, kv_need = np.zeros((len(ids), m), dtype=bool), np.zeros((len(ids), m), dtype=bool)
        q_need[at, q_place] = True
        kv_need[at, kv_place] = True
        return ids, q_need, kv_need

    def block(self, x: int, y: int) -> "Block | None":
        """``blocks.get((x, y))``; on the plain layouts (one or two chunks a rank) worked out for
        this pair alone, so that one rank's plan does not pay for every pair."""
        if self.pairs is None:
            return self._pair(self.layout.owners, x, y)
        return self.blocks.get((x, y))

    def needed(self, xs, ys):
        """numpy bool [n, m] twice (layouts cut for a length): which of x's query chunks and of y's
        key chunks have work in the pair (xs[i], ys[i]), each a pair with work, in the owners'
        local order."""
        import numpy as np

        ids, q_need, kv_need = self._needs
        at = np.searchsorted(ids, np.asarray(xs) * self.layout.world_size + np.asarray(ys))
        return q_need[at], kv_need[at]

    def blocks_of(self, xs, ys) -> list["Block"]:
        """The blocks of the pairs (xs[i], ys[i]), each with work (layouts cut for a length): only
        the chunks with work on either side, found for these pairs alone."""
        q_need, kv_need = (need.tolist() for need in self.needed(xs, ys))
        rows = self.layout.owners
        return [Block(x, tuple(c for c, n in zip(rows[x], qn) if n), y, tuple(c for c, n in zip(rows[y], kn) if n))
                for x, y, qn, kn in zip(xs.tolist(), ys.tolist(), q_need, kv_need)]

    @cached_property
    def blocks(self) -> dict[tuple[int, int], "Block"]:
        """(q owner, kv owner) -> the one block holding all the work between their chunks (only
        the chunks with work on either side); pairs without work are absent."""
        owners = self.layout.owners
        p = len(owners)
        if self.pairs is None:
            return {(x, y): b for x in range(p) for y in range(p) if (b := self._pair(owners, x, y))}
        import numpy as np

        xs, ys = np.divmod(self._needs[0], p)
        return {(b.q_owner, b.kv_owner): b for b in self.blocks_of(xs, ys)}

    def _pair(self, owners, x: int, y: int) -> "Block | None":
        need = [(qc, kc) for qc in owners[x] for kc in owners[y] if self(qc, kc)]
        if not need:
            return None
        return Block(x, tuple(c for c in owners[x] if any(qc == c for qc, _ in need)), y,
                     tuple(c for c in owners[y] if any(kc == c for _, kc in need)))


def payload_tensors(kind: str, tokens: int, s: Shape) -> tuple[tuple[tuple[int, ...], torch.dtype, int], ...]:
    """(shape, dtype, sequence dim) of each tensor a ``kind`` payload over ``tokens`` tokens carries,
    in the order they travel. The executor allocates receive buffers from this, and the byte
    counts come from it, so prediction and measurement cannot drift apart."""
    q = ((s.batch, tokens, s.nheads, s.headdim), s.dtype, 1)
    kv = ((s.batch, tokens, s.nheads_kv, s.headdim), s.dtype, 1)
    lse = ((s.batch, s.nheads, tokens), accum_dtype(s.dtype), 2)  # LSEs travel as they are merged
    if kind == "kv" and s.kv_wire == "int8":
        # keys carry their outliers in fixed channels: a scale per (head, channel) over the tokens
        # (no sequence dim); values one per (token, head)
        kv8 = ((s.batch, tokens, s.nheads_kv, s.headdim), torch.int8, 1)
        return (kv8, ((s.batch, 1, s.nheads_kv, s.headdim), WIRE_SCALE, None),
                kv8, ((s.batch, tokens, s.nheads_kv, 1), WIRE_SCALE, 1))  # k, k scale, v, v scale
    return {
        "kv": (kv, kv),  # k, v
        "q": (q,),
        "o": (q, lse),  # out, lse
        "qg": (q, q, lse, q),  # q, out, lse, d_out
        "dq": (q,),
        "dkv": (kv, kv),  # dk, dv
    }[kind]


def payload_bytes(kind: str, tokens: int, s: Shape) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in payload_tensors(kind, tokens, s))


def _check_shape(shape: Shape, chunks_per_rank: int) -> int:
    """The chunk length for local tensors of ``shape``; ValueError for a shape a user got wrong."""
    problem = Shape.problem(shape)
    if problem or shape.seqlen_local % chunks_per_rank:
        raise ValueError(problem or f"seqlen_local must be a multiple of the {chunks_per_rank} "
                                    f"chunks a rank holds, got {shape.seqlen_local}")
    return shape.seqlen_local // chunks_per_rank


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


@dataclass(frozen=True)
class RankPlan:
    """One rank's view of a plan: ``forward[t]`` and ``backward[t]`` are its :class:`RankStep` at
    step t (every rank's view has every step, empty ones included, so that all ranks walk the
    same number). All the executor, the trace and the memory model read."""

    schedule: str
    layout: Layout
    mask: Mask
    rank: int
    forward: tuple[RankStep, ...]
    backward: tuple[RankStep, ...]

    @cached_property
    def runtime(self) -> dict:
        """Scratch space the executor fills once per view (what it drops when), so that no call
        works it out again; not part of the plan's value."""
        return {}

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def owned(self) -> tuple[int, ...]:
        """This rank's chunks, in its local order."""
        return self.layout.owners[self.rank]

    def steps(self, phase: str) -> tuple[RankStep, ...]:
        return self.forward if phase == "forward" else self.backward

    def traffic(self, shape: Shape, phase: str = "both", side: str = "sends") -> int:
        """Bytes this rank sends (``side="sends"``) or receives (``"recvs"``) in ``phase``."""
        _check_phase(phase)
        chunk = _check_shape(shape, self.layout.chunks_per_rank)
        phases = (self.forward, self.backward) if phase == "both" else (getattr(self, phase),)
        return sum(payload_bytes(tr.payload.kind, chunk * len(tr.payload.chunks), shape)
                   for steps in phases for rs in steps for tr in getattr(rs, side))


@dataclass(frozen=True)
class Plan:
    """Every rank's steps: ``forward[t][rank]``. For the checks of the whole (check.py),
    describe() and the tests; a running rank builds and reads its own :class:`RankPlan`."""

    schedule: str
    layout: Layout
    mask: Mask
    forward: Steps
    backward: Steps
    work: PairWork = field(compare=False, repr=False, default=None)

    def view(self, rank: int) -> RankPlan:
        """Rank ``rank``'s rows, as build_plan(..., rank=rank) gives them."""
        check_place(rank, self.world_size)
        return RankPlan(self.schedule, self.layout, self.mask, rank, tuple(step[rank] for step in self.forward),
                        tuple(step[rank] for step in self.backward))

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def causal(self) -> bool:
        return self.mask.causal

    @property
    def chunk_count(self) -> int:
        return self.layout.chunk_count

    def owned(self, rank: int) -> tuple[int, ...]:
        return self.layout.owners[rank]

    @property
    def compute_steps(self) -> int:
        """Steps in which some rank computes (the forward and backward have the same)."""
        return sum(1 for step in self.forward if any(rs.blocks for rs in step))

    @cached_property
    def critical_work(self) -> float:
        """Sum over steps of the busiest rank's work, in units of one full rank-by-rank block
        ((N/P)^2 query-key pairs); a causal diagonal chunk counts half."""
        per_rank = self.layout.chunks_per_rank
        total = 0.0
        for step in self.forward:
            total += max((sum(self.block_work(b) for b in rs.blocks) for rs in step), default=0.0)
        return total / per_rank**2

    def block_work(self, block: Block) -> float:
        """Chunk-pairs a block computes (causal diagonal chunks count half)."""
        return self.work.size(block)

    def critical_bytes(self, shape: Shape) -> int:
        """Sum over steps, forward and backward, of the most bytes any one rank receives: the
        traffic that gates the step when transfers are not hidden behind compute."""
        chunk = shape.seqlen_local // self.layout.chunks_per_rank
        return sum(
            max(sum(payload_bytes(tr.payload.kind, chunk * len(tr.payload.chunks), shape) for tr in rs.recvs)
                for rs in step)
            for steps in (self.forward, self.backward) for step in steps
        )

    def traffic(self, rank: int, shape: Shape, phase: str = "both", side: str = "sends") -> int:
        """Bytes ``rank`` sends (``side="sends"``) or receives (``"recvs"``) in ``phase``."""
        _check_phase(phase)
        return self.view(rank).traffic(shape, phase, side)

    def bytes_sent(self, rank: int, *, batch: int, seqlen_local: int, nheads: int, nheads_kv: int,
                   headdim: int, dtype: torch.dtype, phase: str = "both") -> int:
        """Exact bytes ``rank`` sends in one dist_attn call (``phase``: forward, backward, both)."""
        shape = Shape(batch, seqlen_local, nheads, nheads_kv, headdim, dtype)
        return self.traffic(rank, shape, phase, "sends")

    def bytes_received(self, rank: int, *, batch: int, seqlen_local: int, nheads: int, nheads_kv: int,
                       headdim: int, dtype: torch.dtype, phase: str = "both") -> int:
        shape = Shape(batch, seqlen_local, nheads, nheads_kv, headdim, dtype)
        return self.traffic(rank, shape, phase, "recvs")

    def describe(self) -> str:
        """A table of the forward plan, one line per step: what each rank computes."""
        lines = [f"{self.schedule} on {self.layout.name}, P={self.world_size}, " + (
            f"causal={self.causal}" if self.mask.plain else f"{self.mask}")]
        for t, step in enumerate(self.forward):
            cells = []
            for rank, rs in enumerate(step):
                work = " ".join(
                    f"Q{','.join(map(str, b.q_chunks))}K{','.join(map(str, b.kv_chunks))}"
                    + ("" if b.q_owner == rank else "(help)")
                    for b in rs.blocks
                )
                cells.append(work or "-")
            lines.append(f"t={t}: " + " | ".join(cells))
        return "\n".join(lines)
