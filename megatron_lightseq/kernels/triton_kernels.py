"""The project's own Triton block kernels ("triton"): forward with the LSE merge fused into its
epilogue, and backward from the merged (out, lse). Arbitrary token positions (any block of any
layout: a position vector per side), causal or not, GQA/MQA by indexing the shared K/V head
(nothing repeated), fp16/bf16/fp32 inputs with fp32 accumulation, head dims up to 256.

On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them;
the block sizes below are for that and for a first GPU run, not tuned.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .base import Span, positions


@triton.jit
def _load_kv(K, V, KP, b, g, rn, rd, Sk, skb, sks, skh, D: tl.constexpr):
    """k, v [BLOCK_N, BLOCK_D] of K/V head g, their positions, and which rows exist."""
    n_ok = rn < Sk
    off = b * skb + rn[:, None] * sks + g * skh + rd[None, :]
    mask = n_ok[:, None] & (rd < D)[None, :]
    k = tl.load(K + off, mask=mask, other=0.0)
    v = tl.load(V + off, mask=mask, other=0.0)
    return k, v, tl.load(KP + rn, mask=n_ok, other=0), n_ok


@triton.jit
def _load_q_rows(Q, DO, QP, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh, slb, slh, D: tl.constexpr):
    """What the backward needs of query rows rm of head h: q, d_out, positions, lse, delta."""
    m_ok = rm < Sq
    off = b * sqb + rm[:, None] * sqs + h * sqh + rd[None, :]
    mask = m_ok[:, None] & (rd < D)[None, :]
    q = tl.load(Q + off, mask=mask, other=0.0)
    do = tl.load(DO + off, mask=mask, other=0.0)
    qpos = tl.load(QP + rm, mask=m_ok, other=0)
    lse = tl.load(Lse + b * slb + h * slh + rm, mask=m_ok, other=float("-inf"))
    delta = tl.load(Delta + b * slb + h * slh + rm, mask=m_ok, other=0.0)
    return q, do, qpos, lse, delta, m_ok


@triton.jit
def _fwd_merge(Q, K, V, QP, KP, Out, Lse, sm_scale, Sq, Sk, H, REP,
               sqb, sqs, sqh, skb, sks, skh, sob, sos, soh, slb, slh,
               CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M x (all keys) tile for one (batch, head); merges into the running (Out, Lse)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // REP  # the K/V head this query head shares
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < Sq, rd < D
    q = tl.load(Q + b * sqb + rm[:, None] * sqs + h * sqh + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(QP + rm, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Sk, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh, D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        seen = n_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            seen = seen & (kpos[None, :] <= qpos[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    has = l_i > 0
    blk_lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    blk_out = acc / tl.where(has, l_i, 1.0)[:, None]
    # Fused merge with the running result (merge.py's rule, -inf-safe).
    lse_ptr = Lse + b * slb + h * slh + rm
    out_ptr = Out + b * sob + rm[:, None] * sos + h * soh + rd[None, :]
    old_lse = tl.load(lse_ptr, mask=m_ok, other=float("-inf"))
    old_out = tl.load(out_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    hi = tl.maximum(old_lse, blk_lse)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    w_old, w_blk = tl.exp(old_lse - hi_safe), tl.exp(blk_lse - hi_safe)
    total = w_old + w_blk
    new_lse = tl.where(total > 0, hi_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    new_out = (old_out * w_old[:, None] + blk_out * w_blk[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(lse_ptr, new_lse, mask=m_ok)
    tl.store(out_ptr, new_out, mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, CAUSAL: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
    seen = m_ok[:, None] & n_ok[None, :] & (lse[:, None] > float("-inf"))
    if CAUSAL:
        seen = seen & (kpos[None, :] <= qpos[:, None])
    return tl.where(seen, tl.exp(s - tl.where(lse > float("-inf"), lse, 0.0)[:, None]), 0.0)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, QP, KP, Lse, Delta, DK, DV, sm_scale, Sq, Sk, H, G, REP,
              sqb, sqs, sqh, skb, sks, skh, slb, slh,
              CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of BLOCK_N keys of one (batch, K/V head), summed over the heads sharing it."""
    pid_n, bg = tl.program_id(0), tl.program_id(1)
    b, g = bg // G, bg % G
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, rn, rd, Sk, skb, sks, skh, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for h in range(g * REP, g * REP + REP):
        for start in range(0, Sq, BLOCK_M):
            q, do, qpos, lse, delta, m_ok = _load_q_rows(Q, DO, QP, Lse, Delta, b, h, start + tl.arange(0, BLOCK_M),
                                                         rd, Sq, sqb, sqs, sqh, slb, slh, D)
            p = _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, CAUSAL)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee") * sm_scale
    kv_off = b * skb + rn[:, None] * sks + g * skh + rd[None, :]
    kv_mask = n_ok[:, None] & (rd < D)[None, :]
    tl.store(DK + kv_off, dk, mask=kv_mask)
    tl.store(DV + kv_off, dv, mask=kv_mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, QP, KP, Lse, Delta, DQ, sm_scale, Sq, Sk, H, REP,
            sqb, sqs, sqh, skb, sks, skh, slb, slh,
            CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // REP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q, do, qpos, lse, delta, m_ok = _load_q_rows(Q, DO, QP, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh, slb, slh, D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Sk, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh, D)
        p = _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, CAUSAL)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee") * sm_scale
    q_off = b * sqb + rm[:, None] * sqs + h * sqh + rd[None, :]
    tl.store(DQ + q_off, dq, mask=(rm < Sq)[:, None] & (rd < D)[None, :])


def _blocks() -> tuple[int, int]:
    return (16, 16) if os.environ.get("TRITON_INTERPRET") == "1" else (64, 64)


class TritonKernel:
    name = "triton"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        on_device = q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        return on_device and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        """Merge this block into the running fp32 (out_acc [B,S,H,D], lse_acc [B,H,S]) in place."""
        b, sq, h, d = q.shape
        q, k, v = (x.contiguous() for x in (q, k, v))
        assert out_acc.stride(-1) == 1 and lse_acc.stride(-1) == 1
        bm, bn = _blocks()
        _fwd_merge[(triton.cdiv(sq, bm), b * h)](
            q, k, v, positions(q_span, q.device).int(), positions(k_span, q.device).int(), out_acc, lse_acc,
            scale, sq, k.shape[1], h, h // k.shape[2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            out_acc.stride(0), out_acc.stride(1), out_acc.stride(2), lse_acc.stride(0), lse_acc.stride(1),
            CAUSAL=causal, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bm, BLOCK_N=bn)

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        b, sq, h, _ = q.shape
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
        self.forward_into(q, k, v, out, lse, q_span=q_span, k_span=k_span, causal=causal, scale=scale)
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        b, sq, h, d = q.shape
        sk, g = k.shape[1], k.shape[2]
        q, k, v, dout = (x.contiguous() for x in (q, k, v, dout))
        lse = lse.float().contiguous()
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Sq]
        qp, kp = positions(q_span, q.device).int(), positions(k_span, q.device).int()
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        bm, bn = _blocks()
        common = dict(CAUSAL=causal, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bm, BLOCK_N=bn)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   lse.stride(0), lse.stride(1))
        _bwd_dkdv[(triton.cdiv(sk, bn), b * g)](q, k, v, dout, qp, kp, lse, delta, dk, dv, scale, sq, sk, h, g,
                                               h // g, *strides, **common)
        _bwd_dq[(triton.cdiv(sq, bm), b * h)](q, k, v, dout, qp, kp, lse, delta, dq, scale, sq, sk, h, h // g,
                                             *strides, **common)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
