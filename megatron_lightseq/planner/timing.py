"""Predicted time of one transformer layer's forward+backward per training step (batch 1).

LightSeq and Megatron CP: the plan's steps; in each, a rank computes its blocks while the next
step's transfers travel, so a step costs max(compute, next transfers) on the busiest rank.
Megatron TP: the same attention and GEMM work split by heads, plus its collectives, which sit
on the critical path (no overlap assumed). All runs use full activation recompute; LightSeq with
remat skips the attention forward in the recompute, the others repeat it.
"""
from __future__ import annotations

from ..distattn import Plan, build_plan, payload_bytes
from .model import Machine, ModelSpec
from .traffic import attention_shape, tp_collectives, _ring_bytes

FWD_SHARE, BWD_SHARE = 1 / 3.5, 2.5 / 3.5  # of fwd+bwd attention FLOPs (backward = 2.5x forward)


def _block_seconds(plan: Plan, block, chunk: int, model: ModelSpec, m: Machine) -> float:
    """fwd+bwd seconds of one block: full chunk pairs at the full-block rate, diagonal ones at the
    diagonal rate, both for the block's own size."""
    seconds = 0.0
    tokens = chunk * len(block.q_chunks)
    for qc in block.q_chunks:
        for kc in block.kv_chunks:
            work = plan.work(qc, kc)
            if work:
                flops = 3.5 * 4 * chunk * chunk * model.headdim * model.heads * work
                seconds += flops / (m.attn_tflops(tokens, diagonal=work < 1) * 1e12)
    return seconds


def _transfer_seconds(transfers, chunk, shape, gpus_per_node: int, m: Machine, scale=None) -> float:
    intra = inter = 0
    for tr in transfers:
        size = payload_bytes(tr.payload.kind, chunk * len(tr.payload.chunks), shape)
        if tr.src // gpus_per_node == tr.dst // gpus_per_node:
            intra += size
        else:
            inter += size
    if scale is not None:
        intra, inter = scale(intra), scale(inter)
    return max(intra / (m.nvlink_gbs * 1e9), inter / (m.ib_gbs * 1e9)) + len(transfers) * m.latency_us * 1e-6


def plan_seconds(plan: Plan, model: ModelSpec, seq: int, gpus_per_node: int, m: Machine, phase: str) -> float:
    """Seconds of the plan's forward or backward on the critical path."""
    shape = attention_shape(model, seq, plan.world_size)
    chunk = shape.seqlen_local // len(plan.owned(0))
    steps = getattr(plan, phase)
    share = FWD_SHARE if phase == "forward" else BWD_SHARE
    comm = [[_transfer_seconds(rs.recvs, chunk, shape, gpus_per_node, m) for rs in step] for step in steps]
    total = max(comm[0])
    for t, step in enumerate(steps):
        nxt = comm[t + 1] if t + 1 < len(steps) else [0.0] * len(step)
        total += max(max(share * sum(_block_seconds(plan, b, chunk, model, m) for b in rs.blocks), nxt[r])
                     for r, rs in enumerate(step))
    return total


def _gemm_seconds(model: ModelSpec, tokens: int, split: int, recompute_forwards: int) -> float:
    return 2 * model.layer_params / split * tokens * (3 + recompute_forwards)


def lightseq_seconds(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, layout: str,
                     schedule: str, *, remat: bool = True) -> float:
    """Megatron CP is timed as the ring on zigzag without remat: the same steps and blocks; its
    larger dK/dV transfers are assumed hidden behind compute like the rest."""
    plan = build_plan(schedule, layout=layout, world_size=gpus, causal=True)
    fwd, bwd = (plan_seconds(plan, model, seq, gpus_per_node, m, ph) for ph in ("forward", "backward"))
    gemm = _gemm_seconds(model, seq // gpus, 1, 1) / (m.gemm_tflops * 1e12)
    return gemm + fwd * (1 if remat else 2) + bwd


def tp_degree(model: ModelSpec, gpus: int) -> int:
    """Megatron splits heads: the largest degree <= gpus that divides the head count."""
    return max(t for t in range(1, gpus + 1) if model.heads % t == 0)


def tp_seconds(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, *, sequence_parallel: bool) -> float:
    tp = tp_degree(model, gpus)
    attn_flops = 3.5 * 2 * seq * seq * model.headdim * model.heads / tp  # causal: half of 4 N^2 D H
    attn = attn_flops / (m.attn_tflops(seq, True) * 1e12) * (1 + FWD_SHARE)  # recompute repeats the fwd
    gemm = _gemm_seconds(model, seq, tp, 1) / (m.gemm_tflops * 1e12)
    bw = (m.nvlink_gbs if tp <= gpus_per_node else m.ib_gbs) * 1e9
    ops = tp_collectives(model, seq, tp, sequence_parallel=sequence_parallel, recompute=True)
    comm = sum(_ring_bytes(op, size, tp) / bw + 2 * (tp - 1) * m.latency_us * 1e-6
               for phase in ops.values() for op, size in phase) if tp > 1 else 0.0
    return attn + gemm + comm
