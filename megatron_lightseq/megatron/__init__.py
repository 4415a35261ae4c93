"""Megatron-Core glue: the ``lightseq`` attention backend (needs ``pip install megatron-lightseq[megatron]``).

Names load on first use, so that reading the ``--lightseq-*`` flags (``config``) does not import
megatron-core's model code, which takes seconds.
"""
import importlib

_WHERE = {
    "register": "backend", "lightseq_backend": "backend", "with_lightseq_attention": "backend",
    "get_batch_on_this_cp_rank": "batch", "get_document_batch_on_this_cp_rank": "batch",
    "LightSeqConfig": "config", "add_lightseq_args": "config", "parse_lightseq_args": "config",
    "settings_of": "config",
    "LightSeqAttention": "core_attention",
    "setup": "prepare",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
