"""Bytes each GPU sends per transformer layer per training step (batch 1), fwd and bwd.

- LightSeq schedules: from the plans themselves (``Plan.bytes_sent``), busiest rank.
- Megatron tensor parallelism: from the collectives of one layer (``tp_collectives``), counted
  as ring algorithms send them: an all-reduce of N bytes sends 2(T-1)/T N per GPU, an
  all-gather or reduce-scatter (N = the full tensor) (T-1)/T N.
(Megatron's own context parallelism: closed_form.py's ``te/p2p`` and attention.py.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distattn import Shape
from ..distattn import build_plan
from .model import ModelSpec

_DTYPES = {2: torch.bfloat16, 4: torch.float32}


@dataclass(frozen=True)
class Traffic:
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def attention_shape(model: ModelSpec, seq: int, gpus: int) -> Shape:
    return Shape(batch=1, seqlen_local=seq // gpus, nheads=model.heads, nheads_kv=model.kv_heads,
                 headdim=model.headdim, dtype=_DTYPES[model.dtype_bytes])


def lightseq_traffic(model: ModelSpec, seq: int, gpus: int, layout: str, schedule: str, *,
                     recompute: bool = True, remat: bool = True) -> Traffic:
    plan = build_plan(schedule, layout=layout, world_size=gpus, causal=True)
    shape = attention_shape(model, seq, gpus)
    fwd = max(plan.traffic(r, shape, "forward") for r in range(gpus))
    bwd = max(plan.traffic(r, shape, "backward") for r in range(gpus))
    repeats = 2 if recompute and not remat else 1  # full recompute without remat re-runs the forward
    return Traffic(repeats * fwd, bwd)


def tp_collectives(model: ModelSpec, seq: int, tp: int, *, sequence_parallel: bool, recompute: bool,
                   batch: int = 1) -> dict[str, list[tuple[str, int]]]:
    """Megatron's TP collectives in one transformer layer as (kind, bytes of the full tensor).
    Attention and MLP each have a column- and a row-parallel linear; their collectives cover the
    layer's activation (batch x seq x hidden). With fewer KV heads than TP ranks Megatron also
    gathers the whole QKV projection output (and reduce-scatters its grad)."""
    act = batch * seq * model.hidden * model.dtype_bytes
    if not sequence_parallel:
        forward = [("all_reduce", act)] * 2  # after the attention projection and after fc2
        backward = [("all_reduce", act)] * 2  # input grads of the qkv and fc1 column-parallel linears
    else:
        forward = [("all_gather", act), ("reduce_scatter", act)] * 2
        # grad of each reduce-scatter is an all-gather, of each all-gather a reduce-scatter, and
        # each column-parallel linear gathers its input again for its weight gradient
        backward = [("all_gather", act), ("all_gather", act), ("reduce_scatter", act)] * 2
    if model.kv_heads < tp:
        qkv = batch * seq * (model.hidden + 2 * model.kv_heads * model.headdim) * model.dtype_bytes
        forward, backward = forward + [("all_gather", qkv)], backward + [("reduce_scatter", qkv)]
    return {"forward": forward * (2 if recompute else 1), "backward": backward}


def _ring_bytes(op: str, size: int, tp: int) -> int:
    share = size * (tp - 1) // tp
    return 2 * share if op == "all_reduce" else share


def tp_traffic(model: ModelSpec, seq: int, tp: int, *, sequence_parallel: bool, recompute: bool = True) -> Traffic:
    ops = tp_collectives(model, seq, tp, sequence_parallel=sequence_parallel, recompute=recompute)
    return Traffic(*(sum(_ring_bytes(op, size, tp) for op, size in ops[phase]) for phase in ("forward", "backward")))
