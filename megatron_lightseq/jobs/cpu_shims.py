"""CPU stand-ins for the few Megatron-Core helpers that insist on CUDA: for running megatron-core
models on CPU processes (the tests and the local CPU training demo), never on a GPU.

The plugin itself (backend, core attention, runner) never installs these; a CPU process calls
:func:`install` before it builds a model.
- ``torch.cuda.current_device``: Megatron passes it as ``device=`` (rotary inv_freq, buffers);
  here it returns "cpu".
- ``get_default_causal_mask``: builds its mask with ``device="cuda"``.
- ``CudaRNGStatesTracker.fork``: swaps CUDA RNG states around dropout; a no-op here (tests
  run without dropout).
- ``_get_all_rng_states`` / ``_set_all_rng_states`` (used by ``tensor_parallel.checkpoint``):
  CPU RNG state only.
- ``get_pos_emb_on_this_cp_rank``: its index tensor is pinned and moved with ``.cuda()``; the
  same zigzag selection without either.
"""
from __future__ import annotations

import contextlib

import torch


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1])
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


@contextlib.contextmanager
def _no_fork(self, name=None):
    yield


def install() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary
    import megatron.core.transformer.utils as transformer_utils
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: "cpu"
    transformer_utils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask
    tp_random.CudaRNGStatesTracker.fork = _no_fork
    tp_random._get_all_rng_states = lambda: (torch.get_rng_state(), None, None)
    tp_random._set_all_rng_states = lambda cpu_state, cuda_state, tracker_states: torch.set_rng_state(cpu_state)
    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
