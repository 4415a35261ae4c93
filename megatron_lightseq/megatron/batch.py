"""Putting a batch and the rotary positions on this CP rank in the layout the attention expects."""
from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..layout import shard
from .config import active_config

# Batch entries that are not per-token tensors (Megatron 0.19 keeps them in the batch dict).
_METADATA_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")


def get_batch_on_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """This CP rank's share of every per-token entry of ``batch`` ([b, s, ...]; attention_mask
    [b, 1, s, s] is split along its query dim), in the configured layout. For zigzag this is
    exactly Megatron-Core's own split."""
    group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group
    size, rank = group.size(), group.rank()
    if any(batch.get(key) is not None for key in ("cu_seqlens", "cu_seqlens_padded")):
        raise NotImplementedError("the lightseq backend does not take packed sequences (cu_seqlens)")
    if size == 1:
        return batch
    layout = active_config().layout
    return {
        key: val if val is None or key in _METADATA_KEYS
        else shard(val, layout=layout, rank=rank, world_size=size, dim=2 if key == "attention_mask" else 1)
        for key, val in batch.items()
    }


def wired_batch_split(original):
    """A stand-in for Megatron's get_batch_on_this_cp_rank (any version's signature) that splits
    in the plugin's layout when the lightseq backend is active, and calls ``original`` otherwise."""
    from .backend import lightseq_active

    def get_batch_on_this_cp_rank_(batch, *args, **kwargs):
        if not lightseq_active():
            return original(batch, *args, **kwargs)
        if kwargs.get("is_hybrid_cp") or (args and args[0] is True):
            raise NotImplementedError("the lightseq backend does not support hybrid context parallelism")
        group = kwargs.get("cp_group")
        if group is None and args and not isinstance(args[0], bool):
            group = args[0]
        return get_batch_on_this_cp_rank(batch, cp_group=group)

    get_batch_on_this_cp_rank_.lightseq_original = original
    return get_batch_on_this_cp_rank_


class ContiguousRotaryEmbedding(RotaryEmbedding):
    """Rotary positions for the contiguous layout: rank r gets positions [r*S/P, (r+1)*S/P)."""

    @lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        emb = self.get_emb(max_seq_len, offset)  # [s, 1, 1, dim]
        group = self.cp_group if cp_group is None else cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            emb = shard(emb, layout="contiguous", rank=group.rank(), world_size=group.size(), dim=0)
        return emb


def follow_layout(model) -> None:
    """Make a built GPTModel's rotary positions follow the configured layout (zigzag needs nothing)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if active_config().layout == "zigzag" or rope is None:
        return
    if type(rope) is not RotaryEmbedding:
        raise NotImplementedError(
            f"--lightseq-layout contiguous supports plain RoPE, got {type(rope).__name__}; use the zigzag layout")
    rope.__class__ = ContiguousRotaryEmbedding
