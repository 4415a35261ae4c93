"""Packed sequences and windows in Megatron's terms, turned into the plugin's mask.

Megatron hands packed documents to a model as ``packed_seq_params``: ``cu_seqlens_q`` (and
``cu_seqlens_q_padded`` in TransformerEngine's convention, every document padded to a multiple
of 2 CP) over the whole sequence, with ``qkv_format`` "thd" (RoPE positions restart at each
document) or "sbhd" (positions run over the whole sequence). The plugin reads them once per
model forward (one host read per batch, not per layer) and keeps what it read as a
:class:`Packing`; the window comes from ``config.window_size`` (not on the layers
``window_attn_skip_freq`` leaves out).

Documents Megatron marks with ``--reset-attention-mask`` reach the model in no packed_seq_params:
its pretrain_gpt.py hands the model the batch's ``attention_mask``, so the batch split puts the
documents it read (documents.py) in that slot instead of the dense mask (:func:`in_place_of_mask`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..distattn import mask_of, positions


@dataclass(frozen=True)
class Packing:
    cu_seqlens: tuple[int, ...]
    cu_seqlens_padded: tuple[int, ...] | None
    per_document: bool  # rotary positions restart at each document (qkv_format "thd")
    # Rotary positions restart every sample_tokens tokens: a micro-batch's samples laid end to end
    # (documents.py), each with the positions Megatron gives it alone. None: one sample.
    sample_tokens: int | None = None

    @property
    def mask(self) -> dict:
        return dict(cu_seqlens=self.cu_seqlens, cu_seqlens_padded=self.cu_seqlens_padded)


def packing_of(packed_seq_params) -> Packing | None:
    """The Packing a packed_seq_params carries (read once and kept on it), or None."""
    if packed_seq_params is None:
        return None
    known = getattr(packed_seq_params, "lightseq_packing", None)
    if known is not None:
        return known
    q, kv = getattr(packed_seq_params, "cu_seqlens_q", None), getattr(packed_seq_params, "cu_seqlens_kv", None)
    if q is None:
        return None
    if kv is not None and kv is not q and not torch.equal(kv, q):
        raise NotImplementedError("the lightseq backend does self-attention: cu_seqlens_kv must equal cu_seqlens_q")
    try:
        mask = mask_of(True, q, (-1, -1), packed_seq_params.cu_seqlens_q_padded)
    except ValueError as e:
        raise ValueError(f"packed_seq_params: {e}") from None
    packing = Packing(mask.cu_seqlens, mask.cu_seqlens_padded, packed_seq_params.qkv_format == "thd")
    packed_seq_params.lightseq_packing = packing
    return packing


def in_place_of_mask(packing: Packing) -> torch.Tensor:
    """What the batch split hands the model as ``attention_mask`` for documents read from the batch
    (an empty tensor carrying them; :func:`packing_of_mask` reads it back)."""
    carrier = torch.empty(0, dtype=torch.bool)
    carrier.lightseq_packing = packing
    return carrier


def packing_of_mask(attention_mask) -> Packing | None:
    return getattr(attention_mask, "lightseq_packing", None)


def sbhd_params(packing: Packing):
    """The packed_seq_params for documents that came without any (in place of the mask)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(packing.cu_seqlens, dtype=torch.int32)
    return for_megatron(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu), packing)


def for_megatron(packed_seq_params, packing: Packing):
    """The packed_seq_params Megatron's own layers should see: "sbhd", so that they neither squeeze
    the batch dim nor split RoPE per document the TransformerEngine way (which assumes its own CP
    split); the plugin's rotary positions and core attention handle documents."""
    length = (packing.cu_seqlens_padded or packing.cu_seqlens)[-1]
    # max_seqlen: Megatron sizes its rotary table from it; the plugin's positions stay below the length
    plain = dataclasses.replace(packed_seq_params, qkv_format="sbhd", max_seqlen_q=length, max_seqlen_kv=length)
    plain.lightseq_packing = packing
    return plain


def window_of(config, layer_number: int) -> tuple[int, int]:
    """The layer's window (left, right): config.window_size unless window_attn_skip_freq leaves
    this layer out (layer_number is 1-based, as Megatron counts)."""
    window = getattr(config, "window_size", None)
    if not window:
        return (-1, -1)
    skip = getattr(config, "window_attn_skip_freq", None)
    if isinstance(skip, int) and layer_number % skip == 0:
        return (-1, -1)
    if isinstance(skip, list) and not skip[layer_number - 1]:
        return (-1, -1)
    return tuple(int(x) for x in window)


@lru_cache(maxsize=64)
def rotary_positions(layout: str, rank: int, world_size: int, tokens: int, packing: Packing | None,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """Each local token's rotary position: its position in the sequence, or in its document when
    positions restart per document; and a bound on them. ``tokens``: the plain sequence's length."""
    mask = packing.mask if packing else {}
    global_ = positions(layout=layout, rank=rank, world_size=world_size, tokens=None if packing else tokens, **mask)
    if packing is not None and packing.per_document:
        starts = torch.tensor(packing.cu_seqlens_padded or packing.cu_seqlens)
        doc = (torch.searchsorted(starts, global_, right=True) - 1).clamp(max=len(starts) - 2)
        global_ = global_ - starts[doc]
    elif packing is not None and packing.sample_tokens:
        global_ = global_ % packing.sample_tokens
    return global_.to(device), int(global_.max()) + 1
