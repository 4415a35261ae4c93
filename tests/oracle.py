"""The test oracle: plain attention over the whole sequence or one block, written independently
of the package (repeat K/V heads, a dense mask from document ids and window arithmetic, masked
softmax), differentiated by autograd."""
from __future__ import annotations

import torch

from megatron_lightseq.distattn.plan.mask import Mask

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


def positions_of(span) -> torch.Tensor:
    return torch.tensor([p for a, b in span for p in range(a, b)], dtype=torch.int64)


def allowed_by_hand(q_span, k_span, *, causal: bool = True, cu_seqlens=None, window=(-1, -1),
                    cu_seqlens_padded=None) -> torch.Tensor:
    """Bool [Sq, Sk], whether a query may see a key, from explicit arithmetic on positions (not
    the package's Mask): causal k <= q; window (left, right) q - k <= left, k - q <= right (-1
    unbounded); documents: equal document ids, a token's id being how many boundaries after the
    first it has reached, and a padding token (at or past the last boundary, or with
    ``cu_seqlens_padded`` past its document's real length) sees nothing and is seen by nothing."""
    qp, kp = positions_of(q_span)[:, None], positions_of(k_span)[None, :]
    ok = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
    if causal:
        ok &= kp <= qp
    left, right = window
    if left >= 0:
        ok &= qp - kp <= left
    if right >= 0:
        ok &= kp - qp <= right
    if cu_seqlens is not None:
        starts = cu_seqlens_padded or cu_seqlens
        lengths = torch.tensor(cu_seqlens).diff()
        doc = lambda p: sum((p >= edge).long() for edge in starts[1:])  # noqa: E731
        real = lambda p: (p < starts[-1]) & (p - torch.tensor(starts)[doc(p).clamp(max=len(lengths) - 1)]  # noqa: E731
                                             < lengths[doc(p).clamp(max=len(lengths) - 1)])
        ok &= (doc(qp) == doc(kp)) & real(qp) & real(kp)
    return ok


def block_reference(q, k, v, dout, allowed, scale):
    """(out, lse, dq, dk, dv) of one block with a dense ``allowed`` [Sq, Sk]: rows that see no key
    give out 0, lse -inf and no gradient. In the inputs' dtype; dk/dv with K/V's heads."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1].repeat_interleave(rep, 2)) * scale
    s = s.masked_fill(~allowed.to(q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows with no key: all zero
    out = torch.einsum("bhqk,bkhd->bqhd", p, leaves[2].repeat_interleave(rep, 2))
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, dout))


def reference_with_grads(q, k, v, dout, *, causal: bool):
    """Full-sequence (out, lse, dq, dk, dv) of the oracle."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=causal)
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(), lse.detach(), *grads)


def assert_within_twice_plain(got, plain, ref, *, label: str, floor: float = 1e-5):
    """flash-attn's error rule for low-precision results: each of (out, lse, dq, dk, dv) ``got``
    is at most twice as far from ``ref`` as a plain computation in that precision (``plain``,
    named ``label`` in messages) is, plus a small floor; NaN anywhere fails."""
    def gap(x, r):  # an lse of -inf (a row that sees no key) matching the reference is no error
        x, r = x.double(), r.double()
        return torch.where(torch.isinf(r) & (x == r), 0.0, x - r).abs().max().item()

    for name, g, p, r in zip(("out", "lse", "dq", "dk", "dv"), got, plain, ref):
        err, base = gap(g, r), gap(p, r)
        assert err <= 2 * base + floor, f"{name}: {err:.3g} vs plain {label} {base:.3g}"
