"""The planner's model held to independent references: its closed-form plan costs to the built
plans (P <= 32), its all-to-all bytes to HybridPlan.bytes, its search to brute force, its memory to
Megatron-LM's theoretical_memory_usage.py (with a checkout: env MEGATRON_LM) and to dist_attn's
allocation-checked attention_bytes."""
import dataclasses
import os
import types

import numpy as np
import pytest
import torch

from megatron_lightseq.distattn import HeadSplit, Shape, attention_bytes, build_hybrid_plan, build_plan
from megatron_lightseq.planner.attention import Comm, a2a_bytes
from megatron_lightseq.planner.closed_form import Group, Sizes, phase_cost, plan_cost
from megatron_lightseq.planner.config import Config
from megatron_lightseq.planner.memory import CAP, activation_bytes, attention_working, states_bytes
from megatron_lightseq.planner.model import MODELS, Machine, ModelSpec
from megatron_lightseq.planner.search import brute_force, search
from megatron_lightseq.planner.timing import plan_seconds
from megatron_lightseq.planner.traffic import attention_shape

LLAMA = MODELS["llama-7b"]
FLAT = [("zigzag", "ring"), ("zigzag", "lightseq"), ("contiguous", "ring"), ("contiguous", "lightseq")]


@pytest.mark.parametrize("p", [2, 3, 5, 8, 12, 16, 32])
@pytest.mark.parametrize("gpus_per_node", [2, 8])
def test_closed_form_equals_the_built_plans(p, gpus_per_node):
    """Time per pass and bytes received (mean over ranks, and per rank) of every flat plan."""
    m, seq = Machine(), p * 2 * 2048
    shape = attention_shape(LLAMA, seq, p)
    for layout, schedule in FLAT:
        plan = build_plan(schedule, layout=layout, world_size=p, causal=True)
        chunk = seq // (p * (1 if layout == "contiguous" else 2))
        sizes = Sizes(LLAMA.heads, LLAMA.kv_heads, LLAMA.headdim, 2, chunk)
        for phase in ("forward", "backward"):
            built = [plan.traffic(r, shape, phase, "recvs") for r in range(p)]
            fast = phase_cost(f"{layout}/{schedule}", phase, Group(p, 1, gpus_per_node), sizes, m)
            every = phase_cost(f"{layout}/{schedule}", phase, Group(p, 1, gpus_per_node), sizes, m, every_rank=True)
            assert fast.seconds == pytest.approx(plan_seconds(plan, LLAMA, seq, gpus_per_node, m, phase), rel=1e-9)
            assert fast.intra + fast.inter == pytest.approx(np.mean(built), rel=1e-9)
            assert every.per_rank.tolist() == built


def test_closed_form_takes_the_slowest_placement():
    """A group of 6 with 4 GPUs per node straddles nodes differently by where it starts."""
    sizes, m = Sizes(32, 32, 128, 2, 4096), Machine()
    costs = [phase_cost("zigzag/ring", "forward", g, sizes, m) for g in Group(6, 1, 4).placements()]
    assert plan_cost("zigzag/ring", "forward", Group(6, 1, 4), sizes, m).seconds == max(c.seconds for c in costs)


@pytest.mark.parametrize("kv_heads,u", [(32, 4), (8, 4), (2, 4), (1, 8)])
def test_all_to_all_bytes_equal_the_hybrid_plan(kv_heads, u):
    """Forward, backward and the remat recompute's (q, k, v in, out and lse back) per inner rank."""
    p, seq = 8, 8 * 2 * 1024
    hyb = build_hybrid_plan("ring", layout="zigzag", world_size=p, inner=u, nheads=LLAMA.heads, nheads_kv=kv_heads)
    shape = Shape(1, seq // p, LLAMA.heads, kv_heads, LLAMA.headdim, torch.bfloat16)
    got = a2a_bytes(Comm("lightseq", u), LLAMA.heads, kv_heads, seq // p, LLAMA.headdim, 2, u, "full")
    ranks = [r for r in range(p) if hyb.place(r)[0] == 0]  # one inner group, in inner order
    ranks.sort(key=lambda r: hyb.place(r)[1])
    for name, phase, lse in (("forward", "forward", False), ("backward", "backward", False),
                             ("recompute", "forward", True)):
        assert got[name].sum(1).tolist() == [hyb.bytes(r, shape, phase=phase, side="recvs", lse=lse) for r in ranks]


@pytest.mark.parametrize("gpus,gpus_per_node,batch,kv_heads", [(8, 4, 4, 32), (16, 8, 8, 8), (8, 8, 2, 1)])
@pytest.mark.parametrize("system", ["lightseq", "megatron"])
def test_search_equals_brute_force(gpus, gpus_per_node, batch, kv_heads, system):
    model = dataclasses.replace(LLAMA, layers=8, kv_heads=kv_heads)
    m, seq = Machine(gpu_memory_gib=40), 64 * 1024
    result = search(model, seq, gpus, gpus_per_node, m, global_batch=batch, progress=False)
    best = result.best[system]
    expected = brute_force(model, seq, gpus, gpus_per_node, m, batch, system)
    assert (best and best.config) == expected


def _megatron_memory():
    """Megatron-LM's own theoretical_memory_usage.py, loaded alone (its one import stubbed)."""
    root = os.environ.get("MEGATRON_LM")
    path = os.path.join(root or "", "megatron", "training", "theoretical_memory_usage.py")
    if not root or not os.path.exists(path):
        pytest.skip("needs a Megatron-LM checkout in env MEGATRON_LM (megatron/training/theoretical_memory_usage.py)")
    source = open(path).read().replace("from .utils import print_rank_0", "print_rank_0 = print")
    module = types.ModuleType("theoretical_memory_usage")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def _megatron_args(model: ModelSpec, seq: int, cfg: Config):
    return types.SimpleNamespace(
        kv_channels=model.headdim, num_attention_heads=model.heads, hidden_size=model.hidden,
        group_query_attention=model.kv_heads != model.heads, num_query_groups=model.kv_heads, num_experts=None,
        swiglu=model.swiglu, moe_shared_expert_intermediate_size=None, moe_layer_freq=1, mtp_num_layers=None,
        normalization="RMSNorm", multi_latent_attention=False, ffn_hidden_size=model.ffn,
        padded_vocab_size=model.vocab, untie_embeddings_and_output_weights=True, num_layers=model.layers,
        pipeline_model_parallel_size=cfg.pp, tensor_model_parallel_size=cfg.tp, use_distributed_optimizer=True,
        data_parallel_size=cfg.dp, seq_length=seq, micro_batch_size=1, virtual_pipeline_model_parallel_size=None,
        sequence_parallel=cfg.sp, recompute_granularity=None)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 8), (2, 1, 4), (8, 1, 1), (4, 4, 2), (1, 8, 1)])
def test_memory_within_10_percent_of_megatron(tp, pp, dp):
    """Non-CP configurations without recompute (Megatron's formula counts every activation, with
    hidden dropout masks: the model here has them); weights and optimizer, activations apart."""
    megatron = _megatron_memory()
    model = dataclasses.replace(LLAMA, dropout=True)
    seq = 8192
    cfg = Config(tp, 1, pp, dp, False, Comm("megatron"), 8, recompute="none")
    args = _megatron_args(model, seq, cfg)
    assert states_bytes(model, cfg) == pytest.approx(megatron.compute_weight_and_optimizer_memory(args), rel=0.1)
    expected = megatron.compute_activation_memory_without_sp(args, num_microbatches=cfg.microbatches)
    assert activation_bytes(model, seq, cfg) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("p,kv_heads", [(4, 32), (8, 8), (16, 1)])
def test_attention_memory_is_attention_bytes(p, kv_heads):
    """Per GPU, the flat plan's working memory is dist_attn's allocation-checked attention_bytes
    of the plan itself (built: P <= CAP), and beyond CAP it grows with the local tokens only."""
    model, seq = dataclasses.replace(LLAMA, kv_heads=kv_heads), p * 16384
    plan = build_plan("ring", layout="zigzag", world_size=p, causal=True)
    expected = attention_bytes(plan, attention_shape(model, seq, p), kernel="cudnn")
    assert attention_working(model, seq, 1, p, Comm("lightseq")) == pytest.approx(expected, rel=0.1)
    far = attention_working(model, 4 * CAP * 16384, 1, 4 * CAP, Comm("lightseq"))
    assert far == pytest.approx(attention_working(model, CAP * 16384, 1, CAP, Comm("lightseq")), rel=1e-9)


def test_hybrid_split_is_kv_replication_aware():
    """With fewer K/V heads than the all-to-all group, each rank receives the K/V head it needs."""
    split = HeadSplit(32, 1, 8)
    got = a2a_bytes(Comm("lightseq", 8), 32, 1, 1024, 128, 2, 8, "none")
    assert all(split.kv_count(j) == 1 for j in range(8)) and "recompute" not in got


def test_int8_kv_wire_is_offered_and_recommended_where_the_exchange_is_exposed():
    """The planner's K/V bytes are distattn's payload bytes (int8: about half of bf16's); int8 is
    faster where the K/V exchange crosses nodes exposed, slower by its quantize passes where the
    exchange hides behind the blocks, and the search recommends it, with its flag, only where faster."""
    from dataclasses import replace

    from megatron_lightseq.planner.attention import Comm, attention_cost
    from megatron_lightseq.planner.closed_form import Sizes
    from megatron_lightseq.planner.flags import training_flags
    from megatron_lightseq.planner.model import MODELS, Machine
    from megatron_lightseq.planner.search import search

    plain = Sizes(32, 8, 128, 2, 2048)
    assert replace(plain, kv_wire="int8").per_token("kv") <= 0.51 * plain.per_token("kv")
    assert replace(plain, kv_wire="int8").per_token("dkv") == plain.per_token("dkv")
    llama, m = MODELS["llama-7b"], Machine()
    cost = lambda comm, seq: attention_cost(comm, llama, seq, 1, 16, 8, m, "none").seconds  # noqa: E731
    ring = Comm("lightseq", 1, "zigzag", "ring")
    assert cost(replace(ring, kv_wire="int8"), 32768) < 0.9 * cost(ring, 32768)  # 2K tokens a GPU, 2 nodes
    hidden = Comm("lightseq", 2, "zigzag", "ring")
    assert cost(replace(hidden, kv_wire="int8"), 131072) > cost(hidden, 131072)
    best = search(llama, 32768, 32, 8, m, progress=False, cp=32, tp=1).best["lightseq"].config
    assert best.comm.kv_wire == "int8" and "--lightseq-kv-wire int8" in training_flags(best)
