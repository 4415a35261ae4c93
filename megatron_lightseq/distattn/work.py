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
    """The balanced layout: start from the contiguous one (neighbouring chunks, mostly of the same
    documents, on one rank: what they exchange stays local) and swap a chunk of the busiest rank
    for a lighter one of another rank, the swap that leaves the busier of the two least loaded,
    until no swap lowers the busiest rank's load; each rank's chunks in sequence order."""
    work = chunk_pair_area(mask, tokens, world_size * per_rank).sum(1).astype(np.float64)
    owner = np.repeat(np.arange(world_size), per_rank)  # chunk -> rank
    load = np.bincount(owner, weights=work, minlength=world_size)
    for _ in range(4 * len(work) if world_size > 1 else 0):
        x = int(np.argmax(load))
        mine, others = np.nonzero(owner == x)[0], np.nonzero(owner != x)[0]
        moved = work[mine][:, None] - work[others][None, :]  # [m, chunks elsewhere]
        after = np.maximum(load[x] - moved, load[owner[others]][None, :] + moved)
        after[moved <= 0] = np.inf
        i, j = np.unravel_index(int(np.argmin(after)), after.shape)
        if after[i, j] >= load[x]:
            break
        a, b = mine[i], others[j]
        y = owner[b]
        owner[a], owner[b] = y, x
        load[x] -= moved[i, j]
        load[y] += moved[i, j]
    return tuple(tuple(int(c) for c in np.nonzero(owner == r)[0]) for r in range(world_size))
