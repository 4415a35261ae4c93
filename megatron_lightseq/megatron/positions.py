"""Rotary positions that follow the token layout: zigzag is Megatron's own CP split (its rotary
positions are right as they are); the contiguous layout needs rank r's positions [r*S/P, (r+1)*S/P)."""
from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..distattn.layout import shard


class ContiguousRotaryEmbedding(RotaryEmbedding):
    """Rotary positions for the contiguous layout: rank r gets positions [r*S/P, (r+1)*S/P)."""

    @lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        emb = self.get_emb(max_seq_len, offset)  # [s, 1, 1, dim]
        group = self.cp_group if cp_group is None else cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            emb = shard(emb, layout="contiguous", rank=group.rank(), world_size=group.size(), dim=0)
        return emb


def follow_layout(model, layout: str) -> None:
    """Make a built GPTModel's rotary positions follow ``layout`` (zigzag needs nothing)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if layout == "zigzag" or rope is None:
        return
    if type(rope) is not RotaryEmbedding:
        raise NotImplementedError(
            f"--lightseq-layout contiguous supports plain RoPE, got {type(rope).__name__}; use the zigzag layout")
    rope.__class__ = ContiguousRotaryEmbedding
