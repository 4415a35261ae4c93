"""torch's cuDNN attention op as a block kernel ("cudnn"): the fastest op on Hopper in ANCHORS.md
(540 TFLOP/s fwd+bwd at 32K causal on an H200, against 318 for torch's FA2).

CUDA only, bf16 and fp16, head dim a multiple of 8 up to 128, and only where the installed torch
has the op with the argument lists this adapter passes (torch 2.5 on; 2.4's op takes no
``attn_bias``): ``supports`` reads the schemas, so an older torch gets "does not support", not a
call with shifted arguments. The op returns the LSE as [B, H, S, 1] in the torch versions seen
(2.11, 2.13); the shape it uses is read once from its meta kernel, so the backward hands it back
the way the forward gave it. Without dropout the op's philox seed/offset and sequence-length
tensors are unread: zeros and None stand in for them.

Layouts the backward must respect (aten/src/ATen/native/cudnn/MHA.cpp, ``run_cudnn_SDP_bprop``):
- with cuDNN < 9.5.1 (the CUDA 12.4 wheels) d_out is rebuilt in out's stride order and must then
  have out's strides, which fails for an out that is not dense (a row slice of a micro-batch > 1,
  as zigzag's second chunk is) or a d_out in another order (Megatron's [s, b, h, d]); so both go
  in as dense [B, S, H, D] tensors, the same strides by construction;
- with ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` and every tensor dense [B, S, H, D], torch runs the
  op with ragged offsets, its forward's LSE laid out [B, S, H] (token stride H) and its backward
  finding each batch's LSE at b * S * (token stride): the LSE must go back in that layout.
"""
from __future__ import annotations

import functools
import os

import torch

from .vendor import FixedMaskKernel, bhsd, repeat_kv, schema_fits, sum_repeated

aten = torch.ops.aten
FORWARD_ARGS = ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
                "return_debug_mask", "scale")
BACKWARD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
                 "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "scale")


def ops_fit(ops) -> bool:
    """Whether namespace ``ops`` (torch.ops.aten) has both cuDNN ops with the arguments passed here."""
    return (schema_fits(ops, "_scaled_dot_product_cudnn_attention", FORWARD_ARGS)
            and schema_fits(ops, "_scaled_dot_product_cudnn_attention_backward", BACKWARD_ARGS))


@functools.cache
def _installed_ops_fit() -> bool:
    return ops_fit(aten)


@functools.cache
def lse_is_4d() -> bool:
    """Whether the op's LSE carries a trailing singleton dim (asked of its meta kernel, no GPU)."""
    x = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.bfloat16)
    return aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)[1].dim() == 4


def ragged_lse(q, k, v, out) -> bool:
    """Whether torch runs the op with ragged offsets for these [B, H, S, D] views, as its
    ``use_ragged_in_dense`` decides: the environment flag set (read per call here; torch reads it
    once) and every tensor dense [B, S, H, D]."""
    flag = os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "").upper() in ("1", "ON", "YES", "TRUE", "Y")
    return flag and all(x.transpose(1, 2).is_contiguous() for x in (q, k, v, out))


def lse_for_backward(lse_BHS: torch.Tensor, ragged: bool) -> torch.Tensor:
    """The merged LSE in the shape and layout the op's forward would have given (module docstring)."""
    if ragged:
        lse_BHS = lse_BHS.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H] in memory
    else:
        lse_BHS = lse_BHS.contiguous()
    return lse_BHS.unsqueeze(-1) if lse_is_4d() else lse_BHS


@functools.cache
def _no_rng(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


class CudnnKernel(FixedMaskKernel):
    name = "cudnn"

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        d = q.shape[-1]
        return (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 128
                and _installed_ops_fit())

    def _forward(self, q, k, v, causal: bool, scale: float):
        b, sq, h, _ = q.shape
        res = aten._scaled_dot_product_cudnn_attention(
            bhsd(q), bhsd(repeat_kv(k, h)), bhsd(repeat_kv(v, h)), None, True, 0.0, causal, False, scale=scale)
        # A view in whatever layout the op chose ([B, S, H] when ragged): readers take strides.
        return bhsd(res[0]), res[1].select(-1, 0) if res[1].dim() == 4 else res[1]

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        sq, h, sk, g = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        # out and dout dense [B, S, H, D], so the same strides (module docstring); q, k, v as given.
        q_, k_, v_, o_, do_ = (bhsd(x) for x in (q, repeat_kv(k, h), repeat_kv(v, h), out.contiguous(),
                                                  dout.contiguous()))
        rng = _no_rng(q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            do_, q_, k_, v_, o_, lse_for_backward(lse, ragged_lse(q_, k_, v_, o_)), rng, rng,
            None, None, None, sq, sk, 0.0, causal, scale=scale)
        return bhsd(dq), sum_repeated(bhsd(dk), g), sum_repeated(bhsd(dv), g)
