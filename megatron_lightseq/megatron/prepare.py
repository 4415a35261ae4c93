"""One call that readies a Megatron-LM training script for the lightseq backend; what the runner
does before running the script, and all that the patches add to pretrain_gpt.py."""
from __future__ import annotations

import importlib

from megatron.core.transformer.enums import AttnBackend

from .backend import NAME, register
from .batch import wired_batch_split
from .config import parse_lightseq_args
from .versions import BATCH_SPLIT_MODULES, training_args


def lightseq_active() -> bool:
    """True unless Megatron-LM's parsed arguments name another attention backend."""
    args = training_args()
    return args is None or getattr(args, "attention_backend", None) == AttnBackend[NAME]


def wire_batch_split(layout: str) -> None:
    """Route Megatron's get_batch_on_this_cp_rank through the plugin's ``layout``. Needed only for
    the contiguous layout (zigzag is Megatron's own split), harmless otherwise. Must run before the
    training script imports the function."""
    for name in BATCH_SPLIT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "get_batch_on_this_cp_rank", None)
        if current is not None and not hasattr(current, "lightseq_original"):
            module.get_batch_on_this_cp_rank = wired_batch_split(current, layout, lightseq_active)


def setup(argv: list[str]) -> None:
    """Take the --lightseq-* flags out of ``argv`` (in place), make them the settings of the models
    the script builds, register the backend and wire the batch split."""
    config, rest = parse_lightseq_args(argv[1:])
    argv[1:] = rest
    register(config)
    wire_batch_split(config.layout)
