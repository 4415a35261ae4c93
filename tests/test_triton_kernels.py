"""The project's Triton kernels (Triton's interpreter on CPU) against the math kernel: forward,
fused merge and backward per block, then through dist_attn on gloo ranks."""
import pytest
import torch

triton = pytest.importorskip("triton")

import megatron_lightseq as mls  # noqa: E402
from harness import run_ranks  # noqa: E402
from megatron_lightseq.kernels import get_kernel  # noqa: E402
from megatron_lightseq.kernels.triton_kernels import merge_into as triton_merge, tile_tables  # noqa: E402
from megatron_lightseq.kernels.merge import merge_into  # noqa: E402
from oracle import CAUSAL, assert_within_twice_plain, reference_with_grads  # noqa: E402
from test_kernels import SPANS, _block_reference, _inputs  # noqa: E402

FP32 = dict(rtol=2e-5, atol=2e-5)


CASES = [(spans, (6, 2), 80) for spans in SPANS] + [("full", (4, 4), 64), ("zigzag diagonal", (4, 1), 96)]


@pytest.mark.parametrize("spans,heads,headdim", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_triton_block_any_positions(spans, heads, headdim):
    q_span, k_span = SPANS[spans]
    sq, sk = (sum(b - a for a, b in sp) for sp in (q_span, k_span))
    q, k, v, dout = _inputs(sq, sk, *heads, headdim)
    ref = _block_reference(q, k, v, dout, q_span, k_span, True, 0.3)
    kernel, q32 = get_kernel("triton"), [x.float() for x in (q, k, v, dout)]
    out, lse = kernel.forward(*q32[:3], q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.3)
    torch.testing.assert_close(out.double(), ref[0], **FP32)
    torch.testing.assert_close(lse.double(), ref[1], **FP32)
    grads = kernel.backward(q32[3], *q32[:3], ref[0].float(), ref[1].float(), q_span=q_span, k_span=k_span,
                            mask=CAUSAL, scale=0.3)
    for got, want in zip(grads, ref[2:]):
        torch.testing.assert_close(got.double(), want, **FP32)


def test_fused_merge_equals_merging_afterwards():
    q, k, v, _ = (x.float() for x in _inputs(8, 16, 4, 2, 64))
    kernel, spans = get_kernel("triton"), dict(q_span=((8, 16),), k_span=((0, 8),), mask=CAUSAL, scale=0.125)
    first = get_kernel("math").forward(q, k[:, 8:], v[:, 8:], q_span=((8, 16),), k_span=((8, 16),), mask=CAUSAL,
                                       scale=0.125)
    fused_out, fused_lse = first[0].clone(), first[1].clone()
    kernel.forward_into(q, k[:, :8], v[:, :8], fused_out, fused_lse, **spans)
    out, lse = first[0].clone(), first[1].clone()
    merge_into(out, lse, *kernel.forward(q, k[:, :8], v[:, :8], **spans))
    torch.testing.assert_close(fused_out, out, **FP32)
    torch.testing.assert_close(fused_lse, lse, **FP32)


def _through_dist_attn(rank, world_size, layout, schedule):
    g = torch.Generator().manual_seed(3)
    n = 2 * world_size * 8
    full = [torch.randn(1, n, h, 64, generator=g, dtype=torch.float64) for h in (6, 2, 2, 6)]
    expected = reference_with_grads(*full, causal=True)
    local = [mls.shard(x, layout=layout, rank=rank, world_size=world_size).float() for x in full]
    q, k, v = (x.requires_grad_() for x in local[:3])
    out, lse = mls.dist_attn(q, k, v, layout=layout, schedule=schedule, kernel="triton", return_lse=True)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), local[3]))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        want = mls.shard(b, layout=layout, rank=rank, world_size=world_size, dim=2 if name == "lse" else 1)
        torch.testing.assert_close(a.double(), want, **FP32, msg=lambda m: f"{name}: {m}")
    return True


@pytest.mark.parametrize("world_size,layout,schedule", [(2, "zigzag", "ring"), (3, "contiguous", "lightseq")])
def test_triton_through_dist_attn(world_size, layout, schedule):
    assert all(run_ranks(world_size, _through_dist_attn, layout, schedule))


LONG_SPANS = {  # several 16-token tiles per side under the interpreter, so tiles are skipped
    "diagonal, partial last tile": (((0, 72),), ((0, 72),)),
    "zigzag diagonal": (((8, 40), (120, 152)), ((8, 40), (120, 152))),
    "past and diagonal": (((64, 136),), ((0, 136),)),
    "rows with no key": (((0, 40), (100, 140)), ((30, 70),)),
    "positions not increasing": (((40, 80), (0, 40)), ((40, 80), (0, 40))),
}


@pytest.mark.parametrize("spans", list(LONG_SPANS), ids=list(LONG_SPANS))
def test_triton_skips_only_what_the_mask_hides(spans):
    q_span, k_span = LONG_SPANS[spans]
    sq, sk = (sum(b - a for a, b in sp) for sp in (q_span, k_span))
    q, k, v, dout = _inputs(sq, sk, 2, 1, 32)
    ref = _block_reference(q, k, v, dout, q_span, k_span, True, 0.2)
    kernel, q32 = get_kernel("triton"), [x.float() for x in (q, k, v, dout)]
    out, lse = kernel.forward(*q32[:3], q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.2)
    grads = kernel.backward(q32[3], *q32[:3], ref[0].float(), ref[1].float(), q_span=q_span, k_span=k_span,
                            mask=CAUSAL, scale=0.2)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
        torch.testing.assert_close(got.double(), want, **FP32, msg=lambda m: f"{name}: {m}")


def test_tile_tables_of_a_diagonal_block_skip_the_upper_triangle():
    _, _, kv_end, kv_full, q_lo, q_full = tile_tables(((0, 72),), ((0, 72),), True, torch.device("cpu"))
    assert kv_end.tolist() == [16, 32, 48, 64, 72]  # granule i's rows see keys < 16(i+1)
    assert kv_full.tolist() == [1, 17, 33, 49, 65]  # and all of them see keys <= 16i
    assert q_lo.tolist() == [0, 16, 32, 48, 64]  # key granule j: rows before 16j see none of it
    assert q_full.tolist() == [15, 31, 47, 63, 71]  # rows from 16j+15 on see all of it
    _, _, kv_end, kv_full, q_lo, q_full = tile_tables(((40, 80), (0, 40)), ((0, 80),), True, torch.device("cpu"))
    assert set(kv_end.tolist()) == {80} and set(kv_full.tolist()) == {0}  # not increasing: skip nothing
    assert set(q_lo.tolist()) == {0} and set(q_full.tolist()) == {80}


def test_one_pass_triton_merge_equals_the_torch_merge():
    g = torch.Generator().manual_seed(5)
    out = torch.randn(2, 40, 3, 80, generator=g)
    lse = torch.randn(2, 3, 40, generator=g)
    lse[:, :, :5], out[:, :5] = float("-inf"), 0.0  # rows that have seen no key yet
    part = torch.randn(2, 24, 3, 80, generator=g).bfloat16()
    part_lse = torch.randn(2, 3, 24, generator=g)
    part_lse[:, :, :2], part[:, :2] = float("-inf"), 0.0  # ... and some see none here either
    want_out, want_lse = out.clone(), lse.clone()
    merge_into(want_out[:, 3:27], want_lse[:, :, 3:27], part, part_lse)  # row-range views, as the executor does
    triton_merge(out[:, 3:27], lse[:, :, 3:27], part, part_lse)
    torch.testing.assert_close(out, want_out, **FP32)
    torch.testing.assert_close(lse, want_lse, **FP32)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_triton_fp16_within_twice_plain_fp16(heads):
    """Low-precision inputs (fp16; Triton 3.9's interpreter multiplies bf16 wrongly in tl.dot, so
    bf16 is left to the GPU tests): error at most twice a plain fp16 computation's."""
    q_span = k_span = ((0, 48),)
    q, k, v, dout = _inputs(48, 48, *heads, 64)
    ref = _block_reference(q, k, v, dout, q_span, k_span, True, 0.125)
    half = [x.half() for x in (q, k, v, dout)]
    plain = _block_reference(*half, q_span, k_span, True, 0.125)
    kernel, block = get_kernel("triton"), dict(q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.125)
    out, lse = kernel.forward(*half[:3], **block)
    grads = kernel.backward(half[3], *half[:3], out, lse, **block)
    assert lse.dtype == torch.float32 and all(x.dtype == torch.float16 for x in (out, *grads))
    assert_within_twice_plain((out, lse, *grads), plain, ref, label="fp16")
