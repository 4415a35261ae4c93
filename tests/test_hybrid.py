"""Hybrid head x sequence parallelism (dist_attn heads_group=, docs/hybrid.md) against the
float64 oracle: the wide sweep on emulated ranks in one process, the plan's data by hand, and a
few cases on real gloo ranks (one process group per world size, every split of it inside)."""
import itertools

import pytest
import torch

import megatron_lightseq as mls
from harness import run_ranks
from megatron_lightseq.distattn.run.emulate import emulate_dist_attn
from megatron_lightseq.distattn.plan.hybrid import HeadSplit, build_hybrid_plan, outer_layout, resolve_hybrid
from megatron_lightseq.distattn.plan.layout import layout_of
from megatron_lightseq.distattn.plan.plan import Shape
from megatron_lightseq.distattn.plan.mask import mask_of
from mask_cases import dense_allowed, documents, masked_reference

F64 = dict(rtol=1e-10, atol=1e-10)
SPLITS = [(4, 2), (4, 4), (6, 3), (6, 2), (8, 2), (8, 4)]  # (P, U): U all-to-all x P/U point-to-point
# MHA, GQA (U divides G; G < U; G not a multiple of U, so K/V heads repeat locally), MQA
HEADS = [(12, 12), (12, 4), (12, 2), (12, 6), (12, 1)]


def _inputs(n, h, hkv, seed, batch=1, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, c, d, generator=g, dtype=torch.float64) for c in (h, hkv, hkv, h)]


def _compare(got, expected, label):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        if name == "lse":  # rows that see no key: -inf on both sides
            a, b = (torch.where(torch.isinf(b), 0.0, x) for x in (a, b))
        torch.testing.assert_close(a, b, **F64, msg=lambda m: f"{label}: {name}: {m}")


def _predicted(hyb, shape, link, side="sends"):
    return sum(hyb.bytes(r, shape, link=link, side=side, lse=link == "intra") for r in range(hyb.world_size))


def _sweep_cases():
    """(P, U, layout, causal, heads, mask): every third of the product, so that each split still
    meets every layout, causal or not, every head ratio and every kind of mask (the whole product
    would cost minutes)."""
    masks = [{}, dict(window_size=(5, 0)), "docs", ("docs", (7, -1))]
    for i, ((p, u), layout, causal, heads) in enumerate(itertools.product(
            SPLITS, ("contiguous", "zigzag", "balanced"), (True, False), HEADS)):
        if i % 3:
            continue
        mask = masks[i // 3 % 4] if layout != "balanced" else masks[2 + i // 3 % 2]
        if not causal and mask == masks[1]:
            mask = dict(window_size=(5, 3))
        yield p, u, layout, causal, heads, mask


@pytest.mark.parametrize("p,u", SPLITS)
def test_emulated_hybrid_matches_the_oracle_and_its_bytes(p, u):
    """out, lse, dq, dk, dv against the oracle; all-to-all and point-to-point bytes as planned."""
    cases = [c for c in _sweep_cases() if c[:2] == (p, u)]
    for i, (_, _, layout, causal, (h, hkv), mask) in enumerate(cases):
        docs = isinstance(mask, tuple) or mask == "docs"
        n = 16 * p * 2 + (3 if docs else 0)  # documents pad the sequence; a window alone needs whole chunks
        if docs:
            window = mask[1] if isinstance(mask, tuple) else (-1, -1)
            mask = dict(cu_seqlens=documents(("odd", "short", "long-tailed")[i % 3], n, seed=i), window_size=window)
        if layout == "balanced" and not mask:
            mask = dict(cu_seqlens=(0, n))
        mask = dict(causal=causal, **mask)
        label = f"P={p} U={u} {layout} heads=({h},{hkv}) {mask}"
        q, k, v, dout = _inputs(n, h, hkv, seed=i, batch=1 + i % 2)
        with mls.trace() as t:
            got = emulate_dist_attn(q, k, v, dout, world_size=p, layout=layout, kernel="math", heads_group=u, **mask)
        _compare(got, masked_reference(q, k, v, dout, dense_allowed(n, **mask)), label)
        local = mls.shard(q, layout=layout, rank=0, world_size=p, **mask).shape[1]
        shape = Shape(q.shape[0], local, h, hkv, 8, torch.float64)
        hyb = resolve_hybrid(shape, world_size=p, inner=u, layout=layout, schedule="auto",
                             mask=mask_of(mask["causal"], mask.get("cu_seqlens"), mask.get("window_size", (-1, -1))))
        assert (t.a2a_bytes_sent, t.a2a_bytes_received) == (_predicted(hyb, shape, "intra"),) * 2, label
        assert (t.bytes_sent, t.bytes_received) == (_predicted(hyb, shape, "inter"),) * 2, label
        assert (t.a2a_bytes_sent > 0) == (u > 1), label
    assert cases


def test_head_split_gives_each_rank_only_the_kv_heads_it_needs():
    mha, gqa, few, odd, mqa = (HeadSplit(12, g, 4) for g in (12, 4, 2, 6, 1))
    assert [mha.kv_heads(j) for j in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert [gqa.kv_heads(j) for j in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [few.kv_heads(j) for j in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # each head to two ranks
    assert [mqa.kv_heads(j) for j in range(4)] == [(0, 1)] * 4
    # 6 K/V heads over 4 ranks of 3 query heads: rank 1 has heads 3, 4, 5 -> K/V 1, 2, 2
    assert odd.kv_heads(1) == (1, 3) and odd.expand(1) == (0, 1, 1) and odd.local_kv(1) == 3
    assert all(s.expand(j) is None for s in (mha, gqa, few, mqa) for j in range(4))


def test_outer_layout_is_the_same_layout_over_fewer_ranks_on_plain_masks():
    """Zigzag over 8 ranks, gathered by 4: outer rank o holds the tokens zigzag over 2 ranks gives it."""
    lay = outer_layout(layout_of("zigzag", 8), 4)
    assert lay.owners == ((0, 1, 2, 3, 12, 13, 14, 15), (4, 5, 6, 7, 8, 9, 10, 11))
    coarse = layout_of("zigzag", 2).owners  # 4 chunks of 4 fine ones
    assert [sorted(f for c in mine for f in range(4 * c, 4 * c + 4)) for mine in coarse] == [list(o) for o in lay.owners]
    assert outer_layout(layout_of("contiguous", 6), 3).owners == ((0, 1, 2), (3, 4, 5))


@pytest.mark.parametrize("p,u,h,hkv,expected", [
    (4, 3, 12, 4, "must divide the context-parallel size (4): sizes that fit are [1, 2, 4]"),
    (8, 4, 6, 2, "heads (6 on this rank) must be a multiple of the all-to-all group size (4)"),
])
def test_bad_splits_are_refused(p, u, h, hkv, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        build_hybrid_plan("ring", layout="zigzag", world_size=p, inner=u, nheads=h, nheads_kv=hkv)


def test_hybrid_cuts_cross_group_bytes_by_the_inner_size():
    """Point-to-point bytes per rank shrink with U (the outer plan has P/U steps of U-times longer
    chunks but 1/U of the heads); U = P sends nothing point to point."""
    shape = Shape(1, 1024, 32, 32, 128, torch.bfloat16)
    flat = mls.build_plan("ring", layout="zigzag", world_size=8).traffic(0, shape)
    for u in (2, 4, 8):
        hyb = build_hybrid_plan("ring", layout="zigzag", world_size=8, inner=u, nheads=32, nheads_kv=32)
        inter = hyb.bytes(0, shape, link="inter")
        assert inter == 0 if u == 8 else inter * u < flat * 1.2


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the capture guard looks at."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _hybrid_steady_state(rank, world_size, outer, inner):
    """A hybrid call under a (faked) CUDA graph capture is refused before anything else; packed
    hybrid calls with new documents every batch agree once per shape: (collectives, host reads)
    per call."""
    capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        q = torch.randn(1, 8, 12, 8).as_subclass(_OnCuda)
        mls.dist_attn(q, q, q, group=outer, heads_group=inner)
        refused = None
    except RuntimeError as e:
        refused = str(e)
    finally:
        torch.cuda.is_current_stream_capturing = capturing
    n, counts = 16 * world_size + 3, []
    for batch in range(3):
        mask = dict(cu_seqlens=documents("long-tailed", n, seed=100 + batch))
        q, k, v, _ = (mls.shard(x, layout="balanced", rank=rank, world_size=world_size, **mask)
                      for x in _inputs(n, 12, 2, seed=batch))
        with mls.trace() as t:
            mls.dist_attn(q, k, v, group=outer, heads_group=inner, layout="balanced", kernel="math", **mask)
        counts.append((t.collectives, t.host_reads))
    return refused, counts


def _hybrid_on_ranks(rank, world_size, splits):
    """Every split of this world on real ranks: a few cases each, their bytes, and a bad split;
    with the first split, the steady state (_hybrid_steady_state)."""
    import torch.distributed as dist

    results, steady = [], None
    for u in splits:
        q_count = world_size // u
        inner = [dist.new_group([o * u + i for i in range(u)]) for o in range(q_count)][rank // u]
        outer = [dist.new_group([o * u + i for o in range(q_count)]) for i in range(u)][rank % u] if q_count > 1 else None
        # first, a bad split on one rank only (7 heads there): every rank raises, none waits in a
        # transfer, and the groups stay usable for the cases below
        q = torch.randn(1, 4, 7 if rank == 0 else 12, 8, dtype=torch.float64)
        k = torch.randn(1, 4, 1, 8, dtype=torch.float64)
        try:
            mls.dist_attn(q, k, k, group=outer, heads_group=inner, layout="contiguous")
            results.append(None)
        except ValueError as e:
            results.append(str(e))
        if steady is None:
            steady = _hybrid_steady_state(rank, world_size, outer, inner)
        cases = [("zigzag", True, (12, 2), {}), ("contiguous", False, (12, 12), {}),
                 ("zigzag", True, (12, 1), dict(window_size=(9, 0))), ("balanced", True, (12, 4), "docs")]
        for i, (layout, causal, (h, hkv), mask) in enumerate(cases):
            n = 16 * world_size * 2 + (5 if mask == "docs" else 0)
            if mask == "docs":
                mask = dict(cu_seqlens=documents("long-tailed", n, seed=i))
            mask = dict(causal=causal, **mask)
            label = f"U={u} {layout} heads=({h},{hkv}) {mask}"
            full = _inputs(n, h, hkv, seed=10 * u + i)
            expected = masked_reference(*full, dense_allowed(n, **mask))
            q, k, v, dout = (mls.shard(x, layout=layout, rank=rank, world_size=world_size, **mask) for x in full)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            with mls.trace() as t:
                out, lse = mls.dist_attn(q, k, v, group=outer, heads_group=inner, layout=layout, kernel="math",
                                         return_lse=True, **mask)
                grads = torch.autograd.grad(out, (q, k, v), dout)
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out.detach(), lse, *grads), expected):
                dim = 2 if name == "lse" else 1
                part = mls.shard(b, layout=layout, rank=rank, world_size=world_size, dim=dim, **mask)
                real = mls.positions(layout=layout, rank=rank, world_size=world_size, tokens=n, **mask) < n
                pick = (lambda x: x[:, :, real]) if dim == 2 else (lambda x: x[:, real])
                torch.testing.assert_close(pick(a), pick(part), **F64, msg=lambda m: f"{label}: {name}: {m}")
            shape = Shape.of(q, k)
            hyb = resolve_hybrid(shape, world_size=world_size, inner=u, layout=layout, schedule="auto",
                                 mask=mask_of(causal, mask.get("cu_seqlens"), mask.get("window_size", (-1, -1))))
            for side, got in (("sends", (t.a2a_bytes_sent, t.bytes_sent)), ("recvs", (t.a2a_bytes_received, t.bytes_received))):
                want = (hyb.bytes(rank, shape, side=side, link="intra", lse=True), hyb.bytes(rank, shape, side=side, link="inter"))
                assert got == want, f"{label} {side}: {got} != {want}"
    return results, steady


@pytest.mark.parametrize("world_size,splits", [(4, (2, 4)), (6, (3, 2))])
def test_hybrid_on_gloo_ranks(world_size, splits):
    ranks = run_ranks(world_size, _hybrid_on_ranks, splits, timeout=240)
    messages = [m for m, _ in ranks]
    for refused, counts in (s for _, s in ranks):
        assert refused is not None and "cannot be captured in a CUDA graph" in refused, refused
        assert counts[0][0] >= 1 and counts[1:] == [(0, 0), (0, 0)], counts  # new documents: no re-agreement
    for u, per_rank in zip(splits, zip(*messages)):
        assert all(m is not None for m in per_rank), (u, per_rank)
        assert "multiple of the all-to-all group size" in per_rank[0] or "multiple of nheads_kv" in per_rank[0]
        assert all("rejected their inputs" in m for m in per_rank[1:]), (u, per_rank)
