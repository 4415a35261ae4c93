"""On a CUDA GPU: every CUDA block kernel against a float32 reference with flash-attn's error rule
(at most twice the error of a plain bf16 PyTorch computation, plus a small floor), and emulated
P = 2, 3, 8 ranks against one monolithic call the same way. Skipped without CUDA; run by
scripts/gpu_check.sh."""
import pytest
import torch

from megatron_lightseq.distattn.emulate import emulate_dist_attn
from megatron_lightseq.kernels import AUTO_ORDER, get_kernel, resolve_kernel
from oracle import CAUSAL, assert_within_twice_plain, reference_with_grads
from test_kernels import _block_reference

pytestmark = pytest.mark.gpu

# (q_span, k_span): a diagonal block, one wholly in the past, a zigzag diagonal (two ranges per
# side) and a causal block no vendor op's mask fits (they hand it on).
BLOCKS = {"diagonal": (((0, 256),), ((0, 256),)), "past": (((512, 768),), ((0, 256),)),
          "zigzag diagonal": (((128, 256), (768, 896)), ((128, 256), (768, 896))),
          "offset": (((256, 512),), ((128, 384),))}
CUDA_KERNELS = [n for n in AUTO_ORDER if n != "math"] + ["auto"]


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("headdim", [64, 128])
def test_cuda_kernel_error_within_twice_plain_bf16(kernel, block, heads, headdim):
    q_span, k_span = BLOCKS[block]
    h, g = heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda hh: torch.randn(2, 256, hh, headdim, device="cuda", generator=gen)
    full32 = [make(h), make(g), make(g), make(h)]
    bf = [x.bfloat16() for x in full32]
    scale = headdim ** -0.5
    ref = _block_reference(*full32, q_span, k_span, True, scale)
    plain = _block_reference(*bf, q_span, k_span, True, scale)
    ker = resolve_kernel(kernel, bf[0], bf[1]) if kernel == "auto" else get_kernel(kernel)
    opts = dict(q_span=q_span, k_span=k_span, mask=CAUSAL, scale=scale)
    out, lse = ker.forward(*bf[:3], **opts)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = ker.backward(bf[3], *bf[:3], out, lse, **opts)
    assert_within_twice_plain((out, lse, *grads), plain, ref, label="bf16")


@pytest.mark.parametrize("world_size", [2, 3, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("kernel", ["auto", "cudnn", "triton"])
def test_emulated_ranks_within_twice_plain_bf16(world_size, layout, kernel):
    gen = torch.Generator(device="cuda").manual_seed(world_size)
    n = 4608  # divisible by 2P for P = 2, 3, 8
    make = lambda hh: torch.randn(1, n, hh, 128, device="cuda", generator=gen)
    full32 = [make(8), make(2), make(2), make(8)]
    bf = [x.bfloat16() for x in full32]
    ref = reference_with_grads(*full32, causal=True)
    plain = reference_with_grads(*bf, causal=True)
    got = emulate_dist_attn(*bf, world_size=world_size, layout=layout, kernel=kernel)
    assert_within_twice_plain(got, plain, ref, label="bf16")
