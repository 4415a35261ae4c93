"""``dist_attn``: exact attention over a sequence split across the ranks of a process group.

The public keywords become one Mask and one Call (plan/call.py) here; the ranks agree on the call
(transport/agreement.py) and the autograd Function runs this rank's pipeline (run/pipeline.py).
"""
from __future__ import annotations

import torch

from ..kernels import kernel_names, unknown_kernel
from .plan.call import FIELDS, local_problem
from .plan.mask import mask_of
from .run.pipeline import DistAttnFunction, RankRun, prepare
from .transport.agreement import agree, refuse_capture
from .transport.exchange import GroupExchange, Mailbox, VirtualExchange
from .transport.failures import DEFAULT_TIMEOUT


def dist_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "contiguous",
              schedule: str = "auto", causal: bool = True, cu_seqlens=None, window_size=(-1, -1),
              cu_seqlens_padded=None, softmax_scale: float | None = None, kernel: str = "auto", return_lse: bool = False,
              timeout: float = DEFAULT_TIMEOUT, label: str | None = None, backward: bool | None = None,
              heads_group=None, kv_wire: str | None = None):
    """Attention of this rank's queries against the keys of the whole sequence.

    q ``(batch, seqlen_local, nheads, headdim)``; k, v ``(batch, seqlen_local, nheads_kv, headdim)``
    with nheads a multiple of nheads_kv (MHA, GQA, MQA): this rank's tokens, placed by ``layout``
    ("contiguous", "zigzag" or "balanced", see :mod:`megatron_lightseq.distattn.plan.layout`; ``shard``
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
    ``kv_wire``: None, K/V travel in the inputs' dtype; "int8", every K/V payload travels as int8
    with per-(head, channel) K and per-(token, head) V scales, half of bf16's bytes, dequantized
    on arrival (docs/kv_wire.md); results, gradients and the all-to-all keep their dtype.

    Returns out shaped like q, or ``(out, lse)`` with ``return_lse``: lse ``(batch, nheads,
    seqlen_local)`` in float32 (float64 for float64 inputs), not differentiable. Differentiable in
    q, k and v; the backward uses the saved out and lse and does not re-run the forward.
    """
    run = _run(q, k, v, group, heads_group, timeout, label, backward, layout=layout, schedule=schedule,
               causal=causal, cu_seqlens=cu_seqlens, window_size=window_size,
               cu_seqlens_padded=cu_seqlens_padded, softmax_scale=softmax_scale, kernel=kernel, kv_wire=kv_wire)
    out, lse = DistAttnFunction.apply(q, k, v, run, None, return_lse)
    return (out, lse) if return_lse else out


def dist_attn_from_saved(q, k, v, out, lse, *, group=None, layout: str = "contiguous", schedule: str = "auto",
                         causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None,
                         softmax_scale: float | None = None, kernel: str = "auto",
                         timeout: float = DEFAULT_TIMEOUT, label: str | None = None, heads_group=None,
                         kv_wire: str | None = None):
    """``dist_attn``'s ``out`` for inputs whose forward already ran and gave ``(out, lse)``: nothing
    is computed or sent now, and the backward is dist_attn's, from (q, k, v, out, lse). The
    options must be the ones that forward ran with (with ``backward=True``: then its agreement,
    backward kernels included, holds for this call and nothing is agreed now). Rematerialization-
    aware checkpointing uses it.
    With ``heads_group`` q, k, v, out and lse still go through the all-to-all (the outer plan's
    backward needs them by heads); the outer plan computes and sends nothing."""
    run = _run(q, k, v, group, heads_group, timeout, label, True, layout=layout, schedule=schedule,
               causal=causal, cu_seqlens=cu_seqlens, window_size=window_size,
               cu_seqlens_padded=cu_seqlens_padded, softmax_scale=softmax_scale, kernel=kernel, kv_wire=kv_wire)
    return DistAttnFunction.apply(q, k, v, run, (out, lse), False)[0]


def _exchanges(group, heads_group, timeout, label) -> tuple[GroupExchange | VirtualExchange, GroupExchange | None]:
    """(the plan's exchange, the all-to-all's or None)."""
    if heads_group is None:
        return GroupExchange(group, timeout=timeout, label=label), None
    inner = GroupExchange(heads_group, timeout=timeout, label=label)
    if group is None:  # pure Ulysses: the outer plan runs on one rank
        outer = VirtualExchange(Mailbox(), 0, 1)
        outer.timeout, outer.label = timeout, label
    else:
        outer = GroupExchange(group, timeout=timeout, label=label)
        # a rank failing in one group (a kernel in the outer plan, a wait in the all-to-all) leaves
        # ranks of the other waiting on it: record the failure in both
        inner.linked, outer.linked = outer, inner
    return outer, inner


def _run(q, k, v, group, heads_group, timeout, label, backward, **options) -> RankRun:
    """This rank's agreed run of the call over its process group(s)."""
    if isinstance(q, torch.Tensor):
        refuse_capture(q.device)  # before the exchanges' set-up: a capture must not see any of it
    plan_ex, inner_ex = _exchanges(group, heads_group, timeout, label)
    return agreed_run(q, k, v, plan_ex, inner_ex, backward, timeout=timeout, **options)


def agreed_run(q, k, v, plan_ex, inner_ex, backward, *, layout, schedule, causal, cu_seqlens, window_size,
               cu_seqlens_padded, softmax_scale, kernel, timeout=DEFAULT_TIMEOUT, kv_wire=None) -> RankRun:
    """This rank's run of the call, once every rank of its group(s) has passed its checks and
    all agree on the call; else ValueError on every rank together, before any transfer.
    ``plan_ex``/``inner_ex``: the plan's exchange and the all-to-all's (None: a flat call), real
    or virtual (benchmarks/overhead.py times virtual ranks through here). ``backward``: whether a
    backward will run from the results (None: grad mode and requires_grad say)."""
    if backward is None:
        backward = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    run, problem = None, local_problem(q, k, v, layout=layout, schedule=schedule, softmax_scale=softmax_scale,
                                       timeout=timeout, kv_wire=kv_wire)
    if problem is None and kernel not in kernel_names():
        problem = unknown_kernel(kernel)
    if problem is None and not isinstance(backward, bool):
        problem = f"backward must be None, True or False, got {backward!r}"
    if problem is None:
        try:
            mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
            inner = None if inner_ex is None else inner_ex.world_size
            call, block_kernel = prepare(q, k, mask=mask, layout=layout, schedule=schedule,
                                         softmax_scale=softmax_scale, kernel=kernel, backward=backward,
                                         world_size=plan_ex.world_size * (inner or 1), inner=inner, kv_wire=kv_wire)
            run = RankRun(call, block_kernel, plan_ex, inner_ex)
        except ValueError as e:  # the mask, the kernel for these inputs, sizes that do not fit
            problem = str(e)
    settle = None
    if run is not None and hasattr(run.kernel, "settle"):  # kernel="auto" on CUDA
        settle = lambda: run.settle(q.device)  # noqa: E731
    agree((plan_ex,) if inner_ex is None else (inner_ex, plan_ex), None if run is None else run.call, problem,
          FIELDS, settle)
    return run
