"""Megatron-Core glue: the ``lightseq`` attention backend (needs ``pip install megatron-lightseq[megatron]``)."""
from .backend import lightseq_backend, register, with_lightseq_attention
from .batch import get_batch_on_this_cp_rank
from .config import LightSeqConfig, active_config, add_lightseq_args, configure, parse_lightseq_args
from .core_attention import LightSeqAttention
from .setup import setup

__all__ = ["register", "setup", "get_batch_on_this_cp_rank", "LightSeqAttention", "LightSeqConfig", "configure",
           "active_config", "add_lightseq_args", "parse_lightseq_args", "lightseq_backend", "with_lightseq_attention"]
