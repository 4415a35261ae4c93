"""Block kernels and the merge against the oracle, single process."""
import pytest
import torch

from megatron_lightseq.kernels import get_kernel, kernel_names, resolve_kernel
from megatron_lightseq.kernels.base import mask_kind
from megatron_lightseq.distattn.plan.runs import span_of
from megatron_lightseq.distattn.plan.mask import Mask
from megatron_lightseq.kernels.merge import merge_into
from oracle import CAUSAL, FULL, allowed_by_hand, block_reference, reference_attention

CPU_KERNELS = ["math", "torch"]


def _inputs(sq, sk, h, g, d, dtype=torch.float64, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    return make(batch, sq, h, d), make(batch, sk, g, d), make(batch, sk, g, d), make(batch, sq, h, d)


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
    ref_out, ref_lse, dq_ref, dk_ref, dv_ref = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span), scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grads = ker.backward(dout, q, k, v, out, lse, q_span=q_span, k_span=k_span, mask=CAUSAL, scale=scale)
    for got, want in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


DOCS = (0, 13, 50, 77, 96)
# Masked blocks of a 96-token sequence: (q_span, k_span, Mask arguments). Spans of 16 to 37
# tokens, most not multiples of 16, so 16-token tiles end inside them.
MASKED = {
    "one document": (((32, 64),), ((32, 64),), dict(cu_seqlens=(0, 96))),
    "many short documents": (((16, 53),), ((16, 53),), dict(cu_seqlens=(0, 5, 9, 16, 22, 30, 31, 40, 47, 61, 96))),
    "long-tailed mix, past keys": (((40, 75),), ((5, 40),), dict(cu_seqlens=(0, 1, 3, 41, 42, 70, 89, 96))),
    "documents without causal": (((0, 32),), ((30, 64),), dict(causal=False, cu_seqlens=DOCS)),
    "window inside a tile": (((16, 48),), ((16, 48),), dict(window=(5, 0))),
    "window over several tiles": (((64, 96),), ((0, 33),), dict(window=(40, 0))),
    "window past the sequence": (((32, 64),), ((0, 32),), dict(window=(200, 0))),
    "window hides the whole block": (((64, 80),), ((0, 16),), dict(window=(3, 0))),
    "left and right without causal": (((20, 52),), ((10, 42),), dict(causal=False, window=(7, 3))),
    "right only": (((20, 52),), ((30, 62),), dict(causal=False, window=(-1, 4))),
    "left only": (((40, 72),), ((8, 40),), dict(causal=False, window=(6, -1))),
    "documents, window, causal": (((40, 75),), ((40, 75),), dict(cu_seqlens=DOCS, window=(9, 0))),
    "padding rows": (((40, 75),), ((30, 64),), dict(cu_seqlens=(0, 30, 55))),
    "zigzag spans": (((8, 16), (80, 88)), ((0, 8), (88, 96)), dict(cu_seqlens=DOCS, window=(20, 0))),
    "positions not increasing": (((40, 60), (0, 20)), ((40, 60), (0, 20)), dict(cu_seqlens=DOCS, window=(12, 0))),
}


def masked_case(name, heads, headdim, dtype=torch.float64, batch=2):
    """(q, k, v, dout, kernel block arguments, oracle) of case ``name`` of MASKED, scale 0.3."""
    q_span, k_span, args = MASKED[name]
    sq, sk = (sum(b - a for a, b in sp) for sp in (q_span, k_span))
    q, k, v, dout = _inputs(sq, sk, *heads, headdim, dtype, 1, batch)
    block = dict(q_span=q_span, k_span=k_span, mask=Mask(**args), scale=0.3)
    wide = [x.double() for x in (q, k, v, dout)]
    return q, k, v, dout, block, block_reference(*wide, allowed_by_hand(q_span, k_span, **args), 0.3)


def assert_matches(got, want, *, case, **tol):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not g.isnan().any(), f"{case}: {name} has NaN"
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{case}: {name}: {m}")


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_block_kernel_masks(kernel):
    """Documents, windows, padding, arbitrary spans, against the dense oracle; rows that see no
    key give out 0, lse -inf and gradients 0. Head ratios and head dims cycle over the cases."""
    ker = get_kernel(kernel)
    for i, name in enumerate(MASKED):
        q, k, v, dout, block, ref = masked_case(name, [(4, 4), (6, 2), (4, 1)][i % 3], [64, 80][i % 2])
        out, lse = ker.forward(q, k, v, **block)
        grads = ker.backward(dout, q, k, v, out, lse, **block)
        assert_matches((out, lse, *grads), ref, case=name, rtol=1e-10, atol=1e-10)


def test_masked_cases_cover_what_they_claim():
    """The oracle's masks are what the cases are named for (so a case cannot silently test less)."""
    allowed = {name: allowed_by_hand(q_span, k_span, **args) for name, (q_span, k_span, args) in MASKED.items()}
    blind = {name: int((~a.any(1)).sum()) for name, a in allowed.items()}
    assert blind["padding rows"] == 20 and blind["window hides the whole block"] == 16
    assert allowed["window past the sequence"].all() and not allowed["window hides the whole block"].any()
    for name, a in allowed.items():  # the others hide some entries, not all
        assert name in ("window past the sequence", "window hides the whole block") or 0 < a.sum() < a.numel(), name


def test_mask_kind_agrees_with_the_oracle():
    """"full": every key seen; "causal": the top-left triangle; else "general"."""
    cases = {name: (q, k, Mask(**args), allowed_by_hand(q, k, **args)) for name, (q, k, args) in MASKED.items()}
    cases |= {name: (q, k, CAUSAL, allowed_by_hand(q, k)) for name, (q, k) in SPANS.items()}
    swapped = ((4, 8), (0, 4))  # equal spans, positions not increasing: not the triangle
    cases["plain, not increasing"] = (swapped, swapped, CAUSAL, allowed_by_hand(swapped, swapped))
    kinds = {}
    for name, (q_span, k_span, mask, allowed) in cases.items():
        kinds[name] = mask_kind(q_span, k_span, mask)
        triangle = allowed.shape[0] == allowed.shape[1] and torch.equal(allowed, torch.ones_like(allowed).tril())
        expected = "full" if allowed.all() else "causal" if triangle else "general"
        assert kinds[name] == expected, name
    assert kinds["one document"] == "causal" and kinds["window past the sequence"] == "full"


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
