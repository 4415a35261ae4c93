"""One call that readies a Megatron-LM training script for the lightseq backend; what the runner
does before running the script, and all that the patches add to pretrain_gpt.py."""
from __future__ import annotations

import importlib

from megatron.core.transformer.enums import AttnBackend

from .backend import NAME, register
from .batch import wired_batch_split, wired_thd_batch_split
from .config import LightSeqConfig, layout_for, parse_lightseq_args
from .flags import check_backend_name, check_command
from .versions import BATCH_SPLIT_MODULES, training_args


def lightseq_active() -> bool:
    """True unless Megatron-LM's parsed arguments name another attention backend."""
    args = training_args()
    return args is None or getattr(args, "attention_backend", None) == AttnBackend[NAME]


def wire_batch_split(settings: LightSeqConfig) -> None:
    """Route Megatron's get_batch_on_this_cp_rank (and get_thd_batch_on_this_cp_rank, for packed
    batches) through the plugin's layouts. Must run before the training script imports them."""
    layout = lambda packed: layout_for(settings, packed)  # noqa: E731
    wrappers = {"get_batch_on_this_cp_rank": wired_batch_split, "get_thd_batch_on_this_cp_rank": wired_thd_batch_split}
    for name in BATCH_SPLIT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for function, wrap in wrappers.items():
            current = getattr(module, function, None)
            if current is not None and not hasattr(current, "lightseq_original"):
                setattr(module, function, wrap(current, layout, lightseq_active))


def setup(argv: list[str]) -> None:
    """Check the command's flags that the backend depends on (flags.py), take the --lightseq-* flags
    out of ``argv`` (in place), make them the settings of the models the script builds, register the
    backend and wire the batch split. ValueError for a command Megatron or the plugin would refuse."""
    check_command(argv[1:])
    config, rest = parse_lightseq_args(argv[1:])
    register(config)
    check_backend_name(rest, list(AttnBackend.__members__))
    argv[1:] = rest
    wire_batch_split(config)
