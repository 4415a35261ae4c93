"""Where tokens live: a layout cuts the sequence into equal chunks and gives every rank the same
number of them. A rank's local tensor is its chunks concatenated in the order ``Layout.owners``
lists them.

- ``contiguous``: rank r holds the r-th P-th of the sequence.
- ``zigzag``: 2P halves, rank r holds halves r and 2P-1-r, in that order. This is the layout
  Megatron-Core's ``get_batch_on_this_cp_rank`` produces, so a CP batch needs no reshuffle.
- ``balanced``: for a mask, chunks dealt out so that every rank computes about the same unmasked
  area, sending as few chunks as it can (swaps from the contiguous and zigzag cuts; work.py).

With the plain masks (causal or none) the contiguous and zigzag layouts hold one and two chunks
per rank, for any length. With documents or a window (and for ``balanced``) each rank holds
several smaller chunks, so that only the chunks a mask needs travel: up to 8 per rank, as long
as a chunk keeps at least 16 tokens. Then only the whole sequence is padded, to a whole number of
chunks, never a document: the padding tokens are a document of their own that sees nothing.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from .mask import Mask, mask_of

LAYOUTS = ("contiguous", "zigzag", "balanced")
MAX_CHUNKS_PER_RANK = 8
MIN_CHUNK_TOKENS = 16  # a Triton granule: smaller chunks only cost launches


@dataclass(frozen=True)
class Layout:
    name: str
    owners: tuple[tuple[int, ...], ...]  # per rank, its chunk ids in local order
    tokens: int | None = None  # the real length it was cut for; None: any length (plain layouts)
    padded_tokens: int | None = None  # tokens plus the padding, a whole number of chunks

    @property
    def world_size(self) -> int:
        return len(self.owners)

    @property
    def chunks_per_rank(self) -> int:
        return len(self.owners[0])

    @property
    def chunk_count(self) -> int:
        return self.chunks_per_rank * self.world_size


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _contiguous(p: int, m: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(r * m, (r + 1) * m)) for r in range(p))


def _zigzag(p: int, m: int) -> tuple[tuple[int, ...], ...]:
    half = m // 2  # each of the 2P halves in m/2 chunks
    return tuple(tuple(range(r * half, (r + 1) * half)) + tuple(range((2 * p - 1 - r) * half, (2 * p - r) * half))
                 for r in range(p))


def chunks_per_rank(name: str, world_size: int, mask: Mask, tokens: int | None) -> int:
    """How many chunks each rank holds (see the module docstring)."""
    check_layout(name)
    if mask.plain and name != "balanced":
        return 1 if name == "contiguous" else 2
    if world_size == 1:
        return 1  # one rank: nothing to balance or send, the sequence as it comes, unpadded
    smallest = 2 if name == "zigzag" else 1
    for m in (8, 4, 2, 1):
        enough = tokens >= MIN_CHUNK_TOKENS * world_size * m
        fits = mask.cu_seqlens is not None or tokens % (world_size * m) == 0  # padding needs a document
        if m >= smallest and m <= MAX_CHUNKS_PER_RANK and enough and fits:
            return m
    return smallest


@lru_cache(maxsize=256)
def layout_of(name: str, world_size: int, mask: Mask = Mask(), tokens: int | None = None) -> Layout:
    """The layout ``name`` over ``world_size`` ranks for ``mask`` and a sequence of ``tokens``
    real tokens (needed unless the mask is plain and the layout contiguous or zigzag; with
    documents it is the length they cover, ``Mask.length``)."""
    check_layout(name)
    world_size = _world_size(world_size)
    if mask.plain and name != "balanced":
        return Layout(name, _contiguous(world_size, 1) if name == "contiguous" else _zigzag(world_size, 2))
    if mask.cu_seqlens is not None:
        if tokens is not None and tokens != mask.length:
            raise ValueError(f"cu_seqlens{'_padded' if mask.cu_seqlens_padded else ''} must end at the sequence's "
                             f"length {tokens}, got {mask.length}")
        tokens = mask.length
    if not tokens:
        raise ValueError(f"the {name} layout for this mask needs the sequence's length, got {tokens!r}")
    m = chunks_per_rank(name, world_size, mask, tokens)
    count = world_size * m
    if mask.cu_seqlens is None and tokens % count:
        raise ValueError(f"the {name} layout over {world_size} ranks cuts the sequence into {count} equal chunks, "
                         f"so its length must be a multiple of {count} (or give cu_seqlens to pad it); got {tokens}")
    padded = -(-tokens // count) * count
    if world_size == 1:
        owners = ((0,),)
    elif name == "balanced":
        from .work import deal_chunks  # work.py builds on Layout

        starts = [_contiguous(world_size, m)] + ([_zigzag(world_size, m)] if m % 2 == 0 else [])
        owners = deal_chunks(mask, padded, starts)
    else:
        owners = _contiguous(world_size, m) if name == "contiguous" else _zigzag(world_size, m)
    return Layout(name, owners, tokens, padded)


def fitted_layout(name: str, world_size: int, mask: Mask, seqlen_local: int) -> Layout:
    """The layout for local tensors of ``seqlen_local`` tokens on each of ``world_size`` ranks;
    ValueError if that length does not fit the mask's documents."""
    seqlen = seqlen_local * world_size
    lay = layout_of(name, world_size, mask, mask.length or seqlen)
    # Only documents pad (a window alone cuts the given length), so a mismatch is theirs.
    if lay.padded_tokens is not None and lay.padded_tokens != seqlen:
        raise ValueError(
            f"cu_seqlens{'_padded' if mask.cu_seqlens_padded else ''} must cover the whole sequence: it ends at "
            f"{lay.tokens}, which the {name} layout holds as {lay.padded_tokens} tokens over {world_size} ranks, so "
            f"seqlen_local must be {lay.padded_tokens // world_size}, got {seqlen_local} ({seqlen} tokens in all)")
    return lay


def shard(full: torch.Tensor, *, layout: str, rank: int, world_size: int, dim: int = 1, causal: bool = True,
          cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (sequence along ``dim``), as a new tensor;
    zero-padded to whole chunks where the layout pads (module docstring)."""
    rank, world_size = check_place(rank, world_size)
    if not -full.dim() <= dim < full.dim():
        raise ValueError(f"dim must index the tensor's {full.dim()} dims, got {dim}")
    lay = layout_of(layout, world_size, mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded), full.shape[dim])
    chunk = _chunk_len(lay, full.shape[dim], f"the sequence (dim {dim})")
    if lay.padded_tokens and lay.padded_tokens > full.shape[dim]:
        pad = list(full.shape)
        pad[dim] = lay.padded_tokens - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return torch.cat([full.narrow(dim, c * chunk, chunk) for c in lay.owners[rank]], dim=dim)


def unshard(parts: Sequence[torch.Tensor], *, layout: str, dim: int = 1, causal: bool = True, cu_seqlens=None,
            window_size=(-1, -1), cu_seqlens_padded=None) -> torch.Tensor:
    """The full-sequence tensor from every rank's part, given in rank order (padding dropped)."""
    world_size = len(parts)
    if world_size == 0:
        raise ValueError("unshard needs one part per rank, got none")
    lengths = {p.shape[dim] for p in parts}
    if len(lengths) != 1:
        raise ValueError(f"every rank's part must have the same length along dim {dim}, got {sorted(lengths)}")
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    seqlen = lengths.pop() * world_size
    lay = layout_of(layout, world_size, mask, mask.length or seqlen)
    chunk = _chunk_len(lay, seqlen, f"the parts (dim {dim})")
    if lay.padded_tokens is not None and lay.padded_tokens != seqlen:
        raise ValueError(f"expected parts of {lay.padded_tokens // world_size} tokens along dim {dim} for this "
                         f"mask, got {seqlen // world_size}")
    by_chunk = {c: part.narrow(dim, i * chunk, chunk) for part, owned in zip(parts, lay.owners)
                for i, c in enumerate(owned)}
    full = torch.cat([by_chunk[c] for c in sorted(by_chunk)], dim=dim)
    return full.narrow(dim, 0, lay.tokens) if lay.tokens else full


def positions(*, layout: str, rank: int, world_size: int, tokens: int | None = None, causal: bool = True,
              cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None, device=None) -> torch.Tensor:
    """Each of this rank's local tokens' position in the whole sequence (int64), e.g. for RoPE;
    padding tokens get the positions past the end. ``tokens``: the sequence's real length (with
    documents, the length they cover by default)."""
    rank, world_size = check_place(rank, world_size)
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    tokens = mask.length if tokens is None else as_count(tokens)
    if tokens is None or tokens < 1:
        raise ValueError(f"positions needs tokens (the sequence's length, >= 1) or cu_seqlens, got {tokens!r}")
    lay = layout_of(layout, world_size, mask, tokens)
    chunk = _chunk_len(lay, tokens, "the sequence")
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in lay.owners[rank]])


def as_count(x) -> int | None:
    """``x`` as an int if it is an integer of any kind (Python, numpy, a 0-d integer tensor) other
    than a bool, else None."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        return None
    try:
        return operator.index(x)
    except TypeError:  # a tensor that is not a 0-d integer one
        return None


def _world_size(world_size) -> int:
    w = as_count(world_size)
    if w is None or w < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return w


def check_place(rank, world_size) -> tuple[int, int]:
    """(rank, world_size) as ints; ValueError unless 0 <= rank < world_size."""
    w, r = _world_size(world_size), as_count(rank)
    if r is None or not 0 <= r < w:
        raise ValueError(f"rank must be an int in [0, {w}), got {rank!r}")
    return r, w


def _chunk_len(lay: Layout, length: int, what: str) -> int:
    if lay.padded_tokens is not None:
        return lay.padded_tokens // lay.chunk_count
    if length % lay.chunk_count:
        raise ValueError(f"the {lay.name} layout over {lay.world_size} ranks cuts {what} into {lay.chunk_count} "
                         f"equal chunks, so it must be a multiple of {lay.chunk_count}; got {length}")
    return length // lay.chunk_count
