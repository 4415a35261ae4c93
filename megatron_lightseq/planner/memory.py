"""Memory per GPU of one training configuration (config.Config), at its fullest pipeline stage.

- Model states: the stage's parameters on this TP rank (the first stage holds the embedding,
  the last the output layer; with PP = 1 one stage holds both). Distributed optimizer: bf16
  params 2 B + fp32 grads 4 B per parameter, Adam's fp32 master, m, v (12 B) sharded over the
  DP x CP ranks (Megatron shards over both, the weights being replicated over CP). FSDP
  (Megatron-FSDP, optim_grads_params): all 18 B sharded over DP x CP.
- Activations per micro-batch in flight (1F1B: min(micro-batches, PP) on the first stage, one on
  the last): with full recompute, each layer's input (the checkpoint; split over TP with sequence
  parallelism), and with the plugin's rematerialization its attention out and fp32 lse; without
  recompute, every layer's whole working set. Then one layer's working set during its backward,
  the attention's own working memory, and on the last stage the logits (bf16, and fp32 for the loss).
- The working set of one layer, bytes per token: over TP, q, k, v, the attention output, the
  lse, the MLP's fc1 output (two halves with SwiGLU) and activation; replicated over TP unless
  sequence parallel, the inputs and outputs of the two norms and the dropout masks. It is the
  term-by-term count of Korthikanti et al. 2022 (Megatron's theoretical_memory_usage.py), with
  K/V heads and the SwiGLU halves counted as they are (tests/test_planner_memory.py holds it
  within 10% of Megatron's own formula where that formula's assumptions hold).
- The attention's working memory: dist_attn's own model (distattn attention_bytes: fp32
  accumulators, chunks in flight, the kernel's buffers; checked against the allocations of the
  executor) per local token, from the plan built at min(P, 16) ranks: per token it no longer
  changes past P = 8 (tests). TransformerEngine's is taken as the zigzag ring's; an all-to-all
  adds the head-split copies of q, k, v and out and of their gradients.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..distattn import HeadSplit, Shape, attention_bytes, build_plan
from .attention import Comm, heads_per_rank
from .closed_form import DTYPES as _DTYPES
from .config import Config
from .model import Machine, ModelSpec

CAP = 16  # ranks of the plan whose working memory per token stands for any larger one
_TOKENS = 2**14  # tokens per rank of that plan


@dataclass(frozen=True)
class Memory:
    states: float
    activations: float
    attention: float

    @property
    def total(self) -> float:
        return self.states + self.activations + self.attention


def stage_params(model: ModelSpec, tp: int, pp: int) -> float:
    """Parameters on one TP rank of the fullest stage (the first, with the embedding; with PP = 1
    also the output layer and final norm)."""
    layers = model.layers // pp * model.layer_params
    embedding = model.vocab * model.hidden
    return (layers + embedding + (embedding + model.hidden if pp == 1 else 0)) / tp


def states_bytes(model: ModelSpec, cfg: Config) -> float:
    shards = cfg.dp * cfg.cp
    params = stage_params(model, cfg.tp, cfg.pp)
    return params * (18 / shards if cfg.fsdp else 6 + 12 / shards)


def working_set(model: ModelSpec, tp: int, sp: bool) -> float:
    """Bytes per token of one layer's activations during its backward (module docstring)."""
    h, f = model.hidden, model.ffn
    _, kv = heads_per_rank(model, tp)
    split = (2 * h + 2 * h + 4 * model.heads + 2 * f * (2 if model.swiglu else 1) + 2 * f) / tp + 4 * kv * model.headdim
    norms = 8 * h + (2 * h if model.dropout else 0)
    return split + norms / (tp if sp else 1)


def kept_per_layer(model: ModelSpec, cfg: Config) -> float:
    """Bytes per token each layer keeps while its micro-batch is in flight."""
    if cfg.recompute == "none":
        return working_set(model, cfg.tp, cfg.sp)
    checkpoint = 2 * model.hidden / (cfg.tp if cfg.sp else 1)
    remat = (2 * model.hidden + 4 * model.heads) / cfg.tp if cfg.system == "lightseq" else 0
    return checkpoint + remat


def activation_bytes(model: ModelSpec, seq: int, cfg: Config) -> float:
    tokens = seq // cfg.cp
    stage = model.layers // cfg.pp * tokens * kept_per_layer(model, cfg)  # one micro-batch's
    logits = tokens * 6 * model.vocab / cfg.tp
    first = min(cfg.microbatches, cfg.pp) * stage + (logits if cfg.pp == 1 else 0)
    one_layer = 0 if cfg.recompute == "none" else tokens * working_set(model, cfg.tp, cfg.sp)
    return max(first, stage + logits) + one_layer


@functools.lru_cache(maxsize=1024)
def _plan_bytes_per_token(layout: str, schedule: str, ranks: int, heads: int, kv_heads: int, headdim: int,
                          item: int, kernel: str) -> float:
    plan = build_plan(schedule, layout=layout, world_size=ranks, causal=True)
    shape = Shape(1, _TOKENS, heads, kv_heads, headdim, _DTYPES[item])
    return attention_bytes(plan, shape, kernel=kernel) / _TOKENS


def attention_working(model: ModelSpec, seq: int, tp: int, cp: int, comm: Comm, kernel: str = "cudnn") -> float:
    """The attention's working memory on one GPU (module docstring); ``kernel`` as attention_bytes."""
    h, g = heads_per_rank(model, tp)
    u, q = comm.inner, cp // comm.inner
    split = HeadSplit(h, g, u)
    kv = g // u if comm.system == "megatron" else max(split.local_kv(j) for j in range(u))
    layout, schedule = ("zigzag", "ring") if comm.system == "megatron" else (comm.layout, comm.schedule)
    per_token = _plan_bytes_per_token(layout, schedule, min(q, CAP), split.local_heads, kv, model.headdim,
                                      model.dtype_bytes, kernel)
    tokens = seq // cp
    copies = 0 if u == 1 else 2 * (2 * h + 2 * g) * model.headdim * model.dtype_bytes  # q, k, v, out; their grads
    return tokens * (u * per_token + copies)


def memory(model: ModelSpec, seq: int, cfg: Config, kernel: str = "cudnn") -> Memory:
    return Memory(states_bytes(model, cfg), activation_bytes(model, seq, cfg),
                  attention_working(model, seq, cfg.tp, cfg.cp, cfg.comm, kernel))


def fits(model: ModelSpec, seq: int, cfg: Config, m: Machine) -> bool:
    return memory(model, seq, cfg).total <= m.budget_bytes


def max_sequence(memory_of, m: Machine, granularity: int) -> int:
    """The longest multiple of ``granularity`` tokens whose memory fits (0 if none)."""
    lo, hi = 0, granularity
    while memory_of(hi) <= m.budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 2**26:
            return lo
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        lo, hi = (mid, hi) if memory_of(mid) <= m.budget_bytes else (lo, mid)
    return lo


def _attention_bytes_per_token(model: ModelSpec, gpus: int, layout: str, schedule: str, kernel: str) -> float:
    """attention_bytes per local token of the flat plan over ``gpus`` ranks (tests/test_memory_model.py)."""
    return _plan_bytes_per_token(layout, schedule, min(gpus, CAP), model.heads, model.kv_heads, model.headdim,
                                 model.dtype_bytes, kernel)


def lightseq_memory(model: ModelSpec, seq: int, gpus: int, *, fsdp: bool = False, layout: str = "zigzag",
                    schedule: str = "ring", kernel: str = "cudnn") -> float:
    """Memory per GPU of the plugin's flat plan over all ``gpus`` (CP = gpus, nothing else), as
    tests/test_memory_model.py reads it."""
    cfg = Config(1, gpus, 1, 1, False, Comm("lightseq", 1, layout, schedule), 1, fsdp=fsdp)
    return memory(model, seq, cfg, kernel).total
