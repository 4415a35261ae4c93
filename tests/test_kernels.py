"""Block kernels and the merge against the oracle, single process."""
import pytest
import torch

from megatron_lightseq.kernels import get_kernel, kernel_names, resolve_kernel
from megatron_lightseq.kernels.base import mask_kind, span_of
from megatron_lightseq.kernels.merge import merge_into
from oracle import CAUSAL, FULL, reference_attention

CPU_KERNELS = ["math", "torch"]


def _inputs(sq, sk, h, g, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    return make(2, sq, h, d), make(2, sk, g, d), make(2, sk, g, d), make(2, sq, h, d)


def _block_reference(q, k, v, dout, q_span, k_span, causal, scale):
    """Oracle for a block: the positions' mask applied by hand, grads by autograd."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1].repeat_interleave(rep, 2)) * scale
    qp = torch.cat([torch.arange(a, b, device=q.device) for a, b in q_span])
    kp = torch.cat([torch.arange(a, b, device=q.device) for a, b in k_span])
    if causal:
        s = s.masked_fill(kp[None, :] > qp[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows with no key: all zero
    out = torch.einsum("bhqk,bkhd->bqhd", p, leaves[2].repeat_interleave(rep, 2))
    return (out, lse, *torch.autograd.grad(out, leaves, dout))


SPANS = {
    "full": (((8, 12),), ((0, 4),)),
    "diagonal": (((4, 8),), ((4, 8),)),
    "zigzag diagonal": (((2, 4), (12, 14)), ((2, 4), (12, 14))),
    "offset causal": (((4, 8),), ((2, 6),)),
    "rows with no key": (((0, 4),), ((2, 6),)),
}


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("spans", list(SPANS), ids=list(SPANS))
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
def test_block_kernel_any_positions(kernel, spans, heads):
    q_span, k_span = SPANS[spans]
    sq, sk = (sum(b - a for a, b in sp) for sp in (q_span, k_span))
    q, k, v, dout = _inputs(sq, sk, *heads, 80)
    ker, scale = get_kernel(kernel), 0.3
    out, lse = ker.forward(q, k, v, q_span=q_span, k_span=k_span, mask=CAUSAL, scale=scale)
    ref_out, ref_lse, dq_ref, dk_ref, dv_ref = _block_reference(q, k, v, dout, q_span, k_span, True, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grads = ker.backward(dout, q, k, v, out, lse, q_span=q_span, k_span=k_span, mask=CAUSAL, scale=scale)
    for got, want in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mask_kind():
    assert mask_kind(*SPANS["full"], CAUSAL) == "full"
    assert mask_kind(*SPANS["diagonal"], CAUSAL) == "causal"
    assert mask_kind(*SPANS["zigzag diagonal"], CAUSAL) == "causal"
    assert mask_kind(*SPANS["offset causal"], CAUSAL) == "general"
    assert mask_kind(*SPANS["offset causal"], FULL) == "full"
    assert span_of((2, 3, 6), 4) == ((8, 16), (24, 28))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_kernel_low_precision_dtypes(dtype):
    q, k, v, _ = _inputs(16, 16, 4, 2, 64, dtype)
    out, lse = get_kernel("torch").forward(q, k, v, q_span=((0, 16),), k_span=((0, 16),), mask=CAUSAL, scale=0.125)
    ref_out, ref_lse = reference_attention(*(x.double() for x in (q, k, v)), causal=True, scale=0.125)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def test_merge_of_two_halves_is_exact_and_empty_rows_stay_finite():
    q, k, v, _ = _inputs(6, 12, 4, 2, 16)
    scale = 0.25
    whole = reference_attention(q, k, v, causal=False, scale=scale)
    ker = get_kernel("math")
    out = torch.zeros_like(q)
    lse = torch.full((2, 4, 6), float("-inf"), dtype=torch.float64)
    merge_into(out, lse, torch.zeros_like(q), torch.full_like(lse, float("-inf")))  # nothing seen yet
    assert not out.isnan().any() and torch.isneginf(lse).all()
    for sl in (slice(0, 5), slice(5, 12)):
        part = ker.forward(q, k[:, sl], v[:, sl], q_span=((0, 6),), k_span=((0, 7),), mask=FULL, scale=scale)
        merge_into(out, lse, *part)
    torch.testing.assert_close(out, whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, whole[1], rtol=1e-12, atol=1e-12)


def test_merge_does_not_overflow_with_large_lse():
    out = torch.ones(1, 1, 1, 2)
    lse = torch.full((1, 1, 1), 1e4)
    merge_into(out, lse, torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1), 1e4))
    torch.testing.assert_close(out, torch.full((1, 1, 1, 2), 0.5))
    torch.testing.assert_close(lse, torch.full((1, 1, 1), 1e4 + torch.log(torch.tensor(2.0)).item()))


def test_registry_names_and_errors():
    assert set(kernel_names()) >= {"math", "torch", "auto"}
    q, k, _, _ = _inputs(4, 4, 4, 2, 16)
    assert resolve_kernel("auto", q, k).name == "torch"
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve_kernel("cutlass", q, k)
    with pytest.raises(ValueError, match="does not support dtype torch.int32"):
        resolve_kernel("torch", q.int(), k.int())
