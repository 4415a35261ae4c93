"""The work a mask leaves between chunks, exactly, and the balanced layout's deal of chunks.

For every mask the keys a query at position i sees are one interval [lo_i, end_i) of positions
(kernels/mask.py), and both ends only grow with i. So the number of keys before a boundary b
that query i sees is clip(min(end_i, b) - lo_i, 0), and summed over a chunk of queries it splits
at two points found by binary search: queries whose interval ends by b count their whole
interval, queries whose interval starts before b count b - lo_i, the rest nothing. Prefix sums
of the interval lengths and of lo make each (query chunk, boundary) sum O(1): the whole
[chunks x chunks] area matrix costs O(tokens + chunks^2), not O(tokens x chunks).
"""
from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from ..kernels.mask import Mask


@lru_cache(maxsize=64)
def chunk_pair_area(mask: Mask, tokens: int, chunk_count: int) -> np.ndarray:
    """int64 [chunks, chunks]: how many (query, key) pairs of query chunk i and key chunk j the
    mask lets through, for a sequence of ``tokens`` cut into ``chunk_count`` equal chunks."""
    length = tokens // chunk_count
    lo, hi = mask.bounds(np.arange(tokens, dtype=np.int64))
    end = np.minimum(hi + 1, tokens)  # keys exist only up to the end
    size = np.maximum(end - lo, 0)
    sizes, los = np.concatenate([[0], size.cumsum()]), np.concatenate([[0], lo.cumsum()])
    bounds = np.arange(chunk_count + 1, dtype=np.int64) * length
    whole = np.searchsorted(end, bounds, side="right")  # before it: intervals end by b
    started = np.maximum(np.searchsorted(lo, bounds), whole)  # before it: start before b
    first = (np.arange(chunk_count, dtype=np.int64) * length)[:, None]
    r1 = np.clip(whole[None, :], first, first + length)
    r2 = np.clip(started[None, :], first, first + length)
    below = (sizes[r1] - sizes[first]) + (r2 - r1) * bounds[None, :] - (los[r2] - los[r1])
    return below[:, 1:] - below[:, :-1]


def deal_chunks(mask: Mask, tokens: int, world_size: int, per_rank: int) -> tuple[tuple[int, ...], ...]:
    """The balanced layout: chunks dealt out, the most work first, each to the least loaded rank
    that has room (ties to the lower rank), then swaps between the busiest rank and another while
    they lower the busier of the two; each rank's chunks in sequence order."""
    work = chunk_pair_area(mask, tokens, world_size * per_rank).sum(1).tolist()
    order = sorted(range(len(work)), key=lambda c: (-work[c], c))
    ranks = [(0, r) for r in range(world_size)]  # (load, rank), a heap of ranks with room
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        load, r = heapq.heappop(ranks)
        owned[r].append(c)
        if len(owned[r]) < per_rank:
            heapq.heappush(ranks, (load + work[c], r))
    _swap_down(owned, work)
    return tuple(tuple(sorted(o)) for o in owned)


def _swap_down(owned: list[list[int]], work: list[int], rounds: int = 1000) -> None:
    """Swap a chunk of the busiest rank for a lighter one of another rank, the swap that leaves the
    busier of the two least loaded, until no swap lowers it."""
    load = [sum(work[c] for c in o) for o in owned]
    for _ in range(rounds):
        x = max(range(len(owned)), key=lambda r: (load[r], -r))
        best = (load[x], None)
        for y in range(len(owned)):
            if y == x:
                continue
            for i, a in enumerate(owned[x]):
                for j, b in enumerate(owned[y]):
                    moved = work[a] - work[b]
                    if moved > 0 and max(load[x] - moved, load[y] + moved) < best[0]:
                        best = (max(load[x] - moved, load[y] + moved), (y, i, j, moved))
        if best[1] is None:
            return
        y, i, j, moved = best[1]
        owned[x][i], owned[y][j] = owned[y][j], owned[x][i]
        load[x] -= moved
        load[y] += moved
