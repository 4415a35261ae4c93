"""torch's flash-attention ops that return the LSE, as a block kernel ("torch").

CPU: ``_scaled_dot_product_flash_attention_for_cpu`` and its backward (any float dtype, GQA
native, any causal block through an additive float mask). CUDA: the flash op (FA2 inside torch)
and its backward, bf16 and fp16, head dim a multiple of 8 up to 256; it wants as many K/V heads
as query heads, so GQA repeats them (vendor.py). Its backward takes the merged (out, lse): no
forward is re-run outside the op.
"""
from __future__ import annotations

import torch

from .base import MaskLike, Span, allowed_mask, mask_kind
from .vendor import FixedMaskKernel, bhsd, repeat_kv, sum_repeated

aten = torch.ops.aten
_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_NO_RNG = torch.zeros((), dtype=torch.int64)  # the op's philox seed/offset; unread without dropout


def _cpu_mask(q_span: Span, k_span: Span, mask: MaskLike, q: torch.Tensor):
    """(is_causal, additive mask or None, rows that see no key or None) for the CPU op."""
    kind = mask_kind(q_span, k_span, mask)
    if kind != "general":
        return kind == "causal", None, None
    allowed = allowed_mask(q_span, k_span, mask, q.device)
    additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    return False, additive, ~allowed.any(-1)


class TorchSdpaKernel(FixedMaskKernel):
    name = "torch"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if q.device.type == "cpu":
            return q.dtype in _CPU_DTYPES
        return q.device.type == "cuda" and q.dtype in _CUDA_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        if q.device.type != "cpu":
            return super().forward(q, k, v, q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        is_causal, additive, blind_rows = _cpu_mask(q_span, k_span, mask, q)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            bhsd(q), bhsd(k), bhsd(v), 0.0, is_causal, attn_mask=additive, scale=scale)
        if blind_rows is not None:  # the op reports lse 0 for a row with no key; it is -inf
            lse = lse.masked_fill(blind_rows, float("-inf"))
        return bhsd(out), lse

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        if q.device.type != "cpu":
            return super().backward(dout, q, k, v, out, lse, q_span=q_span, k_span=k_span, mask=mask,
                                    scale=scale)
        is_causal, additive, blind_rows = _cpu_mask(q_span, k_span, mask, q)
        if blind_rows is not None:  # exp(-inf - -inf) would be NaN; any finite lse gives p = 0
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.contiguous(), 0.0, is_causal,
            attn_mask=additive, scale=scale)
        return bhsd(dq), bhsd(dk), bhsd(dv)

    def _forward(self, q, k, v, causal: bool, scale: float):
        h = q.shape[2]
        res = aten._scaled_dot_product_flash_attention(
            bhsd(q), bhsd(repeat_kv(k, h)), bhsd(repeat_kv(v, h)), 0.0, causal, False, scale=scale)
        return bhsd(res[0]), res[1]

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        sq, h, sk, g = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        # cum_seq_q/k None: not variable-length (a defined tensor there would select that path).
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            bhsd(dout), bhsd(q), bhsd(repeat_kv(k, h)), bhsd(repeat_kv(v, h)), bhsd(out), lse.contiguous(),
            None, None, sq, sk, 0.0, causal, _NO_RNG, _NO_RNG, scale=scale)
        return bhsd(dq), sum_repeated(bhsd(dk), g), sum_repeated(bhsd(dv), g)
