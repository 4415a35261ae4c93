"""The project's Triton kernels (Triton's interpreter on CPU) against the math kernel: forward,
fused merge and backward per block, then through dist_attn on gloo ranks."""
import pytest
import torch

triton = pytest.importorskip("triton")

import megatron_lightseq as mls  # noqa: E402
from harness import run_ranks  # noqa: E402
from megatron_lightseq.kernels import get_kernel  # noqa: E402
from megatron_lightseq.distattn.plan.mask import Mask  # noqa: E402
from megatron_lightseq.kernels.tiles import tile_tables  # noqa: E402
from megatron_lightseq.kernels.triton_kernels import merge_into as triton_merge  # noqa: E402
from megatron_lightseq.kernels.merge import merge_into  # noqa: E402
from oracle import (CAUSAL, allowed_by_hand, assert_within_twice_plain, block_reference,  # noqa: E402
                    reference_with_grads)
from allocations import Allocations  # noqa: E402
from test_kernels import MASKED, SPANS, _inputs, assert_matches, masked_case  # noqa: E402

FP32 = dict(rtol=2e-5, atol=2e-5)


CASES = [(spans, (6, 2), 80) for spans in SPANS] + [("full", (4, 4), 64), ("zigzag diagonal", (4, 1), 96)]


@pytest.mark.parametrize("spans,heads,headdim", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_triton_block_any_positions(spans, heads, headdim):
    q_span, k_span = SPANS[spans]
    sq, sk = (sum(b - a for a, b in sp) for sp in (q_span, k_span))
    q, k, v, dout = _inputs(sq, sk, *heads, headdim)
    ref = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span), 0.3)
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
    ref = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span), 0.2)
    kernel, q32 = get_kernel("triton"), [x.float() for x in (q, k, v, dout)]
    out, lse = kernel.forward(*q32[:3], q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.2)
    grads = kernel.backward(q32[3], *q32[:3], ref[0].float(), ref[1].float(), q_span=q_span, k_span=k_span,
                            mask=CAUSAL, scale=0.2)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
        torch.testing.assert_close(got.double(), want, **FP32, msg=lambda m: f"{name}: {m}")


def test_triton_masks():
    """Every MASKED block (documents, windows, padding, zigzag and non-increasing spans; 16x16
    tiles under the interpreter, so tiles are skipped, masked and left whole), fp32 against the
    float64 oracle; rows that see no key give out 0, lse -inf, gradients 0."""
    kernel = get_kernel("triton")
    for i, name in enumerate(MASKED):
        q, k, v, dout, block, ref = masked_case(name, [(2, 1), (2, 2)][i % 2], [32, 24][i % 2], torch.float32, batch=1)
        out, lse = kernel.forward(q, k, v, **block)
        grads = kernel.backward(dout, q, k, v, ref[0].float(), ref[1].float(), **block)
        assert_matches((out, lse, *grads), ref, case=name, **FP32)


def test_triton_fused_merge_of_masked_blocks():
    """Two masked blocks merged into one accumulator (the executor's path) equal the whole row,
    including rows that see no key in the first block, or in either."""
    q_span, k_span, args = ((40, 75),), ((0, 75),), dict(cu_seqlens=(0, 30, 47, 60), window=(9, 0))
    q, k, v, _ = (x.float() for x in _inputs(35, 75, 4, 2, 32))
    whole = block_reference(*(x.double() for x in (q, k, v, q)), allowed_by_hand(q_span, k_span, **args), 0.3)
    out, lse = torch.zeros(2, 35, 4, 32), torch.full((2, 4, 35), float("-inf"))
    kernel = get_kernel("triton")
    for keys in (slice(40, 75), slice(0, 40)):
        kernel.forward_into(q, k[:, keys], v[:, keys], out, lse, q_span=q_span, k_span=((keys.start, keys.stop),),
                            mask=Mask(**args), scale=0.3)
    torch.testing.assert_close(out.double(), whole[0], **FP32)
    torch.testing.assert_close(lse.double(), whole[1], **FP32)


def test_triton_fp16_masked_within_twice_plain_fp16():
    q, k, v, dout, block, ref = masked_case("documents, window, causal", (4, 2), 64, torch.float16, batch=1)
    q_span, k_span, args = MASKED["documents, window, causal"]
    plain = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span, **args), 0.3)
    kernel = get_kernel("triton")
    out, lse = kernel.forward(q, k, v, **block)
    grads = kernel.backward(dout, q, k, v, out, lse, **block)
    assert all(x.dtype == torch.float16 for x in (out, *grads)) and not any(x.isnan().any() for x in grads)
    assert_within_twice_plain((out, lse, *grads), plain, ref, label="fp16")


def _kernel_tiles(t, sq: int, sk: int, bm: int, bn: int):
    """What the kernels do with tables ``t`` at block sizes (bm, bn), computed as they compute it:
    {(query tile, key tile): masked?} of the tiles the forward/dQ loops visit, and the same for
    the dK/dV loops (keyed (query tile, key tile) too). Tiles not in a dict are skipped."""
    def tile_range(table, pid, block, n):
        first = pid * (block // 16)
        last = min(first + block // 16 - 1, (n - 1) // 16)
        return table[first][0], table[last][1], table[last][2], table[first][3]

    kv, qt = t.kv.tolist(), t.q.tolist()
    fwd, dkdv = {}, {}
    for i in range(-(-sq // bm)):
        any_lo, any_hi, all_lo, all_hi = tile_range(kv, i, bm, sq)
        for start in range((any_lo // bn) * bn if t.cut_lo else 0, any_hi, bn):
            fwd[i, start // bn] = start + bn > all_hi or (t.cut_lo and start < all_lo)
    for j in range(-(-sk // bn)):
        any_lo, any_hi, all_lo, all_hi = tile_range(qt, j, bn, sk)
        for start in range((any_lo // bm) * bm, any_hi if t.cut_lo else sq, bm):
            dkdv[start // bm, j] = start < all_lo or (t.cut_lo and start + bm > all_hi)
    return fwd, dkdv


def _random_masked_blocks(n: int):
    """n (q_span, k_span, Mask arguments) of 20 to 400 tokens: documents (with padding), windows,
    causal or not, spans of one or two increasing ranges at any offsets."""
    gen = torch.Generator().manual_seed(7)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=gen))
    for _ in range(n):
        seq = rand(60, 400)
        end = seq - rand(0, 2) * rand(1, 20)  # sometimes padding at the end
        cuts = sorted({rand(1, end) for _ in range(rand(0, 12))})
        args = dict(causal=bool(rand(0, 2)))
        if rand(0, 3):
            args["cu_seqlens"] = (0, *cuts, end)
        if rand(0, 3):
            args["window"] = (rand(-1, 60), 0 if args["causal"] else rand(-1, 60))
        spans = []
        for _ in range(2):
            a = rand(0, seq - 40)
            b = rand(a + 20, seq + 1)
            cut = rand(a, b)
            spans.append(((a, b),) if rand(0, 2) or cut in (a, b - 1) else ((a, cut), (cut + rand(1, 10), b + 10)))
        yield spans[0], spans[1], args


def test_tile_tables_skip_and_leave_unmasked_only_what_they_may():
    """For random and MASKED blocks and every tile shape the kernels may use: no tile with an
    entry some row sees is skipped, no tile with a hidden entry goes unmasked; with 16x16 tiles
    and increasing positions, the loops start and end at the first and last tile with a seen
    entry, and every whole tile that is all seen goes unmasked."""
    blocks = [MASKED[name] for name in MASKED] + list(_random_masked_blocks(40))
    shapes = [(16, 16), (32, 16), (16, 64), (64, 32), (128, 64), (64, 128)]
    for q_span, k_span, args in blocks:
        allowed = allowed_by_hand(q_span, k_span, **args)
        sq, sk = allowed.shape
        t = tile_tables(q_span, k_span, Mask(**args), torch.device("cpu"))
        case = (q_span, k_span, args)
        for bm, bn in shapes:
            fwd, dkdv = _kernel_tiles(t, sq, sk, bm, bn)
            for i in range(-(-sq // bm)):
                for j in range(-(-sk // bn)):
                    tile = allowed[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                    for loops, name in ((fwd, "forward"), (dkdv, "dK/dV")):
                        where = (name, bm, bn, i, j, case)
                        assert (i, j) in loops or not tile.any(), ("skips a seen tile", where)
                        assert loops.get((i, j), True) or tile.all(), ("leaves a hidden entry unmasked", where)
                    assert fwd.get((i, j), True) or (j + 1) * bn <= sk, ("unmasked keys past the end", case)
        qp, kp = (torch.tensor([p for a, b in sp for p in range(a, b)]) for sp in (q_span, k_span))
        if not ((qp[1:] > qp[:-1]).all() and (kp[1:] > kp[:-1]).all()):
            continue
        fwd, dkdv = _kernel_tiles(t, sq, sk, 16, 16)
        for i in range(-(-sq // 16)):
            seen = [j for j in range(-(-sk // 16)) if allowed[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].any()]
            looped = sorted(j for (ii, j) in fwd if ii == i)
            if seen:
                assert looped[-1] == seen[-1] and (looped[0] == seen[0] or not t.cut_lo), case
            for j in looped:
                whole = allowed[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                assert fwd[i, j] == (not whole.all() or whole.shape[1] < 16), case
        for j in range(-(-sk // 16)):
            seen = [i for i in range(-(-sq // 16)) if allowed[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].any()]
            looped = sorted(i for (i, jj) in dkdv if jj == j)
            if seen:
                assert looped[0] == seen[0] and (looped[-1] == seen[-1] or not t.cut_lo), case
            for i in looped:
                whole = allowed[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                assert dkdv[i, j] == (not whole.all() or (t.cut_lo and whole.shape[0] < 16)), case


def test_tile_tables_of_a_causal_diagonal_block_skip_the_upper_triangle():
    t = tile_tables(((0, 72),), ((0, 72),), CAUSAL, torch.device("cpu"))
    assert (t.cut_hi, t.cut_lo) == (True, False)
    assert t.kv[:, 1].tolist() == [16, 32, 48, 64, 72]  # query granule i's rows see keys < 16(i+1)
    assert t.kv[:, 3].tolist() == [1, 17, 33, 49, 65]  # and all of them see keys <= 16i
    assert t.q[:, 0].tolist() == [0, 16, 32, 48, 64]  # key granule j: rows before 16j see none of it
    assert t.q[:, 2].tolist() == [15, 31, 47, 63, 71]  # rows from 16j+15 on see all of it
    t = tile_tables(((40, 80), (0, 40)), ((0, 80),), CAUSAL, torch.device("cpu"))
    assert t.kv.tolist() == [[0, 80, 80, 0]] * 5 and t.q.tolist() == [[0, 80, 80, 0]] * 5  # not increasing


@pytest.mark.parametrize("lse_layout", ["BHS", "BSH"])
def test_one_pass_triton_merge_equals_the_torch_merge(lse_layout):
    """Into row-range views of the accumulators, as the executor merges; the part's LSE dense
    [B, H, S] or laid out [B, S, H] (token stride H), as cuDNN gives it with
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1."""
    g = torch.Generator().manual_seed(5)
    out = torch.randn(2, 40, 3, 80, generator=g)
    lse = torch.randn(2, 3, 40, generator=g)
    lse[:, :, :5], out[:, :5] = float("-inf"), 0.0  # rows that have seen no key yet
    part = torch.randn(2, 24, 3, 80, generator=g).bfloat16()
    part_lse = torch.randn(2, 3, 24, generator=g)
    if lse_layout == "BSH":
        part_lse = part_lse.transpose(1, 2).contiguous().transpose(1, 2)
        assert part_lse.stride() == (72, 1, 3)
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
    ref = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span), 0.125)
    half = [x.half() for x in (q, k, v, dout)]
    plain = block_reference(*half, allowed_by_hand(q_span, k_span), 0.125)
    kernel, block = get_kernel("triton"), dict(q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.125)
    out, lse = kernel.forward(*half[:3], **block)
    grads = kernel.backward(half[3], *half[:3], out, lse, **block)
    assert lse.dtype == torch.float32 and all(x.dtype == torch.float16 for x in (out, *grads))
    assert_within_twice_plain((out, lse, *grads), plain, ref, label="fp16")


@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_triton_reads_megatron_layouts_without_copies(heads):
    """Micro-batch 2 as the executor hands blocks over: q, k, v, dout as Megatron's [s, b, h, d]
    seen as [b, s, h, d], out and lse the second chunk of a longer result (strided slices). The
    results equal those of dense copies, and the only tensors made are the results (out, lse
    forward; dq, dk, dv, delta and a dense copy of the lse slice backward): no input is copied,
    and GQA's dK/dV have G heads from the start (no per-query-head buffers)."""
    h, g = heads
    gen = torch.Generator().manual_seed(11)
    sbhd = lambda s, n: torch.randn(s, 2, n, 32, generator=gen).transpose(0, 1)
    q, k, v, dout = sbhd(40, h), sbhd(40, g), sbhd(40, g), sbhd(40, h)
    out_full, lse_full = torch.zeros(2, 80, h, 32), torch.full((2, h, 80), float("-inf"))
    out, lse = out_full[:, 40:], lse_full[:, :, 40:]
    block = dict(q_span=((40, 80),), k_span=((16, 56),), mask=CAUSAL, scale=0.2)
    kernel = get_kernel("triton")
    tile_tables(block["q_span"], block["k_span"], CAUSAL, q.device)  # cached: not counted below
    with Allocations() as fwd:
        kernel.forward_into(q, k, v, out, lse, **block)
    with Allocations() as bwd:
        grads = kernel.backward(dout, q, k, v, out, lse, **block)
    assert fwd.total == 0, fwd.made
    b, s, d = 2, 40, 32
    assert bwd.total == 4 * b * s * (h * d + 2 * g * d) + 2 * 4 * b * h * s, bwd.made  # fp32 inputs: 4 bytes each
    dense = [x.contiguous() for x in (q, k, v, dout)]
    want_out, want_lse = torch.zeros(2, 40, h, 32), torch.full((2, h, 40), float("-inf"))
    kernel.forward_into(*dense[:3], want_out, want_lse, **block)
    want = kernel.backward(dense[3], *dense[:3], want_out, want_lse, **block)
    torch.testing.assert_close(out, want_out, **FP32)
    torch.testing.assert_close(lse, want_lse, **FP32)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, **FP32)
    ref = block_reference(*(x.double() for x in dense), allowed_by_hand(block["q_span"], block["k_span"]), 0.2)
    for got, exp in zip((out, lse, *grads), ref):
        torch.testing.assert_close(got.double(), exp, **FP32)


def test_tile_tables_reach_the_device_in_one_copy_and_tuning_keys_bucket_shapes():
    """A new block's tables go to the device as one buffer (on CUDA: pinned, non-blocking), and
    the autotuner keys token counts by power-of-two bucket, so packed batches whose blocks change
    length within a bucket neither tune nor synchronise again."""
    from megatron_lightseq.kernels import triton_kernels as tk

    with Allocations("meta") as a:
        t = tile_tables(((0, 72),), ((0, 72),), Mask(cu_seqlens=(0, 30, 72)), torch.device("meta"))
    assert len(a.made) == 1 and a.made[0][0] == "aten._to_copy.default", a.made
    assert all(x.device.type == "meta" for x in t[:5]) and t.kv.shape == (5, 4)
    assert "Sq" not in tk._TUNE_KEY and "Sk" not in tk._TUNE_KEY and {"SQ_KEY", "SK_KEY"} <= set(tk._TUNE_KEY)
    assert tk.tune_bucket(300) == tk.tune_bucket(512) == 512 and tk.tune_bucket(513) == 1024 and tk.tune_bucket(3) == 16
