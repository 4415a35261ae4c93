"""Documents from Megatron-LM's own data pipeline, as the one packed sequence the plugin balances
over the CP group (never padded per document).

Megatron marks documents inside its samples in two ways:
- ``--dataloader-inter-document-masking`` (core_v0.19.0): GPTDataset gives each sample its
  ``cu_seqlens``, padded to ``seq_length + 1`` entries with ``seq_length`` so that samples stack;
  a micro-batch holds ``[b, seq_length + 1]`` such rows (pretrain_gpt.py merges them itself, with
  flatten_batch_for_packed_sequences, before the CP split; :func:`merged_cu_seqlens` does it
  where that has not happened).
- ``--reset-attention-mask`` (every tag): the dataset builds a dense ``[s, s]`` block mask with a
  document ending after each EOD token. Its boundaries are read from the batch in O(sequence),
  never from that mask: where ``--reset-position-ids`` restarts the positions, a document starts
  at each position 0 (:func:`starts_from_positions`), otherwise after each EOD token
  (:func:`starts_from_eod`).

A micro-batch of more than one sample becomes one sequence ``[1, b * s]``, the samples end to end
(as Megatron's own flatten does for "thd"): no document crosses a sample, and one set of
boundaries covers the batch.
"""
from __future__ import annotations

import torch

# The per-token entries of Megatron's batches; everything else (cu_seqlens, max_seqlen, ...) is metadata.
PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def merged_cu_seqlens(rows, seq_length: int) -> tuple[int, ...]:
    """One set of boundaries over ``len(rows) * seq_length`` tokens from per-sample ``rows``
    ([b, n], each from 0 to ``seq_length`` and then padded with ``seq_length``)."""
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else [list(r) for r in rows]
    if rows and not isinstance(rows[0], list):
        rows = [rows]
    merged = [0]
    for j, row in enumerate(rows):
        if seq_length not in row or row[0] != 0:
            raise ValueError(f"cu_seqlens row {j} must run from 0 to the sample's length {seq_length} "
                             f"(then padded with {seq_length}), got {row}")
        real = row[1:row.index(seq_length) + 1]
        if any(b <= a for a, b in zip([0] + real, real)):
            raise ValueError(f"cu_seqlens row {j} must increase up to {seq_length}, got {row}")
        merged += [j * seq_length + x for x in real]
    return tuple(merged)


def starts_from_positions(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Boundaries over the samples end to end from reset position ids ([b, s]): a document starts
    where its position is 0 (every sample's first token is)."""
    b, s = position_ids.shape
    if not bool((position_ids[:, 0] == 0).all()):
        raise ValueError(f"reset position ids must be 0 at each sample's first token, got {position_ids[:, 0].tolist()}")
    starts = torch.nonzero(position_ids.reshape(-1) == 0).reshape(-1).tolist()
    return tuple(starts) + (b * s,)


def starts_from_eod(tokens: torch.Tensor, eod: int) -> tuple[int, ...]:
    """Boundaries over the samples end to end where a document ends at each EOD token ([b, s]),
    and at each sample's end."""
    b, s = tokens.shape
    after_eod = (torch.nonzero(tokens.reshape(-1) == eod).reshape(-1) + 1).tolist()
    return tuple(sorted(set(after_eod) | set(range(0, b * s + 1, s))))


def flattened(batch: dict) -> dict:
    """The batch with its per-token entries [b, s] laid end to end as [1, b * s] and no dense
    attention mask; the other entries as they are."""
    return {key: (val.reshape(1, -1) if key in PER_TOKEN_KEYS and val is not None
                  else None if key == "attention_mask" else val)
            for key, val in batch.items()}
