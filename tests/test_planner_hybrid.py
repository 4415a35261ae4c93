"""The planner's hybrid model (planner/hybrid.py): its closed-form rank view equals the built
plans (time, bytes) at small P, it stays fast at P = 512, and the issue's targets hold."""
import dataclasses
import time

import numpy as np
import pytest
import torch

import megatron_lightseq as mls
from megatron_lightseq.distattn.plan.hybrid import build_hybrid_plan
from megatron_lightseq.distattn.plan.plan import Shape
from megatron_lightseq.planner import hybrid
from megatron_lightseq.planner.model import MODELS, Machine
from megatron_lightseq.planner.timing import plan_seconds
from megatron_lightseq.planner.traffic import attention_shape

LLAMA = MODELS["llama-7b"]


@pytest.mark.parametrize("p,gpus_per_node", [(4, 2), (6, 2), (8, 4)])
@pytest.mark.parametrize("schedule", hybrid.SCHEDULES)
def test_closed_form_equals_the_built_plans(p, gpus_per_node, schedule):
    m, seq = Machine(), p * 2 * 1024
    plan = mls.build_plan(schedule, layout="zigzag", world_size=p)
    steps = hybrid._outer_steps(p, seq // (2 * p), LLAMA.heads, LLAMA.kv_heads, LLAMA.headdim, 2, schedule,
                                np.arange(p) // gpus_per_node, m)
    for phase in ("forward", "backward"):
        assert hybrid._phase_seconds(*steps[phase][:2]) == pytest.approx(
            plan_seconds(plan, LLAMA, seq, gpus_per_node, m, phase), rel=1e-9)
        shape = attention_shape(LLAMA, seq, p)
        assert steps[phase][3].tolist() == [plan.traffic(r, shape, phase, "recvs") for r in range(p)]


def test_a2a_bytes_equal_the_hybrid_plan():
    """The all-to-all's bytes per layer (forward, remat's recompute, backward) from HybridPlan.bytes."""
    model = dataclasses.replace(LLAMA, kv_heads=2)  # fewer K/V heads than U: replicated
    p, u, seq = 8, 4, 8 * 2 * 1024
    hyb = build_hybrid_plan("ring", layout="zigzag", world_size=p, inner=u, nheads=model.heads, nheads_kv=2)
    shape = Shape(1, seq // p, model.heads, 2, model.headdim, torch.bfloat16)
    _, cross, total = hybrid._a2a(hyb.split, u, seq // p, model.headdim, 2, 4, 8, Machine())
    fwd = max(hyb.bytes(r, shape, phase="forward", side="recvs") for r in range(u))
    recompute = max(hyb.bytes(r, shape, phase="forward", side="recvs", lse=True) for r in range(u))
    bwd = [hyb.bytes(r, shape, phase="backward", side="recvs") for r in range(u)]
    assert cross == 0 and total == max(hyb.bytes(r, shape, phase="forward", side="recvs")
                                       + hyb.bytes(r, shape, phase="forward", side="recvs", lse=True) + bwd[r]
                                       for r in range(u))
    assert fwd < recompute


def test_fast_at_512_gpus():
    start = time.perf_counter()
    found = hybrid.choices(LLAMA, 512 * 1024, 512, 8, Machine())
    assert time.perf_counter() - start < 5 and [c.inner for c in found] == [1, 2, 4, 8, 16, 32]


def test_llama7b_128k_on_64_gpus_targets():
    """MHA: the recommended split's time <= 0.8x the flat plan's and its cross-node bytes U times
    fewer; GQA-8 and MQA: a split still wins, on block length, and the reason names the K/V copies."""
    m = Machine()
    found = hybrid.choices(LLAMA, 128 * 1024, 64, 8, m)
    best, flat = hybrid.recommend(found), found[0]
    assert best.inner == 8 and best.outer == 8, best
    assert best.seconds <= 0.8 * flat.seconds and best.cross_node_bytes * best.inner <= flat.cross_node_bytes
    assert "--cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 8 8" in hybrid.flags_of(best, 64)
    mqa = dataclasses.replace(LLAMA, kv_heads=1)
    found = hybrid.choices(mqa, 128 * 1024, 64, 8, m)
    best = hybrid.recommend(found)
    assert best.inner > 1 and best.replicated_kv_heads == best.inner - 1
    assert "copies, counted" in hybrid.why(mqa, 128 * 1024, found, best)
