"""CUDA block kernels against a float32 reference, with flash-attn's error rule: at most about
twice the error of a plain bf16 PyTorch computation. Skipped without CUDA."""
import pytest
import torch

from megatron_lightseq.kernels import get_kernel
from oracle import reference_with_grads

pytestmark = pytest.mark.gpu

# (q_span, k_span, causal mask in the oracle): a diagonal block and a block wholly in the past.
BLOCKS = {"diag": (((0, 256),), ((0, 256),), True), "full": (((512, 768),), ((0, 256),), False)}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("headdim", [64, 128])
def test_torch_cuda_kernel_error_within_twice_plain_bf16(block, heads, headdim):
    q_span, k_span, oracle_causal = BLOCKS[block]
    h, g = heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda hh: torch.randn(2, 256, hh, headdim, device="cuda", generator=gen)
    full32 = [make(h), make(g), make(g), make(h)]
    bf = [x.bfloat16() for x in full32]
    ref = reference_with_grads(*full32, causal=oracle_causal)
    plain = reference_with_grads(*bf, causal=oracle_causal)
    kernel = get_kernel("torch")
    opts = dict(q_span=q_span, k_span=k_span, causal=True, scale=headdim ** -0.5)
    out, lse = kernel.forward(*bf[:3], **opts)
    grads = kernel.backward(bf[3], *bf[:3], out, lse, **opts)
    assert lse.dtype == torch.float32
    for name, got, p, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), plain, ref):
        err = (got.float() - r).abs().max().item()
        base = (p.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: {err:.3g} vs plain bf16 {base:.3g}"
