"""Hybrid DistAttn on real ranks: the all-to-all over the inner (heads) group around dist_attn's
own autograd Function over the outer (sequence) group. hybrid.py has the data, alltoall.py the
transfers; this module checks the inputs and wires the autograd graph:

    out = ToTokens(DistAttnFunction(ToHeads(q, k, v)))

so the backward runs ToTokens' (d_out to heads), the outer plan's backward from its saved
outer-space (q, k, v, out, lse), then ToHeads' (dq, dk, dv back to tokens): the distributed
forward is never re-run, and nothing besides the outer plan's saved tensors is kept.
"""
from __future__ import annotations

import zlib

import torch

from ..kernels import resolve_kernel
from ..kernels.base import accum_dtype
from ..kernels.mask import make_mask
from .alltoall import Side, expand_kv, reduce_kv, to_heads, to_tokens
from .autograd import DistAttnFunction
from .call import Call
from .checks import local_problem, refuse_capture
from .exchange import Exchange, GroupExchange, Mailbox, VirtualExchange
from .executor import drive, kernel_calls
from .failures import DistAttnError, TransferError
from .hybrid import HybridPlan, resolve_hybrid, split_problem
from .plan import Shape


class _Run:
    """What one hybrid call runs with on this rank."""

    def __init__(self, hyb: HybridPlan, call: Call, side: Side, outer: Exchange, shape: Shape) -> None:
        self.hyb, self.call, self.side, self.outer, self.shape = hyb, call, side, outer, shape


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: _Run):
        ctx.run = run
        q_o, k_o, v_o = drive(to_heads(run.side, [q, k, v], ["q", "kv", "kv"], "forward q, k, v"))
        return (q_o, *expand_kv(run.side, [k_o, v_o]))

    @staticmethod
    def backward(ctx, dq_o, dk_o, dv_o):
        run = ctx.run
        dk_o, dv_o = reduce_kv(run.side, [dk_o.contiguous(), dv_o.contiguous()])
        s = run.shape
        dq, dk, dv = drive(to_tokens(run.side, [dq_o.contiguous(), dk_o, dv_o], ["q", "kv", "kv"],
                                     [s.nheads, s.nheads_kv, s.nheads_kv], "backward dq, dk, dv"))
        return dq, dk, dv, None


class _ToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_o, run: _Run, known):
        """``known``: this rank's out when an earlier forward gave it (remat), else None."""
        ctx.run = run
        if known is not None:
            return known.view_as(known)
        return drive(to_tokens(run.side, [out_o], ["q"], [run.shape.nheads], "forward out"))[0]

    @staticmethod
    def backward(ctx, dout):
        return drive(to_heads(ctx.run.side, [dout.contiguous()], ["q"], "backward d_out"))[0], None, None


def _crc(name: str) -> float:
    return float(zlib.crc32(name.encode()))


_FIELDS = ("batch", "seqlen_local", "nheads", "nheads_kv", "headdim", "dtype", "layout", "schedule", "causal",
           "cu_seqlens", "window_size", "softmax_scale", "kernel", "backward", "all-to-all size", "outer size")


def _signature(q, k, run: _Run, backward: bool) -> tuple[float, ...]:
    b, s, h, d = q.shape
    mask = run.call.mask
    return (0.0, b, s, h, k.shape[2], d, _crc(str(q.dtype)), _crc(run.hyb.layout.name), _crc(run.hyb.schedule),
            float(mask.causal), _crc(f"{mask.cu_seqlens}{mask.cu_seqlens_padded}"), _crc(str(mask.window)),
            run.call.scale, _crc(run.call.kernel.name), float(backward), run.hyb.inner, run.outer.world_size)


def _exchanges(inner_group, outer_group, timeout, label) -> tuple[Exchange, Exchange]:
    inner = GroupExchange(inner_group, timeout=timeout, label=label)
    if outer_group is None:  # pure Ulysses: the outer plan runs on one rank
        outer = VirtualExchange(Mailbox(), 0, 1)
        outer.timeout, outer.label = timeout, label
    else:
        outer = GroupExchange(outer_group, timeout=timeout, label=label)
        # a rank failing in one group (a kernel in the outer plan, a wait in the all-to-all) leaves
        # ranks of the other waiting on it: record the failure in both
        inner.linked, outer.linked = outer, inner
    return inner, outer


def _resolve(q, k, v, inner: Exchange, outer: Exchange, options: dict, timeout: float) -> tuple[_Run | None, str | None]:
    """(this rank's run, None) or (None, what is wrong with its inputs)."""
    try:
        mask = make_mask(options["causal"], options["cu_seqlens"], options["window_size"], options["cu_seqlens_padded"])
    except (TypeError, ValueError) as e:
        return None, f"cu_seqlens must be a sequence of ints and window_size a pair of ints ({e})"
    world = inner.world_size * outer.world_size
    problem = local_problem(q, k, v, layout=options["layout"], schedule=options["schedule"], mask=mask,
                            softmax_scale=options["softmax_scale"], kernel=options["kernel"], timeout=timeout)
    problem = problem or split_problem(world, inner.world_size, q.shape[2], k.shape[2])
    if problem:
        return None, problem
    try:
        shape = Shape.of(q, k)
        hyb = resolve_hybrid(shape, world_size=world, inner=inner.world_size, layout=options["layout"],
                             schedule=options["schedule"], mask=mask)
        kernel = resolve_kernel(options["kernel"], q, k)
    except ValueError as e:
        return None, str(e)
    scale = q.shape[-1] ** -0.5 if options["softmax_scale"] is None else float(options["softmax_scale"])
    rank = outer.rank * inner.world_size + inner.rank
    side = Side(hyb, rank, inner, shape.seqlen_local // hyb.layout.chunks_per_rank)
    return _Run(hyb, Call(hyb.outer, kernel, scale), side, outer, shape), None




def checked_run(q, k, v, *, inner: Exchange, outer: Exchange, timeout: float, backward: bool | None = None,
                **options) -> _Run:
    """The run, once every rank of both groups has passed its checks and all agree on sizes and
    options; else ValueError on every rank together, before any transfer. The agreement is one
    all_gather in the inner group, then one in the outer group of what each inner group found,
    which reaches every rank; once agreed, a signature is not agreed again. ``backward`` as in
    checks.checked_call."""
    if isinstance(q, torch.Tensor):
        refuse_capture(q)
    run, problem = _resolve(q, k, v, inner, outer, options, timeout)
    for ex in (inner, outer):
        if ex.failure:
            raise DistAttnError(f"dist_attn: this group failed earlier ({ex.failure}); it cannot be used")
    if backward is None:
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    failed = (1.0,) + (0.0,) * len(_FIELDS)
    signature = failed if problem else _signature(q, k, run, backward)
    agreed = inner.agreed if isinstance(inner, GroupExchange) else set()
    key = ("hybrid",) + signature
    if problem is None and key in agreed:
        return run
    if problem and agreed:
        inner.fail("forward input checks", ValueError(problem))  # peers may skip the agreement
        raise ValueError(problem)
    try:
        rows = inner.agree(signature)
        same = all(row[0] == 0 for row in rows) and all(tuple(row) == tuple(rows[0]) for row in rows)
        summary = tuple(rows[0]) if same else (2.0,) + tuple(signature[1:])
        groups = outer.agree(summary)
    except TransferError as e:  # a peer failed (or skipped, having agreed before): stop both groups
        raise inner.fail("forward input agreement", e) from e
    if problem:
        raise ValueError(problem)
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"dist_attn: rank(s) {bad} of the all-to-all group rejected their inputs (see their error)")
    if any(row[0] for row in groups):
        raise ValueError(f"dist_attn: the all-to-all groups at outer rank(s) {[o for o, r in enumerate(groups) if r[0]]} "
                         f"rejected their inputs or disagree (see their error)")
    differ = [name for i, name in enumerate(_FIELDS)
              if len({row[i + 1] for row in rows} | {row[i + 1] for row in groups}) > 1]
    if differ:
        raise ValueError(f"dist_attn: every rank must pass the same sizes and options; expected equal, got ranks "
                         f"that differ in {differ} (this rank: {dict(zip(_FIELDS[:6], signature[1:7]))})")
    settle = getattr(run.call.kernel, "settle", None)  # kernel="auto" on CUDA: the same choices in the outer group
    if settle is not None:
        outer_shape = run.hyb.outer_shape(run.shape, run.side.inner_rank)
        try:
            settle(kernel_calls(run.call, outer_shape, q.device, backward), outer.agree)
        except TransferError as e:
            raise outer.fail("forward kernel agreement", e) from e
    agreed.add(key)
    return run


def hybrid_attn(q, k, v, *, inner_group, outer_group, timeout: float, label: str | None, saved=None,
                return_lse: bool = False, backward: bool | None = None, **options):
    """dist_attn with ``heads_group`` (api.py documents it): q, k, v this rank's tokens in the
    layout over all inner x outer ranks. ``saved``: (out, lse) of an earlier forward of the same
    inputs (dist_attn_from_saved): the outer plan then computes and sends nothing."""
    inner, outer = _exchanges(inner_group, outer_group, timeout, label)
    run = checked_run(q, k, v, inner=inner, outer=outer, timeout=timeout,
                      backward=True if saved is not None else backward, **options)
    q_o, k_o, v_o = _ToHeads.apply(q, k, v, run)
    outer_saved = None
    if saved is not None:
        out, lse = saved
        with torch.no_grad():
            out_o, lse_o = drive(to_heads(run.side, [out, lse.to(accum_dtype(q.dtype))], ["q", "q"], "saved out, lse"))
        outer_saved = (out_o, lse_o)
    out_o, lse_o = DistAttnFunction.apply(q_o, k_o, v_o, run.call, run.outer, outer_saved)
    out = _ToTokens.apply(out_o, run, None if saved is None else saved[0])
    if not return_lse:
        return out
    lse = drive(to_tokens(run.side, [lse_o], ["q"], [run.shape.nheads], "forward lse"))[0]
    return out, lse
