"""The core attention Megatron builds into every self-attention layer when the backend is lightseq.

Megatron's contract: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (RoPE already
applied, np/ng the heads on this tensor-parallel rank) -> ``[sq, b, np * hn]``; in the packed
"thd" format ``[t, np, hn]`` -> ``[t, np * hn]``. The sequence is this rank's share of the
context-parallel group's sequence, in the layout of its settings (which the spec rewrite passes
as ModuleSpec params). Packed documents come in ``packed_seq_params`` (packed.py), a sliding
window in ``config.window_size``. Megatron's ``cp_comm_type`` (p2p, all_gather, a2a, a2a+p2p)
picks the groups: the plan over the CP group, or the hybrid all-to-all around it (cp_groups.py).
"""
from __future__ import annotations

import warnings

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..distattn import dist_attn, dist_attn_from_saved
from ..distattn import split_problem
from .config import LightSeqConfig, kv_wire_of, layout_for
from .cp_groups import attention_groups, cp_comm_of
from .packed import packing_of, window_of
from .remat import AttentionStash
from .versions import cp_group_from, is_checkpointing

_SUPPORTED_MASKS = (AttnMaskType.causal, AttnMaskType.no_mask)


class LightSeqAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 cp_comm_type: str | None = None, softmax_scale: float | None = None, pg_collection=None,
                 settings: LightSeqConfig = LightSeqConfig(), **kwargs) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise NotImplementedError(f"the lightseq backend does self-attention only, got {attention_type!r}")
        if config.attention_dropout:
            raise NotImplementedError(
                f"the lightseq backend has no attention dropout; set --attention-dropout 0 "
                f"(got {config.attention_dropout})")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.cp_group = cp_group_from(pg_collection, kwargs)
        self.cp_comm_type = cp_comm_of(cp_comm_type, layer_number)
        self.groups = attention_groups(self.cp_comm_type, self.cp_group, pg_collection)
        if self.groups.get("heads_group") is not None:  # a bad split fails when the model is built
            tp = config.tensor_model_parallel_size
            problem = split_problem(self.cp_group.size(), self.groups["heads_group"].size(),
                                    config.num_attention_heads // tp, max(1, config.num_query_groups // tp))
            if problem:
                raise ValueError(f"--cp-comm-type {self.cp_comm_type}: {problem}")
        self.settings = settings
        self.stash = AttentionStash()
        if settings.remat and (getattr(config, "fp8", None) or getattr(config, "fp4", None)) \
                and getattr(config, "recompute_granularity", None) == "full":
            # Megatron checkpoints fp8/fp4 layers with TransformerEngine's checkpoint, in which
            # tensor_parallel's is_checkpointing() is False: remat cannot tell the passes apart.
            warnings.warn("lightseq remat is off with --fp8/--fp4 and full recompute: Megatron uses "
                          "TransformerEngine's checkpoint there, so the attention forward and its communication "
                          "run again in every recompute (correct, not faster); pass --lightseq-no-remat to "
                          "silence this", stacklevel=2)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in _SUPPORTED_MASKS:
            raise NotImplementedError(f"the lightseq backend supports causal and no_mask attention, got {mask_type}")
        if attention_bias is not None:
            raise NotImplementedError("the lightseq backend does not take an attention_bias")
        packing = packing_of(packed_seq_params)
        if packed_seq_params is not None and packing is None:
            raise NotImplementedError("the lightseq backend takes packed_seq_params with cu_seqlens_q, got none")
        # attention_mask is ignored as by Megatron's TE backends: with mask type causal it is the
        # causal mask, which the kernels apply from token positions; with no_mask there is none.
        s = self.settings
        thd = query.dim() == 3  # packed "thd" tensors straight from Megatron's attention: one sequence
        if thd and self.cp_group.size() > 1:
            raise NotImplementedError(
                "the lightseq backend takes packed thd data through GPTModel, whose forward gives the rotary "
                "positions of the plugin's layout; Megatron's own thd RoPE assumes TransformerEngine's CP split")
        q, k, v = (x.unsqueeze(0) if thd else x.transpose(0, 1) for x in (query, key, value))  # [b, s, heads, hn]
        options = dict(**self.groups, layout=layout_for(s, packed=packing is not None), schedule=s.schedule,
                       causal=mask_type == AttnMaskType.causal, window_size=window_of(self.config, self.layer_number),
                       softmax_scale=self.softmax_scale, kernel=s.kernel, timeout=s.timeout, kv_wire=kv_wire_of(s),
                       label=f"layer {self.layer_number}", **(packing.mask if packing else {}))
        if s.remat and is_checkpointing() and not torch.is_grad_enabled():  # first pass of a checkpoint
            # backward=True: its recompute differentiates this result, so the group agrees on the
            # backward kernels now, before any transfer, and the recompute agrees nothing.
            out_BSHD, lse = dist_attn(q, k, v, return_lse=True, backward=True, **options)
            self.stash.push(q, k, v, out_BSHD, lse)
        elif s.remat and is_checkpointing():  # its recompute: no attention forward, no communication
            out_BSHD = dist_attn_from_saved(q, k, v, *self.stash.pop(q, k, v), **options)
        else:
            out_BSHD = dist_attn(q, k, v, **options)
        if thd:
            return out_BSHD[0].reshape(query.shape[0], -1)
        sq, b, np_, hn = query.shape
        return out_BSHD.transpose(0, 1).reshape(sq, b, np_ * hn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written with TransformerEngine's core attention in this slot holds its FP8
        # metadata under <prefix>_extra_state (an empty tensor without FP8; torch checkpoint format,
        # torch_dist leaves it out): nothing this attention keeps, so a strict load drops it rather
        # than call it unexpected. The other way needs nothing: TE's DotProductAttention forgives a
        # missing core_attention._extra_state itself.
        state_dict.pop(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
