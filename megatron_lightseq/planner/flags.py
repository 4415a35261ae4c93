"""Megatron-LM's pretrain_gpt.py flags for a configuration, and the sbatch line that runs it with
the project's scripts (scripts/lightseq.sbatch with the plugin, scripts/tp_baseline.sbatch for
plain Megatron-LM) and configs/.

The scripts pass --context-parallel-size (lightseq.sbatch) or --tensor-model-parallel-size
(tp_baseline.sbatch) as the task count, before the arguments given after the script's name;
Megatron's argparse keeps the last value of a repeated flag, so the planner's flags, given after
the script, set every parallel size.
"""
from __future__ import annotations

import os

from .config import Config
from .model import MODELS, ModelSpec, token_label

RECOMPUTE = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def attention_flags(cfg: Config) -> str:
    """The CP communication's flags (none at CP = 1)."""
    comm, cp = cfg.comm, cfg.cp
    if cp == 1:
        return ""
    kind = comm.comm_type(cp)
    hierarchy = f" --hierarchical-context-parallel-sizes {comm.inner} {cp // comm.inner}" if kind == "a2a+p2p" else ""
    comm_type = "" if kind == "p2p" and comm.system == "lightseq" else f" --cp-comm-type {kind}{hierarchy}"
    if comm.system == "megatron":
        return f"--attention-backend auto{comm_type}"
    wire = f" --lightseq-kv-wire {comm.kv_wire}" if comm.kv_wire else ""
    return (f"--attention-backend lightseq --lightseq-layout {comm.layout} --lightseq-schedule {comm.schedule} "
            f"--attention-dropout 0{comm_type}{wire}")


def training_flags(cfg: Config, *, window: int = -1, layout: str | None = None, schedule: str | None = None) -> str:
    """Every flag the configuration sets: parallel sizes, global batch, CP communication,
    recompute, optimizer sharding and gradient overlap (``layout``/``schedule`` override the
    plugin's, e.g. for packed documents; ``window``: the model's --window-size)."""
    if layout or schedule:
        from dataclasses import replace

        cfg = replace(cfg, comm=replace(cfg.comm, layout=layout or cfg.comm.layout,
                                        schedule=schedule or cfg.comm.schedule))
    parts = [f"--tensor-model-parallel-size {cfg.tp}" + (" --sequence-parallel" if cfg.sp else ""),
             f"--context-parallel-size {cfg.cp}", f"--pipeline-model-parallel-size {cfg.pp}",
             f"--micro-batch-size 1 --global-batch-size {cfg.dp * cfg.microbatches}", attention_flags(cfg),
             RECOMPUTE if cfg.recompute == "full" else "",
             "--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params --ckpt-format fsdp_dtensor"
             if cfg.fsdp else "--use-distributed-optimizer",
             "--overlap-grad-reduce --overlap-param-gather", f"--window-size {window},0" if window >= 0 else ""]
    return " ".join(p for p in parts if p)


def model_configs(model: ModelSpec, seq: int) -> tuple[list[str], str]:
    """(configs/ files that set this model and sequence, flags for what no file sets)."""
    found, extra = [], []
    base = MODELS["llama-7b"]
    same = all(getattr(model, f) == getattr(base, f) for f in ("layers", "hidden", "heads", "ffn", "vocab", "swiglu"))
    if same:
        found.append("llama7b")
        heads = {model.heads: "heads/mha", 8: "heads/gqa", 1: "heads/mqa"}.get(model.kv_heads)
        if heads:
            found.append(heads)
        else:
            extra.append(f"--group-query-attention --num-query-groups {model.kv_heads}")
    else:
        extra.append(model_flags(model))
    name = f"seq/{token_label(seq).lower()}"
    if os.path.exists(os.path.join(CONFIGS, name + ".sh")):
        found.append(name)
    else:
        extra.append(f"--seq-length {seq} --max-position-embeddings {seq}")
    return found, " ".join(extra)


def model_flags(model: ModelSpec) -> str:
    """pretrain_gpt.py's flags for a model configs/ has no file for (configs/llama7b.sh's settings otherwise)."""
    gqa = f" --group-query-attention --num-query-groups {model.kv_heads}" if model.kv_heads != model.heads else ""
    return (f"--num-layers {model.layers} --hidden-size {model.hidden} --num-attention-heads {model.heads}{gqa} "
            f"--ffn-hidden-size {model.ffn} --vocab-size {model.vocab}" + (" --swiglu" if model.swiglu else ""))


def sbatch_line(model: ModelSpec, seq: int, cfg: Config, gpus_per_node: int, flags: str) -> str:
    """The sbatch command for scripts/ (module docstring)."""
    configs, extra = model_configs(model, seq)
    plugin = cfg.system == "lightseq"
    configs.append("parallel/lightseq" if plugin else "parallel/native")
    if cfg.recompute == "none":  # llama7b.sh turns full recompute on; this config drops it again
        configs.append("recompute/none")
    nodes = -(-cfg.gpus // gpus_per_node)
    shape = "" if gpus_per_node == 8 else f" --ntasks-per-node={gpus_per_node} --gpus-per-node={gpus_per_node}"
    script = "scripts/lightseq.sbatch" if plugin else "scripts/tp_baseline.sbatch"
    return (f"sbatch --nodes={nodes}{shape} --export=ALL,MEGATRON_LM=$MEGATRON_LM,CONFIGS=\"{' '.join(configs)}\" "
            f"{script} {flags}" + (f" {extra}" if extra else ""))
