"""What ``plan`` prints for a search (search.Result): the assumptions and their sources, the best
LightSeq and the best Megatron-native configuration side by side, the top few of each, and the
flags and sbatch line of each; and the same as JSON."""
from __future__ import annotations

import dataclasses

from .config import Config
from .flags import sbatch_line, training_flags
from .model import Machine, ModelSpec, machine_lines, model_text, token_label
from .search import SYSTEMS, TIE, Result
from .step import Estimate

TITLES = {"lightseq": "lightseq (the plugin)", "megatron": "megatron (its own attention)"}
GIB = 2**30


def header(model: ModelSpec, result: Result, m: Machine, recompute: tuple[str, ...], fsdp: bool) -> list[str]:
    states = "Megatron-FSDP (params, grads, optimizer sharded)" if fsdp else "distributed optimizer"
    seq, batch = result.seq, result.global_batch
    return [
        f"{model_text(model)}; {token_label(seq)} tokens per sequence, global batch {batch} sequences "
        f"({token_label(seq * batch)} tokens)",
        *machine_lines(m, result.gpus, result.gpus_per_node),
        f"training: micro-batch 1 sequence, 1F1B pipeline, {' or '.join(recompute)} recompute (the plugin's remat "
        f"skips the attention forward in full recompute, Megatron's repeats it), {states}; gradients reduced over "
        "DP x CP in fp32 and params gathered, overlapped with the backward and forward (--overlap-grad-reduce "
        "--overlap-param-gather): only what outlasts them counts",
        f"searched {result.searched} configurations (TP within a node dividing the heads, with and without SP; PP "
        f"dividing the layers; CP with 2 x CP dividing the sequence, every CP communication; DP = GPUs / (TP x CP x PP)"
        f" dividing the global batch) in {result.seconds:.1f} s; {len(result.fitting)} fit in memory; ranked by "
        f"tokens/s per GPU, predictions within {TIE:.1%} a tie that the fewer cross-node bytes win",
        "PREDICTIONS from the constants above, not measurements",
    ]


def _cells(e: Estimate | None, cp_line) -> list[str]:
    if e is None:
        return ["none fits"] + [""] * 7
    c = e.config
    return [f"TP{c.tp}{'+SP' if c.sp else ''} CP{c.cp} PP{c.pp} DP{c.dp}, "
            f"{'no' if c.recompute == 'none' else 'full'} recompute",
            cp_line(c), f"{e.step_seconds:.2f}", f"{e.tokens_per_s_per_gpu:,.0f}", f"{e.mfu:.1%}",
            f"{e.memory.total / GIB:.1f}", f"{e.intra_bytes / GIB:.1f}", f"{e.inter_bytes / GIB:.1f}"]


def _comm_text(c: Config) -> str:
    if c.cp == 1:
        return "no CP"
    kind = c.comm.comm_type(c.cp)
    name = c.comm.name(c.cp)
    return name if name == kind else f"{name} ({kind})" if kind != "a2a" else f"a2a over {c.cp} (Ulysses)"


def side_by_side(result: Result) -> list[str]:
    names = ["configuration", "CP communication", "step (s)", "tokens/s/GPU", "MFU", "memory (GiB/GPU)",
             "GiB/GPU/step in a node", "GiB/GPU/step across nodes"]
    cols = {s: _cells(result.best.get(s), _comm_text) for s in SYSTEMS}
    lines = [f"{'':<26} {TITLES['lightseq']:<40} {TITLES['megatron']}"]
    lines += [f"{n:<26} {cols['lightseq'][i]:<40} {cols['megatron'][i]}" for i, n in enumerate(names)]
    return lines


def placement(result: Result) -> str:
    """Where the chosen LightSeq configuration's CP traffic goes, and why when it leaves a node."""
    best = result.best["lightseq"]
    c = best.config
    span = c.tp * c.cp
    if span <= result.gpus_per_node and result.gpus_per_node % span == 0:
        return (f"   CP traffic stays inside a node (TP {c.tp} x CP {c.cp} = {span} GPUs in a row); the "
                f"{best.inter_bytes / GIB:.1f} GiB/GPU across nodes per step are the DP x CP gradient reduction"
                + (" and the pipeline's activations" if c.pp > 1 else ""))
    inside = [e for e in result.ranked("lightseq") if e.config.tp * e.config.cp <= result.gpus_per_node]
    alt = (f"the fastest with CP inside a node ({inside[0].config.name}) is predicted "
           f"{best.tokens_per_s_per_gpu / inside[0].tokens_per_s_per_gpu:.2f}x slower" if inside
           else "no configuration with CP inside a node fits the memory")
    return f"   CP traffic crosses nodes (TP {c.tp} x CP {c.cp} = {span} GPUs): {alt}"


def top(result: Result, system: str, count: int) -> list[str]:
    lines = [f"top {count} {TITLES[system]}:",
             f"  {'configuration':<62} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'GiB/GPU':>8} "
             f"{'GiB in/across nodes':>20} {'bubble':>7}"]
    for e in result.ranked(system)[:count]:
        bubble = e.bubble_seconds / e.step_seconds
        lines.append(f"  {e.config.name:<62} {e.step_seconds:>8.2f} {e.tokens_per_s_per_gpu:>10,.0f} {e.mfu:>6.1%} "
                     f"{e.memory.total / GIB:>8.1f} {e.intra_bytes / GIB:>9.1f}/{e.inter_bytes / GIB:<10.1f} "
                     f"{bubble:>6.1%}")
    return lines


def text(model: ModelSpec, result: Result, m: Machine, flags: dict, *, recompute: tuple[str, ...] = ("full",),
         fsdp: bool = False, count: int = 5) -> str:
    """``flags``: system -> (flags, sbatch line) of its best, as the caller settled them (masks)."""
    lines = header(model, result, m, recompute, fsdp) + side_by_side(result)
    if result.best["lightseq"] is None:
        lines.append(f"-> no LightSeq plan fits {m.gpu_memory_gib:g} GiB per GPU at {token_label(result.seq)} with "
                     f"{result.gpus} GPUs and a global batch of {result.global_batch}: use more GPUs, a shorter "
                     "sequence" + ("" if fsdp else " or --fsdp"))
    elif result.speedup:
        lines.append(f"LightSeq's predicted speedup over the best Megatron-native configuration on the same "
                     f"{result.gpus} GPUs: {result.speedup:.2f}x tokens/s per GPU")
    if result.best["lightseq"]:
        lines.append(placement(result))
    for system in SYSTEMS:
        lines += top(result, system, count)
    for system in SYSTEMS:  # the recommendation (the plugin's) first: "->" marks it
        if flags.get(system):
            lines += [f"{'->' if system == 'lightseq' else '  '} {TITLES[system]}: pretrain_gpt.py {flags[system][0]}",
                      f"   {flags[system][1]}"]
    return "\n".join(lines)


def settle_flags(model: ModelSpec, result: Result, **overrides) -> dict:
    """system -> (flags, sbatch line) of its best; ``overrides``: training_flags' layout, schedule, window."""
    found = {}
    for system, e in result.best.items():
        if e:
            f = training_flags(e.config, **(overrides if system == "lightseq" else
                                            {"window": overrides.get("window", -1)}))
            found[system] = (f, sbatch_line(model, result.seq, e.config, result.gpus_per_node, f))
    return found


def as_dict(e: Estimate, flags: tuple[str, str] | None = None) -> dict:
    c = e.config
    return dict(tp=c.tp, sp=c.sp, cp=c.cp, pp=c.pp, dp=c.dp, microbatches=c.microbatches, system=c.system,
                recompute=c.recompute, fsdp=c.fsdp,
                cp_comm_type=c.comm.comm_type(c.cp) if c.cp > 1 else None, comm=c.comm.name(c.cp),
                step_ms=e.step_seconds * 1e3, tokens_per_s_per_gpu=e.tokens_per_s_per_gpu, mfu=e.mfu,
                memory_gib=e.memory.total / GIB, intra_node_gib_per_step=e.intra_bytes / GIB,
                inter_node_gib_per_step=e.inter_bytes / GIB, bubble_ms=e.bubble_seconds * 1e3,
                exposed_grad_ms=e.exposed_grad_seconds * 1e3,
                flags=flags[0] if flags else training_flags(c), sbatch=flags[1] if flags else None)


def as_json(model: ModelSpec, result: Result, m: Machine, flags: dict, count: int = 5) -> dict:
    best = {s: e and as_dict(e, flags.get(s)) for s, e in result.best.items()}
    ls = result.best["lightseq"]
    return {"model": dataclasses.asdict(model), "machine": dataclasses.asdict(m), "gpus": result.gpus,
            "gpus_per_node": result.gpus_per_node, "seq": result.seq, "global_batch": result.global_batch,
            "searched": result.searched, "fitting": len(result.fitting), "planning_seconds": result.seconds,
            "best": best, "speedup": result.speedup,
            "top": {s: [as_dict(e) for e in result.ranked(s)[:count]] for s in SYSTEMS},
            "recommended": {result.seq: ls and ls.config.name}, "recommended_flags": {result.seq: best["lightseq"]
                                                                                       and best["lightseq"]["flags"]}}
