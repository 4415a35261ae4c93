"""The log-sum-exp merge of partial results: its rule, its torch code, and the one-pass kernels
that replace the torch code where they can (registered by the kernels package: Triton's on CUDA,
which carries the same rule in triton_kernels._merge_tile, also fused into its forward).

Two partial results of the same query rows, (out_a, lse_a) and (out_b, lse_b), over disjoint key
sets combine exactly as lse = logaddexp(lse_a, lse_b), out = w*out_a + (1-w)*out_b with
w = exp(lse_a - lse) = sigmoid(lse_a - lse_b). The sigmoid form never overflows; a row where both
sides are -inf (no key seen yet) stays at out 0, lse -inf instead of turning into NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Merge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (takes(out_accumulator), merge): the first that takes an accumulator runs instead of torch's ops.
_ONE_PASS: list[tuple[Callable[[torch.Tensor], bool], Merge]] = []


def register_one_pass_merge(takes: Callable[[torch.Tensor], bool], merge: Merge) -> None:
    _ONE_PASS.append((takes, merge))


def merge_into(out_BSHD: torch.Tensor, lse_BHS: torch.Tensor, part_BSHD: torch.Tensor,
               part_lse_BHS: torch.Tensor) -> None:
    """Merge a partial result into the running (out, lse) accumulators, in place.

    ``out_BSHD`` and ``lse_BHS`` are in the accumulation dtype (float32 or float64); they may be
    views onto row ranges of larger accumulators.
    """
    for takes, merge in _ONE_PASS:
        if takes(out_BSHD):
            merge(out_BSHD, lse_BHS, part_BSHD, part_lse_BHS)
            return
    part_lse = part_lse_BHS.to(lse_BHS.dtype)
    diff = torch.nan_to_num(lse_BHS - part_lse, nan=0.0)  # -inf - -inf: both empty, weight moot
    w_BSH1 = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    out_BSHD.mul_(w_BSH1).add_(part_BSHD.to(out_BSHD.dtype) * (1 - w_BSH1))
    lse_BHS.copy_(torch.logaddexp(lse_BHS, part_lse))
