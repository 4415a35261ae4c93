"""torch's cuDNN attention op as a block kernel ("cudnn"): the fastest op on Hopper in ANCHORS.md
(540 TFLOP/s fwd+bwd at 32K causal on an H200, against 318 for torch's FA2).

CUDA only, bf16 and fp16, head dim a multiple of 8 up to 128. The op returns the LSE as
[B, H, S, 1] in the torch versions seen (2.11, 2.13); the shape it uses is read once from its meta
kernel, so the backward hands it back the way the forward gave it. Without dropout the op's
philox seed/offset and sequence-length tensors are unread: zeros and None stand in for them.
"""
from __future__ import annotations

import functools

import torch

from .vendor import FixedMaskKernel, bhsd, repeat_kv, sum_repeated

aten = torch.ops.aten


@functools.cache
def lse_is_4d() -> bool:
    """Whether the op's LSE carries a trailing singleton dim (asked of its meta kernel, no GPU)."""
    x = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.bfloat16)
    return aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)[1].dim() == 4


@functools.cache
def _no_rng(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


class CudnnKernel(FixedMaskKernel):
    name = "cudnn"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        d = q.shape[-1]
        return (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 128
                and hasattr(aten, "_scaled_dot_product_cudnn_attention"))

    def _forward(self, q, k, v, causal: bool, scale: float):
        b, sq, h, _ = q.shape
        res = aten._scaled_dot_product_cudnn_attention(
            bhsd(q), bhsd(repeat_kv(k, h)), bhsd(repeat_kv(v, h)), None, True, 0.0, causal, False, scale=scale)
        return bhsd(res[0]), res[1].reshape(b, h, sq)

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        sq, h, sk, g = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        lse = (lse.unsqueeze(-1) if lse_is_4d() else lse).contiguous()
        rng = _no_rng(q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            bhsd(dout), bhsd(q), bhsd(repeat_kv(k, h)), bhsd(repeat_kv(v, h)), bhsd(out), lse, rng, rng,
            None, None, None, sq, sk, 0.0, causal, scale=scale)
        return bhsd(dq), sum_repeated(bhsd(dk), g), sum_repeated(bhsd(dv), g)
