"""Where tokens live: each layout cuts the sequence into equal chunks and gives each rank some.

- ``contiguous``: P chunks, rank r holds chunk r (tokens [r*N/P, (r+1)*N/P)).
- ``zigzag``: 2P chunks, rank r holds chunks r and 2P-1-r, in that order. This is the layout
  Megatron-Core's ``get_batch_on_this_cp_rank`` produces, so a CP batch needs no reshuffle.

A rank's local tensor is its chunks concatenated in the order ``owned_chunks`` lists them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_per_rank(layout: str) -> int:
    check_layout(layout)
    return 1 if layout == "contiguous" else 2


def owned_chunks(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in local order."""
    check_layout(layout)
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def _check_split(length: int, layout: str, world_size: int, what: str) -> int:
    pieces = chunks_per_rank(layout) * world_size
    if world_size < 1 or length % pieces:
        raise ValueError(
            f"the {layout} layout over {world_size} ranks cuts {what} into {pieces} equal chunks, "
            f"so it must be a multiple of {pieces}; got {length}"
        )
    return length // pieces


def shard(full: torch.Tensor, *, layout: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (sequence along ``dim``), as a new tensor."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    chunk = _check_split(full.shape[dim], layout, world_size, f"the sequence (dim {dim})")
    pieces = [full.narrow(dim, c * chunk, chunk) for c in owned_chunks(layout, rank, world_size)]
    return torch.cat(pieces, dim=dim)


def unshard(parts: Sequence[torch.Tensor], *, layout: str, dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from every rank's part, given in rank order."""
    world_size = len(parts)
    if world_size == 0:
        raise ValueError("unshard needs one part per rank, got none")
    lengths = {p.shape[dim] for p in parts}
    if len(lengths) != 1:
        raise ValueError(f"every rank's part must have the same length along dim {dim}, got {sorted(lengths)}")
    per_rank = chunks_per_rank(layout)
    chunk = _check_split(lengths.pop(), layout, 1, f"each part (dim {dim})") if per_rank > 1 else lengths.pop()
    by_chunk: dict[int, torch.Tensor] = {}
    for rank, part in enumerate(parts):
        for i, c in enumerate(owned_chunks(layout, rank, world_size)):
            by_chunk[c] = part.narrow(dim, i * chunk, chunk)
    return torch.cat([by_chunk[c] for c in sorted(by_chunk)], dim=dim)
