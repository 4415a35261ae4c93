"""On a CUDA GPU: every CUDA block kernel against a float32 reference with flash-attn's error rule
(at most twice the error of a plain bf16 PyTorch computation, plus a small floor), and emulated
P = 2, 3, 8 ranks against one monolithic call the same way; micro-batch 2 in Megatron's layouts, and
no host sync in the Triton kernels' steady state with changing documents. Skipped without CUDA; run by
scripts/gpu_check.sh."""
import pytest
import torch

from megatron_lightseq.distattn.run.emulate import emulate_dist_attn
from megatron_lightseq.kernels import AUTO_ORDER, get_kernel, resolve_kernel
from megatron_lightseq.distattn.plan.mask import Mask
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


def _megatron_views(s, b, h, g, d, gen):
    """q, k, v, d_out as Megatron hands them over: [s, b, heads, d] tensors seen as [b, s, heads, d]."""
    make = lambda n: torch.randn(s, b, n, d, device="cuda", generator=gen).bfloat16().transpose(0, 1)
    return make(h), make(g), make(g), make(h)


@pytest.mark.parametrize("kernel", ["cudnn", "triton", "torch"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_micro_batch_2_in_megatron_layouts(kernel, heads):
    """Micro-batch 2: q, k, v, d_out strided views, out and lse the second half of a longer
    result (zigzag's second chunk); the block's results equal those of dense copies (cuDNN's
    backward before 9.5.1 asserted on these strides)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, dout = _megatron_views(256, 2, *heads, 128, gen)
    ker, opts = get_kernel(kernel), dict(q_span=((256, 512),), k_span=((256, 512),), mask=CAUSAL, scale=0.125)
    out_full = torch.zeros(2, 512, heads[0], 128, device="cuda", dtype=torch.bfloat16)
    lse_full = torch.zeros(2, heads[0], 512, device="cuda")
    o, l = ker.forward(q, k, v, **opts)
    out_full[:, 256:], lse_full[:, :, 256:] = o, l
    out, lse = out_full[:, 256:], lse_full[:, :, 256:]
    grads = ker.backward(dout, q, k, v, out, lse, **opts)
    dense = [x.contiguous() for x in (q, k, v, dout)]
    want = ker.backward(dense[3], *dense[:3], out.contiguous(), lse.contiguous(), **opts)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)  # bf16 defaults: the op may pick another plan for other strides


def test_triton_steady_state_makes_no_host_sync():
    """Blocks of packed documents whose boundaries change every batch: after the first batch of a
    shape no call synchronises the host with the GPU (tile tables go up in a non-blocking copy
    from pinned memory; the autotuner's choice is looked up by shape bucket)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout = _megatron_views(512, 2, 8, 2, 128, gen)
    kernel = get_kernel("triton")

    def batch(cu):
        opts = dict(q_span=((0, 512),), k_span=((0, 512),), mask=Mask(cu_seqlens=cu), scale=0.125)
        out, lse = torch.zeros(2, 512, 8, 128, device="cuda"), torch.full((2, 8, 512), float("-inf"), device="cuda")
        kernel.forward_into(q, k, v, out, lse, **opts)
        kernel.backward(dout, q, k, v, out.bfloat16(), lse, **opts)

    batch((0, 100, 300, 512))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cu in ((0, 77, 260, 512), (0, 5, 400, 511, 512), (0, 256, 512)):
            batch(cu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
