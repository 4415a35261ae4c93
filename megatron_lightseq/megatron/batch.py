"""Putting a batch on this CP rank in the layout the attention expects: plain sequences, and
packed documents (their cu_seqlens over the whole sequence stay whole; every per-token entry,
tokens, labels, loss mask, position ids, is cut like the attention's tokens, the sequence padded
to whole chunks with zeros, so that padding has loss mask 0). Documents Megatron's dataloader
marks (documents.py) are read here, once per batch."""
from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from ..distattn import mask_of, shard
from .config import LightSeqConfig, layout_for
from .documents import PER_TOKEN_KEYS, flattened, merged_cu_seqlens, starts_from_eod, starts_from_positions
from .packed import Packing, in_place_of_mask, packing_of
from .versions import training_args

# Batch entries that are not per-token tensors (Megatron 0.19 keeps them in the batch dict).
_METADATA_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")


def _registered_settings() -> LightSeqConfig:
    """The settings of models whose TransformerConfig carries none: the command line's, once
    register() has them (backend.py keeps them on GPTModel.__init__)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return getattr(GPTModel.__init__, "lightseq_defaults", None) or LightSeqConfig()


def get_batch_on_this_cp_rank(batch: dict, cp_group=None, *, layout: str | None = None, cu_seqlens=None,
                              cu_seqlens_padded=None) -> dict:
    """This CP rank's share of every per-token entry of ``batch`` ([b, s, ...]; attention_mask
    [b, 1, s, s] is split along its query dim), in ``layout`` (the model's, packed.layout_for;
    by default the registered settings' layout for plain sequences, or for documents when there
    are cu_seqlens). A drop-in for Megatron-Core's: for plain sequences in the zigzag layout it
    is exactly Megatron's own split. Documents: ``cu_seqlens`` (or the batch's own entry, as
    Megatron 0.19's dataloader gives it: [1, n], or per-sample rows [b, s + 1] padded with s, which
    are merged, the samples laid end to end)."""
    group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group
    if cu_seqlens is None and batch.get("cu_seqlens") is not None:
        batch, cu_seqlens, cu_seqlens_padded = _merged(batch)
    if layout is None:
        layout = layout_for(_registered_settings(), packed=cu_seqlens is not None)
    size, rank = group.size(), group.rank()
    documents = mask_of(True, cu_seqlens, (-1, -1), cu_seqlens_padded)  # boundaries read once
    mask = dict(cu_seqlens=documents.cu_seqlens, cu_seqlens_padded=documents.cu_seqlens_padded)
    if size == 1 and cu_seqlens is None:
        return batch
    return {
        key: val if val is None or key in _METADATA_KEYS
        else shard(val, layout=layout, rank=rank, world_size=size, dim=2 if key == "attention_mask" else 1, **mask)
        for key, val in batch.items()
    }


def get_document_batch_on_this_cp_rank(batch: dict, cp_group=None, *, layout: str | None = None,
                                       eod: int | None = None) -> dict:
    """The split for Megatron's ``--reset-attention-mask`` batches: the documents read from the
    reset position ids (``eod`` None: ``--reset-position-ids``) or after each ``eod`` token, never
    from the dense mask; the samples laid end to end ([1, b * s]); and in the attention_mask slot,
    the documents the model's forward reads (packed.in_place_of_mask), rotary positions per
    sample as Megatron gives them."""
    if eod is None and batch.get("position_ids") is None:
        raise ValueError("documents from reset position ids need the batch's position_ids, got none (or give eod)")
    sample = next(batch[k] for k in PER_TOKEN_KEYS if batch.get(k) is not None)
    s = sample.shape[1]
    cu = starts_from_positions(batch["position_ids"]) if eod is None else starts_from_eod(batch["tokens"], eod)
    flat = flattened(batch)
    if layout is None:
        layout = layout_for(_registered_settings(), packed=True)
    local = get_batch_on_this_cp_rank(flat, cp_group, layout=layout, cu_seqlens=cu)
    local["attention_mask"] = in_place_of_mask(Packing(cu, None, per_document=False, sample_tokens=s))
    return local


def _merged(batch: dict):
    """(batch, cu_seqlens, cu_seqlens_padded) with the batch's per-sample cu_seqlens rows merged
    and its samples laid end to end, as Megatron 0.19's flatten_batch_for_packed_sequences does
    (already done when the rows are one row that ends at the sequence's end)."""
    sample = next(batch[k] for k in PER_TOKEN_KEYS if batch.get(k) is not None)
    s = sample.shape[1]
    rows = batch["cu_seqlens"].reshape(-1, batch["cu_seqlens"].shape[-1])
    if rows.shape[0] != sample.shape[0]:
        raise ValueError(f"cu_seqlens must have one row per sample ({sample.shape[0]}), got {rows.shape[0]}")
    padded = batch.get("cu_seqlens_padded")
    merged = merged_cu_seqlens(rows, s)
    merged_padded = None if padded is None else merged_cu_seqlens(padded.reshape(rows.shape[0], -1), s)
    if rows.shape[0] > 1:
        batch = flattened(batch)
        as_row = lambda cu: None if cu is None else torch.tensor(cu, dtype=torch.int32)[None]  # noqa: E731
        batch.update(cu_seqlens=as_row(merged), cu_seqlens_padded=as_row(merged_padded))
        if batch.get("max_seqlen") is not None:
            batch["max_seqlen"] = batch["max_seqlen"].max().reshape(1)
    return batch, merged, merged_padded


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
        cu = batch.get("cu_seqlens")
        source = _documents_source()
        if cu is None and source is not None:
            return get_document_batch_on_this_cp_rank(batch, cp_group=group, layout=layout(True), **source)
        return get_batch_on_this_cp_rank(batch, cp_group=group, layout=layout(cu is not None))

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


def _documents_source() -> dict | None:
    """None unless Megatron-LM's arguments ask for --reset-attention-mask; then where documents are
    read (get_document_batch_on_this_cp_rank's keywords): the reset position ids with
    --reset-position-ids, else after the tokenizer's EOD token."""
    args = training_args()
    if args is None or not getattr(args, "reset_attention_mask", False):
        return None
    if getattr(args, "pipeline_model_parallel_size", 1) > 2:
        raise NotImplementedError("--reset-attention-mask with the lightseq backend: Megatron hands pipeline "
                                  "stages between the first and the last no batch to read documents from; "
                                  f"use at most 2 pipeline stages, got {args.pipeline_model_parallel_size}")
    if getattr(args, "reset_position_ids", False):
        return {}
    from megatron.training import get_tokenizer

    return {"eod": get_tokenizer().eod}


def _flat(cu):
    """Boundaries as a flat int tensor (Megatron's batches may carry them [1, n])."""
    return None if cu is None else (cu.reshape(-1) if isinstance(cu, torch.Tensor) else cu)
