"""The test oracle: plain attention over the whole sequence, written independently of the
package (repeat K/V heads, masked softmax), differentiated by autograd."""
from __future__ import annotations

import torch

from megatron_lightseq.kernels.mask import Mask

CAUSAL, FULL = Mask(causal=True), Mask(causal=False)  # the plain masks, for kernel calls


def reference_attention(q, k, v, *, causal: bool, scale: float | None = None):
    """(out_BSHD, lse_BHS) in the inputs' dtype; differentiable through out."""
    rep = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kr, vr = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vr)
    return out, lse


def reference_with_grads(q, k, v, dout, *, causal: bool):
    """Full-sequence (out, lse, dq, dk, dv) of the oracle."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=causal)
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(), lse.detach(), *grads)


def assert_within_twice_plain(got, plain, ref, *, label: str, floor: float = 1e-5):
    """flash-attn's error rule for low-precision results: each of (out, lse, dq, dk, dv) ``got``
    is at most twice as far from ``ref`` as a plain computation in that precision (``plain``,
    named ``label`` in messages) is, plus a small floor."""
    for name, g, p, r in zip(("out", "lse", "dq", "dk", "dv"), got, plain, ref):
        err = (g.double() - r.double()).abs().max().item()
        base = (p.double() - r.double()).abs().max().item()
        assert err <= 2 * base + floor, f"{name}: {err:.3g} vs plain {label} {base:.3g}"
