"""kv_wire.py's quantize and dequantize as fused Triton kernels (CUDA; the interpreter in the
tests): one read of K/V and one write of the int8 form and scales each way, with the arithmetic
of the torch code (IEEE division, round half to even, the product in float32, or float64 for
float64 inputs), so that both give the same bytes.

Legend: B batch, T tokens, G key/value heads, D head dim. Every tensor is read through its
strides (a payload's rows may be a view of Megatron's [s, b, h, d] tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .wire_form import QMAX, SCALE_DTYPE, TINY

BLOCK_T = 32  # tokens per program (a V program's rows; a K program's tile along T)
TINY_, QMAX_ = tl.constexpr(TINY), tl.constexpr(QMAX)


@triton.jit
def _divide(x, s, F64: tl.constexpr):
    if F64:
        return x / s  # float64 division is IEEE on every target
    else:
        return tl.math.div_rn(x, s)


@triton.jit
def _to_int8(y):
    """round half to even, clamped to [-127, 127] (|y| <= 127 plus rounding, so floor(y + 0.5) is exact)"""
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)


@triton.jit
def _tile(T, G, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's (batch, head, tokens, channels, in-bounds mask) of a [B, T, G, D] grid of
    (B * G, tiles of BLOCK_T tokens) programs."""
    bg, tb = tl.program_id(0), tl.program_id(1)
    rt = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.arange(0, BLOCK_D)
    return bg // G, bg % G, rt, rd, (rt[:, None] < T) & (rd[None, :] < D)


@triton.jit
def _quantize_k(X, Q, S, T, sxb, sxt, sxg, sqb, sqt, sqg, ssb, ssg, G, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_T: tl.constexpr, F64: tl.constexpr):
    """One program per (batch, head): each channel's amax over the T tokens, then the int8 values."""
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    amax = tl.zeros([BLOCK_D], dtype=tl.float64 if F64 else tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < T) & d_ok[None, :]
        x = tl.load(X + b * sxb + rt[:, None] * sxt + g * sxg + rd[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(amax.dtype)), 0))
    scale = tl.math.div_rn(tl.maximum(amax.to(tl.float32), TINY_), QMAX_)
    tl.store(S + b * ssb + g * ssg + rd, scale, mask=d_ok)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < T) & d_ok[None, :]
        x = tl.load(X + b * sxb + rt[:, None] * sxt + g * sxg + rd[None, :], mask=ok, other=0.0)
        q = _to_int8(_divide(x.to(amax.dtype), scale.to(amax.dtype)[None, :], F64))
        tl.store(Q + b * sqb + rt[:, None] * sqt + g * sqg + rd[None, :], q, mask=ok)


@triton.jit
def _quantize_v(X, Q, S, T, sxb, sxt, sxg, sqb, sqt, sqg, ssb, sst, ssg, G, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, F64: tl.constexpr):
    """One program per (batch, head, BLOCK_T tokens): each token's amax over D, its int8 values."""
    b, g, rt, rd, ok = _tile(T, G, D, BLOCK_D, BLOCK_T)
    x = tl.load(X + b * sxb + rt[:, None] * sxt + g * sxg + rd[None, :], mask=ok, other=0.0)
    x = x.to(tl.float64 if F64 else tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 1).to(tl.float32), TINY_), QMAX_)
    tl.store(S + b * ssb + rt * sst + g * ssg, scale, mask=rt < T)
    q = _to_int8(_divide(x, scale.to(x.dtype)[:, None], F64))
    tl.store(Q + b * sqb + rt[:, None] * sqt + g * sqg + rd[None, :], q, mask=ok)


@triton.jit
def _dequantize(Q, S, Y, T, sqb, sqt, sqg, ssb, sst, ssg, ssd, syb, syt, syg, G, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, F64: tl.constexpr, BF16: tl.constexpr):
    """int8 times its scale (stride 0 along the dims a scale spans), written in Y's dtype."""
    b, g, rt, rd, ok = _tile(T, G, D, BLOCK_D, BLOCK_T)
    q = tl.load(Q + b * sqb + rt[:, None] * sqt + g * sqg + rd[None, :], mask=ok, other=0)
    s = tl.load(S + b * ssb + rt[:, None] * sst + g * ssg + rd[None, :] * ssd, mask=ok, other=0.0)
    y = q.to(tl.float64 if F64 else tl.float32) * s.to(tl.float64 if F64 else tl.float32)
    if BF16:  # to nearest, ties to even, as torch and the GPU round (the interpreter's cast truncates)
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    tl.store(Y + b * syb + rt[:, None] * syt + g * syg + rd[None, :], y, mask=ok)


def _dense_d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(kernel, grid, *args, **meta) -> None:
    """One place every launch goes through (the memory-model test leaves them out)."""
    kernel[grid](*args, **meta)


def _meta(x: torch.Tensor, d: int) -> dict:
    return dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_T=BLOCK_T, F64=x.dtype == torch.float64)


def quantize_kv_fused(k_BTGD: torch.Tensor, v_BTGD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """kv_wire.quantize_kv in two launches (K, V)."""
    k, v = _dense_d(k_BTGD), _dense_d(v_BTGD)
    b, t, g, d = k.shape
    k8, v8 = (torch.empty(x.shape, dtype=torch.int8, device=x.device) for x in (k, v))
    ks = torch.empty((b, 1, g, d), dtype=SCALE_DTYPE, device=k.device)
    vs = torch.empty((b, t, g, 1), dtype=SCALE_DTYPE, device=v.device)
    _launch(_quantize_k, (b * g,), k, k8, ks, t, *k.stride()[:3], *k8.stride()[:3], ks.stride(0), ks.stride(2), g,
            **_meta(k, d))
    _launch(_quantize_v, (b * g, triton.cdiv(t, BLOCK_T)), v, v8, vs, t, *v.stride()[:3], *v8.stride()[:3],
            vs.stride(0), vs.stride(1), vs.stride(2), g, **_meta(v, d))
    return k8, ks, v8, vs


def dequantize_kv_fused(k8, k_scale, v8, v_scale, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_wire.dequantize_kv in two launches of one kernel (a scale's stride is 0 where it spans)."""
    b, t, g, d = k8.shape
    out = []
    for q, s, spans in ((k8, k_scale, "t"), (v8, v_scale, "d")):
        y = torch.empty(q.shape, dtype=dtype, device=q.device)
        st, sd = (0, s.stride(3)) if spans == "t" else (s.stride(1), 0)
        _launch(_dequantize, (b * g, triton.cdiv(t, BLOCK_T)), q, s, y, t, *q.stride()[:3], s.stride(0), st,
                s.stride(2), sd, *y.stride()[:3], g, BF16=dtype == torch.bfloat16, **_meta(y, d))
        out.append(y)
    return out[0], out[1]
