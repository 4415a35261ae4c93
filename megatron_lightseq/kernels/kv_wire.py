"""K/V in 8 bits for the wire: int8, symmetric, K with one scale per (batch, head, channel) over
the payload's tokens, V with one per (batch, token, head). Keys carry their outliers in a few
fixed channels, so a channel's scale keeps the other channels fine; values have no such
channels and a token's scale suits them (docs/kv_wire.md has the measurements).

Legend: B batch, T the payload's tokens, G key/value heads, D head dim.

    k8, k_scale_B1GD, v8, v_scale_BTG1 = quantize_kv(k_BTGD, v_BTGD)
    k, v = dequantize_kv(k8, k_scale_B1GD, v8, v_scale_BTG1, dtype)

Both are deterministic (the same inputs give the same bytes), which is what lets the backward
quantize its K/V again instead of keeping the forward's. The arithmetic: scale = amax / 127 in
float32 (a zero amax gives the smallest normal float32, so its zeros stay zeros); q =
round-half-even(x / scale) in float32 (float64 for float64 inputs), clamped to [-127, 127];
dequantized x = q * scale in that precision, cast to ``dtype``. On CUDA the fused Triton kernels
(triton_wire.py) compute the same; this torch code is the CPU path and their reference.
"""
from __future__ import annotations

import torch

from .wire_form import QMAX, SCALE_DTYPE, TINY


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of ``x`` with one scale per slice along ``dim`` (kept as 1)."""
    work = x.to(_work_dtype(x.dtype))
    scale = (work.abs().amax(dim, keepdim=True).to(SCALE_DTYPE).clamp_min(TINY) / QMAX)
    q = torch.round(work / scale.to(work.dtype)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the product in the work dtype, cast as it is written: no work-dtype copy of the payload on GPUs
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q, scale.to(_work_dtype(dtype)), out=out)


def _fused(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run these tensors: CUDA only (the interpreter is for tests)."""
    return x.is_cuda


def quantize_kv(k_BTGD: torch.Tensor, v_BTGD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(k int8, k scale [B, 1, G, D], v int8, v scale [B, T, G, 1]): the wire form of a payload."""
    if _fused(k_BTGD):
        from .triton_wire import quantize_kv_fused

        return quantize_kv_fused(k_BTGD, v_BTGD)
    return quantize_kv_torch(k_BTGD, v_BTGD)


def dequantize_kv(k8, k_scale, v8, v_scale, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) in ``dtype`` from the wire form quantize_kv made."""
    if _fused(k8):
        from .triton_wire import dequantize_kv_fused

        return dequantize_kv_fused(k8, k_scale, v8, v_scale, dtype)
    return dequantize_kv_torch(k8, k_scale, v8, v_scale, dtype)


def quantize_kv_torch(k_BTGD: torch.Tensor, v_BTGD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """quantize_kv's torch code on any device: the Triton kernels' reference in the tests."""
    return (*_quantize(k_BTGD, 1), *_quantize(v_BTGD, 3))


def dequantize_kv_torch(k8, k_scale, v8, v_scale, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _dequantize(k8, k_scale, dtype), _dequantize(v8, v_scale, dtype)
