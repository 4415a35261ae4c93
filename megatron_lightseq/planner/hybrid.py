"""For one configuration (the per-layer table), every head x sequence split of its CP group
(docs/hybrid.md): the plugin's flat plan (U = 1), each split U x CP/U (all-to-all over U GPUs
around its zigzag plan over CP/U, the faster outer schedule) and pure Ulysses (U = CP), next to
TransformerEngine's a2a and a2a+p2p; per layer: time, all-to-all time, bytes, memory; the choice
and why. The costs are attention.py's closed forms (exact against built plans at small P).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..distattn import HeadSplit, replicated_kv_heads, split_problem
from .attention import Comm, heads_per_rank
from .config import Config
from .flags import training_flags
from .model import Machine, ModelSpec, token_label
from .search import TIE
from .step import Estimate, estimate

SCHEDULES = ("ring", "lightseq")


@dataclass(frozen=True)
class Choice:
    inner: int  # U: 1 flat, CP pure Ulysses
    schedule: str  # the outer plan's
    seconds: float  # one layer, forward + backward: GEMMs, TP, attention with the all-to-all
    attention_seconds: float
    a2a_seconds: float
    cross_node_bytes: float  # per GPU per layer, received, mean over the group
    total_bytes: float
    replicated_kv_heads: int  # K/V heads received beyond G over an inner group
    outer: int
    memory_bytes: float
    fits: bool
    system: str = "lightseq"
    config: Config | None = None


def splits(model: ModelSpec, gpus: int, tp: int = 1) -> list[int]:
    """The all-to-all sizes U the plugin allows: U divides the CP size and the heads per TP rank."""
    h, g = heads_per_rank(model, tp)
    return [u for u in range(1, gpus + 1) if split_problem(gpus, u, h, g) is None]


def _choice(e: Estimate, model: ModelSpec) -> Choice:
    cfg = e.config
    h, g = heads_per_rank(model, cfg.tp)
    return Choice(cfg.comm.inner, cfg.comm.schedule, e.layer_seconds, e.attention.seconds, e.attention.a2a,
                  e.attention.inter, e.attention.intra + e.attention.inter,
                  replicated_kv_heads(HeadSplit(h, g, cfg.comm.inner)) if cfg.system == "lightseq" else 0,
                  cfg.cp // cfg.comm.inner, e.memory.total, e.fits, cfg.system, cfg)


def choices(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, *,
            base: Config | None = None, megatron: bool = False) -> list[Choice]:
    """The plugin's flat zigzag plan and every split (the faster outer schedule of each) of the CP
    group of ``base`` (default: CP = ``gpus``, nothing else); with ``megatron``, TransformerEngine's
    a2a and a2a+p2p after them."""
    base = base or Config(1, gpus, 1, 1, False, Comm("lightseq"), 1)
    found = []
    for u in splits(model, base.cp, base.tp):
        options = [estimate(model, seq, replace(base, comm=Comm("lightseq", u, "zigzag", s)), gpus_per_node, m)
                   for s in (SCHEDULES if u < base.cp else SCHEDULES[:1])]
        found.append(_choice(min(options, key=lambda e: e.layer_seconds), model))
    if megatron:
        h, g = heads_per_rank(model, base.tp)
        found += [_choice(estimate(model, seq, replace(base, comm=Comm("megatron", u, "zigzag", "p2p")), gpus_per_node,
                                   m), model) for u in range(2, base.cp + 1) if base.cp % u == 0 and h % u == 0 and g % u == 0]
    return found


def _faster(a: Choice, b: Choice) -> Choice:
    if abs(a.seconds - b.seconds) <= TIE * min(a.seconds, b.seconds):
        return a if a.cross_node_bytes <= b.cross_node_bytes else b
    return a if a.seconds < b.seconds else b


def recommend(found: list[Choice]) -> Choice | None:
    """The fastest of the plugin's choices that fit; times within TIE (0.1%) are a tie, which the
    fewer cross-node bytes win. None when none fits."""
    best = None
    for c in found:
        if c.system == "lightseq" and c.fits:
            best = c if best is None else _faster(best, c)
    return best


def name_of(c: Choice) -> str:
    who = "" if c.system == "lightseq" else "megatron "
    return who + ("flat p2p" if c.inner == 1 else "ulysses (a2a)" if c.outer == 1 else f"hybrid a2a {c.inner} x p2p {c.outer}")


def flags_of(c: Choice, cp: int | None = None) -> str:
    """``cp``: ignored, the choice's configuration holds it (benchmarks/hybrid.py still passes it)."""
    return training_flags(c.config)


def _bytes_text(flat: Choice, best: Choice) -> str:
    """The split's cross-node bytes against the flat plan's, in the direction they go."""
    if not flat.cross_node_bytes and not best.cross_node_bytes:
        return "no cross-node bytes either way (one node)"
    if best.cross_node_bytes <= flat.cross_node_bytes:
        return f"{flat.cross_node_bytes / max(best.cross_node_bytes, 1):.1f}x fewer cross-node bytes per GPU"
    return f"{best.cross_node_bytes / max(flat.cross_node_bytes, 1):.1f}x more cross-node bytes per GPU"


def _blocks_text(seq: int, flat: Choice, best: Choice) -> str:
    """Why a split runs attention faster: longer blocks (planner/model.py's rates by block size)."""
    against = f"against the flat plan's {token_label(seq // (2 * flat.outer))}-token blocks"
    if best.outer == 1:
        return f"one attention call over the whole {token_label(seq)} sequence per GPU, {against}"
    return f"its outer plan's blocks are {token_label(seq // (2 * best.outer))} tokens long, {against}"


def why(model: ModelSpec, seq: int, found: list[Choice], best: Choice | None) -> str:
    """One sentence on the choice: what the split trades, a tie when there is one (TIE, stated),
    K/V copies."""
    if best is None:
        return "no split fits the memory"
    flat = next(c for c in found if c.inner == 1 and c.system == "lightseq")
    faster = [c for c in found if c.system == "lightseq" and c.fits and c.seconds < best.seconds]
    tie = (f" (within {TIE:.1%} of {name_of(faster[0])}'s {faster[0].seconds * 1e3:.2f} ms: a tie, which the fewer "
           "cross-node bytes win)") if faster else ""
    if best.inner == 1:
        return "flat p2p: the fastest" + tie + "; a split's all-to-all of q, k, v, out and their gradients is not hidden"
    parts = [f"{name_of(best)}: {best.seconds / flat.seconds:.2f}x the flat plan's time per layer{tie}, "
             f"{_bytes_text(flat, best)}; {_blocks_text(seq, flat, best)} (attention runs faster on longer blocks: "
             "planner/model.py)"]
    if best.replicated_kv_heads:
        less = (", so the cross-node bytes fall less than U times"
                if 0 < best.cross_node_bytes < flat.cross_node_bytes else "")
        parts.append(f"its all-to-all groups of {best.inner} GPUs need {model.kv_heads} K/V head(s) between them and "
                     f"receive {model.kv_heads + best.replicated_kv_heads} ({best.replicated_kv_heads} copies, counted "
                     f"in the bytes){less}")
    return "; ".join(parts)


def report(model: ModelSpec, seqs: list[int], base: Config, gpus_per_node: int, m: Machine) -> tuple[str, dict]:
    """The per-layer table's split section and its JSON: every split per sequence, the choice, why."""
    h, g = heads_per_rank(model, base.tp)
    lines = [f"head x sequence splits of the CP group of {base.cp} GPUs ({h} heads, {g} K/V heads per TP rank; "
             f"zigzag, causal; the plugin with remat, Megatron (TransformerEngine) with its recompute)",
             f"{'seq':>6} {'split':<32} {'schedule':<9} {'ms/layer':>9} {'a2a ms':>7} {'cross-node MiB/GPU':>19} "
             f"{'GiB/GPU':>8}"]
    data = {}
    for seq in seqs:
        found = choices(model, seq, base.gpus, gpus_per_node, m, base=base, megatron=True)
        best = recommend(found)
        for c in found:
            lines.append(f"{token_label(seq):>6} {name_of(c):<32} {c.schedule:<9} {c.seconds * 1e3:>9.2f} "
                         f"{c.a2a_seconds * 1e3:>7.2f} {c.cross_node_bytes / 2**20:>19.1f} "
                         f"{c.memory_bytes / 2**30:>8.1f}" + ("" if c.fits else " (OOM)"))
        # why, not flags: the recommendation (and its flags) is the search's, printed once above
        lines.append(f"{'':>6}    best split: {why(model, seq, found, best)}")
        # no flags: the table's recommendation (the search's) is the one set of flags
        data[seq] = dict(choices=as_dicts(found), best_split=best and name_of(best), seconds=best and best.seconds,
                         why=why(model, seq, found, best))
    return "\n".join(lines), data


def as_dicts(found: list[Choice]) -> list[dict]:
    return [dict({k: v for k, v in asdict(c).items() if k != "config"}, name=name_of(c)) for c in found]
