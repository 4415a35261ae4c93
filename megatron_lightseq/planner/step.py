"""Predicted time of one training step for a configuration (config.Config): a prediction from the
constants in model.py, not a measurement.

- A layer, one micro-batch (one sequence over TP x CP GPUs): its GEMMs (3 passes, 4 with full
  recompute) at the GEMM rate on 1/TP of the weights; its attention (attention.py); TP's
  collectives on the critical path over NVLink (no --tp-comm-overlap assumed).
- A pipeline stage: its layers, the output layer (counted on every stage: the last one is the
  slowest), and the activation sent to the next stage and its gradient back. 1F1B: the step takes
  (micro-batches + PP - 1) stage times (the bubble is the PP - 1).
- Gradients: reduce-scattered in fp32 over the DP x CP ranks (Megatron reduces in fp32 for bf16
  training) and the bf16 parameters all-gathered back (distributed optimizer), overlapped as
  Megatron's --overlap-grad-reduce and --overlap-param-gather do: only what outlasts the last
  micro-batch's backward (the reduce) and the first one's forward (the gather) adds to the step.
  A group of k GPUs per node reduces across nodes at k times the network rate per GPU. FSDP is
  timed as the distributed optimizer (its per-layer gathers assumed hidden).
- MFU: model FLOPs (3 x the forward's: 2 per weight per token, causal attention 2 S^2 D H per
  sequence per layer; recompute not counted) over the step time and the peak of every GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import AttentionCost, attention_cost
from .closed_form import Group
from .config import Config
from .memory import Memory, memory, stage_params
from .model import Machine, ModelSpec
from .traffic import _ring_bytes, tp_collectives


@dataclass(frozen=True)
class Estimate:
    config: Config
    step_seconds: float
    tokens_per_s_per_gpu: float
    mfu: float
    memory: Memory
    intra_bytes: float  # per GPU per step, within a node (CP, TP, PP, DP traffic)
    inter_bytes: float  # ... across nodes
    layer_seconds: float  # one layer, one micro-batch, forward + backward (+ recompute)
    attention: AttentionCost
    tp_bytes: float  # one layer, one micro-batch: what a GPU sends in TP's collectives
    bubble_seconds: float
    exposed_grad_seconds: float
    fits: bool


def _tp_seconds(model: ModelSpec, tokens: int, cfg: Config, m: Machine) -> tuple[float, float, float]:
    """(forward, backward seconds, bytes a GPU sends) of one layer's TP collectives."""
    if cfg.tp == 1:
        return 0.0, 0.0, 0.0
    ops = tp_collectives(model, tokens, cfg.tp, sequence_parallel=cfg.sp, recompute=cfg.recompute == "full")
    per_op = lambda op, size: _ring_bytes(op, size, cfg.tp) / (m.nvlink_gbs * 1e9) + 2 * (cfg.tp - 1) * m.latency_us * 1e-6
    fwd, bwd = (sum(per_op(op, size) for op, size in ops[phase]) for phase in ("forward", "backward"))
    sent = sum(_ring_bytes(op, size, cfg.tp) for phase in ops.values() for op, size in phase)
    return fwd, bwd, sent


def _reduce_bandwidth(group: Group, m: Machine) -> tuple[float, float]:
    """(bytes/s per GPU, share of its bytes that cross nodes) of a ring collective over ``group``."""
    if group.period == 1:  # one node
        return m.nvlink_gbs * 1e9, 0.0
    per_node = max(1, min(group.size, group.gpus_per_node // group.stride))
    return min(m.nvlink_gbs, per_node * m.ib_gbs) * 1e9, 1 / per_node


def model_flops(model: ModelSpec, seq: int) -> float:
    """Model FLOPs of one sequence, forward and backward (module docstring)."""
    weights = 2 * (model.layers * model.layer_gemm_params + model.hidden * model.vocab) * seq
    attention = model.layers * 2 * seq * seq * model.headdim * model.heads
    return 3 * (weights + attention)


def estimate(model: ModelSpec, seq: int, cfg: Config, gpus_per_node: int, m: Machine) -> Estimate:
    tokens = seq // cfg.cp
    layers = model.layers // cfg.pp
    attn = attention_cost(cfg.comm, model, seq, cfg.tp, cfg.cp, gpus_per_node, m, cfg.recompute)
    gemm_pass = 2 * model.layer_gemm_params / cfg.tp * tokens / (m.gemm_tflops * 1e12)
    tp_fwd, tp_bwd, tp_sent = _tp_seconds(model, tokens, cfg, m)
    forward = gemm_pass + attn.forward + tp_fwd
    backward = gemm_pass * (2 + (cfg.recompute == "full")) + attn.backward + attn.recompute + tp_bwd
    output = 3 * 2 * model.hidden * model.vocab / cfg.tp * tokens / (m.gemm_tflops * 1e12)
    block = cfg.tp * cfg.cp * cfg.dp  # GPUs of one pipeline stage
    pp_bytes = tokens * model.hidden * model.dtype_bytes / (cfg.tp if cfg.sp else 1) if cfg.pp > 1 else 0.0
    pp_cross = block >= gpus_per_node
    pp_seconds = 2 * (pp_bytes / ((m.ib_gbs if pp_cross else m.nvlink_gbs) * 1e9) + m.latency_us * 1e-6) \
        if cfg.pp > 1 else 0.0
    stage = layers * (forward + backward) + output + pp_seconds
    pipeline = (cfg.microbatches + cfg.pp - 1) * stage
    shards = cfg.dp * cfg.cp
    grads = Group(shards, cfg.tp, gpus_per_node)
    rate, crossing = _reduce_bandwidth(grads, m)
    moved = stage_params(model, cfg.tp, cfg.pp) * (shards - 1) / shards * (4 + 2) if shards > 1 else 0.0
    reduce, gather = moved * 4 / 6 / rate, moved * 2 / 6 / rate
    exposed = max(0.0, reduce - layers * backward) + max(0.0, gather - layers * forward)
    step = pipeline + exposed
    micro = cfg.microbatches * layers
    intra = micro * (attn.intra + tp_sent) + moved * (1 - crossing) + (0 if pp_cross else 2 * pp_bytes * cfg.microbatches)
    inter = micro * attn.inter + moved * crossing + (2 * pp_bytes * cfg.microbatches if pp_cross else 0)
    batch = cfg.dp * cfg.microbatches
    mem = memory(model, seq, cfg)
    return Estimate(cfg, step, batch * seq / step / cfg.gpus, batch * model_flops(model, seq) / (step * cfg.gpus * m.peak_tflops * 1e12),
                    mem, intra, inter, forward + backward, attn, tp_sent, (cfg.pp - 1) * stage, exposed,
                    bool(mem.total <= m.budget_bytes))  # a numpy bool would not go into JSON
