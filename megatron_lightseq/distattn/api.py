"""``dist_attn``: exact attention over a sequence split across the ranks of a process group."""
from __future__ import annotations

import torch

from .autograd import DistAttnFunction
from .checks import checked_call
from .exchange import GroupExchange
from .failures import DEFAULT_TIMEOUT
from .ulysses import hybrid_attn


def dist_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "contiguous",
              schedule: str = "auto", causal: bool = True, cu_seqlens=None, window_size=(-1, -1),
              cu_seqlens_padded=None, softmax_scale: float | None = None, kernel: str = "auto", return_lse: bool = False,
              timeout: float = DEFAULT_TIMEOUT, label: str | None = None, backward: bool | None = None,
              heads_group=None):
    """Attention of this rank's queries against the keys of the whole sequence.

    q ``(batch, seqlen_local, nheads, headdim)``; k, v ``(batch, seqlen_local, nheads_kv, headdim)``
    with nheads a multiple of nheads_kv (MHA, GQA, MQA): this rank's tokens, placed by ``layout``
    ("contiguous", "zigzag" or "balanced", see :mod:`megatron_lightseq.distattn.layout`; ``shard``
    puts a whole-sequence tensor there). The mask: ``causal``; ``cu_seqlens``, document
    boundaries over the whole sequence as in flash-attn's varlen functions (0 first, the real
    length last, the same on every rank; a query sees only its own document); ``window_size``
    (left, right), flash-attn's sliding window, -1 unbounded; ``cu_seqlens_padded``:
    TransformerEngine's convention, where document d starts at cu_seqlens_padded[d] and is
    padded up to the next one (the padding sees nothing). ``group``: the
    sequence-parallel process group (None: the default group, or a single process when
    torch.distributed is not initialised). ``schedule``: "ring", "lightseq" or "auto"
    (docs/schedules.md). ``kernel``: a name from :func:`megatron_lightseq.kernels.kernel_names`.
    ``softmax_scale`` defaults to headdim ** -0.5. ``timeout``: seconds any rank waits for one
    step's transfers (forward or backward) before it fails, naming the ranks it waits for; a rank
    that fails makes its peers fail at once, naming it (docs/reliability.md). ``label`` names the
    call in those errors (Megatron's core attention passes "layer N"). ``backward``: whether a
    backward will run from this call's results, which the group agrees on with the kernels it
    will use (None: when grad is enabled and an input requires it; True: a first pass under
    ``no_grad`` whose (out, lse) :func:`dist_attn_from_saved` differentiates later).
    ``heads_group``: hybrid head x sequence parallelism (docs/hybrid.md): an all-to-all over this
    group of U ranks trades the sequence for heads (Ulysses) around the plan over ``group``, which
    is then the outer group (None: none, pure Ulysses); the layout is over all U x |group| ranks,
    rank = group rank x U + heads_group rank, as Megatron's hierarchical CP groups number them.

    Returns out shaped like q, or ``(out, lse)`` with ``return_lse``: lse ``(batch, nheads,
    seqlen_local)`` in float32 (float64 for float64 inputs), not differentiable. Differentiable in
    q, k and v; the backward uses the saved out and lse and does not re-run the forward.
    """
    if heads_group is not None:
        return hybrid_attn(q, k, v, inner_group=heads_group, outer_group=group, timeout=timeout, label=label,
                           return_lse=return_lse, backward=backward, layout=layout, schedule=schedule, causal=causal,
                           cu_seqlens=cu_seqlens, window_size=window_size, cu_seqlens_padded=cu_seqlens_padded,
                           softmax_scale=softmax_scale, kernel=kernel)
    exchange = GroupExchange(group, timeout=timeout, label=label)
    call = checked_call(q, k, v, exchange=exchange, layout=layout, schedule=schedule, causal=causal,
                        cu_seqlens=cu_seqlens, window_size=window_size, cu_seqlens_padded=cu_seqlens_padded,
                        softmax_scale=softmax_scale, kernel=kernel, backward=backward)
    out, lse = DistAttnFunction.apply(q, k, v, call, exchange, None)
    return (out, lse) if return_lse else out


def dist_attn_from_saved(q, k, v, out, lse, *, group=None, layout: str = "contiguous", schedule: str = "auto",
                         causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None,
                         softmax_scale: float | None = None, kernel: str = "auto",
                         timeout: float = DEFAULT_TIMEOUT, label: str | None = None, heads_group=None):
    """``dist_attn``'s ``out`` for inputs whose forward already ran and gave ``(out, lse)``: nothing
    is computed or sent now, and the backward is dist_attn's, from (q, k, v, out, lse). The
    options must be the ones that forward ran with (with ``backward=True``: then its agreement,
    backward kernels included, holds for this call and nothing is agreed now). Rematerialization-
    aware checkpointing uses it.
    With ``heads_group`` q, k, v, out and lse still go through the all-to-all (the outer plan's
    backward needs them by heads); the outer plan computes and sends nothing."""
    if heads_group is not None:
        return hybrid_attn(q, k, v, inner_group=heads_group, outer_group=group, timeout=timeout, label=label,
                           saved=(out, lse), layout=layout, schedule=schedule, causal=causal, cu_seqlens=cu_seqlens,
                           window_size=window_size, cu_seqlens_padded=cu_seqlens_padded,
                           softmax_scale=softmax_scale, kernel=kernel)
    exchange = GroupExchange(group, timeout=timeout, label=label)
    call = checked_call(q, k, v, exchange=exchange, layout=layout, schedule=schedule, causal=causal,
                        cu_seqlens=cu_seqlens, window_size=window_size, cu_seqlens_padded=cu_seqlens_padded,
                        softmax_scale=softmax_scale, kernel=kernel, backward=True)
    return DistAttnFunction.apply(q, k, v, call, exchange, (out, lse))[0]
