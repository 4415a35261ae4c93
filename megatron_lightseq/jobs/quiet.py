"""Third-party warnings that say nothing to a run on CPU processes (the demo job, the CPU mode),
filtered by message, each with why it is noise there. Anything else still prints."""
from __future__ import annotations

import logging
import re
import warnings

# (a part of the message, why it says nothing on CPU processes)
WARNINGS = (
    ("Apex is not installed", "megatron-core falls back to torch's norms: the local layers are what runs on CPU"),
    ("Transformer Engine and Apex are not installed",
     "megatron-core falls back to torch's optimizers and multi-tensor ops: what runs on CPU"),
    ("Only transformer-engine>=1.7.0 supports MoE experts",
     "core_v0.19.0's note that TransformerEngine (absent on CPU) would run MoE experts: the local layers do"),
    ("MimoModelConfig is experimental", "core_v0.19.0 warns on import about a model config the run does not use"),
    ("absl.logging is not installed", "megatron-core logs through Python's logging instead: nothing is lost"),
    ("full scope is deprecated", "TransformerConfig's note on its own default cuda_graph_scope; no graph is captured"),
    ("set the environment variable CUDA_DEVICE_MAX_CONNECTIONS", "a CUDA stream setting"),
    ("Constraints for invoking optimized fused softmax kernel are not met",
     "the fused softmax is a CUDA kernel, off on CPU (--no-masked-softmax-fusion)"),
    ("'pin_memory' argument is set as true but no accelerator is found", "pinned memory is for copies to a GPU"),
    ("Overriding default arguments for tokenizer_type",
     "pretrain_gpt.py's default tokenizer, replaced by the command's own --tokenizer-type"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", "torch's note to Megatron's code, not to the run"),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", "torch's note to Megatron's code, not to the run"),
)
# (logger, message, why): Megatron's logged warnings of the same kind.
LOGGED = (
    ("megatron.core.tensor_parallel.random", "CPU RNG state changed within GPU RNG context",
     "on CPU processes every op draws from torch's CPU generator, not from the CUDA generator that Megatron's "
     "RNG tracker swaps (so dropout masks and TP-sharded initialization differ from a GPU run's: the README says "
     "which flags make runs comparable)"),
)


class _Drop(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return self.message not in record.getMessage()


def quiet_third_party() -> None:
    """Filter this process's copies of the warnings above (before the modules that warn are imported)."""
    for message, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + re.escape(message))
    for logger, message, _ in LOGGED:
        logging.getLogger(logger).addFilter(_Drop(message))
