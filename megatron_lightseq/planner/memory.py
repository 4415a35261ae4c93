"""Memory per GPU for training with full activation recompute (one layer per checkpoint), batch 1.

- Model states (Megatron's distributed optimizer): bf16 params 2 B and fp32 grads 4 B per
  parameter on each GPU of its TP shard; Adam's fp32 master, m and v (12 B) sharded over all
  GPUs of the job. With ``fsdp`` (Megatron-FSDP, ``--use-megatron-fsdp``) params and grads are
  sharded over the GPUs too, which is what lets sequence parallelism alone hold a 7B model.
- Activations: each layer keeps its input (the checkpoint); with remat also the attention's out
  and fp32 lse. One layer's full working set is live during its recompute+backward; the logits
  (bf16, plus fp32 for the loss) of the GPU's tokens over its vocabulary shard.
- dist_attn's own working memory during that layer's attention (``attention_bytes``): its
  fp32 accumulators, the chunks in flight, the kernels' buffers (K/V repeated for GQA by the
  vendor ops), for the plan of the chosen layout and schedule: the core's own model of it
  (distattn/run/memory.py), which follows the executor's lifetimes.
"""
from __future__ import annotations

import functools

from ..distattn import attention_bytes, build_plan
from .model import Machine, ModelSpec
from .timing import tp_degree
from .traffic import attention_shape


def _states(model: ModelSpec, tp: int, gpus: int, fsdp: bool = False) -> float:
    return (18 if fsdp else 6 * gpus / tp + 12) * model.params / gpus


def _working_set(model: ModelSpec, tokens: int, split: int, split_norms: bool) -> float:
    """Bytes per token of one layer's activations during its backward (bf16, lse fp32)."""
    h, kv = model.hidden, model.kv_heads * model.headdim
    split_part = 2 * (h + 2 * kv) + 2 * h + 4 * model.heads + 6 * model.ffn  # qkv, attn out, lse, fc1, act
    norm_part = 2 * h * 4  # layer input, ln1 out, residual, ln2 out
    return tokens * (split_part / split + norm_part / (split if split_norms else 1))


def lightseq_memory(model: ModelSpec, seq: int, gpus: int, *, remat: bool = True, fsdp: bool = False,
                    layout: str = "zigzag", schedule: str = "ring", kernel: str = "cudnn") -> float:
    """``kernel``: whose buffers to count (distattn.run.memory.KERNELS); "cudnn", the one that repeats K/V for
    GQA, is what ``auto`` picks on Hopper for most blocks, and the larger of the two."""
    tokens = seq // gpus
    keep = 2 * model.hidden + (2 * model.hidden + 4 * model.heads if remat else 0)
    attention = tokens * _attention_bytes_per_token(model, gpus, layout, schedule, kernel)
    return (_states(model, 1, gpus, fsdp) + model.layers * tokens * keep + _working_set(model, tokens, 1, True)
            + attention + tokens * model.vocab * 6)


@functools.lru_cache(maxsize=256)
def _attention_bytes_per_token(model: ModelSpec, gpus: int, layout: str, schedule: str, kernel: str) -> float:
    """attention_bytes per local token (it grows linearly with the tokens), at 16K tokens a rank."""
    plan = build_plan(schedule, layout=layout, world_size=gpus, causal=True)
    shape = attention_shape(model, 2**14 * gpus, gpus)
    return attention_bytes(plan, shape, kernel=kernel) / shape.seqlen_local


def tp_memory(model: ModelSpec, seq: int, gpus: int, *, sequence_parallel: bool, fsdp: bool = False) -> float:
    tp = tp_degree(model, gpus)
    kept_tokens = seq // tp if sequence_parallel else seq
    return (_states(model, tp, gpus, fsdp) + model.layers * kept_tokens * 2 * model.hidden
            + _working_set(model, seq, tp, sequence_parallel) + seq * model.vocab / tp * 6)


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
