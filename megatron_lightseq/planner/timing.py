"""The reference the closed forms (closed_form.py) are held to: the time of one pass of a BUILT
plan, rank by rank and step by step (tests/test_planner_model.py compares them for P <= 32). In
each step a rank computes its blocks while the next step's transfers travel, so a step costs
max(compute, next transfers) on the busiest rank. Building a plan is slow at large P: the
planner itself uses only the closed forms.
"""
from __future__ import annotations

from ..distattn import Plan, payload_bytes
from .model import Machine, ModelSpec
from .closed_form import BWD_SHARE, FWD_SHARE
from .traffic import attention_shape


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


def _transfer_seconds(transfers, chunk, shape, gpus_per_node: int, m: Machine) -> float:
    intra = inter = 0
    for tr in transfers:
        size = payload_bytes(tr.payload.kind, chunk * len(tr.payload.chunks), shape)
        if tr.src // gpus_per_node == tr.dst // gpus_per_node:
            intra += size
        else:
            inter += size
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
