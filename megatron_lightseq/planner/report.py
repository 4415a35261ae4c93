"""The comparison table the ``plan`` command prints, as data: one row per (sequence, system)."""
from __future__ import annotations

from dataclasses import dataclass

from ..distattn import build_plan
from .memory import lightseq_memory, max_sequence, tp_memory
from .model import Machine, ModelSpec
from .timing import lightseq_seconds, tp_degree, tp_seconds
from .traffic import lightseq_traffic, megatron_cp_traffic, tp_traffic

LIGHTSEQ_VARIANTS = (("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq"))


@dataclass(frozen=True)
class Row:
    seq: int
    system: str
    traffic_bytes: int  # per GPU per layer, fwd+bwd
    steps: int  # attention steps per pass (1 for TP)
    seconds: float  # per layer, fwd+bwd
    memory_bytes: float
    max_seq: int
    flags: str


def lightseq_flags(gpus: int, layout: str, schedule: str, *, fsdp: bool = False, window: int = -1) -> str:
    """Megatron's flags for a LightSeq run; ``layout`` may be auto (the plugin's: zigzag for plain
    sequences, balanced for packed documents); a window is the model's own (--window-size)."""
    return (f"--context-parallel-size {gpus} --attention-backend lightseq --lightseq-layout {layout} "
            f"--lightseq-schedule {schedule} --attention-dropout 0 --recompute-granularity full "
            f"--recompute-method uniform --recompute-num-layers 1" + (" --use-megatron-fsdp" if fsdp else "")
            + (f" --window-size {window},0" if window >= 0 else ""))


def rows_for(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, *, fsdp: bool = False) -> list[Row]:
    gran = 2 * gpus * 1024
    extra = " --use-megatron-fsdp" if fsdp else ""
    rows = []
    for layout, schedule in LIGHTSEQ_VARIANTS:
        plan = build_plan(schedule, layout=layout, world_size=gpus, causal=True)
        rows.append(Row(
            seq, f"lightseq {layout}/{schedule}", lightseq_traffic(model, seq, gpus, layout, schedule).total,
            plan.compute_steps, lightseq_seconds(model, seq, gpus, gpus_per_node, m, layout, schedule),
            lightseq_memory(model, seq, gpus, fsdp=fsdp, layout=layout, schedule=schedule),
            max_sequence(lambda n: lightseq_memory(model, n, gpus, fsdp=fsdp, layout=layout, schedule=schedule),
                         m, gran),
            lightseq_flags(gpus, layout, schedule, fsdp=fsdp)))
    tp = tp_degree(model, gpus)
    for sp in (False, True):
        rows.append(Row(
            seq, f"megatron TP={tp}" + ("+SP" if sp else ""), tp_traffic(model, seq, tp, sequence_parallel=sp).total,
            1, tp_seconds(model, seq, gpus, gpus_per_node, m, sequence_parallel=sp),
            tp_memory(model, seq, gpus, sequence_parallel=sp, fsdp=fsdp),
            max_sequence(lambda n: tp_memory(model, n, gpus, sequence_parallel=sp, fsdp=fsdp), m, gran),
            f"--tensor-model-parallel-size {tp}" + (" --sequence-parallel" if sp else "")
            + " --recompute-granularity full --recompute-method uniform --recompute-num-layers 1" + extra))
    cp_plan = build_plan("ring", layout="zigzag", world_size=gpus, causal=True)
    rows.append(Row(
        seq, "megatron CP (TE ring)", megatron_cp_traffic(model, seq, gpus).total, cp_plan.compute_steps,
        lightseq_seconds(model, seq, gpus, gpus_per_node, m, "zigzag", "ring", remat=False),
        lightseq_memory(model, seq, gpus, remat=False, fsdp=fsdp),
        max_sequence(lambda n: lightseq_memory(model, n, gpus, remat=False, fsdp=fsdp), m, gran),
        f"--context-parallel-size {gpus} --cp-comm-type p2p --recompute-granularity full" + extra))
    return rows


def assumptions(model: ModelSpec, gpus: int, gpus_per_node: int, m: Machine, *, fsdp: bool = False) -> list[str]:
    """The lines above the table: the model, the machine and what each column counts. The machine
    decides the "max seq" and "ms/layer" columns, so it is on screen, not only in --json."""
    usable = m.budget_bytes / 2**30
    rates = sorted(rate for _, rate in m.attn_full + m.attn_diag)
    sizes = sorted(tokens for tokens, _ in m.attn_full + m.attn_diag)
    states = "params+grads+optimizer sharded (FSDP)" if fsdp else "optimizer sharded (distributed optimizer)"
    dtype = {2: "bf16", 4: "fp32"}.get(model.dtype_bytes, f"{model.dtype_bytes}-byte values")
    return [
        f"{model.name}: {model.layers} layers, hidden {model.hidden}, {model.heads} heads, {model.kv_heads} KV heads, "
        f"{dtype}; batch 1, full recompute; {states}",
        f"machine: {gpus} GPUs, {gpus_per_node} per node; {m.gpu_memory_gib:g} GiB per GPU, {m.usable_fraction:.0%} "
        f"usable ({usable:.1f} GiB); per GPU and direction NVLink {m.nvlink_gbs:g} GB/s within a node, network "
        f"{m.ib_gbs:g} GB/s between nodes (GB/s: 10^9 bytes/s), {m.latency_us:g} us per transfer",
        f"compute: GEMMs {m.gemm_tflops:g} TFLOP/s; attention {rates[0]:g}..{rates[-1]:g} TFLOP/s by block size "
        f"({sizes[0] // 1024}K..{sizes[-1] // 1024}K tokens, FA2 forward+backward measured on one H200); "
        "--gpu-memory-gib, --nvlink-gbs, --ib-gbs set the machine, planner/model.py the rest",
        "columns, per transformer layer of one training step:",
        "  MiB/GPU/layer  bytes the busiest GPU sends, forward + backward (and the recompute's forward where it "
        "sends again)",
        "  steps          attention steps per pass (the backward has as many): in each, a GPU computes a block while "
        "the next one's inputs travel; 1: attention without exchange",
        "  ms/layer       predicted time, forward + backward with the recompute",
        f"  GiB/GPU        predicted peak memory per GPU (model states and activations); (OOM): over {usable:.1f} GiB",
        f"  max seq        the longest sequence whose memory fits {usable:.1f} GiB per GPU",
    ]


def recommend(rows: list[Row], m: Machine) -> Row | None:
    """The fastest LightSeq variant that fits, or None when none does (no flags to give then)."""
    fitting = [r for r in rows if r.system.startswith("lightseq") and r.memory_bytes <= m.budget_bytes]
    return min(fitting, key=lambda r: r.seconds) if fitting else None

