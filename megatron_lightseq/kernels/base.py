"""The block-kernel interface: attention of one block of queries against one block of keys.

Shapes (legend used across the package): B batch, S tokens, H query heads, G key/value heads
(H a multiple of G), D head dim. Tensors are ``_BSHD`` like flash-attn; the LSE is ``_BHS``.

A block knows where its tokens sit in the whole sequence: ``q_span`` and ``k_span`` are tuples
of (start, stop) token ranges, concatenated in row order. ``mask`` (the core's Mask, :class:`MaskLike` here) says which keys a
query may see: for a query at position i, the keys at positions in ``mask.bounds(i)``. That
covers any block of any layout and any mask; :func:`mask_kind` tells a kernel when the cheap
forms (no mask, top-left causal) are exact.

``forward(q, k, v, *, q_span, k_span, mask, scale) -> (out_BSHD, lse_BHS)``:
    out in q's dtype; lse float32 (float64 for float64 inputs), -inf on rows that see no key
    (their out is 0).
``backward(dout, q, k, v, out, lse, *, q_span, k_span, mask, scale) -> (dq, dk, dv)``:
    from the *merged* out and lse of the whole row, so the block's gradients are exact parts of
    the full gradients; grads in the inputs' dtypes, dk/dv with G heads.
``forward_into(q, k, v, out_acc, lse_acc, ...)``: the block merged into running accumulators
(float32, or float64 for float64 inputs) in place, which is how the executor runs a rank's own
blocks. By default forward then merge (merge.py); a kernel with the merge fused into its forward
overrides it, so whether a merge is fused is decided by the kernel, in one place.
A kernel that cannot produce an LSE must not be registered: it never returns a made-up one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Protocol

import torch

from .merge import merge_into

Span = tuple[tuple[int, int], ...]


class MaskLike(Protocol):
    """What a kernel needs of a mask (the core's :class:`megatron_lightseq.distattn.plan.mask.Mask`):
    for query positions, the first and last key position each may see. Hashable: kernels cache
    per (spans, mask)."""

    def bounds(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class BlockKernel(ABC):
    name: str
    # False for a kernel that computes only the vendor masks itself and hands "general" blocks
    # to another kernel (vendor.py): ``auto`` does not time it on those blocks.
    any_mask: bool = True

    @abstractmethod
    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool: ...

    @abstractmethod
    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float): ...

    @abstractmethod
    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike,
                 scale: float): ...

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, mask: MaskLike,
                     scale: float) -> None:
        merge_into(out_acc, lse_acc, *self.forward(q, k, v, q_span=q_span, k_span=k_span, mask=mask, scale=scale))


@lru_cache(maxsize=4096)
def mask_kind(q_span: Span, k_span: Span, mask: MaskLike) -> str:
    """"full" (no key hidden), "causal" (exactly the lower triangle from the top-left of a square
    block, the one mask besides none that vendor ops know) or "general"."""
    qp, kp = positions(q_span, torch.device("cpu")), positions(k_span, torch.device("cpu"))
    lo, hi = mask.bounds(qp)
    if int(lo.max()) <= int(kp.min()) and int(hi.min()) >= int(kp.max()):
        return "full"
    if len(qp) == len(kp) and bool((kp[1:] > kp[:-1]).all()):
        # Keys in increasing order: row i sees the key indices [first, stop); a triangle is [0, i + 1).
        first, stop = torch.searchsorted(kp, lo), torch.searchsorted(kp, hi, right=True)
        if bool((first == 0).all()) and torch.equal(stop, torch.arange(1, len(kp) + 1)):
            return "causal"
    return "general"


def positions(span: Span, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in span])


def allowed_mask(q_span: Span, k_span: Span, mask: MaskLike, device: torch.device) -> torch.Tensor:
    """Bool [Sq, Sk]: True where a query may see a key."""
    lo, hi = mask.bounds(positions(q_span, device))
    kp = positions(k_span, device)
    return (kp[None, :] >= lo[:, None]) & (kp[None, :] <= hi[:, None])


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision to accumulate and merge in: float64 stays, everything else goes to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
