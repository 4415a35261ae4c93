"""docs/paper.md, the paper's claims against the planner, written by the planner itself:

    python -m megatron_lightseq.planner.paper > docs/paper.md

Three tables, all predictions from planner/model.py's constants: bytes per layer, Megatron TP
over the plugin's flat plans; the search's best LightSeq configuration against the best
Megatron-native one (the whole step, DP, TP, PP and CP searched); the longest sequence per system.
"""
from __future__ import annotations

import dataclasses
import sys

from .attention import NO_CP, Comm, attention_cost
from .config import Config
from .layer_table import granularity
from .memory import max_sequence, memory
from .model import MODELS, Machine, sources, token_label
from .search import search
from .traffic import tp_traffic

LLAMA = MODELS["llama-7b"]
HEADS = {"MHA (32 K/V heads)": 32, "GQA-8": 8, "MQA": 1}
PLUGIN = (("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq"))


def _traffic_row(model, gpus: int, gpus_per_node: int, m: Machine) -> str:
    """Megatron TP (the largest degree in a node) over the plugin's helper plan and its best flat plan."""
    seq = 128 * 1024
    tp = max(t for t in range(1, gpus_per_node + 1) if model.heads % t == 0 and gpus_per_node % t == 0)
    tp_bytes = tp_traffic(model, seq, tp, sequence_parallel=False).total
    plugin = {(lay, sch): attention_cost(Comm("lightseq", 1, lay, sch), model, seq, 1, gpus, gpus_per_node, m, "full")
              for lay, sch in PLUGIN}
    helper = plugin["contiguous", "lightseq"]
    best_name, best = min(plugin.items(), key=lambda kv: kv[1].intra + kv[1].inter)
    return (f"{tp_bytes / (helper.intra + helper.inter):.1f}x / {tp_bytes / (best.intra + best.inter):.1f}x "
            f"({'/'.join(best_name)})")


def traffic_table(m: Machine) -> list[str]:
    lines = ["## Bytes per GPU per layer: Megatron TP (TP=8 in a node) over LightSeq's flat plans",
             "Both grow linearly with the sequence, so the ratio holds at every length (128K shown); forward, "
             "backward and full recompute's forward again.",
             "| model | CP = 8: vs contiguous/lightseq (helpers) / the fewest-bytes plan | CP = 16 |", "|---|---|---|"]
    for name, kv in HEADS.items():
        model = dataclasses.replace(LLAMA, kv_heads=kv)
        lines.append(f"| {name} | {_traffic_row(model, 8, 8, m)} | {_traffic_row(model, 16, 8, m)} |")
    return lines


def _speedup_cell(model, seq: int, gpus: int, m: Machine, recompute) -> str:
    r = search(model, seq, gpus, 8, m, recompute=recompute, progress=False)
    ls, mg = r.best["lightseq"], r.best["megatron"]
    if not ls or not mg:
        return "nothing fits" if not ls else "only LightSeq fits"
    return (f"{r.speedup:.2f}x ({ls.config.name.replace(', no recompute', ' nr')} vs "
            f"{mg.config.name.replace(', no recompute', ' nr')}; batch {r.global_batch})")


def speedup_table(m: Machine, seqs=(32 * 1024, 128 * 1024, 512 * 1024), gpus=(8, 64)) -> list[str]:
    lines = ["## The whole step: LightSeq's best configuration over Megatron's best native one",
             "tokens/s per GPU, each system's fastest configuration that fits (TP x CP x PP x DP and the CP "
             "communication searched; `nr`: no recompute), 8 GPUs per node, the default global batch (the "
             "smallest with which the most data-parallel configuration that fits uses every GPU).",
             "| model | seq | GPUs | full or no recompute | full recompute only |", "|---|---|---|---|---|"]
    for name, kv in HEADS.items():
        model = dataclasses.replace(LLAMA, kv_heads=kv)
        for seq in seqs:
            for n in gpus:
                both = _speedup_cell(model, seq, n, m, ("full", "none"))
                full = _speedup_cell(model, seq, n, m, ("full",))
                lines.append(f"| {name} | {token_label(seq)} | {n} | {both} | {full} |")
    return lines


def _longest(model, cfg: Config, m: Machine) -> str:
    return token_label(max_sequence(lambda n: memory(model, n, cfg).total, m, granularity(cfg)))


def longest_table(m: Machine, gpus: int = 16) -> list[str]:
    lines = [f"## Longest sequence on {gpus} GPUs (one sequence, full recompute, distributed optimizer)",
             "| heads | LightSeq CP (zigzag/ring) | Megatron CP (TE p2p) | Megatron TP=8 x DP | TP=8+SP x DP | "
             "TP=8+SP x CP=2 (TE) |", "|---|---|---|---|---|---|"]
    for heads in (32, 8, 4):
        model = dataclasses.replace(LLAMA, heads=heads, kv_heads=heads)
        tp = min(8, heads)
        cells = [Config(1, gpus, 1, 1, False, Comm("lightseq"), 1), Config(1, gpus, 1, 1, False, Comm("megatron"), 1),
                 Config(tp, 1, 1, gpus // tp, False, NO_CP, 1), Config(tp, 1, 1, gpus // tp, True, NO_CP, 1),
                 Config(tp, 2, 1, gpus // tp // 2, True, Comm("megatron"), 1)]
        lines.append(f"| {heads} | " + " | ".join(_longest(model, c, m) for c in cells) + " |")
    return lines


def render(m: Machine | None = None) -> str:
    m = m or Machine()
    intro = ["# The paper's claims, on paper", "",
             "Written by `python -m megatron_lightseq.planner.paper > docs/paper.md` from the planner "
             "(megatron_lightseq/planner); every number is a PREDICTION from the constants below "
             "(planner/model.py, docs/planner.md), not a measurement. Llama-7B sizes (32 layers, hidden 4096, "
             "SwiGLU 11008, vocab 32000), bf16, micro-batch 1.", "", *sources(m), ""]
    claims = ["", "The paper reports up to 4.7x less communication than Megatron-LM TP and 1.24-2.01x end to end. "
              "The first table is that claim per layer; the second replaces the paper's TP baseline by "
              "Megatron's best native configuration, its own context parallelism included, which is the "
              "comparison a user of Megatron-LM faces: most of the plugin's predicted gain is its "
              "rematerialization (one attention forward per layer fewer under full recompute), so it shrinks "
              "where keeping every activation fits."]
    return "\n".join(intro + traffic_table(m) + [""] + speedup_table(m) + [""] + longest_table(m) + claims) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
