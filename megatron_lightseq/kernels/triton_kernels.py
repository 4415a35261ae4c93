"""The project's own Triton block kernels ("triton"): forward with the LSE merge fused into its
epilogue, and backward from the merged (out, lse). Arbitrary token positions (any block of any
layout: a position vector per side), causal or not, GQA/MQA by indexing the shared K/V head
(nothing repeated), fp16/bf16/fp32 inputs with fp32 accumulation, head dims up to 256.

Causal blocks skip what the mask hides. When both sides' positions increase (every block of the
built-in layouts), a table per 16-token granule says how far each tile must go: for query rows,
how many keys any of them sees (the loop's end) and how many all of them see (tiles below need no
mask); for keys, the first query that sees any of them and the first that sees all. Tiles are
multiples of granules, so one table serves every block size the autotuner tries. Positions that
do not increase get tables that skip nothing and mask everything, which is always exact.

On CUDA the block sizes, warps and pipeline depth are autotuned per shape (the forward's
accumulators are restored between trials); on CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``) with small fixed blocks, which is how CI tests them.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .base import BlockKernel, Span, positions
from .mask import Mask

GRANULE = 16


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
def _granules(pid, BLOCK: tl.constexpr, S):
    """First and last 16-token granule of tile ``pid`` (the last clamped to the sequence)."""
    first = pid * (BLOCK // 16)
    return first, tl.minimum(first + BLOCK // 16 - 1, (S - 1) // 16)


@triton.jit
def _fwd(Q, K, V, QP, KP, KV_END, KV_FULL, Out, Lse, sm_scale, Sq, Sk, H, REP,
         sqb, sqs, sqh, skb, sks, skh, sob, sos, soh, slb, slh,
         CAUSAL: tl.constexpr, MERGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M x (the keys it sees) tile for one (batch, head). With MERGE, merged into the
    running fp32 (Out, Lse); else stored there. Scores are kept in base 2 (exp2 is the
    hardware's exponential)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // REP  # the K/V head this query head shares
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < Sq, rd < D
    q = tl.load(Q + b * sqb + rm[:, None] * sqs + h * sqh + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(QP + rm, mask=m_ok, other=0)
    first_g, last_g = _granules(pid_m, BLOCK_M, Sq)
    kv_end, kv_full = tl.load(KV_END + last_g), tl.load(KV_FULL + first_g)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh, D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if start + BLOCK_N > kv_full:  # a tile some row must not see all of
            seen = n_ok[None, :] & m_ok[:, None]
            if CAUSAL:
                seen = seen & (kpos[None, :] <= qpos[:, None])
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    has = l_i > 0
    blk_lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    blk_out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse_ptr = Lse + b * slb + h * slh + rm
    out_ptr = Out + b * sob + rm[:, None] * sos + h * soh + rd[None, :]
    if not MERGE:
        tl.store(lse_ptr, blk_lse, mask=m_ok)
        tl.store(out_ptr, blk_out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        return
    _merge_tile(out_ptr, lse_ptr, blk_out, blk_lse, m_ok[:, None] & d_ok[None, :], m_ok)  # the fused merge


@triton.jit
def _merge_tile(out_ptr, lse_ptr, part, part_lse, out_mask, row_mask):
    """Merge a partial (out, lse) tile into the running fp32 one in place: merge.py's rule,
    weights relative to the larger lse, a row that has seen no key on either side left at 0, -inf."""
    old_lse = tl.load(lse_ptr, mask=row_mask, other=float("-inf"))
    old_out = tl.load(out_ptr, mask=out_mask, other=0.0)
    hi = tl.maximum(old_lse, part_lse)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    w_old, w_part = tl.exp(old_lse - hi_safe), tl.exp(part_lse - hi_safe)
    total = w_old + w_part
    new_lse = tl.where(total > 0, hi_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    new_out = (old_out * w_old[:, None] + part * w_part[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(lse_ptr, new_lse, mask=row_mask)
    tl.store(out_ptr, new_out, mask=out_mask)


@triton.jit
def _merge(Out, Lse, Part, PartLse, S, H, sob, sos, soh, slb, slh, spb, sps, sph, splb, splh,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """A computed block's (Part, PartLse) merged into the running (Out, Lse), BLOCK_S rows of one
    (batch, head) per program: one pass over the data, where the eager merge takes several."""
    pid_s, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    s_ok = rs < S
    mask = s_ok[:, None] & (rd < D)[None, :]
    part = tl.load(Part + b * spb + rs[:, None] * sps + h * sph + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    part_lse = tl.load(PartLse + b * splb + h * splh + rs, mask=s_ok, other=float("-inf")).to(tl.float32)
    _merge_tile(Out + b * sob + rs[:, None] * sos + h * soh + rd[None, :], Lse + b * slb + h * slh + rs,
                part, part_lse, mask, s_ok)


@triton.jit
def _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, MASKED, CAUSAL: tl.constexpr):
    """p = exp(s - lse) for a tile; masked only where ``MASKED`` says some entry is hidden."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * (sm_scale * 1.4426950408889634)
    seen_any = lse > float("-inf")
    p = tl.exp2(s - tl.where(seen_any, lse * 1.4426950408889634, 0.0)[:, None])
    if MASKED:
        seen = m_ok[:, None] & n_ok[None, :] & seen_any[:, None]
        if CAUSAL:
            seen = seen & (kpos[None, :] <= qpos[:, None])
        p = tl.where(seen, p, 0.0)
    return p


@triton.jit
def _bwd_dkdv(Q, K, V, DO, QP, KP, Q_LO, Q_FULL, Lse, Delta, DK, DV, sm_scale, Sq, Sk, H, REP,
              sqb, sqs, sqh, skb, sks, skh, slb, slh, sdb, sds, sdh,
              CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head's part of dK, dV for BLOCK_N keys (the caller sums heads sharing a K/V
    head: one program per query head keeps MQA's grid as wide as MHA's)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // REP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, rn, rd, Sk, skb, sks, skh, D)
    first_g, last_g = _granules(pid_n, BLOCK_N, Sk)
    q_lo, q_full = tl.load(Q_LO + first_g), tl.load(Q_FULL + last_g)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range((q_lo // BLOCK_M) * BLOCK_M, Sq, BLOCK_M):
        q, do, qpos, lse, delta, m_ok = _load_q_rows(Q, DO, QP, Lse, Delta, b, h, start + tl.arange(0, BLOCK_M),
                                                     rd, Sq, sqb, sqs, sqh, slb, slh, D)
        p = _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, start < q_full, CAUSAL)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    off = b * sdb + rn[:, None] * sds + h * sdh + rd[None, :]
    mask = n_ok[:, None] & (rd < D)[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, QP, KP, KV_END, KV_FULL, Lse, Delta, DQ, sm_scale, Sq, Sk, H, REP,
            sqb, sqs, sqh, skb, sks, skh, slb, slh,
            CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // REP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q, do, qpos, lse, delta, m_ok = _load_q_rows(Q, DO, QP, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh, slb, slh, D)
    first_g, last_g = _granules(pid_m, BLOCK_M, Sq)
    kv_end, kv_full = tl.load(KV_END + last_g), tl.load(KV_FULL + first_g)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh, D)
        p = _probs(q, k, qpos, kpos, lse, m_ok, n_ok, sm_scale, start + BLOCK_N > kv_full, CAUSAL)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    q_off = b * sqb + rm[:, None] * sqs + h * sqh + rd[None, :]
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (rd < D)[None, :])


@triton.jit
def _delta(Out, DO, Delta, S, H, sob, sos, soh, sdb, sds, sdh, slb, slh,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """delta = rowsum(d_out * out) in fp32, the backward's softmax correction, in one pass."""
    pid_s, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    mask = (rs < S)[:, None] & (rd < D)[None, :]
    o = tl.load(Out + b * sob + rs[:, None] * sos + h * soh + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + rs[:, None] * sds + h * sdh + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + b * slb + h * slh + rs, tl.sum(o * do, 1), mask=rs < S)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates for the autotuner on CUDA, (BLOCK_M, BLOCK_N, warps, stages), per head-dim bound (a
# head dim d uses the list of the smallest bound >= d); the first of each list is the default.
# Every one builds for sm_90 with `python -m megatron_lightseq.kernels.triton_aot` within shared
# memory and without spilling registers at its bound (CI checks them all);
# benchmarks/results/triton_build_sm90.json has the table.
_FWD = [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(64, 64, 4, 3)]
_DKDV = [_config(128, 64, 8, 2), _config(64, 64, 8, 2)]
_DQ = [_config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(64, 128, 8, 2)]
CONFIGS = {
    "fwd": {64: _FWD, 128: _FWD, 256: [_config(64, 64, 8, 2)]},
    "dkdv": {64: _DKDV + [_config(64, 128, 8, 2)], 128: _DKDV,  # 64x128 spills at d 128
             256: [_config(32, 32, 8, 2), _config(16, 32, 4, 2)]},
    "dq": {64: _DQ, 128: _DQ, 256: [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(64, 64, 8, 2)]},
}
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNE_KEY = ["Sq", "Sk", "D", "CAUSAL"]
KERNELS = {"fwd": _fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq}


def head_dim_bound(d: int) -> int:
    """The key of ``CONFIGS`` lists for head dim ``d`` (at most 256)."""
    return next(bound for bound in (64, 128, 256) if d <= bound)


@functools.cache
def _tuned(name: str, bound: int):
    restore = ["Out", "Lse"] if name == "fwd" else None  # trials must not merge into the result
    return triton.autotune(CONFIGS[name][bound], key=_TUNE_KEY, restore_value=restore)(KERNELS[name])


def _launch(name: str, rows: int, cols: int, *args, **meta) -> None:
    """Run kernel ``name`` on a grid of (tiles over ``rows``, ``cols``): autotuned on CUDA, fixed
    small blocks under the interpreter."""
    tile = "BLOCK_N" if name == "dkdv" else "BLOCK_M"  # the block size the grid's first axis tiles
    if _interpreted():
        KERNELS[name][(triton.cdiv(rows, INTERPRETER_BLOCKS[tile]), cols)](*args, **meta, **INTERPRETER_BLOCKS)
    else:
        _tuned(name, head_dim_bound(meta["D"]))[lambda m: (triton.cdiv(rows, m[tile]), cols)](*args, **meta)


@functools.lru_cache(maxsize=256)
def tile_tables(q_span: Span, k_span: Span, causal: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """int32 (q positions, k positions, kv_end, kv_full per query granule, q_lo, q_full per key
    granule) on ``device``; see the module docstring. Built once per block geometry."""
    qp, kp = positions(q_span, torch.device("cpu")), positions(k_span, torch.device("cpu"))
    sq, sk = len(qp), len(kp)
    last = lambda p: p[torch.clamp(torch.arange(0, len(p), GRANULE) + GRANULE - 1, max=len(p) - 1)]
    increasing = bool((qp[1:] > qp[:-1]).all() and (kp[1:] > kp[:-1]).all())
    nq, nk = len(qp[::GRANULE]), len(kp[::GRANULE])
    if not causal:
        kv_end = kv_full = torch.full((nq,), sk)
        q_lo = q_full = torch.zeros(nk)
    elif not increasing:
        kv_end, kv_full = torch.full((nq,), sk), torch.zeros(nq)
        q_lo, q_full = torch.zeros(nk), torch.full((nk,), sq)
    else:
        kv_end = torch.searchsorted(kp, last(qp), right=True)  # keys the row with the latest position sees
        kv_full = torch.searchsorted(kp, qp[::GRANULE].contiguous(), right=True)  # keys the earliest row sees
        q_lo = torch.searchsorted(qp, kp[::GRANULE].contiguous())  # rows before the first that sees the earliest key
        q_full = torch.searchsorted(qp, last(kp))  # rows before the first that sees the latest key
    return tuple(t.to(device=device, dtype=torch.int32) for t in (qp, kp, kv_end, kv_full, q_lo, q_full))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rows_per_program(d: int) -> int:
    """Rows per program of the one-pass kernels (merge, delta): about 4096 elements each."""
    return 16 if _interpreted() else max(16, 4096 // _block_d(d))


def merge_into(out_BSHD: torch.Tensor, lse_BHS: torch.Tensor, part_BSHD: torch.Tensor, part_lse_BHS: torch.Tensor):
    """merge.merge_into's rule as one Triton kernel (fp32 accumulators, last dims contiguous)."""
    b, s, h, d = out_BSHD.shape
    assert out_BSHD.dtype == lse_BHS.dtype == torch.float32 and out_BSHD.stride(-1) == part_BSHD.stride(-1) == 1
    block_s = _rows_per_program(d)
    _merge[(triton.cdiv(s, block_s), b * h)](
        out_BSHD, lse_BHS, part_BSHD, part_lse_BHS, s, h, *out_BSHD.stride()[:3], *lse_BHS.stride()[:2],
        *part_BSHD.stride()[:3], *part_lse_BHS.stride()[:2], D=d, BLOCK_D=_block_d(d), BLOCK_S=block_s)


def _plain_causal(mask: Mask) -> bool:
    if not mask.plain:
        raise NotImplementedError("the Triton kernels do not take document or window masks yet")
    return mask.causal


class TritonKernel(BlockKernel):
    name = "triton"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        on_device = q.device.type == "cuda" or _interpreted()
        return on_device and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, mask: Mask, scale: float,
                     merge: bool = True):
        """Merge this block into the running fp32 (out_acc [B,S,H,D], lse_acc [B,H,S]) in place;
        with ``merge=False`` overwrite them instead (out_acc may then have any float dtype)."""
        b, sq, h, d = q.shape
        q, k, v = (x.contiguous() for x in (q, k, v))
        assert out_acc.stride(-1) == 1 and lse_acc.stride(-1) == 1
        causal = _plain_causal(mask)
        qp, kp, kv_end, kv_full, _, _ = tile_tables(q_span, k_span, causal, q.device)
        _launch("fwd", sq, b * h, q, k, v, qp, kp, kv_end, kv_full, out_acc, lse_acc,
                scale, sq, k.shape[1], h, h // k.shape[2],
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                out_acc.stride(0), out_acc.stride(1), out_acc.stride(2), lse_acc.stride(0), lse_acc.stride(1),
                CAUSAL=causal, MERGE=merge, D=d, BLOCK_D=_block_d(d))

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: Mask, scale: float):
        b, sq, h, _ = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        self.forward_into(q, k, v, out, lse, q_span=q_span, k_span=k_span, mask=mask, scale=scale, merge=False)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: Mask, scale: float):
        b, sq, h, d = q.shape
        sk, g = k.shape[1], k.shape[2]
        # q and dout share strides in the kernels; out is read row by row (its last dim must be dense).
        q, k, v, dout, out = (x.contiguous() for x in (q, k, v, dout, out))
        lse = lse.float().contiguous()
        delta = torch.empty_like(lse)
        block_s = _rows_per_program(d)
        _delta[(triton.cdiv(sq, block_s), b * h)](out, dout, delta, sq, h, *out.stride()[:3], *dout.stride()[:3],
                                                  *delta.stride()[:2], D=d, BLOCK_D=_block_d(d), BLOCK_S=block_s)
        causal = _plain_causal(mask)
        qp, kp, kv_end, kv_full, q_lo, q_full = tile_tables(q_span, k_span, causal, q.device)
        dq = torch.empty_like(q)  # the kernels store in the inputs' dtype
        # dK/dV per query head: straight into the result for MHA, else fp32 to sum over shared heads.
        dk_h = torch.empty_like(k) if h == g else torch.empty((b, sk, h, d), dtype=torch.float32, device=q.device)
        dv_h = torch.empty_like(dk_h)
        meta = dict(CAUSAL=causal, D=d, BLOCK_D=_block_d(d))
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   lse.stride(0), lse.stride(1))
        _launch("dkdv", sk, b * h, q, k, v, dout, qp, kp, q_lo, q_full, lse, delta, dk_h, dv_h, scale, sq, sk, h,
                h // g, *strides, dk_h.stride(0), dk_h.stride(1), dk_h.stride(2), **meta)
        _launch("dq", sq, b * h, q, k, v, dout, qp, kp, kv_end, kv_full, lse, delta, dq, scale, sq, sk, h, h // g,
                *strides, **meta)
        if h == g:
            return dq, dk_h, dv_h
        dk, dv = (x.view(b, sk, g, h // g, d).sum(3) for x in (dk_h, dv_h))  # heads sharing a K/V head
        return dq, dk.to(k.dtype), dv.to(v.dtype)
