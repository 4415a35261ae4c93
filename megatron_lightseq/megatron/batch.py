"""Putting a batch on this CP rank in the layout the attention expects: plain sequences, and
packed documents (their cu_seqlens over the whole sequence stay whole; every per-token entry,
tokens, labels, loss mask, position ids, is cut like the attention's tokens, the sequence padded
to whole chunks with zeros, so that padding has loss mask 0)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from ..distattn.layout import shard
from ..kernels.mask import make_mask
from .packed import packing_of

# Batch entries that are not per-token tensors (Megatron 0.19 keeps them in the batch dict).
_METADATA_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")


def get_batch_on_this_cp_rank(batch: dict, cp_group=None, *, layout: str, cu_seqlens=None,
                              cu_seqlens_padded=None) -> dict:
    """This CP rank's share of every per-token entry of ``batch`` ([b, s, ...]; attention_mask
    [b, 1, s, s] is split along its query dim), in ``layout`` (the model's, packed.layout_for).
    For plain sequences in the zigzag layout this is exactly Megatron-Core's own split."""
    group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group
    size, rank = group.size(), group.rank()
    documents = make_mask(True, cu_seqlens, (-1, -1), cu_seqlens_padded)  # boundaries read once
    mask = dict(cu_seqlens=documents.cu_seqlens, cu_seqlens_padded=documents.cu_seqlens_padded)
    if size == 1 and cu_seqlens is None:
        return batch
    return {
        key: val if val is None or key in _METADATA_KEYS
        else shard(val, layout=layout, rank=rank, world_size=size, dim=2 if key == "attention_mask" else 1, **mask)
        for key, val in batch.items()
    }


def get_thd_batch_on_this_cp_rank(batch: dict, cu_seqlens, cu_seqlens_padded=None, max_seqlen=None, cp_group=None,
                                  *, layout: str) -> tuple[dict, PackedSeqParams]:
    """Megatron's packed ("thd") batch split, the plugin's way: the batch cut like plain sequences
    with the documents' mask, and the packed_seq_params the model reads the documents from
    (boundaries over the whole sequence)."""
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                             max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    packing = packing_of(params)  # read once, here
    return get_batch_on_this_cp_rank(batch, cp_group, layout=layout, **packing.mask), params


def wired_batch_split(original, layout: Callable[[bool], str], active: Callable[[], bool]):
    """A stand-in for Megatron's get_batch_on_this_cp_rank (any version's signature) that splits
    in the plugin's layout (``layout(packed)``) while ``active()``, and calls ``original``
    otherwise."""

    def get_batch_on_this_cp_rank_(batch, *args, **kwargs):
        if not active():
            return original(batch, *args, **kwargs)
        if kwargs.get("is_hybrid_cp") or (args and args[0] is True):
            raise NotImplementedError("the lightseq backend does not support hybrid context parallelism")
        group = kwargs.get("cp_group")
        if group is None and args and not isinstance(args[0], bool):
            group = args[0]
        cu, padded = batch.get("cu_seqlens"), batch.get("cu_seqlens_padded")
        return get_batch_on_this_cp_rank(batch, cp_group=group, layout=layout(cu is not None),
                                         cu_seqlens=_flat(cu), cu_seqlens_padded=_flat(padded))

    get_batch_on_this_cp_rank_.lightseq_original = original
    return get_batch_on_this_cp_rank_


def wired_thd_batch_split(original, layout: Callable[[bool], str], active: Callable[[], bool]):
    """The same for Megatron's get_thd_batch_on_this_cp_rank (packed batches of pretrain_gpt.py)."""

    def get_thd_batch_on_this_cp_rank_(batch, cu_seqlens, cu_seqlens_padded=None, max_seqlen=None, *args, **kwargs):
        if not active():
            return original(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs)
        return get_thd_batch_on_this_cp_rank(batch, _flat(cu_seqlens), _flat(cu_seqlens_padded), max_seqlen,
                                             layout=layout(True))

    get_thd_batch_on_this_cp_rank_.lightseq_original = original
    return get_thd_batch_on_this_cp_rank_


def _flat(cu):
    """Boundaries as a flat int tensor (Megatron's batches may carry them [1, n])."""
    return None if cu is None else (cu.reshape(-1) if isinstance(cu, torch.Tensor) else cu)
