"""The plugin's settings: one frozen dataclass and the ``--lightseq-*`` flags that fill it, parsed here
and nowhere else.

A model's settings travel with it: a ``LightSeqConfig`` set as the ``lightseq`` attribute of its
TransformerConfig, else the command line's (``setup()`` hands them to ``register()``); the spec
rewrite puts them into each core attention's ModuleSpec params. No module global is read when a
model is built, so models with different settings can live in one process.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..distattn.transport.failures import DEFAULT_TIMEOUT
from ..distattn import LAYOUTS

LAYOUT_CHOICES = LAYOUTS + ("auto",)
KV_WIRE_CHOICES = ("none", "int8")  # the flag's spelling of dist_attn's kv_wire (None, "int8")
from ..distattn.plan.schedules import SCHEDULE_CHOICES
from ..kernels import kernel_names


@dataclass(frozen=True)
class LightSeqConfig:
    schedule: str = "auto"
    """DistAttn schedule: ring, lightseq or auto (docs/schedules.md)."""
    layout: str = "auto"
    """Token layout over the CP group: auto (zigzag for plain sequences, balanced for packed
    documents), zigzag (Megatron-Core's own CP split: its batch split and rotary positions are
    used as they are for plain sequences), contiguous, balanced (docs/masks.md)."""
    kernel: str = "auto"
    """Block kernel name (megatron_lightseq.kernels)."""
    remat: bool = True
    """Under Megatron's activation recompute, reuse the first pass's attention output and LSE
    instead of running the attention forward again (--lightseq-no-remat turns it off)."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds a rank waits for one step's transfers before it fails, naming the ranks and the layer
    (docs/reliability.md); well below Megatron's process-group timeout."""
    kv_wire: str = "none"
    """How K/V travel between CP ranks: none, in the model's dtype; int8, quantized (half of bf16's
    bytes, docs/kv_wire.md); results and gradients keep their dtype."""

    def __post_init__(self) -> None:
        choices = {"schedule": SCHEDULE_CHOICES, "layout": LAYOUT_CHOICES, "kernel": kernel_names(),
                   "kv_wire": KV_WIRE_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--lightseq-{name.replace('_', '-')} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < float("inf")):
            raise ValueError(f"--lightseq-timeout must be a positive number of seconds, got {self.timeout!r}")


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"megatron-lightseq flags: {message}")


def add_lightseq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--lightseq-*`` flags (usable as Megatron's ``extra_args_provider``)."""
    group = parser.add_argument_group("megatron-lightseq")
    defaults = LightSeqConfig()
    group.add_argument("--lightseq-schedule", choices=SCHEDULE_CHOICES, default=defaults.schedule,
                       help="DistAttn schedule (default: auto, the cheapest plan for the layout)")
    group.add_argument("--lightseq-layout", choices=LAYOUT_CHOICES, default=defaults.layout,
                       help="token layout over the context-parallel group (default: auto, Megatron's own zigzag "
                            "for plain sequences, balanced for packed documents)")
    group.add_argument("--lightseq-kernel", choices=kernel_names(), default=defaults.kernel,
                       help="block attention kernel (default: auto)")
    group.add_argument("--lightseq-no-remat", dest="lightseq_remat", action="store_false",
                       help="under activation recompute, run the attention forward again (Megatron's plain "
                            "behaviour) instead of reusing the first pass's output and LSE")
    group.add_argument("--lightseq-timeout", type=float, default=defaults.timeout, metavar="SECONDS",
                       help=f"fail a rank that waits this long for one attention step's transfers, naming the "
                            f"ranks it waits for and the layer (default {defaults.timeout:g})")
    group.add_argument("--lightseq-kv-wire", choices=KV_WIRE_CHOICES, default=defaults.kv_wire,
                       help="send K/V between context-parallel ranks as int8 with per-channel K and per-token V "
                            "scales (half of bf16's bytes; the attention still computes in the model's dtype), "
                            "or as they are (default: none)")
    return parser


def config_from_namespace(ns: argparse.Namespace) -> LightSeqConfig:
    return LightSeqConfig(schedule=ns.lightseq_schedule, layout=ns.lightseq_layout, kernel=ns.lightseq_kernel,
                          remat=ns.lightseq_remat, timeout=ns.lightseq_timeout, kv_wire=ns.lightseq_kv_wire)


def parse_lightseq_args(argv: list[str]) -> tuple[LightSeqConfig, list[str]]:
    """(config, the other arguments): takes the ``--lightseq-*`` flags out of ``argv``."""
    parser = add_lightseq_args(_RaisingParser(add_help=False, allow_abbrev=False))
    ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--lightseq")]
    if unknown:
        known = [flag for action in parser._actions for flag in action.option_strings]
        raise ValueError(f"megatron-lightseq flags: unknown {unknown}; known: {', '.join(known)}")
    return config_from_namespace(ns), rest


def layout_for(settings: LightSeqConfig, packed: bool) -> str:
    """The layout a model's settings give for plain or packed data (auto resolved)."""
    if settings.layout != "auto":
        return settings.layout
    return "balanced" if packed else "zigzag"


def kv_wire_of(settings: LightSeqConfig) -> str | None:
    """dist_attn's kv_wire for a model's settings."""
    return None if settings.kv_wire == "none" else settings.kv_wire


def settings_of(transformer_config) -> LightSeqConfig | None:
    """The settings a TransformerConfig carries (its ``lightseq`` attribute), or None."""
    settings = getattr(transformer_config, "lightseq", None)
    if settings is not None and not isinstance(settings, LightSeqConfig):
        raise ValueError(f"TransformerConfig.lightseq must be a LightSeqConfig, got {type(settings).__name__}")
    return settings
