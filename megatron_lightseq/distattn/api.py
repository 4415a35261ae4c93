"""``dist_attn``: exact attention over a sequence split across the ranks of a process group."""
from __future__ import annotations

import torch

from .autograd import DistAttnFunction
from .call import resolve_call
from .checks import check_inputs
from .exchange import GroupExchange


def dist_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "contiguous",
              schedule: str = "auto", causal: bool = True, softmax_scale: float | None = None,
              kernel: str = "auto", return_lse: bool = False):
    """Attention of this rank's queries against the keys of the whole sequence.

    q ``(batch, seqlen_local, nheads, headdim)``; k, v ``(batch, seqlen_local, nheads_kv, headdim)``
    with nheads a multiple of nheads_kv (MHA, GQA, MQA): this rank's tokens, placed by ``layout``
    ("contiguous" or "zigzag", see :mod:`megatron_lightseq.distattn.layout`). ``group``: the
    sequence-parallel process group (None: the default group, or a single process when
    torch.distributed is not initialised). ``schedule``: "ring", "lightseq" or "auto"
    (docs/schedules.md). ``kernel``: a name from :func:`megatron_lightseq.kernels.kernel_names`.
    ``softmax_scale`` defaults to headdim ** -0.5.

    Returns out shaped like q, or ``(out, lse)`` with ``return_lse``: lse ``(batch, nheads,
    seqlen_local)`` in float32 (float64 for float64 inputs), not differentiable. Differentiable in
    q, k and v; the backward uses the saved out and lse and does not re-run the forward.
    """
    exchange = GroupExchange(group)
    options = dict(layout=layout, schedule=schedule, causal=causal, softmax_scale=softmax_scale, kernel=kernel)
    check_inputs(q, k, v, exchange=exchange, **options)
    call = resolve_call(q, k, world_size=exchange.world_size, **options)
    out, lse = DistAttnFunction.apply(q, k, v, call, exchange, None)
    return (out, lse) if return_lse else out


def dist_attn_from_saved(q, k, v, out, lse, *, group=None, layout: str = "contiguous", schedule: str = "auto",
                         causal: bool = True, softmax_scale: float | None = None, kernel: str = "auto"):
    """``dist_attn``'s ``out`` for inputs whose forward already ran and gave ``(out, lse)``: nothing
    is computed or sent now, and the backward is dist_attn's, from (q, k, v, out, lse). The
    options must be the ones that forward ran with. Rematerialization-aware checkpointing uses it."""
    exchange = GroupExchange(group)
    call = resolve_call(q, k, world_size=exchange.world_size, layout=layout, schedule=schedule, causal=causal,
                        softmax_scale=softmax_scale, kernel=kernel)
    return DistAttnFunction.apply(q, k, v, call, exchange, (out, lse))[0]
