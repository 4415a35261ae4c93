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


_wired: list[LightSeqConfig] = []  # the settings the wired batch split reads, the last setup()'s
_set_up: list[list[str]] = []  # the argv list the last setup() read and rewrote


def wire_batch_split(settings: LightSeqConfig) -> None:
    """Route Megatron's get_batch_on_this_cp_rank (and get_thd_batch_on_this_cp_rank, for packed
    batches) through the plugin's layouts, those of ``settings`` (a later call's replace them:
    each function is wrapped once and reads the settings when called). Must run before the
    training script imports them."""
    _wired[:] = [settings]
    layout = lambda packed: layout_for(_wired[0], packed)  # noqa: E731
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
    backend and wire the batch split. ValueError for a command Megatron or the plugin would refuse.
    Called again with the list it rewrote (the runner, then a patched pretrain_gpt.py on the same
    sys.argv), it does nothing: the flags are gone from it, and reading it again would put the
    defaults back in place of the command's settings."""
    if _set_up and argv is _set_up[0]:
        return
    check_command(argv[1:])
    config, rest = parse_lightseq_args(argv[1:])
    register(config)
    check_backend_name(rest, list(AttnBackend.__members__))
    argv[1:] = rest
    wire_batch_split(config)
    _set_up[:] = [argv]
