"""Rotary positions that follow the plugin's layout. For plain sequences in the zigzag layout,
Megatron's own (its CP split is the same); otherwise each local token gets the rotary embedding
of its own position (packed.rotary_positions): in the sequence, or in its document for packed
"thd" data, as Megatron's per-document RoPE gives them."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from .packed import rotary_positions


class LayoutRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose ``forward`` gives this CP rank's tokens their own positions. The
    model's forward sets ``lightseq_packing`` for the batch (backend.py)."""

    lightseq_layout = "zigzag"  # the layout for plain sequences
    lightseq_packed_layout = "balanced"  # for packed documents
    lightseq_packing = None

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        group = self.cp_group if cp_group is None else cp_group
        size, rank = (group.size(), group.rank()) if group is not None else (1, 0)
        packing = self.lightseq_packing
        layout = self.lightseq_packed_layout if packing else self.lightseq_layout
        if packing is None and (layout == "zigzag" or size == 1):
            return super().forward(max_seq_len, offset, packed_seq, cp_group)  # Megatron's own split
        local, bound = rotary_positions(layout, rank, size, max_seq_len, packing, self.inv_freq.device)
        return self.get_emb(max(max_seq_len, bound), offset)[local]  # [local tokens, 1, 1, dim]


def follow_layout(model, layout: str, packed_layout: str) -> bool:
    """Make a built GPTModel's rotary positions follow the plugin's layouts; False where they cannot
    (a RoPE variant other than plain RoPE: then only plain sequences in the zigzag layout work)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return True
    if type(rope) is not RotaryEmbedding:
        if layout != "zigzag":
            raise NotImplementedError(
                f"the {layout} layout supports plain RoPE, got {type(rope).__name__}; use --lightseq-layout zigzag")
        return False
    rope.__class__ = LayoutRotaryEmbedding
    rope.lightseq_layout, rope.lightseq_packed_layout = layout, packed_layout
    return True
