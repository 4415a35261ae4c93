"""The log-sum-exp merge: its rule, and the torch code of it (the Triton kernels carry the same
rule in triton_kernels._merge_tile, fused into their forward and as a one-pass merge on CUDA).

Two partial results of the same query rows, (out_a, lse_a) and (out_b, lse_b), over disjoint key
sets combine exactly as lse = logaddexp(lse_a, lse_b), out = w*out_a + (1-w)*out_b with
w = exp(lse_a - lse) = sigmoid(lse_a - lse_b). The sigmoid form never overflows; a row where both
sides are -inf (no key seen yet) stays at out 0, lse -inf instead of turning into NaN.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _fused_merge():
    """The Triton merge (one pass instead of several eager ops) when triton imports, else None.
    Looked up on first use: the kernels package imports this module."""
    try:
        from .kernels.triton_kernels import merge_into as fused
    except ImportError:
        return None
    return fused


def merge_into(out_BSHD: torch.Tensor, lse_BHS: torch.Tensor, part_BSHD: torch.Tensor,
               part_lse_BHS: torch.Tensor) -> None:
    """Merge a partial result into the running (out, lse) accumulators, in place.

    ``out_BSHD`` and ``lse_BHS`` are in the accumulation dtype (float32 or float64); they may be
    views onto row ranges of larger accumulators. On CUDA with float32 accumulators this runs as
    one Triton kernel where triton imports.
    """
    if out_BSHD.is_cuda and out_BSHD.dtype == torch.float32 and _fused_merge() is not None:
        _fused_merge()(out_BSHD, lse_BHS, part_BSHD, part_lse_BHS)
        return
    part_lse = part_lse_BHS.to(lse_BHS.dtype)
    diff = torch.nan_to_num(lse_BHS - part_lse, nan=0.0)  # -inf - -inf: both empty, weight moot
    w_BSH1 = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    out_BSHD.mul_(w_BSH1).add_(part_BSHD.to(out_BSHD.dtype) * (1 - w_BSH1))
    lse_BHS.copy_(torch.logaddexp(lse_BHS, part_lse))
