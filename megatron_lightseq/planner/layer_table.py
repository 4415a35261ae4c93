"""The per-layer table for one configuration (``plan --tp T --cp C --pp P``): per sequence length,
the plugin's flat plans, Megatron TP and TP+SP on the same node's GPUs and Megatron's CP ring,
each with its bytes, steps, time per layer, memory and longest sequence; as data, one Row each.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .attention import NO_CP, Comm
from .config import Config, tp_sizes
from .flags import training_flags
from .memory import max_sequence, memory
from .model import Machine, ModelSpec, machine_lines, model_text, token_label
from .step import estimate

LIGHTSEQ_VARIANTS = (("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq"))


@dataclass(frozen=True)
class Row:
    seq: int
    system: str
    traffic_bytes: float  # a GPU's, per layer, fwd+bwd (with the recompute's), mean over the GPUs
    steps: int  # attention steps per pass (1 for TP)
    seconds: float  # per layer, fwd+bwd (with the recompute), one micro-batch
    memory_bytes: float
    max_seq: int
    flags: str


def tp_baseline(model: ModelSpec, cfg: Config, gpus_per_node: int, *, sp: bool) -> Config:
    """Megatron TP over the configuration's TP x CP GPUs of one node (at most): the largest TP
    Megatron allows there, the rest data parallel."""
    pool = cfg.tp * cfg.cp * cfg.dp
    tp = max(t for t in tp_sizes(model, pool, gpus_per_node) if t <= cfg.tp * cfg.cp)
    return replace(cfg, tp=tp, cp=1, dp=pool // tp, sp=sp and tp > 1, comm=NO_CP,
                   microbatches=max(1, cfg.dp * cfg.microbatches // (pool // tp)))


def configs_for(model: ModelSpec, cfg: Config, gpus_per_node: int) -> list[tuple[str, Config]]:
    rows = [(f"lightseq {layout}/{schedule}", replace(cfg, comm=Comm("lightseq", 1, layout, schedule)))
            for layout, schedule in LIGHTSEQ_VARIANTS]
    for sp in (False, True):
        tp = tp_baseline(model, cfg, gpus_per_node, sp=sp)
        rows.append((f"megatron TP={tp.tp}" + ("+SP" if tp.sp else ""), tp))
    rows.append(("megatron CP (TE ring)", replace(cfg, comm=Comm("megatron"))))
    return rows


def granularity(cfg: Config) -> int:
    """Sequence lengths the max-seq column steps by: a multiple of 2 x CP (Megatron's zigzag split)
    and of 1K tokens."""
    return math.lcm(2 * cfg.cp, 1024) if cfg.cp > 1 else 1024


def rows_for(model: ModelSpec, seq: int, cfg: Config, gpus_per_node: int, m: Machine) -> list[Row]:
    rows = []
    for name, c in configs_for(model, cfg, gpus_per_node):
        e = estimate(model, seq, c, gpus_per_node, m)
        longest = max_sequence(lambda n: memory(model, n, c).total, m, granularity(c))
        rows.append(Row(seq, name, e.attention.intra + e.attention.inter + e.tp_bytes, e.attention.steps,
                        e.layer_seconds, e.memory.total, longest, training_flags(c)))
    return rows


def assumptions(model: ModelSpec, cfg: Config, gpus_per_node: int, m: Machine) -> list[str]:
    """The lines above the table: the model, the machine, the constants and what each column counts."""
    usable = m.budget_bytes / 2**30
    states = "params+grads+optimizer sharded (FSDP)" if cfg.fsdp else "optimizer sharded (distributed optimizer)"
    return [
        f"{model_text(model)}; micro-batch 1, {cfg.recompute} recompute; {states}; TP {cfg.tp} x CP {cfg.cp} x "
        f"PP {cfg.pp} x DP {cfg.dp}, {cfg.microbatches} micro-batches per step",
        *machine_lines(m, cfg.gpus, gpus_per_node),
        "PREDICTIONS from these constants, not measurements; columns, per transformer layer of one micro-batch:",
        "  MiB/GPU/layer  bytes a GPU sends, forward + backward (and the recompute's forward where it sends again), "
        "mean over the GPUs",
        "  steps          attention steps per pass (the backward has as many): in each, a GPU computes a block while "
        "the next one's inputs travel; 1: attention without exchange",
        "  ms/layer       predicted time, forward + backward with the recompute",
        f"  GiB/GPU        predicted peak memory per GPU (model states and activations); (OOM): over {usable:.1f} GiB",
        f"  max seq        the longest sequence whose memory fits {usable:.1f} GiB per GPU",
    ]


def table(model: ModelSpec, cfg: Config, gpus_per_node: int, m: Machine, by_seq: dict, recommended: dict,
          what: str = "") -> str:
    """``recommended``: seq -> (name, flags) or None; ``what``: the masked table the flags follow."""
    lines = [*assumptions(model, cfg, gpus_per_node, m),
             f"{'seq':>6} {'system':<26} {'MiB/GPU/layer':>13} {'steps':>5} {'ms/layer':>9} {'GiB/GPU':>8} "
             f"{'max seq':>8}"]
    for seq, rows in by_seq.items():
        for r in rows:
            fits = "" if r.memory_bytes <= m.budget_bytes else " (OOM)"
            lines.append(f"{token_label(seq):>6} {r.system:<26} {r.traffic_bytes / 2**20:>13.1f} {r.steps:>5} "
                         f"{r.seconds * 1e3:>9.2f} {r.memory_bytes / 2**30:>8.1f} {token_label(r.max_seq):>8}{fits}")
        best = recommended[seq]
        if best:
            lines.append(f"{'':>6} -> {best[0]}" + (f" (chosen from the {what} table below)" if what else "")
                         + f": {best[1]}")
        else:
            lines.append(f"{'':>6} -> no LightSeq plan fits {m.gpu_memory_gib:g} GiB per GPU at {token_label(seq)} "
                         f"(max seq: the longest that fits); use more GPUs, a shorter sequence"
                         + ("" if cfg.fsdp else " or --fsdp"))
    return "\n".join(lines)


def as_json(model: ModelSpec, m: Machine, cfg: Config, gpus_per_node: int, by_seq: dict, recommended: dict,
            splits: dict, masks: dict) -> dict:
    """The per-layer table as data: rows, the recommendation (null where nothing fits), the CP
    group's splits and the --docs/--window rows, per sequence."""
    return {"model": asdict(model), "machine": asdict(m), "config": cfg.name, "gpus": cfg.gpus,
            "gpus_per_node": gpus_per_node, "rows": [asdict(r) for rows in by_seq.values() for r in rows],
            "recommended": {seq: best and best[0] for seq, best in recommended.items()},
            "recommended_flags": {seq: best and best[1] for seq, best in recommended.items()},
            "sbatch": {seq: best and best[2] for seq, best in recommended.items()},
            "hybrid": splits, "masks": {seq: [asdict(r) for r in v[1]] for seq, v in masks.items() if v}}
