"""Documents and windows in DistAttn, swept wide with emulated ranks in one process (the same
plans, executor and kernels as real ranks; tests/test_dist_attn.py runs a share of these on gloo
ranks): out, lse, dq, dk, dv against a dense float64 oracle, and the plans' properties."""
import itertools
import math

import pytest
import torch

import megatron_lightseq as mls
from mask_cases import DOCUMENTS, dense_allowed, documents, masked_reference, padded
from megatron_lightseq.distattn.run.emulate import emulate_dist_attn
from megatron_lightseq.distattn.plan.check import check_plan

EXACT = dict(rtol=1e-10, atol=1e-10)
HEADS = [(4, 4), (6, 2), (4, 1)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 tokens instead of 16, so that short test sequences are cut 8 chunks a rank too;
    one intra-op thread (these tensors are tiny: more threads only contend)."""
    from megatron_lightseq.distattn.plan import layout, schedules

    monkeypatch.setattr(layout, "MIN_CHUNK_TOKENS", 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for cached in (layout.layout_of, schedules.plan_for, schedules.auto_schedule):
        cached.cache_clear()
    yield
    torch.set_num_threads(threads)
    for cached in (layout.layout_of, schedules.plan_for, schedules.auto_schedule):
        cached.cache_clear()


def _cases(world_size: int):
    """(layout, causal, documents or None, window, tokens, heads, kernel, schedule): every mask on
    every layout, the other dimensions rotating (each mask meets both causal settings across the
    layouts)."""
    p = world_size
    short, long = 3 * p + 1, 16 * p + 3  # with small_chunks: 1 and 8 chunks a rank, padded
    masks = [(docs, (-1, -1), tokens) for docs in DOCUMENTS for tokens in (short, long)]
    masks += [(None, (3, 0), 16 * p), (None, (9, 0), 16 * p), (None, (10 * long, 0), 16 * p),
              ("odd", (long // p * 2 + 1, 0), long), ("long-tailed", (5, 0), short),
              ("padded", (-1, -1), long), ("padded", (7, 0), short)]  # TransformerEngine's per-document padding
    cases = []
    for i, (layout, (docs, window, tokens)) in enumerate(itertools.product(("contiguous", "zigzag", "balanced"),
                                                                            masks)):
        causal = i % 2 == 0
        if not causal and window[1] == 0:
            window = (window[0], window[0] // 3) if window[0] >= 0 else window  # a window both ways
        if docs is None and tokens % (p * (2 if layout == "zigzag" else 1)):
            continue
        cases.append((layout, causal, docs, window, tokens, HEADS[i % 3], ("math", "torch")[i % 2],
                      ("ring", "lightseq", "auto")[i % 3]))
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_masks_match_the_dense_oracle_on_emulated_ranks(world_size, small_chunks):
    for n, (layout, causal, docs, window, tokens, (h, hkv), kernel, schedule) in enumerate(_cases(world_size)):
        mask = dict(causal=causal, window_size=window, **_documents(docs, tokens, world_size, seed=n))
        tokens = mask["cu_seqlens_padded"][-1] if mask.get("cu_seqlens_padded") else tokens
        label = f"P={world_size} {layout} causal={causal} docs={docs} window={window} tokens={tokens} {kernel} {schedule}"
        g = torch.Generator().manual_seed(n)
        q, dout = (torch.randn(1, tokens, h, 16, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, tokens, hkv, 16, generator=g, dtype=torch.float64) for _ in range(2))
        got = emulate_dist_attn(q, k, v, dout, world_size=world_size, layout=layout, schedule=schedule, kernel=kernel,
                                **mask)
        want = masked_reference(q, k, v, dout, dense_allowed(tokens, **mask))
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, **EXACT, msg=lambda m: f"{label}: {name}: {m}")


def _documents(kind, tokens: int, world_size: int, seed: int = 0) -> dict:
    """cu_seqlens (and cu_seqlens_padded, for "padded": long-tailed documents padded as TE does)."""
    if kind is None:
        return {}
    if kind == "padded":
        cu = documents("long-tailed", tokens, seed)
        return dict(cu_seqlens=cu, cu_seqlens_padded=padded(cu, world_size))
    return dict(cu_seqlens=documents(kind, tokens, seed))


def _needed(plan, block, kv_chunks) -> bool:
    return all(any(plan.work(qc, kc) for qc in block.q_chunks) for kc in kv_chunks)


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
def test_masked_plans_are_valid_and_send_only_what_has_work(world_size, small_chunks):
    for layout, causal, docs, window, tokens, *_ in _cases(world_size):
        mask = _documents(docs, tokens, world_size)
        tokens = mask["cu_seqlens_padded"][-1] if mask.get("cu_seqlens_padded") else tokens
        for schedule in ("ring", "lightseq"):
            plan = mls.build_plan(schedule, layout=layout, world_size=world_size, causal=causal, window_size=window,
                                  tokens=tokens, **mask)
            check_plan(plan)  # every pair with work computed exactly once, every input there in time
            for steps in (plan.forward, plan.backward):
                for step in steps:
                    for rs in step:
                        for b in rs.blocks:
                            assert plan.block_work(b) > 0, (layout, docs, window, b)
                            assert _needed(plan, b, b.kv_chunks), (layout, docs, window, b)
                            sent = [tr.payload for tr in rs.recvs if tr.payload.kind == "kv"
                                    and tr.payload.owner == b.kv_owner]
                            assert all(p.chunks == b.kv_chunks for p in sent)  # no chunk without work travels


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_a_window_talks_only_to_the_ranks_within_it(world_size):
    tokens = 128 * world_size
    chunk = tokens // world_size  # one rank's share with the contiguous layout
    for left in (3, chunk // 2, chunk + 5, 3 * chunk):
        plan = mls.build_plan("ring", layout="contiguous", world_size=world_size, window_size=(left, 0),
                              tokens=tokens)
        assert plan.compute_steps <= math.ceil(left / chunk) + 1
        reach = math.ceil(left / chunk)
        for step in plan.forward:
            for rank, rs in enumerate(step):
                assert all(0 < rank - tr.src <= reach for tr in rs.recvs), (left, rank, rs.recvs)
        sizes = dict(batch=1, seqlen_local=chunk, nheads=4, nheads_kv=4, headdim=8, dtype=torch.float32)
        sub_chunk = chunk // plan.layout.chunks_per_rank
        kv_bytes_per_token = 2 * 4 * 8 * 4
        # K/V of the window's tokens, rounded up to whole sub-chunks, there and back (dK/dV)
        bound = 2 * 3 * (math.ceil(left / sub_chunk) + 1) * sub_chunk * kv_bytes_per_token
        assert max(plan.bytes_sent(r, **sizes) for r in range(world_size)) <= bound


def test_balanced_layout_balances_the_unmasked_area():
    tokens, p = 4099, 8
    cu = documents("long-tailed", tokens, seed=3)
    plan = mls.build_plan("ring", layout="balanced", world_size=p, cu_seqlens=cu)
    per_rank = [plan.work.area[list(plan.owned(r))].sum() for r in range(p)]
    assert max(per_rank) / (sum(per_rank) / p) <= 1.05, per_rank
    assert 0 < plan.layout.padded_tokens - tokens < plan.chunk_count  # only the sequence is padded


def test_balanced_layout_on_one_document_sends_what_zigzag_sends():
    """One document is the causal problem, which zigzag's pairing balances: the balanced layout
    (which also starts its swaps from the zigzag cut) sends and receives no more than it."""
    p, tokens = 8, 4096
    sizes = dict(batch=1, seqlen_local=tokens // p, nheads=4, nheads_kv=1, headdim=64, dtype=torch.bfloat16)
    traffic = {}
    for layout in ("balanced", "zigzag"):
        plan = mls.build_plan("ring", layout=layout, world_size=p, cu_seqlens=[0, tokens])
        traffic[layout] = max(plan.bytes_sent(r, **sizes) + plan.bytes_received(r, **sizes) for r in range(p))
        per_rank = [plan.work.area[list(plan.owned(r))].sum() for r in range(p)]
        assert max(per_rank) / (sum(per_rank) / p) <= 1.01, (layout, per_rank)
    assert traffic["balanced"] <= traffic["zigzag"], traffic


def test_shard_unshard_and_positions_for_every_layout():
    tokens, p = 203, 4
    cu = documents("odd", tokens)
    full = torch.arange(tokens)[None]
    for layout in ("contiguous", "zigzag", "balanced"):
        parts = [mls.shard(full, layout=layout, rank=r, world_size=p, cu_seqlens=cu) for r in range(p)]
        assert len({x.shape[1] for x in parts}) == 1
        assert torch.equal(mls.unshard(parts, layout=layout, cu_seqlens=cu), full)
        for r, part in enumerate(parts):
            pos = mls.positions(layout=layout, rank=r, world_size=p, cu_seqlens=cu)
            real = pos < tokens
            assert torch.equal(part[0][real], pos[real])  # each token's own position; padding past the end


def test_chunk_pair_areas_are_exact():
    """work.py's prefix-sum count against the dense mask, over random masks of every kind."""
    import random

    from megatron_lightseq.distattn.plan.work import _Pieces, _Tokens, area_from
    from megatron_lightseq.distattn.plan.mask import mask_of

    rng = random.Random(0)
    for _ in range(400):
        real = rng.randint(1, 40)
        kind = rng.choice(DOCUMENTS + ("padded", None))
        mask = _documents(kind, real, rng.randint(1, 3), seed=rng.randint(0, 99))
        length = mask["cu_seqlens_padded"][-1] if mask.get("cu_seqlens_padded") else real
        tokens = length + rng.randint(0, 5) * (kind is not None)  # padding past the documents too
        chunks = rng.choice([c for c in range(1, tokens + 1) if tokens % c == 0])
        causal = rng.random() < 0.6
        window = (rng.choice((-1, 0, 1, 3, 50)), rng.choice((-1, 0)) if causal else rng.choice((-1, 0, 2, 50)))
        want = dense_allowed(tokens, causal=causal, window_size=window, **mask)
        want = want.view(chunks, tokens // chunks, chunks, tokens // chunks).sum((1, 3))
        made = mask_of(causal, mask.get("cu_seqlens"), window, mask.get("cu_seqlens_padded"))
        pieces = _Pieces.of(made, tokens)
        assert pieces is not None, (made, tokens)  # the fast way knows every mask's edges
        for sums in (pieces, _Tokens(made, tokens)):
            pairs = area_from(sums, tokens, chunks)  # only the pairs with work, row by row
            got = pairs.dense()
            assert (torch.from_numpy(got) == want).all(), (type(sums), kind, mask, causal, window, tokens, chunks)
            assert (pairs.counts > 0).all() and (pairs.row_sums == got.sum(1)).all()
