"""Hybrid head x sequence parallelism as data: an all-to-all over an inner group of U ranks
(Ulysses: the sequence gathered, the heads scattered) around a DistAttn plan over the outer
group of P/U ranks. Pure Python, no process: what travels where, and how many bytes, is known
before anything runs (docs/hybrid.md).

Ranks. The P ranks of the layout are numbered ``outer_rank * U + inner_rank``, as Megatron's
hierarchical CP groups number them (``create_hierarchical_groups``: the a2a group holds
consecutive CP ranks, the p2p group every U-th).

Tokens. Before the all-to-all rank (o, i) holds the chunks ``layout.owners[o*U + i]`` of the
P-rank layout, all heads. After it, every member of inner group o holds the chunks of all U
members, sorted by chunk id, for its share of the heads: that union is the outer layout's rank o
(:func:`outer_layout`). Chunk ids are the P-rank layout's, so positions, and with them the mask
(causal, documents, window), carry over as they are. On the plain layouts the union is the
same layout over P/U ranks with chunks U times longer (contiguous: U neighbouring chunks;
zigzag: halves 2P-1-oU-U+1 .. 2P-1-oU and oU .. oU+U-1, the zigzag of P/U ranks).

Heads (:class:`HeadSplit`). Inner rank j computes query heads [j H/U, (j+1) H/U). It receives
the K/V heads those queries use and no others: G/U of them when U divides G, else the few it
shares with its neighbours (K/V heads fewer than U, or not a multiple of it), which are then
sent to each rank that needs them and counted as such. Where those heads cannot serve the local
queries as a plain GQA ratio (h/n not whole), they are repeated locally, one per query head,
after they arrive: a device copy, not traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from ...kernels.base import accum_dtype
from .layout import Layout, fitted_layout, layout_of
from .mask import Mask, mask_of
from .plan import PHASES, Plan, RankPlan, Shape
from .runs import Run, chunk_runs
from .schedules import SCHEDULES, auto_schedule, plan_for, rank_plan

LINKS = ("intra", "inter")  # the all-to-all inside the inner group; the outer plan's point-to-point


def split_problem(world_size: int, inner: int, nheads: int, nheads_kv: int) -> str | None:
    """What is wrong with splitting ``world_size`` ranks as ``inner`` x world_size/inner over
    these heads, or None."""
    if not (isinstance(inner, int) and not isinstance(inner, bool) and inner >= 1):
        return f"the all-to-all group size must be a positive int, got {inner!r}"
    if world_size % inner:
        return (f"the all-to-all group size ({inner}) must divide the context-parallel size ({world_size}): "
                f"sizes that fit are {[u for u in range(1, world_size + 1) if world_size % u == 0]}")
    if nheads % inner:
        return (f"the attention heads ({nheads} on this rank) must be a multiple of the all-to-all group size "
                f"({inner}): each of its ranks computes nheads / {inner} of them")
    if nheads_kv < 1 or nheads % nheads_kv:
        return f"nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})"
    return None


@dataclass(frozen=True)
class HeadSplit:
    """Which heads each of ``size`` inner ranks computes (query heads) and receives (K/V heads)."""

    nheads: int
    nheads_kv: int
    size: int

    @property
    def local_heads(self) -> int:
        return self.nheads // self.size

    def q_heads(self, j: int) -> tuple[int, int]:
        h = self.local_heads
        return j * h, (j + 1) * h

    def kv_heads(self, j: int) -> tuple[int, int]:
        """[start, stop) of the K/V heads inner rank j's queries use (head h uses h // (H/G))."""
        ratio = self.nheads // self.nheads_kv
        first, last = self.q_heads(j)
        return first // ratio, (last - 1) // ratio + 1

    def kv_count(self, j: int) -> int:
        start, stop = self.kv_heads(j)
        return stop - start

    def expand(self, j: int) -> tuple[int, ...] | None:
        """For each local query head, the index of its K/V head among the received ones, when the
        received heads cannot serve as a plain GQA ratio; None when they can (the usual case)."""
        h, n = self.local_heads, self.kv_count(j)
        ratio, (first, _), (kv_first, _) = self.nheads // self.nheads_kv, self.q_heads(j), self.kv_heads(j)
        index = tuple((first + a) // ratio - kv_first for a in range(h))
        if h % n == 0 and all(index[a] == a // (h // n) for a in range(h)):
            return None
        return index

    def local_kv(self, j: int) -> int:
        """K/V heads the kernels see on inner rank j."""
        return self.kv_count(j) if self.expand(j) is None else self.local_heads


def outer_layout(layout: Layout, inner: int) -> Layout:
    """The layout the outer plan runs on (module docstring): outer rank o holds every chunk of
    the ranks o*inner .. o*inner + inner - 1, sorted."""
    q = layout.world_size // inner
    owners = tuple(tuple(sorted(c for i in range(inner) for c in layout.owners[o * inner + i])) for o in range(q))
    return Layout(layout.name, owners, layout.tokens, layout.padded_tokens)


@dataclass(frozen=True)
class HybridPlan:
    """The P-rank ``layout`` split as ``inner`` x P/inner: the all-to-all's heads (``split``) and
    the outer plan of ``schedule`` over :func:`outer_layout`."""

    layout: Layout
    inner: int
    schedule: str
    mask: Mask
    split: HeadSplit

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @cached_property
    def outer_layout(self) -> Layout:
        return outer_layout(self.layout, self.inner)

    @cached_property
    def outer(self) -> Plan:
        """The whole outer plan (describe(), the tests); a running rank reads :meth:`outer_view`."""
        return plan_for(self.schedule, self.outer_layout, self.mask)

    def outer_view(self, outer_rank: int) -> RankPlan:
        return rank_plan(self.schedule, self.outer_layout, self.mask, outer_rank)

    def place(self, rank: int) -> tuple[int, int]:
        """(outer rank, inner rank) of a P-layout rank."""
        return divmod(rank, self.inner)

    def outer_shape(self, shape: Shape, inner_rank: int) -> Shape:
        """The outer plan's local sizes on inner rank ``inner_rank``, from the P-rank local ones."""
        return Shape(shape.batch, shape.seqlen_local * self.inner, self.split.local_heads,
                     self.split.local_kv(inner_rank), shape.headdim, shape.dtype, shape.kv_wire)

    def member_runs(self, rank: int) -> tuple[Run, ...]:
        """P-layout rank ``rank``'s chunks' runs in its outer rank's tokens (runs.chunk_runs)."""
        return chunk_runs(self.layout.owners[rank], self.outer_layout.owners[rank // self.inner])

    def bytes(self, rank: int, shape: Shape, *, phase: str = "both", side: str = "sends", link: str = "intra",
              lse: bool = False) -> int:
        """Bytes ``rank`` (of the P ranks) sends (or receives, ``side="recvs"``) in ``phase`` over
        ``link``: "intra", the all-to-all (q, k, v in, out back; d_out in, dq, dk, dv back; the
        lse back too with ``lse``, as return_lse asks), or "inter", the outer plan's transfers.
        ``shape``: the P-rank local sizes. The executor's transfers are built from the same
        sizes, so trace() measures exactly this."""
        if phase not in PHASES or side not in ("sends", "recvs") or link not in LINKS:
            raise ValueError(f"phase, side and link must be one of {PHASES}, ('sends', 'recvs') and {LINKS}, "
                             f"got {phase!r}, {side!r}, {link!r}")
        o, i = self.place(rank)
        if link == "inter":
            return self.outer_view(o).traffic(self.outer_shape(shape, i), phase, side)
        item = shape.dtype.itemsize
        token = shape.batch * shape.seqlen_local * shape.headdim * item  # one head of one rank's tokens
        h = self.split.local_heads
        lse_bytes = shape.batch * shape.seqlen_local * h * accum_dtype(shape.dtype).itemsize if lse else 0
        total = 0
        for j in range(self.inner):
            if j == i:
                continue
            mine, theirs = self.split.kv_count(i), self.split.kv_count(j)
            # forward: q, k, v to their heads' owner; out (and lse) back to the tokens' owner
            to_peer, from_peer = (h + 2 * theirs) * token, (h + 2 * mine) * token
            fwd = to_peer + h * token + lse_bytes if side == "sends" else from_peer + h * token + lse_bytes
            # backward: d_out to the heads' owner; dq, dk, dv back to the tokens' owner
            bwd = (h + h + 2 * mine) * token if side == "sends" else (h + h + 2 * theirs) * token
            total += {"forward": fwd, "backward": bwd, "both": fwd + bwd}[phase]
        return total

    def describe(self) -> str:
        """The split, each outer rank's chunks, then the outer plan (Plan.describe)."""
        q = self.world_size // self.inner
        lines = [f"hybrid {self.inner} x {q} (all-to-all over {self.inner} ranks, {self.schedule} over {q})"]
        for o in range(q):
            members = ", ".join(str(o * self.inner + i) for i in range(self.inner))
            lines.append(f"outer rank {o} = ranks {members}: chunks {self.outer_layout.owners[o]}")
        return "\n".join(lines + [self.outer.describe()])


def replicated_kv_heads(split: HeadSplit) -> int:
    """K/V heads received beyond G over the inner group: what the split replicates (0 when U divides G)."""
    return sum(split.kv_count(j) for j in range(split.size)) - split.nheads_kv


def resolve_hybrid(shape: Shape, *, world_size: int, inner: int, layout: str, schedule: str,
                   mask: Mask) -> HybridPlan:
    """The hybrid plan for P-rank local tensors of ``shape``; ValueError for a bad split or a
    length that does not fit the mask. ``schedule`` "auto" is resolved for the outer plan's
    sizes (those of inner rank 0: every outer group then runs the same schedule)."""
    problem = split_problem(world_size, inner, shape.nheads, shape.nheads_kv)
    if problem:
        raise ValueError(problem)
    return _resolve(shape, world_size, inner, layout, schedule, mask)


@lru_cache(maxsize=256)
def _resolve(shape: Shape, world_size: int, inner: int, layout: str, schedule: str, mask: Mask) -> HybridPlan:
    lay = fitted_layout(layout, world_size, mask, shape.seqlen_local)
    split = HeadSplit(shape.nheads, shape.nheads_kv, inner)
    if schedule == "auto":
        shape0 = Shape(shape.batch, shape.seqlen_local * inner, split.local_heads, split.local_kv(0), shape.headdim,
                       shape.dtype, shape.kv_wire)
        schedule = auto_schedule(outer_layout(lay, inner), mask, shape0)
    return HybridPlan(lay, inner, schedule, mask, split)


def build_hybrid_plan(schedule: str, *, layout: str, world_size: int, inner: int, nheads: int, nheads_kv: int,
                      causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None,
                      tokens: int | None = None) -> HybridPlan:
    """The hybrid plan of ``schedule`` ("ring" or "lightseq" for the outer plan) over
    ``world_size`` ranks split as ``inner`` (all-to-all) x world_size/inner (point-to-point), for
    ``nheads``/``nheads_kv`` heads; the mask as in build_plan. ValueError for a bad split."""
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    problem = split_problem(world_size, inner, nheads, nheads_kv)
    if problem:
        raise ValueError(problem)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return HybridPlan(layout_of(layout, world_size, mask, tokens), inner, schedule, mask,
                      HeadSplit(nheads, nheads_kv, inner))
