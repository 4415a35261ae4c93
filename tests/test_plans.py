"""Plan properties for P = 1..16, per-rank views against whole plans, the auto rule; without processes."""
import dataclasses

import pytest
import torch

from megatron_lightseq import build_plan
from megatron_lightseq.distattn.plan.plan import Payload, Shape, Transfer
from megatron_lightseq.distattn.plan.check import check_plan
from megatron_lightseq.distattn.plan.hybrid import resolve_hybrid
from megatron_lightseq.distattn.plan.layout import layout_of
from megatron_lightseq.distattn.plan.mask import Mask, mask_of
from megatron_lightseq.distattn.plan.schedules import SCHEDULES, auto_schedule, choose_schedule, plan_for

ALL = [(s, lay, p, c) for s in SCHEDULES for lay in ("contiguous", "zigzag") for p in range(1, 17)
       for c in (True, False)]


@pytest.mark.parametrize("schedule,layout,world_size,causal", ALL)
def test_every_plan_is_valid(schedule, layout, world_size, causal):
    check_plan(build_plan(schedule, layout=layout, world_size=world_size, causal=causal))


@pytest.mark.parametrize("world_size", range(1, 17))
def test_lightseq_contiguous_takes_half_the_steps(world_size):
    plan = build_plan("lightseq", layout="contiguous", world_size=world_size, causal=True)
    assert plan.compute_steps == world_size // 2 + 1
    ring = build_plan("ring", layout="contiguous", world_size=world_size, causal=True)
    assert ring.compute_steps == world_size


def test_lightseq_p8_matches_the_paper_table():
    plan = build_plan("lightseq", layout="contiguous", world_size=8, causal=True)
    table = plan.describe().splitlines()[1:6]
    assert table[0] == "t=0: " + " | ".join(f"Q{r}K{r}" for r in range(8))
    assert table[1] == "t=1: Q7K0(help) | Q1K0 | Q2K1 | Q3K2 | Q4K3 | Q5K4 | Q6K5 | Q7K6"
    assert table[3] == "t=3: Q5K0(help) | Q6K1(help) | Q7K2(help) | Q3K0 | Q4K1 | Q5K2 | Q6K3 | Q7K4"
    assert table[4] == "t=4: - | - | - | - | Q4K0 | Q5K1 | Q6K2 | Q7K3"


@pytest.mark.parametrize("world_size", [3, 5, 7, 9])
def test_lightseq_odd_world_is_fully_balanced(world_size):
    plan = build_plan("lightseq", layout="contiguous", world_size=world_size, causal=True)
    for step in plan.forward[1:plan.compute_steps]:
        assert all(len(rs.blocks) == 1 for rs in step)


# Hand-derived bytes. Shape: batch 1, 4 local tokens, 4 heads, 2 KV heads, head dim 8, bf16:
# q/o/dq of one rank = 1*4*4*8*2 = 256 B, its k or v = 128 B, its lse = 1*4*4*4 = 64 B (fp32).
SHAPE = dict(batch=1, seqlen_local=4, nheads=4, nheads_kv=2, headdim=8, dtype=torch.bfloat16)


def test_bytes_ring_contiguous_causal_p2():
    plan = build_plan("ring", layout="contiguous", world_size=2, causal=True)
    # rank 0 sends its k,v to rank 1 (256 B); backward again (256 B); rank 1 returns dk,dv (256 B).
    assert plan.bytes_sent(0, phase="forward", **SHAPE) == 256
    assert plan.bytes_sent(0, phase="backward", **SHAPE) == 256
    assert plan.bytes_sent(1, phase="backward", **SHAPE) == 256
    assert plan.bytes_received(1, **SHAPE) == 512


def test_bytes_lightseq_helper_p3():
    plan = build_plan("lightseq", layout="contiguous", world_size=3, causal=True)
    # One step after the diagonals: rank 0 helps with Q2K0 (rank 2 sends q, 256 B, and gets
    # out+lse back, 320 B); rank 1 computes Q1K0 (k,v from rank 0) and rank 2 Q2K1 (k,v from 1).
    assert plan.compute_steps == 2
    assert plan.bytes_sent(2, phase="forward", **SHAPE) == 256
    assert plan.bytes_sent(0, phase="forward", **SHAPE) == 256 + 320
    # Backward: rank 2 sends q, out, lse, d_out (3*256 + 64 B) and dk,dv to rank 1 (256 B);
    # rank 0 sends k,v to rank 1 and dq to rank 2; rank 2 receives k,v of rank 1 and its dq.
    assert plan.bytes_sent(2, phase="backward", **SHAPE) == 3 * 256 + 64 + 256
    assert plan.bytes_sent(0, phase="backward", **SHAPE) == 256 + 256
    assert plan.bytes_received(2, phase="backward", **SHAPE) == 256 + 256


def test_bytes_zigzag_lightseq_sends_only_needed_chunks():
    ring = build_plan("ring", layout="zigzag", world_size=2, causal=True)
    direct = build_plan("lightseq", layout="zigzag", world_size=2, causal=True)
    # Rank 1 needs only chunk 0 of rank 0 (half its k,v); rank 0 needs all of rank 1's.
    assert ring.bytes_sent(0, phase="forward", **SHAPE) == 256
    assert direct.bytes_sent(0, phase="forward", **SHAPE) == 128
    assert direct.bytes_sent(1, phase="forward", **SHAPE) == 256


def test_auto_rule():
    shape = Shape(1, 128, 4, 1, 64, torch.bfloat16)
    assert choose_schedule("contiguous", 8, True, shape) == "lightseq"
    assert choose_schedule("contiguous", 8, False, shape) == "ring"  # nothing to balance: a tie
    assert choose_schedule("zigzag", 2, False, shape) == "ring"


def _broken(plan, **change):
    return dataclasses.replace(plan, **change)


def test_checker_catches_broken_plans():
    plan = build_plan("lightseq", layout="contiguous", world_size=4, causal=True)
    fwd = [list(step) for step in plan.forward]
    # 1. a block computed twice
    dup = [list(s) for s in fwd]
    dup[2][3] = dup[2][3]._replace(blocks=dup[2][3].blocks * 2)
    # 2. a receive dropped
    norecv = [list(s) for s in fwd]
    norecv[1][1] = norecv[1][1]._replace(recvs=())
    # 3. a send of something the rank does not have
    ghost = Transfer(1, 2, Payload("kv", 3, (3,)))
    bad_send = [list(s) for s in fwd]
    bad_send[1][1] = bad_send[1][1]._replace(sends=bad_send[1][1].sends + (ghost,))
    bad_send[1][2] = bad_send[1][2]._replace(recvs=bad_send[1][2].recvs + (ghost,))
    # 4. a helper result that never goes home
    lost = [list(s) for s in fwd[:-1]]
    for steps in (dup, norecv, bad_send, lost):
        with pytest.raises(AssertionError):
            check_plan(_broken(plan, forward=tuple(tuple(s) for s in steps)))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_plan("striped", layout="contiguous", world_size=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        build_plan("ring", layout="diagonal", world_size=2)


# Per-rank views (build_plan(..., rank=r)) are built from the tasks touching the rank alone; they
# must equal the whole plan's rows, and the whole plan assembled from them must pass the checks.
def _mask_cases(p: int) -> list[dict]:
    return [dict(causal=True), dict(causal=False), dict(cu_seqlens=(0, 5 * p, 7 * p, 16 * p + 3)),
            dict(cu_seqlens=(0, 3, 40 * p), causal=False), dict(window_size=(20, 0), tokens=32 * p)]


VIEW_CASES = [(s, lay, p, i) for s in SCHEDULES for lay in ("contiguous", "zigzag", "balanced")
              for p in (*range(1, 10), 16, 33) for i in range(5)]


@pytest.mark.parametrize("schedule,layout,world_size,case", VIEW_CASES)
def test_rank_views_equal_the_whole_plan(schedule, layout, world_size, case):
    kw = _mask_cases(world_size)[case]
    if layout == "balanced" and "cu_seqlens" not in kw:
        kw = dict(kw, tokens=32 * world_size)
    whole = build_plan(schedule, layout=layout, world_size=world_size, **kw)
    views = [build_plan(schedule, layout=layout, world_size=world_size, rank=r, **kw) for r in range(world_size)]
    assert views == [whole.view(r) for r in range(world_size)]
    assembled = dataclasses.replace(whole, forward=tuple(zip(*(v.forward for v in views))),
                                    backward=tuple(zip(*(v.backward for v in views))))
    check_plan(assembled)


def _whole_plan_rule(layout, mask, shape) -> str:
    """auto_schedule as it was: from the whole plans' critical numbers."""
    if layout.padded_tokens is not None:
        ring, light = (plan_for(s, layout, mask) for s in SCHEDULES)
        if [[rs.blocks for rs in st] for st in ring.forward] == [[rs.blocks for rs in st] for st in light.forward]:
            return "ring"
    return min(SCHEDULES, key=lambda s: (plan_for(s, layout, mask).critical_work,
                                         plan_for(s, layout, mask).critical_bytes(shape), SCHEDULES.index(s)))


@pytest.mark.parametrize("world_size", [*range(1, 10), 16, 24, 33, 40])
def test_auto_decisions_match_the_whole_plans(world_size):
    shape = Shape(1, 32 * world_size, 4, 2, 16, torch.bfloat16)
    for layout in ("contiguous", "zigzag", "balanced"):
        for kw in _mask_cases(world_size) + [dict(cu_seqlens=(0, 1, 2 * world_size, 30 * world_size))]:
            if len(kw) == 1 and "causal" in kw and layout != "balanced" and world_size > 16:
                continue  # plain layouts: the closed form, checked below
            mask = mask_of(kw.get("causal", True), kw.get("cu_seqlens"), kw.get("window_size", (-1, -1)))
            lay = layout_of(layout, world_size, mask, mask.length or 32 * world_size * world_size)
            assert auto_schedule(lay, mask, shape) == _whole_plan_rule(lay, mask, shape), (layout, kw)


def test_auto_closed_form_on_plain_layouts():
    shape = Shape(1, 128, 4, 1, 64, torch.bfloat16)
    for p in (*range(1, 17), 24, 33):
        for layout in ("contiguous", "zigzag"):
            for causal in (True, False):
                lay = layout_of(layout, p, Mask(causal=causal))
                assert auto_schedule(lay, Mask(causal=causal), shape) == _whole_plan_rule(lay, Mask(causal), shape)


def test_a_rank_never_builds_a_whole_plan():
    """Views, auto and the hybrid plan's per-rank parts (outer views, member runs, bytes) at a P
    where whole plans would be slow: none of them goes through plan_for."""
    p, shape = 64, Shape(1, 256, 4, 2, 16, torch.bfloat16)
    plan_for.cache_clear()
    for layout in ("contiguous", "zigzag", "balanced"):
        for kw in (dict(causal=True), dict(cu_seqlens=(0, 900, 5000, 256 * p))):
            mask = mask_of(kw.get("causal", True), kw.get("cu_seqlens"))
            schedule = choose_schedule(layout, p, mask.causal, shape, cu_seqlens=mask.cu_seqlens)
            view = build_plan(schedule, layout=layout, world_size=p, rank=p - 1, tokens=256 * p, **kw)
            assert view.forward and view.traffic(shape) > 0
            hyb = resolve_hybrid(shape, world_size=p, inner=4, layout=layout, schedule="auto", mask=mask)
            assert hyb.member_runs(5) and hyb.bytes(5, shape, link="inter") > 0
    assert plan_for.cache_info().misses == 0
