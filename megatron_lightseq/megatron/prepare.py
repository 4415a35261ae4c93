"""One call that readies a Megatron-LM training script for the lightseq backend; what the runner
does before running the script, and all that the patches add to pretrain_gpt.py."""
from __future__ import annotations

import importlib

from .backend import register
from .batch import wired_batch_split
from .config import configure, parse_lightseq_args
from .versions import BATCH_SPLIT_MODULES


def wire_batch_split() -> None:
    """Route Megatron's get_batch_on_this_cp_rank through the plugin's layout. Needed only for the
    contiguous layout (zigzag is Megatron's own split), harmless otherwise. Must run before the
    training script imports the function."""
    for name in BATCH_SPLIT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "get_batch_on_this_cp_rank", None)
        if current is not None and not hasattr(current, "lightseq_original"):
            module.get_batch_on_this_cp_rank = wired_batch_split(current)


def setup(argv: list[str]) -> None:
    """Take the --lightseq-* flags out of ``argv`` (in place), apply them, register the backend and
    wire the batch split."""
    config, rest = parse_lightseq_args(argv[1:])
    argv[1:] = rest
    configure(config)
    register()
    wire_batch_split()
