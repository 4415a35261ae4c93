"""Masks for the tests: documents from several distributions, windows of several reaches, and an
oracle built densely from document ids and window arithmetic (not from Mask.bounds)."""
from __future__ import annotations

import random

import torch


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
    """Bool [tokens, tokens]: query i may see key j. With ``cu_seqlens_padded``, document d starts
    at cu_seqlens_padded[d] and its tokens past its real length are padding (see nothing, seen by
    nothing)."""
    i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    left, right = window_size
    if left >= 0:
        allowed &= i - j <= left
    if right >= 0:
        allowed &= j - i <= right
    if cu_seqlens is not None:
        starts = cu_seqlens_padded or cu_seqlens
        doc = torch.full((tokens,), -1, dtype=torch.long)  # -1: padding
        for d in range(len(cu_seqlens) - 1):
            doc[starts[d]:starts[d] + cu_seqlens[d + 1] - cu_seqlens[d]] = d
        allowed &= (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    return allowed


def masked_reference(q, k, v, dout, allowed: torch.Tensor, scale: float | None = None):
    """Whole-sequence (out, lse, dq, dk, dv) under a dense mask; rows that see nothing give out 0,
    lse -inf and zero gradients. Differentiated by autograd."""
    rep = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1].repeat_interleave(rep, 2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]) * torch.isfinite(lse)[..., None]
    out = torch.einsum("bhqk,bkhd->bqhd", p, leaves[2].repeat_interleave(rep, 2))
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, dout))
