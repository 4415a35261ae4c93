"""The work a mask leaves between chunks, exactly, and the balanced layout's deal of chunks.

For every mask the keys a query at position i sees are one interval [lo_i, end_i) of positions
(plan/mask.py), and both ends only grow with i. So the number of keys before a boundary b
that query i sees is clip(min(end_i, b) - lo_i, 0), and summed over a chunk of queries it splits
at two points found by counting: queries whose interval ends by b count their whole interval,
queries whose interval starts before b count b - lo_i, the rest nothing. Prefix sums of the
interval lengths and of lo make each (query chunk, boundary) sum O(1). Those sums come from the
pieces on which lo and end are linear (a few per document), and only the pairs inside each
query chunk's band of key chunks are summed, so the pairs with work cost O((documents + chunks)
log documents + pairs with work), never a dense [chunks x chunks] matrix nor O(tokens x chunks);
every token's interval is the fallback for a mask whose pieces are not known.
"""
from __future__ import annotations

import heapq
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .mask import Mask


@lru_cache(maxsize=64)
def chunk_pairs(mask: Mask, tokens: int, chunk_count: int) -> "ChunkPairs":
    """How many (query, key) pairs of query chunk i and key chunk j the mask lets through, for a
    sequence of ``tokens`` cut into ``chunk_count`` equal chunks: the pairs with any."""
    return area_from(_Pieces.of(mask, tokens) or _Tokens(mask, tokens), tokens, chunk_count)


class ChunkPairs(NamedTuple):
    """The chunk pairs with work, row by row (query chunk), key chunks increasing in a row."""

    rows: np.ndarray  # int64 query chunk
    cols: np.ndarray  # int64 key chunk
    counts: np.ndarray  # int64 query-key pairs, > 0
    chunk_count: int
    row_sums: np.ndarray  # int64 [chunks]: each query chunk's work, its row's counts summed

    def dense(self) -> np.ndarray:
        """int64 [chunks, chunks], 0 where a pair has no work (the whole plans' checks, the tests)."""
        area = np.zeros((self.chunk_count, self.chunk_count), dtype=np.int64)
        area[self.rows, self.cols] = self.counts
        return area


def area_from(sums: "_Tokens | _Pieces", tokens: int, chunk_count: int) -> ChunkPairs:
    """chunk_pairs from either way of summing (both are tested against a dense mask). The prefix
    sums are taken at the O(chunks) boundaries only: both sums grow with k (sizes and lo are >= 0),
    so the sum at a clipped point is the clipped sum, and what is left per (query chunk,
    boundary) is a few elementwise operations, done only inside each query chunk's band of key
    chunks (_band): O(chunks + pairs with work), not O(chunks^2)."""
    length = tokens // chunk_count
    bounds = np.arange(chunk_count + 1, dtype=np.int64) * length
    whole = sums.ending_by(bounds)  # before it: intervals end by b
    started = np.maximum(sums.starting_before(bounds), whole)  # before it: start before b
    row, k = _band(whole, started, bounds, chunk_count)
    first, last = bounds[row], bounds[row + 1]  # each entry's query chunk's first and next token
    size_at, lo_at = sums.size(bounds), sums.lo(bounds)  # the sums at the boundaries, once

    def clipped(values, at_bounds, at):  # values(clip(at[k], first, last)), from the values at the points
        return np.clip(values(at)[k], at_bounds[row], at_bounds[row + 1])

    r1, r2 = np.clip(whole[k], first, last), np.clip(started[k], first, last)
    below = (clipped(sums.size, size_at, whole) - size_at[row]) + (r2 - r1) * bounds[k] - (
        clipped(sums.lo, lo_at, started) - clipped(sums.lo, lo_at, whole))
    counts = below[1:] - below[:-1]
    keep = (row[1:] == row[:-1]) & (counts > 0)  # pairs (k, k + 1) of one row: key chunk k
    # a row's sum is its queries' interval sizes summed: one difference of the prefix sums
    return ChunkPairs(row[1:][keep], k[:-1][keep], counts[keep], chunk_count, np.diff(size_at))


def _band(whole, started, bounds, chunk_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, boundary) of every boundary k a query chunk's band needs, row by row. Key chunk j
    can share work with query chunk i only if some query of i starts before j's end (it is among
    the first started[j + 1] tokens) and ends after j's start (not among the first whole[j]):
    both counts grow with j, so the j that can are one range, found by a search."""
    first, last = bounds[:-1], bounds[1:]
    lo = np.maximum(np.searchsorted(started, first, side="right") - 1, 0)
    hi = np.maximum(np.minimum(np.searchsorted(whole, last, side="left"), chunk_count), lo)  # key chunks [lo, hi)
    n = hi - lo + 1  # boundaries lo .. hi
    row = np.repeat(np.arange(chunk_count, dtype=np.int64), n)
    k = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n - lo, n)
    return row, k


class _Tokens:
    """The sums chunk_pair_area needs, from every token's interval: O(tokens)."""

    def __init__(self, mask: Mask, tokens: int) -> None:
        lo, hi = mask.bounds(np.arange(tokens, dtype=np.int64))
        self._lo, self._end = lo, np.minimum(hi + 1, tokens)  # keys exist only up to the end
        zero = np.zeros(1, dtype=np.int64)
        self._sizes = np.concatenate([zero, np.maximum(self._end - lo, 0).cumsum()])
        self._los = np.concatenate([zero, lo.cumsum()])

    def size(self, k):  # sum of interval sizes of the first k tokens
        return self._sizes[k]

    def lo(self, k):  # sum of lo of the first k tokens
        return self._los[k]

    def ending_by(self, b):  # how many tokens' intervals end by b
        return np.searchsorted(self._end, b, side="right")

    def starting_before(self, b):  # how many start before b
        return np.searchsorted(self._lo, b)


class _Pieces:
    """The same sums from the pieces on which lo and end are linear (slope 0 or 1): between the
    documents' edges and where a window's reach meets them, so O(documents), not O(tokens)."""

    @classmethod
    def of(cls, mask: Mask, tokens: int) -> "_Pieces | None":
        left, right = mask.window
        edges = {0, left, tokens - right - 1}
        if mask.cu_seqlens is not None:
            starts = mask.cu_seqlens_padded or mask.cu_seqlens
            for d in range(len(mask.cu_seqlens) - 1):
                real_end = starts[d] + mask.cu_seqlens[d + 1] - mask.cu_seqlens[d]
                edges.update((starts[d], real_end, starts[d] + left, real_end - right - 1))
        begin = np.array(sorted(e for e in edges if 0 <= e < tokens), dtype=np.int64)
        stop = np.append(begin[1:], tokens)
        probes = [mask.bounds(x) for x in (begin, np.minimum(begin + 1, stop - 1), stop - 1)]  # each increasing
        lo = [p[0] for p in probes]
        end = [np.minimum(p[1] + 1, tokens) for p in probes]
        lo_step, end_step, last = lo[1] - lo[0], end[1] - end[0], stop - 1 - begin
        if not (np.array_equal(lo[2], lo[0] + lo_step * last) and np.array_equal(end[2], end[0] + end_step * last)):
            return None  # a piece that is not linear: a mask this does not know the edges of
        return cls(begin, stop, lo[0], lo_step, end[0] - lo[0], end_step - lo_step, end[0], end_step)

    def __init__(self, begin, stop, lo0, lo_step, size0, size_step, end0, end_step) -> None:
        self._begin, self._n = begin, stop - begin
        self._lo, self._size, self._end = (lo0, lo_step), (size0, size_step), (end0, end_step)
        self._lo_sums, self._size_sums = (np.concatenate([[0], self._piece_sum(*v, self._n).cumsum()])
                                          for v in (self._lo, self._size))

    @staticmethod
    def _piece_sum(v0, step, m):
        """Sum of v0 + step * t for t < m."""
        return m * v0 + step * m * (m - 1) // 2

    def _prefix(self, values, sums, k):
        piece = np.clip(np.searchsorted(self._begin, k, side="right") - 1, 0, len(self._begin) - 1)
        m = k - self._begin[piece]
        return sums[piece] + self._piece_sum(values[0][piece], values[1][piece], m)

    def size(self, k):
        return self._prefix(self._size, self._size_sums, k)

    def lo(self, k):
        return self._prefix(self._lo, self._lo_sums, k)

    def _count(self, values, b, strict: bool):
        """How many positions have value <= b (or < b), summed over the pieces: on a flat piece
        all its n or none, on a rising one (slope 1, from v0) clip(b - v0 + 1, 0, n), which is
        ramp(v0) - ramp(v0 + n) with ramp(a) = max(b + 1 - a, 0). Sorted starts and prefix sums
        make every sum over the pieces a search: O((pieces + boundaries) log pieces)."""
        v0, step = values
        b = b - strict
        flat = step == 0
        return (_at_most(v0[flat], b, self._n[flat]) + _ramp(v0[~flat], b)
                - _ramp(v0[~flat] + self._n[~flat], b))

    def ending_by(self, b):
        return self._count(self._end, b, strict=False)

    def starting_before(self, b):
        return self._count(self._lo, b, strict=True)


def _at_most(values: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """For each b, the sum of ``weights`` where ``values`` <= b."""
    order = np.argsort(values, kind="stable")
    sums = np.concatenate([[0], np.cumsum(weights[order])])
    return sums[np.searchsorted(values[order], b, side="right")]


def _ramp(starts: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each b, the sum of max(b + 1 - a, 0) over a in ``starts``."""
    return _at_most(starts, b, np.ones_like(starts)) * (b + 1) - _at_most(starts, b, starts)


# Swaps from each start: each looks at every chunk, so at most SWAP_WORK // chunks of them (and at
# least 16) keep the deal linear in chunks, while small layouts swap to the end, keeping their
# neighbouring chunks together (the heaviest-first start balances but scatters them).
SWAP_WORK, MIN_SWAPS = 2**15, 16


def _swap_cap(chunk_count: int) -> int:
    return max(MIN_SWAPS, SWAP_WORK // chunk_count)


def deal_chunks(mask: Mask, tokens: int, starts: list[tuple[tuple[int, ...], ...]]) -> tuple[tuple[int, ...], ...]:
    """The balanced layout. From each start (owners per rank: the contiguous cut, where neighbouring
    chunks, mostly of the same documents, stay on one rank; the zigzag pairs, the causal pairing,
    best when one document fills most of the sequence; the heaviest chunks first, each to the
    lightest rank with room, which balances any mix of documents in one pass), swap chunks while
    that lowers the busiest rank's load (at most _swap_cap times); of the results within 1% of the
    lightest busiest rank, the one whose busiest rank sends and receives the fewest chunks (ties:
    the earlier start). Each rank's chunks in sequence order."""
    world_size, per_rank = len(starts[0]), len(starts[0][0])
    pairs = chunk_pairs(mask, tokens, world_size * per_rank)
    work = pairs.row_sums.astype(np.float64)
    owners = [_owner_of(start) for start in starts] + [_heaviest_first(work, world_size, per_rank)]
    dealt = [_swap_until_balanced(work, owner, world_size) for owner in owners]
    lightest = min(load.max() for _, load in dealt)
    fits = [owner for owner, load in dealt if load.max() <= 1.01 * lightest]
    owner = min(fits, key=lambda owner: _chunks_moved(pairs, owner, world_size))
    return tuple(map(tuple, np.argsort(owner, kind="stable").reshape(world_size, per_rank).tolist()))


def _owner_of(owners: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """chunk -> rank, from the chunks of every rank."""
    owner = np.empty(sum(map(len, owners)), dtype=np.int64)
    for rank, chunks in enumerate(owners):
        owner[list(chunks)] = rank
    return owner


def _heaviest_first(work: np.ndarray, world_size: int, per_rank: int) -> np.ndarray:
    """chunk -> rank: each chunk, heaviest first, to the least loaded rank that holds fewer than
    ``per_rank`` (a heap of the ranks with room): O(chunks log P)."""
    owner = np.empty(len(work), dtype=np.int64)
    heap, room = [(0.0, r) for r in range(world_size)], [per_rank] * world_size
    for c, w in zip(np.argsort(-work, kind="stable").tolist(), sorted(work.tolist(), reverse=True)):
        load, r = heapq.heappop(heap)
        owner[c] = r
        room[r] -= 1
        if room[r]:
            heapq.heappush(heap, (load + w, r))
    return owner


def _swap_until_balanced(work: np.ndarray, owner: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Swap a chunk of the busiest rank for a lighter one of another rank, the swap that leaves
    the busier of the two least loaded, until no swap lowers the busiest rank's load or _swap_cap
    swaps are made; returns the owners (``owner`` itself, changed) and the ranks' loads."""
    load = np.bincount(owner, weights=work, minlength=world_size)
    count = len(work)
    for _ in range(_swap_cap(count) if world_size > 1 else 0):
        x = int(load.argmax())
        top = load[x]
        mine = (owner == x).nonzero()[0]
        moved = work[mine][:, None] - work  # [x's chunks, every chunk]
        # Every pair is scored: only a lighter chunk of a lighter rank can leave both ranks below
        # x's load, any other swap leaves one at or above it, so the first least score below
        # x's load is the first best swap, with no candidates picked out first.
        after = np.maximum(top - moved, load[owner] + moved)
        best = int(after.argmin())
        if after.flat[best] >= top:
            break
        i, b = divmod(best, count)
        a, y, d = mine[i], owner[b], moved[i, b]
        owner[a], owner[b] = y, x
        load[x] -= d
        load[y] += d
    return owner, load


def _chunks_moved(pairs: ChunkPairs, owner: np.ndarray, world_size: int) -> int:
    """The busiest rank's K/V chunks in and out: each chunk goes once to every other rank with a
    query chunk that sees some of it (what a masked plan sends, in chunks)."""
    seen = np.zeros((world_size, len(owner)), dtype=bool)  # rank -> key chunks its queries see
    seen[owner[pairs.rows], pairs.cols] = True
    seen[owner, np.arange(len(owner))] = False  # its own chunks do not travel
    received = seen.sum(1)
    sent = np.bincount(owner, weights=seen.sum(0), minlength=world_size)
    return int((received + sent).max())
