"""Masks for the tests: documents from several distributions and TransformerEngine's per-document
padding; whole-sequence views of the oracle's dense masks (document ids and window arithmetic,
not Mask.bounds)."""
from __future__ import annotations

import random

import torch
from oracle import allowed_by_hand, block_reference


def documents(kind: str, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """cu_seqlens over ``tokens`` tokens: "one" document; "short" (many, shorter than a chunk);
    "long-tailed" (lognormal lengths); "odd" (lengths not divisible by anything)."""
    rng = random.Random(seed)
    if kind == "one":
        return (0, tokens)
    cuts = [0]
    while cuts[-1] < tokens:
        if kind == "short":
            step = rng.randint(1, 5)
        elif kind == "long-tailed":
            step = max(1, int(rng.lognormvariate(2.5, 1.0)))
        else:  # odd
            step = rng.choice((7, 11, 13, 17, 19, 23))
        cuts.append(min(tokens, cuts[-1] + step))
    return tuple(cuts)


DOCUMENTS = ("one", "short", "long-tailed", "odd")


def padded(cu_seqlens: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """TransformerEngine's convention: every document padded to a multiple of 2 x world_size."""
    out = [0]
    for a, b in zip(cu_seqlens, cu_seqlens[1:]):
        out.append(out[-1] + -(-(b - a) // (2 * world_size)) * 2 * world_size)
    return tuple(out)


def dense_allowed(tokens: int, *, causal: bool, cu_seqlens=None, window_size=(-1, -1),
                  cu_seqlens_padded=None) -> torch.Tensor:
    """Bool [tokens, tokens]: query i may see key j (oracle.allowed_by_hand over the sequence)."""
    whole = ((0, tokens),)
    return allowed_by_hand(whole, whole, causal=causal, cu_seqlens=cu_seqlens, window=window_size,
                           cu_seqlens_padded=cu_seqlens_padded)


def masked_reference(q, k, v, dout, allowed: torch.Tensor):
    """Whole-sequence (out, lse, dq, dk, dv) under a dense mask (oracle.block_reference)."""
    return block_reference(q, k, v, dout, allowed, q.shape[-1] ** -0.5)
