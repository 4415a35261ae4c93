"""Plain-torch block kernel: einsum, logsumexp, explicit backward. Any dtype (float64 too), any
mask, GQA without repeating K/V. It materialises the [B, H, Sq, Sk] scores, so it is the test
oracle and the fallback, not the fast path."""
from __future__ import annotations

import torch

from .base import BlockKernel, MaskLike, Span, accum_dtype, allowed_mask, mask_kind


def _scores(q, k, q_span, k_span, mask, scale):
    """Scores [B, G, H/G, Sq, Sk] in the accumulation dtype, masked with -inf."""
    b, sq, h, d = q.shape
    g = k.shape[2]
    dt = accum_dtype(q.dtype)
    q5 = q.to(dt).view(b, sq, g, h // g, d)
    s = torch.einsum("bqgnd,bkgd->bgnqk", q5, k.to(dt)) * scale
    if mask_kind(q_span, k_span, mask) != "full":
        s = s.masked_fill(~allowed_mask(q_span, k_span, mask, q.device), float("-inf"))
    return s


def _probs(s, lse):
    """exp(s - lse), with rows whose lse is -inf (no key seen) set to 0 instead of NaN."""
    finite = torch.isfinite(lse)
    return torch.exp(s - torch.where(finite, lse, 0.0)[..., None]) * finite[..., None]


class MathKernel(BlockKernel):
    name = "math"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        return q.is_floating_point()

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        b, sq, h, d = q.shape
        g = k.shape[2]
        s = _scores(q, k, q_span, k_span, mask, scale)
        lse = torch.logsumexp(s, dim=-1)  # [B, G, H/G, Sq]; -inf where the row is all masked
        p = _probs(s, lse)
        out = torch.einsum("bgnqk,bkgd->bqgnd", p, v.to(p.dtype)).reshape(b, sq, h, d)
        return out.to(q.dtype), lse.reshape(b, h, sq)

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike,
                 scale: float):
        b, sq, h, d = q.shape
        g = k.shape[2]
        s = _scores(q, k, q_span, k_span, mask, scale)
        p = _probs(s, lse.to(s.dtype).view(b, g, h // g, sq))
        dt = s.dtype
        do5 = dout.to(dt).view(b, sq, g, h // g, d)
        delta = (dout.to(dt) * out.to(dt)).sum(-1).view(b, sq, g, h // g).permute(0, 2, 3, 1)
        dp = torch.einsum("bqgnd,bkgd->bgnqk", do5, v.to(dt))
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("bgnqk,bkgd->bqgnd", ds, k.to(dt)).reshape(b, sq, h, d) * scale
        dk = torch.einsum("bgnqk,bqgnd->bkgd", ds, q.to(dt).view(b, sq, g, h // g, d)) * scale
        dv = torch.einsum("bgnqk,bqgnd->bkgd", p, do5)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
