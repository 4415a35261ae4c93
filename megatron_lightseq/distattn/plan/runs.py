"""Runs of neighbouring chunks: the one place that finds them.

A rank's local tensor is its chunks concatenated in its layout order, a payload's tensors its
chunks in the payload's order. Where some chunks sit in a tensor of others, and which token
ranges a block's chunks cover, decides whether the executor takes a view or a copy, how the
all-to-all cuts a rank's rows, what the kernels are told (spans) and what the memory model counts.
"""
from __future__ import annotations

from functools import lru_cache

Run = tuple[int, int, int]  # (first index in the chunks, first index in the tensor they sit in, count)
Span = tuple[tuple[int, int], ...]  # token ranges (start, stop), in row order


@lru_cache(maxsize=8192)
def chunk_runs(chunks: tuple[int, ...], within: tuple[int, ...]) -> tuple[Run, ...]:
    """Where ``chunks`` sit among ``within`` (each one of them), one run per stretch neighbouring
    in both."""
    found: list[list[int]] = []
    at_of = {c: i for i, c in enumerate(within)} if len(within) > 8 else None
    for i, c in enumerate(chunks):
        at = at_of[c] if at_of is not None else within.index(c)
        if found and found[-1][0] + found[-1][2] == i and found[-1][1] + found[-1][2] == at:
            found[-1][2] += 1
        else:
            found.append([i, at, 1])
    return tuple(tuple(r) for r in found)


def one_run(chunks: tuple[int, ...], within: tuple[int, ...]) -> bool:
    """``chunks`` are neighbours in ``within``, in its order: their rows are one slice of it."""
    return len(chunk_runs(chunks, within)) == 1


@lru_cache(maxsize=8192)
def span_of(chunks: tuple[int, ...], chunk_len: int) -> Span:
    """Token ranges of chunk ids (in the sequence), adjacent ranges joined."""
    ranges: list[tuple[int, int]] = []
    for c in chunks:
        start, stop = c * chunk_len, (c + 1) * chunk_len
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return tuple(ranges)
