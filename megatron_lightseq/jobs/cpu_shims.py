"""CPU stand-ins for the few Megatron-Core helpers that insist on CUDA: for running megatron-core
models on CPU processes (the tests and the local CPU training demo), never on a GPU.

The plugin itself (backend, core attention, runner) never installs these; a CPU process calls
:func:`install` before it builds a model.
- ``torch.cuda.current_device``: Megatron passes it as ``device=`` (rotary inv_freq, buffers);
  here it returns "cpu".
- ``get_default_causal_mask``, ``get_sliding_window_causal_mask``: build their masks with
  ``device="cuda"``.
- ``CudaRNGStatesTracker.fork``: swaps CUDA RNG states around dropout; a no-op here (tests
  run without dropout).
- ``_get_all_rng_states`` / ``_set_all_rng_states`` (used by ``tensor_parallel.checkpoint``):
  CPU RNG state only.
- ``get_pos_emb_on_this_cp_rank``: its index tensor is pinned and moved with ``.cuda()``; the
  same zigzag selection without either.
- ``WrappedTorchNorm`` (the local layers' norm) with ``--sequence-parallel``
  (:func:`sequence_parallel_torch_norm`, also used by the CPU mode).
"""
from __future__ import annotations

import contextlib
import copy

import torch


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """Megatron's mask (True = hidden) for a (left, right) window, on the CPU."""
    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window_size[0]).tril(skv - sq + window_size[1])
    return ~allowed


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1])
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


@contextlib.contextmanager
def _no_fork(self, name=None):
    yield


def sequence_parallel_torch_norm() -> None:
    """Let Megatron's torch norm (``WrappedTorchNorm``, 0.16 and 0.19) run under sequence parallelism,
    which only Apex's and TransformerEngine's norms (CUDA) accept. Under SP each TP rank normalizes
    its own tokens with a replicated weight, so the weight's gradient is a sum over the TP group:
    Megatron's ``finalize_model_grads`` all-reduces the parameters marked ``sequence_parallel``, and
    the norm is marked as Apex's ``FusedLayerNorm`` marks its own. Idempotent."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build = WrappedTorchNorm.__new__
    if getattr(build, "lightseq_sequence_parallel", False):
        return

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        unsplit = copy.copy(config)  # the same norm, past WrappedTorchNorm's assert
        unsplit.sequence_parallel = False
        norm = build(cls, unsplit, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__.lightseq_sequence_parallel = True
    WrappedTorchNorm.__new__ = __new__


def install() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary
    import megatron.core.transformer.utils as transformer_utils
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: "cpu"
    transformer_utils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask
    transformer_utils.get_sliding_window_causal_mask = _sliding_window_mask
    fused_softmax.get_sliding_window_causal_mask = _sliding_window_mask
    tp_random.CudaRNGStatesTracker.fork = _no_fork
    tp_random._get_all_rng_states = lambda: (torch.get_rng_state(), None, None)
    tp_random._set_all_rng_states = lambda cpu_state, cuda_state, tracker_states: torch.set_rng_state(cpu_state)
    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    sequence_parallel_torch_norm()
