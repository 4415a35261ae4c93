"""Putting a batch on this CP rank in the layout the attention expects."""
from __future__ import annotations

from collections.abc import Callable

from megatron.core import parallel_state

from ..distattn.layout import shard

# Batch entries that are not per-token tensors (Megatron 0.19 keeps them in the batch dict).
_METADATA_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")


def get_batch_on_this_cp_rank(batch: dict, cp_group=None, *, layout: str) -> dict:
    """This CP rank's share of every per-token entry of ``batch`` ([b, s, ...]; attention_mask
    [b, 1, s, s] is split along its query dim), in ``layout`` (the model's
    ``LightSeqConfig.layout``). For zigzag this is exactly Megatron-Core's own split."""
    group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group
    size, rank = group.size(), group.rank()
    if any(batch.get(key) is not None for key in ("cu_seqlens", "cu_seqlens_padded")):
        raise NotImplementedError("the lightseq backend does not take packed sequences (cu_seqlens)")
    if size == 1:
        return batch
    return {
        key: val if val is None or key in _METADATA_KEYS
        else shard(val, layout=layout, rank=rank, world_size=size, dim=2 if key == "attention_mask" else 1)
        for key, val in batch.items()
    }


def wired_batch_split(original, layout: str, active: Callable[[], bool]):
    """A stand-in for Megatron's get_batch_on_this_cp_rank (any version's signature) that splits
    in ``layout`` while ``active()`` (the lightseq backend is the one parsed), and calls
    ``original`` otherwise."""

    def get_batch_on_this_cp_rank_(batch, *args, **kwargs):
        if not active():
            return original(batch, *args, **kwargs)
        if kwargs.get("is_hybrid_cp") or (args and args[0] is True):
            raise NotImplementedError("the lightseq backend does not support hybrid context parallelism")
        group = kwargs.get("cp_group")
        if group is None and args and not isinstance(args[0], bool):
            group = args[0]
        return get_batch_on_this_cp_rank(batch, cp_group=group, layout=layout)

    get_batch_on_this_cp_rank_.lightseq_original = original
    return get_batch_on_this_cp_rank_
