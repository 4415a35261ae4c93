"""Everything that differs between the megatron-core versions we support (0.16 .. 0.19), in one
place. Nothing else in the plugin branches on a version."""
from __future__ import annotations

import importlib

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing  # noqa: F401 (0.14 .. 0.19)

# Modules through which pretrain_gpt.py reaches Megatron's CP batch split: 0.16's script imports
# it from megatron.training.utils (a re-export), 0.19's from megatron.core.utils.
BATCH_SPLIT_MODULES = ("megatron.core.utils", "megatron.training.utils")


def cp_group_from(pg_collection, kwargs: dict):
    """The context-parallel group a core attention was built for: pg_collection (0.15+),
    model_comm_pgs (0.14), else the global parallel state."""
    pgs = pg_collection if pg_collection is not None else kwargs.get("model_comm_pgs")
    group = getattr(pgs, "cp", None) if pgs is not None else None
    return group if group is not None else parallel_state.get_context_parallel_group()


def training_args():
    """Megatron-LM's parsed arguments when megatron.training is importable and has parsed them."""
    try:
        global_vars = importlib.import_module("megatron.training.global_vars")
    except ImportError:
        return None
    return getattr(global_vars, "_GLOBAL_ARGS", None)
