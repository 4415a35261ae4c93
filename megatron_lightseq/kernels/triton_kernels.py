"""The project's own Triton block kernels ("triton"): forward with the LSE merge fused into its
epilogue, and backward from the merged (out, lse). Arbitrary token positions and any mask (any
block of any layout, documents, windows: per query row the interval [lo, hi] of key positions it
may see, per key its position), GQA/MQA by indexing the shared K/V head (nothing repeated),
fp16/bf16/fp32 inputs with fp32 accumulation, head dims up to 256.

Tiles the mask hides are skipped, and only tiles some row sees in part are masked: tiles.py's
tables say, per 16-token granule, which range of the other side's tiles to loop over and which
of them every row sees whole. Tiles are multiples of granules, so one table serves every block
size the autotuner tries. Two constexprs say which ends of the interval are compared: none (no
key of the block hidden), ``CUT_HI`` (keys hidden past a row's hi only: causal) or both
(``CUT_LO`` too: windows, documents), so a plain causal block compiles to the causal kernel and
a block with no mask to the unmasked one. (Keys hidden only before lo, as in a sliding window's
past blocks, take the both-ends kernel: the lo-only one spills at head dim 128, and the extra
compare costs only masked tiles.) A row that sees no key gives out 0, lse -inf, gradients 0.

Inputs are read through their strides (only the head dim must be dense), so Megatron's
[s, b, h, d] tensors seen as [b, s, h, d] and row slices of the executor's buffers go in as they
are, not copied per block. Offsets are computed in int64: a batch or sequence index times a
stride passes 2^31 elements at sizes training reaches (an fp32 accumulator at B = 4, 128K
tokens, 32 x 128 heads), which int32 arithmetic would wrap.

On CUDA the block sizes, warps and pipeline depth are autotuned per shape bucket (the forward's
accumulators are restored between trials); on CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``) with small fixed blocks, which is how CI tests them.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .base import BlockKernel, MaskLike, Span
from .tiles import Tiles, tile_tables


@triton.jit
def _load_kv(K, V, KP, b, g, rn, rd, Sk, skb, sks, skh, svb, svs, svh, D: tl.constexpr):
    """k, v [BLOCK_N, BLOCK_D] of K/V head g (b, g int64), their positions, and which rows exist."""
    n_ok = rn < Sk
    rn64 = rn.to(tl.int64)
    mask = n_ok[:, None] & (rd < D)[None, :]
    k = tl.load(K + (b * skb + g * skh) + rn64[:, None] * sks + rd[None, :], mask=mask, other=0.0)
    v = tl.load(V + (b * svb + g * svh) + rn64[:, None] * svs + rd[None, :], mask=mask, other=0.0)
    return k, v, tl.load(KP + rn, mask=n_ok, other=0), n_ok


@triton.jit
def _load_q_rows(Q, DO, QHI, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh, sdob, sdos, sdoh, slb, slh,
                 D: tl.constexpr):
    """What the backward needs of query rows rm of head h (b, h int64): q, d_out, hi, lse, delta."""
    m_ok = rm < Sq
    rm64 = rm.to(tl.int64)
    mask = m_ok[:, None] & (rd < D)[None, :]
    q = tl.load(Q + (b * sqb + h * sqh) + rm64[:, None] * sqs + rd[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (b * sdob + h * sdoh) + rm64[:, None] * sdos + rd[None, :], mask=mask, other=0.0)
    hi = tl.load(QHI + rm, mask=m_ok, other=0)
    lse = tl.load(Lse + (b * slb + h * slh) + rm64, mask=m_ok, other=float("-inf"))
    delta = tl.load(Delta + (b * slb + h * slh) + rm64, mask=m_ok, other=0.0)
    return q, do, hi, lse, delta, m_ok
@triton.jit
def _tile_range(T, pid, BLOCK: tl.constexpr, S):
    """(any_lo, any_hi, all_lo, all_hi) of tile ``pid`` of the other side's indices (tiles.py):
    any_lo and all_hi from its first 16-token granule, any_hi and all_lo from its last (clamped
    to the sequence)."""
    first = pid * (BLOCK // 16)
    last = tl.minimum(first + BLOCK // 16 - 1, (S - 1) // 16)
    return tl.load(T + 4 * first), tl.load(T + 4 * last + 1), tl.load(T + 4 * last + 2), tl.load(T + 4 * first + 3)


@triton.jit
def _loop_start(any_lo, BLOCK: tl.constexpr, CUT_LO: tl.constexpr):
    """The first key tile a query tile's loop visits. Without CUT_LO every row's keys start at
    index 0 (tiles.py), so the loop starts at a literal 0 as it did before masks had a lower end:
    the causal kernels compile to the same code, registers and all. The dK/dV loop's end (Sq
    without CUT_LO) is the same case; there a loaded end costs the 128x64 tile a spill at head
    dim 128."""
    if CUT_LO:
        return (any_lo // BLOCK) * BLOCK
    return 0


@triton.jit
def _seen(seen, kpos, hi, QLO, rm, m_ok, CUT_HI: tl.constexpr, CUT_LO: tl.constexpr):
    """``seen`` where rows rm's interval [lo, hi] holds the key's position, comparing only the
    ends that hide some key of the block. lo is read here, in the masked branch: read with the
    rows it would stay live across the pipelined loop (a spill in the dK/dV kernel's largest
    tile at head dim 128)."""
    if CUT_HI:
        seen = seen & (kpos[None, :] <= hi[:, None])
    if CUT_LO:
        seen = seen & (kpos[None, :] >= tl.load(QLO + rm, mask=m_ok, other=0)[:, None])
    return seen


@triton.jit
def _fwd(Q, K, V, QLO, QHI, KP, KV_TILES, Out, Lse, sm_scale, Sq, Sk, H, REP, SQ_KEY, SK_KEY,
         sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
         CUT_HI: tl.constexpr, CUT_LO: tl.constexpr, MERGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M x (the keys it sees) tile for one (batch, head). With MERGE, merged into the
    running fp32 (Out, Lse); else stored there. Scores are kept in base 2 (exp2 is the
    hardware's exponential). SQ_KEY, SK_KEY: the autotuner's shape bucket, unread here."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    g = h // REP  # the K/V head this query head shares
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < Sq, rd < D
    q = tl.load(Q + (b * sqb + h * sqh) + rm64[:, None] * sqs + rd[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    hi = tl.load(QHI + rm, mask=m_ok, other=0)
    kv_lo, kv_hi, full_lo, full_hi = _tile_range(KV_TILES, pid_m, BLOCK_M, Sq)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(_loop_start(kv_lo, BLOCK_N, CUT_LO), kv_hi, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh,
                                    svb, svs, svh, D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        edge = start + BLOCK_N > full_hi  # a tile some row must not see all of (or past the keys' end)
        if CUT_LO:
            edge = edge | (start < full_lo)
        if edge:
            seen = _seen(n_ok[None, :] & m_ok[:, None], kpos, hi, QLO, rm, m_ok, CUT_HI, CUT_LO)
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
    lse_ptr = Lse + (b * slb + h * slh) + rm64
    out_ptr = Out + (b * sob + h * soh) + rm64[:, None] * sos + rd[None, :]
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
def _merge(Out, Lse, Part, PartLse, S, H, sob, sos, soh, slb, slh, sls, spb, sps, sph, splb, splh, spls,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """A computed block's (Part, PartLse) merged into the running (Out, Lse), BLOCK_S rows of one
    (batch, head) per program: one pass over the data, where the eager merge takes several. Each
    LSE is read through its own strides, token dim included: cuDNN may hand back one laid out
    [b, s, h] (TORCH_CUDNN_SDPA_AVOID_RECOMPILE), whose token stride is h, not 1."""
    pid_s, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rs64 = rs.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    s_ok = rs < S
    mask = s_ok[:, None] & (rd < D)[None, :]
    part = tl.load(Part + (b * spb + h * sph) + rs64[:, None] * sps + rd[None, :], mask=mask, other=0.0)
    part_lse = tl.load(PartLse + (b * splb + h * splh) + rs64 * spls, mask=s_ok, other=float("-inf"))
    _merge_tile(Out + (b * sob + h * soh) + rs64[:, None] * sos + rd[None, :], Lse + (b * slb + h * slh) + rs64 * sls,
                part.to(tl.float32), part_lse.to(tl.float32), mask, s_ok)


@triton.jit
def _probs(q, k, kpos, hi, QLO, rm, lse, m_ok, n_ok, sm_scale, edge, CUT_HI: tl.constexpr, CUT_LO: tl.constexpr):
    """p = exp(s - lse) for a tile; masked only where ``edge`` says some entry is hidden. A row
    that sees no key (lse -inf) gets p 0."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * (sm_scale * 1.4426950408889634)
    seen_any = lse > float("-inf")
    p = tl.exp2(s - tl.where(seen_any, lse * 1.4426950408889634, 0.0)[:, None])
    if edge:
        seen = _seen(m_ok[:, None] & n_ok[None, :] & seen_any[:, None], kpos, hi, QLO, rm, m_ok, CUT_HI, CUT_LO)
        p = tl.where(seen, p, 0.0)
    return p


@triton.jit
def _bwd_dkdv(Q, K, V, DO, QLO, QHI, KP, Q_TILES, Lse, Delta, DK, DV, sm_scale, Sq, Sk, H, REP, SQ_KEY, SK_KEY,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, slb, slh, sdb, sds, sdh,
              CUT_HI: tl.constexpr, CUT_LO: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of BLOCK_N keys of one K/V head, summed over the REP query heads that share it
    inside the program: the result is stored once, in the inputs' dtype, with no per-query-head
    buffer (which cost 8 * H * D bytes per key, about 1 GB for a 16K block at 64 x 128)."""
    pid_n, bg = tl.program_id(0), tl.program_id(1)
    G = H // REP
    b, g = (bg // G).to(tl.int64), (bg % G).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, rn, rd, Sk, skb, sks, skh, svb, svs, svh, D)
    q_lo, q_hi, full_lo, full_hi = _tile_range(Q_TILES, pid_n, BLOCK_N, Sk)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # One loop over (query head, query tile) pairs: a loop over heads around the loop over tiles
    # keeps K and V in shared memory across it and spills at head dim 128.
    first = (q_lo // BLOCK_M) * BLOCK_M
    tiles = tl.cdiv((q_hi if CUT_LO else Sq) - first, BLOCK_M)  # see _loop_start
    for i in range(0, REP * tiles):
        r = i // tiles
        h = g * REP + r
        start = first + (i - r * tiles) * BLOCK_M
        rm = start + tl.arange(0, BLOCK_M)
        q, do, hi, lse, delta, m_ok = _load_q_rows(Q, DO, QHI, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh,
                                                   sdob, sdos, sdoh, slb, slh, D)
        # Rows before full_lo are cut by their hi; rows past full_hi by their lo (rows past Sq
        # need no mask: their d_out and delta are 0, so they add nothing).
        edge = start < full_lo
        if CUT_LO:
            edge = edge | (start + BLOCK_M > full_hi)
        p = _probs(q, k, kpos, hi, QLO, rm, lse, m_ok, n_ok, sm_scale, edge, CUT_HI, CUT_LO)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    off = (b * sdb + g * sdh) + rn.to(tl.int64)[:, None] * sds + rd[None, :]
    mask = n_ok[:, None] & (rd < D)[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, QLO, QHI, KP, KV_TILES, Lse, Delta, DQ, sm_scale, Sq, Sk, H, REP, SQ_KEY, SK_KEY,
            sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, slb, slh, sdqb, sdqs, sdqh,
            CUT_HI: tl.constexpr, CUT_LO: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    g = h // REP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q, do, hi, lse, delta, m_ok = _load_q_rows(Q, DO, QHI, Lse, Delta, b, h, rm, rd, Sq, sqb, sqs, sqh,
                                               sdob, sdos, sdoh, slb, slh, D)
    kv_lo, kv_hi, full_lo, full_hi = _tile_range(KV_TILES, pid_m, BLOCK_M, Sq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(_loop_start(kv_lo, BLOCK_N, CUT_LO), kv_hi, BLOCK_N):
        k, v, kpos, n_ok = _load_kv(K, V, KP, b, g, start + tl.arange(0, BLOCK_N), rd, Sk, skb, sks, skh,
                                    svb, svs, svh, D)
        edge = start + BLOCK_N > full_hi
        if CUT_LO:
            edge = edge | (start < full_lo)
        p = _probs(q, k, kpos, hi, QLO, rm, lse, m_ok, n_ok, sm_scale, edge, CUT_HI, CUT_LO)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    q_off = (b * sdqb + h * sdqh) + rm.to(tl.int64)[:, None] * sdqs + rd[None, :]
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (rd < D)[None, :])


@triton.jit
def _delta(Out, DO, Delta, S, H, sob, sos, soh, sdb, sds, sdh, slb, slh,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """delta = rowsum(d_out * out) in fp32, the backward's softmax correction, in one pass."""
    pid_s, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rs64 = rs.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    mask = (rs < S)[:, None] & (rd < D)[None, :]
    o = tl.load(Out + (b * sob + h * soh) + rs64[:, None] * sos + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + (b * sdb + h * sdh) + rs64[:, None] * sds + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (b * slb + h * slh) + rs64, tl.sum(o * do, 1), mask=rs < S)


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
_DQ = [_config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(64, 128, 8, 2)]
# dK/dV loops over (query head, query tile) pairs; its tiles are smaller than before that loop
# (64x128 spills at head dim 64, and 128x64 at 128 unless it is not pipelined).
CONFIGS = {
    "fwd": {64: _FWD, 128: _FWD, 256: [_config(64, 64, 8, 2)]},
    "dkdv": {64: [_config(128, 64, 8, 2), _config(64, 64, 8, 2)],
             128: [_config(128, 64, 8, 1), _config(64, 64, 8, 2), _config(128, 32, 8, 2)],
             256: [_config(32, 32, 8, 1), _config(16, 32, 8, 2)]},
    "dq": {64: _DQ, 128: _DQ, 256: [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(64, 64, 8, 2)]},
}
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
# The autotuner measures (and synchronises) once per key: token counts enter as their power-of-two
# bucket (SQ_KEY, SK_KEY), so blocks of packed documents whose lengths change every batch reuse
# the choice of the first block of their size class instead of tuning again.
_TUNE_KEY = ["SQ_KEY", "SK_KEY", "D", "CUT_HI", "CUT_LO"]
KERNELS = {"fwd": _fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq}


def head_dim_bound(d: int) -> int:
    """The key of ``CONFIGS`` lists for head dim ``d`` (at most 256)."""
    return next(bound for bound in (64, 128, 256) if d <= bound)


def tune_bucket(tokens: int) -> int:
    """The autotuner's key for a token count: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(tokens))


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


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rows_per_program(d: int) -> int:
    """Rows per program of the one-pass kernels (merge, delta): about 4096 elements each."""
    return 16 if _interpreted() else max(16, 4096 // _block_d(d))


def _dense_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as it is when its head dim (last) is dense, which is all the kernels need of a
    layout; else a copy (no layout the executor or Megatron makes needs one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bsh(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [B, S, H, D] tensor's batch, token and head dims."""
    return x.stride(0), x.stride(1), x.stride(2)


def merge_into(out_BSHD: torch.Tensor, lse_BHS: torch.Tensor, part_BSHD: torch.Tensor, part_lse_BHS: torch.Tensor):
    """merge.merge_into's rule as one Triton kernel (fp32 accumulators; every tensor read through
    its strides, the head dims of out and part dense)."""
    b, s, h, d = out_BSHD.shape
    assert out_BSHD.dtype == lse_BHS.dtype == torch.float32 and out_BSHD.stride(-1) == 1
    part_BSHD = _dense_d(part_BSHD)
    block_s = _rows_per_program(d)
    _merge[(triton.cdiv(s, block_s), b * h)](
        out_BSHD, lse_BHS, part_BSHD, part_lse_BHS, s, h, *_bsh(out_BSHD), *lse_BHS.stride(),
        *_bsh(part_BSHD), *part_lse_BHS.stride(), D=d, BLOCK_D=_block_d(d), BLOCK_S=block_s)


def _mask_variant(t: Tiles) -> dict[str, bool]:
    """The kernels' mask constexprs for a block: CUT_LO compiled only with CUT_HI (docstring)."""
    return dict(CUT_HI=t.cut_hi or t.cut_lo, CUT_LO=t.cut_lo)


class TritonKernel(BlockKernel):
    name = "triton"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        on_device = q.device.type == "cuda" or _interpreted()
        return on_device and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float,
                     merge: bool = True):
        """Merge this block into the running fp32 (out_acc [B,S,H,D], lse_acc [B,H,S]) in place;
        with ``merge=False`` overwrite them instead (out_acc may then have any float dtype).
        q, k, v in any layout whose head dim is dense (views of Megatron's tensors as they are)."""
        b, sq, h, d = q.shape
        sk, g = k.shape[1], k.shape[2]
        q, k, v = (_dense_d(x) for x in (q, k, v))
        assert out_acc.stride(-1) == 1 and lse_acc.stride(-1) == 1
        t = tile_tables(q_span, k_span, mask, q.device)
        _launch("fwd", sq, b * h, q, k, v, t.q_lo, t.q_hi, t.k_pos, t.kv, out_acc, lse_acc,
                scale, sq, sk, h, h // g, tune_bucket(sq), tune_bucket(sk), *_bsh(q), *_bsh(k), *_bsh(v),
                *_bsh(out_acc), lse_acc.stride(0), lse_acc.stride(1),
                **_mask_variant(t), MERGE=merge, D=d, BLOCK_D=_block_d(d))

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        b, sq, h, _ = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        self.forward_into(q, k, v, out, lse, q_span=q_span, k_span=k_span, mask=mask, scale=scale, merge=False)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        """Gradients from the merged (out, lse). Every input is read through its strides (dout in
        Megatron's [s, b, h, d] order, out a row slice of the executor's result); dq, dk, dv are
        new dense tensors in the inputs' dtypes, dk and dv with G heads."""
        b, sq, h, d = q.shape
        sk, g = k.shape[1], k.shape[2]
        q, k, v, dout, out = (_dense_d(x) for x in (q, k, v, dout, out))
        lse = lse.float().contiguous()  # B*H*S*4 bytes; delta shares its strides
        delta = torch.empty_like(lse)
        block_s = _rows_per_program(d)
        _delta[(triton.cdiv(sq, block_s), b * h)](out, dout, delta, sq, h, *_bsh(out), *_bsh(dout),
                                                  *delta.stride()[:2], D=d, BLOCK_D=_block_d(d), BLOCK_S=block_s)
        t = tile_tables(q_span, k_span, mask, q.device)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # the kernels store in the inputs' dtype
        dk, dv = torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)
        meta = dict(**_mask_variant(t), D=d, BLOCK_D=_block_d(d))
        common = (scale, sq, sk, h, h // g, tune_bucket(sq), tune_bucket(sk), *_bsh(q), *_bsh(k), *_bsh(v),
                  *_bsh(dout), lse.stride(0), lse.stride(1))
        rows = (t.q_lo, t.q_hi, t.k_pos)
        assert dk.stride() == dv.stride()  # the dK/dV kernel stores both with one set of strides
        _launch("dkdv", sk, b * g, q, k, v, dout, *rows, t.q, lse, delta, dk, dv, *common, *_bsh(dk), **meta)
        _launch("dq", sq, b * h, q, k, v, dout, *rows, t.kv, lse, delta, dq, *common, *_bsh(dq), **meta)
        return dq, dk, dv
