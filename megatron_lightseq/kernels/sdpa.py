"""torch's fused attention ops that return the LSE, as a block kernel ("torch").

CPU: ``_scaled_dot_product_flash_attention_for_cpu`` and its backward (any float dtype, GQA
native, explicit masks as an additive float mask). CUDA: the flash op and its backward (bf16 and
fp16, head dim <= 256, K/V heads repeated inside the adapter for GQA since the op wants equal
heads). Blocks whose mask is neither full nor top-left causal run the math kernel on CUDA; the
built-in plans never make such blocks.
The ops take [B, H, S, D]; transposed views of our [B, S, H, D] tensors serve without copies.
"""
from __future__ import annotations

import torch

from .base import Span, allowed_mask, mask_kind
from .math import MathKernel

aten = torch.ops.aten
_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _cpu_mask(q_span: Span, k_span: Span, causal: bool, q: torch.Tensor):
    """(is_causal, additive mask or None, rows that see no key or None) for the CPU op."""
    kind = mask_kind(q_span, k_span, causal)
    if kind != "general":
        return kind == "causal", None, None
    allowed = allowed_mask(q_span, k_span, q.device)
    additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    return False, additive, ~allowed.any(-1)


class TorchSdpaKernel:
    name = "torch"

    def __init__(self) -> None:
        self._math = MathKernel()

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if q.device.type == "cpu":
            return q.dtype in _CPU_DTYPES
        return q.device.type == "cuda" and q.dtype in _CUDA_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        if q.device.type == "cpu":
            is_causal, mask, blind_rows = _cpu_mask(q_span, k_span, causal, q)
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q), _bhsd(k), _bhsd(v), 0.0, is_causal, attn_mask=mask, scale=scale)
            if blind_rows is not None:  # the op reports lse 0 for a row with no key; it is -inf
                lse = lse.masked_fill(blind_rows, float("-inf"))
            return _bhsd(out), lse
        kind = mask_kind(q_span, k_span, causal)
        if kind == "general":
            return self._math.forward(q, k, v, q_span=q_span, k_span=k_span, causal=causal, scale=scale)
        rep = q.shape[2] // k.shape[2]
        res = aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(k.repeat_interleave(rep, 2)), _bhsd(v.repeat_interleave(rep, 2)),
            0.0, kind == "causal", False, scale=scale)
        return _bhsd(res[0]), res[1]

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, causal: bool,
                 scale: float):
        if q.device.type == "cpu":
            is_causal, mask, blind_rows = _cpu_mask(q_span, k_span, causal, q)
            if blind_rows is not None:  # exp(-inf - -inf) would be NaN; any finite lse gives p = 0
                lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(), 0.0, is_causal,
                attn_mask=mask, scale=scale)
            return _bhsd(dq), _bhsd(dk), _bhsd(dv)
        kind = mask_kind(q_span, k_span, causal)
        if kind == "general":
            return self._math.backward(dout, q, k, v, out, lse, q_span=q_span, k_span=k_span,
                                       causal=causal, scale=scale)
        b, sk, g, d = k.shape
        rep = q.shape[2] // g
        empty = torch.empty(0, device=q.device)
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k.repeat_interleave(rep, 2)), _bhsd(v.repeat_interleave(rep, 2)),
            _bhsd(out), lse.contiguous(), empty, empty, q.shape[1], sk, 0.0, kind == "causal", seed, seed,
            scale=scale)
        # Sum the repeated heads' gradients back onto their shared K/V head.
        dk = _bhsd(dk).reshape(b, sk, g, rep, d).sum(3)
        dv = _bhsd(dv).reshape(b, sk, g, rep, d).sum(3)
        return _bhsd(dq), dk, dv
