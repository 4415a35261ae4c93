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

import torch

from ..kernels.mask import Mask


@lru_cache(maxsize=64)
def chunk_pair_area(mask: Mask, tokens: int, chunk_count: int) -> torch.Tensor:
    """int64 [chunks, chunks]: how many (query, key) pairs of query chunk i and key chunk j the
    mask lets through, for a sequence of ``tokens`` cut into ``chunk_count`` equal chunks."""
    length = tokens // chunk_count
    lo, hi = mask.bounds(torch.arange(tokens, dtype=torch.int64))
    end = torch.minimum(hi + 1, torch.tensor(tokens))  # keys exist only up to the end
    size = (end - lo).clamp(min=0)
    zero = torch.zeros(1, dtype=torch.int64)
    sizes, los = torch.cat([zero, size.cumsum(0)]), torch.cat([zero, lo.cumsum(0)])
    bounds = torch.arange(chunk_count + 1, dtype=torch.int64) * length
    whole = torch.searchsorted(end.contiguous(), bounds, right=True)  # before it: intervals end by b
    started = torch.maximum(torch.searchsorted(lo.contiguous(), bounds), whole)  # before it: start before b
    first = (torch.arange(chunk_count, dtype=torch.int64) * length)[:, None]
    r1 = whole[None, :].clamp(min=first, max=first + length)
    r2 = started[None, :].clamp(min=first, max=first + length)
    below = (sizes[r1] - sizes[first]) + (r2 - r1) * bounds[None, :] - (los[r2] - los[r1])
    return below[:, 1:] - below[:, :-1]


def deal_chunks(mask: Mask, tokens: int, world_size: int, per_rank: int) -> tuple[tuple[int, ...], ...]:
    """The balanced layout: chunks dealt out, the most work first, each to the least loaded rank
    that has room (ties to the lower rank); each rank's chunks in sequence order."""
    work = chunk_pair_area(mask, tokens, world_size * per_rank).sum(1).tolist()
    order = sorted(range(len(work)), key=lambda c: (-work[c], c))
    ranks = [(0, r) for r in range(world_size)]  # (load, rank), a heap of ranks with room
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        load, r = heapq.heappop(ranks)
        owned[r].append(c)
        if len(owned[r]) < per_rank:
            heapq.heappush(ranks, (load + work[c], r))
    return tuple(tuple(sorted(o)) for o in owned)
