"""On a CUDA GPU: every CUDA block kernel against a float32 reference with flash-attn's error rule
(at most twice the error of a plain bf16 PyTorch computation, plus a small floor), and emulated
P = 2, 3, 8 ranks against one monolithic call the same way. Skipped without CUDA; run by
scripts/gpu_check.sh."""
import pytest
import torch

from megatron_lightseq.distattn.emulate import emulate_dist_attn
from megatron_lightseq.kernels import AUTO_ORDER, get_kernel, resolve_kernel
from megatron_lightseq.kernels.mask import Mask
from oracle import CAUSAL, allowed_by_hand, assert_within_twice_plain, block_reference, reference_with_grads

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
    allowed = allowed_by_hand(q_span, k_span)
    ref = block_reference(*full32, allowed, scale)
    plain = block_reference(*bf, allowed, scale)
    ker = resolve_kernel(kernel, bf[0], bf[1]) if kernel == "auto" else get_kernel(kernel)
    opts = dict(q_span=q_span, k_span=k_span, mask=CAUSAL, scale=scale)
    out, lse = ker.forward(*bf[:3], **opts)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = ker.backward(bf[3], *bf[:3], out, lse, **opts)
    assert_within_twice_plain((out, lse, *grads), plain, ref, label="bf16")


# Packed documents (shorter and longer than the block) with a sliding window, on a diagonal block
# and on a block of past keys whose queries run into padding (positions from 700): the vendor
# kernels hand these to Triton, which skips and masks tiles by the rows' key intervals.
MASKED_BLOCKS = {
    "documents, window, diagonal": (((256, 512),), ((256, 512),),
                                    dict(cu_seqlens=(0, 100, 300, 333, 600, 900), window=(128, 0))),
    "documents, window, past, padding": (((512, 768),), ((256, 512),),
                                         dict(cu_seqlens=(0, 100, 300, 333, 600, 700), window=(200, 0))),
}


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("block", list(MASKED_BLOCKS))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_cuda_kernel_masked_block_within_twice_plain_bf16(kernel, block, heads):
    q_span, k_span, args = MASKED_BLOCKS[block]
    gen = torch.Generator(device="cuda").manual_seed(1)
    make = lambda hh: torch.randn(2, 256, hh, 128, device="cuda", generator=gen)
    full32 = [make(heads[0]), make(heads[1]), make(heads[1]), make(heads[0])]
    bf = [x.bfloat16() for x in full32]
    allowed = allowed_by_hand(q_span, k_span, **args)
    ref, plain = block_reference(*full32, allowed, 0.125), block_reference(*bf, allowed, 0.125)
    ker = resolve_kernel(kernel, bf[0], bf[1]) if kernel == "auto" else get_kernel(kernel)
    opts = dict(q_span=q_span, k_span=k_span, mask=Mask(**args), scale=0.125)
    out, lse = ker.forward(*bf[:3], **opts)
    grads = ker.backward(bf[3], *bf[:3], out, lse, **opts)
    assert torch.isneginf(lse).any() == (block == "documents, window, past, padding")  # rows with no key
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
