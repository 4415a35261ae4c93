"""The oracle of int8 K/V on the wire: plain attention where each query owner's block sees the K/V
the plan says it computes with: its executor's own K/V as they are, or the payload the executor
received, quantized over exactly that payload's tokens (kernels/kv_wire.py's scheme) and
dequantized, with gradients straight through to k and v. Read from the whole plan, independently
of the executor: the payloads each block uses, in the forward and in the backward (which must
be the same ones)."""
from __future__ import annotations

import torch

from megatron_lightseq.distattn.plan.call import resolve_plan
from megatron_lightseq.distattn.plan.layout import layout_of
from megatron_lightseq.distattn.plan.mask import mask_of
from megatron_lightseq.distattn.plan.plan import Shape
from megatron_lightseq.kernels.kv_wire import dequantize_kv_torch, quantize_kv_torch
from oracle import allowed_by_hand


def payloads_used(plan) -> dict[tuple[int, int], tuple[int, ...] | None]:
    """(q owner, kv owner) -> the chunks of the kv payload its block computes with (None: the
    executor's own K/V), the same in the forward and the backward (asserted)."""
    found = {}
    for phase in ("forward", "backward"):
        used = {}
        for e in range(plan.world_size):
            held = {}
            for step in getattr(plan, phase):
                rs = step[e]
                held.update({tr.payload.owner: tr.payload.chunks for tr in rs.recvs if tr.payload.kind == "kv"})
                for b in rs.blocks:
                    chunks = None if b.kv_owner == e else held[b.kv_owner]
                    assert chunks is None or set(b.kv_chunks) <= set(chunks)
                    used[b.q_owner, b.kv_owner] = chunks
        found.setdefault("forward", used)
        assert used == found["forward"], "the backward computes with the forward's payloads"
    return found["forward"]


def _rows(chunks, chunk_len: int) -> torch.Tensor:
    return torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in chunks])


def _seen_kv(k, v, chunks, chunk_len: int, dtype):
    """k and v with the payload ``chunks``' rows as they arrive (straight-through gradients)."""
    rows = _rows(chunks, chunk_len)
    wire = quantize_kv_torch(k.detach()[:, rows].to(dtype), v.detach()[:, rows].to(dtype))
    got = dequantize_kv_torch(*wire, dtype)
    seen = []
    for x, y in zip((k, v), got):
        delta = torch.zeros_like(x)
        delta[:, rows] = y.to(x.dtype) - x.detach()[:, rows]
        seen.append(x + delta)
    return seen


def wire_reference(q, k, v, dout, *, world_size: int, layout: str, schedule: str, dtype=None, **mask_keywords):
    """(out, dq, dk, dv) over the whole sequence, float64 in, as dist_attn with kv_wire="int8"
    computes them in exact arithmetic; ``dtype``: the inputs' dtype the executor quantizes from
    (default q's). The softmax scale is headdim ** -0.5."""
    mask = mask_of(**mask_keywords)
    lay = layout_of(layout, world_size, mask, mask.length or q.shape[1])
    n = lay.padded_tokens or q.shape[1]
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], 1)  # noqa: E731
    leaves = [pad(x).detach().requires_grad_() for x in (q, k, v)]
    b, _, h, d = q.shape
    shape = Shape(b, n // world_size, h, k.shape[2], d, dtype or q.dtype, "int8")
    plan = resolve_plan(shape, world_size=world_size, layout=layout, schedule=schedule, mask=mask)
    chunk_len, used = n // lay.chunk_count, payloads_used(plan)
    outs, rows_of = [], []
    for x in range(world_size):
        k_x, v_x = leaves[1], leaves[2]
        for (qo, ko), chunks in used.items():
            if qo == x and chunks is not None:
                k_x, v_x = _seen_kv(k_x, v_x, chunks, chunk_len, dtype or q.dtype)
        rows = _rows(lay.owners[x], chunk_len)
        span = tuple((int(r), int(r) + 1) for r in rows)
        allowed = allowed_by_hand(span, ((0, n),), causal=mask_keywords.get("causal", True),
                                  cu_seqlens=mask_keywords.get("cu_seqlens"),
                                  window=mask_keywords.get("window_size", (-1, -1)),
                                  cu_seqlens_padded=mask_keywords.get("cu_seqlens_padded"))
        outs.append(_attend(leaves[0][:, rows], k_x, v_x, allowed))
        rows_of.append(rows)
    out = torch.zeros_like(leaves[0])
    for rows, o in zip(rows_of, outs):
        out = out.index_add(1, rows, o)
    grads = torch.autograd.grad(out, leaves, pad(dout))
    return tuple(t[:, :q.shape[1]] for t in (out.detach(), *grads))


def _attend(q, k, v, allowed):
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(rep, 2))
