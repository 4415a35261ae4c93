"""What the adapters of vendor attention ops (torch's flash and cuDNN ops, flash-attn) share.

Those ops know two masks: none, and the causal triangle from the top-left of a square block.
:class:`FixedMaskKernel` maps a block's spans and mask onto them (``mask_kind``) and hands any
other block (documents, windows, a causal block off the diagonal) to a kernel that takes any
mask: Triton where it imports, else the math kernel. K/V heads are repeated for ops that want as many
K/V heads as query heads, and the repeated heads' gradients summed back onto their shared head.
"""
from __future__ import annotations

import functools

import torch

from .base import BlockKernel, MaskLike, Span, mask_kind
from .math import MathKernel


def schema_fits(ops, name: str, args: tuple[str, ...]) -> bool:
    """Whether ``ops`` (torch.ops.aten) has op ``name`` taking exactly ``args``, in order: the
    adapters pass arguments by position, so a release that adds, drops or moves one is refused
    instead of called wrongly."""
    op = getattr(ops, name, None)
    schema = getattr(getattr(op, "default", None), "_schema", None)
    return schema is not None and tuple(a.name for a in schema.arguments) == args


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] <-> [B, H, S, D] as a view (torch's SDPA ops take the latter)."""
    return x.transpose(1, 2)


def repeat_kv(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """K or V [B, S, G, D] with each head repeated to ``nheads`` heads (no copy when G == nheads)."""
    rep = nheads // x.shape[2]
    return x if rep == 1 else x.repeat_interleave(rep, 2)


def sum_repeated(grad: torch.Tensor, nheads_kv: int) -> torch.Tensor:
    """Gradient [B, S, H, D] of repeated K/V heads summed back onto the [B, S, G, D] shared heads."""
    b, s, h, d = grad.shape
    return grad if h == nheads_kv else grad.reshape(b, s, nheads_kv, h // nheads_kv, d).sum(3)


@functools.cache
def _any_mask_kernels() -> tuple[BlockKernel, ...]:
    """Kernels that take any positions and mask, in order of preference: Triton's where it imports, math."""
    try:  # optional
        from .triton_kernels import TritonKernel
    except ImportError:
        return (MathKernel(),)
    return TritonKernel(), MathKernel()


def _any_mask_kernel(q: torch.Tensor, k: torch.Tensor) -> BlockKernel:
    return next(kernel for kernel in _any_mask_kernels() if kernel.supports(q, k))


class FixedMaskKernel(BlockKernel):
    """Base of adapters: subclasses define ``_forward(q, k, v, causal, scale) -> (out, lse_BHS)``
    and ``_backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`` for full or top-left
    causal blocks, tensors [B, S, H, D] (K/V with G heads)."""

    any_mask = False

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        kind = mask_kind(q_span, k_span, mask)
        if kind == "general":
            return _any_mask_kernel(q, k).forward(q, k, v, q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        return self._forward(q, k, v, kind == "causal", scale)

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        kind = mask_kind(q_span, k_span, mask)
        if kind == "general":
            return _any_mask_kernel(q, k).backward(dout, q, k, v, out, lse, q_span=q_span, k_span=k_span,
                                               mask=mask, scale=scale)
        return self._backward(dout, q, k, v, out, lse, kind == "causal", scale)
