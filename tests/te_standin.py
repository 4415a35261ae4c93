"""A stand-in for TransformerEngine's core attention (TE cannot be installed without CUDA): Megatron's
own DotProductAttention with the checkpoint behaviour of Megatron's TEDotProductAttention, read from
TransformerEngine (transformer_engine/pytorch/module/base.py, .../dot_product_attention.py) and
megatron/core/extensions/transformer_engine.py:
- ``get_extra_state``: an empty uint8 tensor when there is no FP8 state (so state_dict() and the
  torch checkpoint format carry ``core_attention._extra_state``);
- ``set_extra_state``: accepts None or that empty tensor;
- a load post-hook that forgives a missing ``core_attention._extra_state`` on strict loads;
- ``sharded_state_dict``: empty (torch_dist leaves TE's core attention out unless its softmax
  offset is learnable).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def _forgive_missing_extra_state(module, incompatible_keys) -> None:
    for key in list(incompatible_keys.missing_keys):
        if "core_attention._extra_state" in key:
            incompatible_keys.missing_keys.remove(key)


class TEStandInAttention(DotProductAttention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_post_hook(_forgive_missing_extra_state)

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise ValueError(f"expected no FP8 extra state (None or an empty tensor), got {state!r}")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}


def with_te_standin(spec):
    """``spec`` (a layer spec from get_gpt_layer_local_spec) with the stand-in as core attention."""
    spec.submodules.self_attention.submodules.core_attention = TEStandInAttention
    return spec
