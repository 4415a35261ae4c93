"""The topology-aware choice of the all-to-all size U (docs/hybrid.md): flat P2P (U = 1), each
hybrid split U x P/U and pure Ulysses (U = P) on Megatron's zigzag layout, causal, batch 1, for
one transformer layer's attention, forward + backward (with remat: the recompute runs no
attention forward, but the hybrid's all-to-all of q, k, v, out, lse runs again).

Per rank's view, in closed form: the zigzag plans of distattn/schedules.py on a plain causal
mask have the same shape at every step (step 0 a rank's own two chunks; step t the chunks it
shares with rank r - t: 2 chunk pairs, the block's queries or keys one chunk or two), so the
planner writes them down for all ranks at once with numpy instead of building a P = 512 plan
(which takes minutes). tests/test_planner_hybrid.py checks the formulas against the built plans
(timing.plan_seconds, Plan.traffic, HybridPlan.bytes) at small P.

Timing as timing.py: a step costs max(compute, next step's transfers) on the busiest rank; a
transfer crosses InfiniBand when its two ranks are on different nodes (rank // gpus_per_node),
NVLink otherwise. The all-to-all is not overlapped (neither is TransformerEngine's).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..distattn import HeadSplit, replicated_kv_heads, split_problem
from .model import Machine, ModelSpec
from .timing import BWD_SHARE, FWD_SHARE, _gemm_seconds

SCHEDULES = ("ring", "lightseq")


@dataclass(frozen=True)
class Choice:
    inner: int  # U: 1 flat, P pure Ulysses
    schedule: str  # the outer plan's
    seconds: float  # attention fwd+bwd per layer (with the all-to-all), plus the layer's GEMMs
    attention_seconds: float
    a2a_seconds: float
    cross_node_bytes: int  # per GPU per layer, fwd+bwd, the busiest rank's, received
    total_bytes: int  # per GPU per layer, fwd+bwd, everything received (busiest rank)
    replicated_kv_heads: int  # K/V heads received beyond G over an inner group (hybrid.py)
    outer: int = 1  # P / U


def _rate(m: Machine, tokens: np.ndarray, diagonal: bool) -> np.ndarray:
    return np.vectorize(lambda t: m.attn_tflops(int(t), diagonal))(tokens) * 1e12


def _outer_steps(q: int, chunk: int, heads: int, kv_heads: int, headdim: int, item: int, schedule: str,
                 node_of: np.ndarray, m: Machine):
    """Per phase: (compute seconds [steps, Q] of fwd+bwd FLOPs, comm seconds [steps+1, Q],
    cross-node bytes [Q], all bytes [Q]) of the zigzag plan over q ranks (module docstring)."""
    r = np.arange(q)
    pair = 4 * chunk * chunk * headdim * heads * 3.5  # fwd+bwd FLOPs of one full chunk pair
    kv_tok = 2 * kv_heads * headdim * item  # k + v (or dk + dv) bytes per token
    compute = np.zeros((q, q))
    # step 0: (r, r) and (2Q-1-r, 2Q-1-r) causal diagonals, (2Q-1-r, r) full; block of 2 chunks
    compute[0] = pair * 0.5 * 2 / _rate(m, np.full(q, 2 * chunk), True) + pair / _rate(m, np.full(q, 2 * chunk), False)
    inbound = {"forward": [], "backward": []}  # per step: list of (src [Q], tokens [Q]) arriving at r
    for t in range(1, q):
        b = (r - t) % q
        before = b < r  # kv owner earlier: queries x and 2Q-1-x against chunk b; else 2Q-1-x against both
        q_tokens = np.where(before, 2 * chunk, chunk)
        compute[t] = 2 * pair / _rate(m, q_tokens, False)
        if schedule == "ring":  # the owner's whole K/V, one hop a step from the ring neighbour
            kv = ((r - 1) % q, np.full(q, 2 * chunk))
        else:  # straight from the owner, only the chunks the block needs
            kv = (b, np.where(before, chunk, 2 * chunk))
        inbound["forward"].append((t, *kv))
        inbound["backward"].append((t, *kv))
        x = (r + t) % q  # the rank computing with r's keys at step t returns dk, dv at t + 2
        inbound["backward"].append((t + 2, x, np.where(r < x, chunk, 2 * chunk)))
    result = {}
    for phase, share in (("forward", FWD_SHARE), ("backward", BWD_SHARE)):
        steps = q + (2 if phase == "backward" and q > 1 else 0)
        intra = np.zeros((steps + 1, q))
        inter = np.zeros((steps + 1, q))
        count = np.zeros((steps + 1, q))
        for s, src, tokens in inbound[phase]:
            crossing = node_of[src] != node_of[r]
            size = tokens * kv_tok
            inter[s] += np.where(crossing, size, 0)
            intra[s] += np.where(crossing, 0, size)
            count[s] += 1
        comm = np.maximum(intra / (m.nvlink_gbs * 1e9), inter / (m.ib_gbs * 1e9)) + count * m.latency_us * 1e-6
        work = np.zeros((steps, q))
        work[:q] = compute * share
        result[phase] = (work, comm, inter.sum(0), (intra + inter).sum(0))
    return result


def _phase_seconds(work: np.ndarray, comm: np.ndarray) -> float:
    """timing.plan_seconds' rule: the first transfers, then each step's max(compute, next transfers)."""
    return float(comm[0].max() + np.maximum(work, comm[1:]).max(1).sum())


def _a2a(split: HeadSplit, inner: int, tokens: int, headdim: int, item: int, lse_item: int, gpus_per_node: int,
         m: Machine):
    """(seconds, cross-node bytes, all bytes) received by the busiest rank of inner group 0 in one
    layer's all-to-all: forward q, k, v in, out back; recompute (remat) q, k, v, out, lse in; backward
    d_out in, dq, dk, dv back (hybrid.HybridPlan.bytes' terms)."""
    token = tokens * headdim * item
    h = split.local_heads
    best = (0.0, 0, 0)
    for i in range(inner):
        rounds = {"fwd": [0, 0], "rec": [0, 0], "bwd": [0, 0]}  # [intra, inter] bytes received
        for j in range(inner):
            if j == i:
                continue
            crossing = int(i // gpus_per_node != j // gpus_per_node)
            mine, theirs = split.kv_count(i), split.kv_count(j)
            rounds["fwd"][crossing] += (h + 2 * mine) * token + h * token
            rounds["rec"][crossing] += (h + 2 * mine) * token + h * token + h * tokens * lse_item
            rounds["bwd"][crossing] += h * token + (h + 2 * theirs) * token
        seconds = sum(max(a / (m.nvlink_gbs * 1e9), b / (m.ib_gbs * 1e9)) + 2 * (inner - 1) * m.latency_us * 1e-6
                      for a, b in rounds.values())
        cross = sum(b for _, b in rounds.values())
        total = sum(a + b for a, b in rounds.values())
        best = max(best, (seconds, cross, total))
    return best


def splits(model: ModelSpec, gpus: int) -> list[int]:
    """The all-to-all sizes U the heads allow: U divides P and the heads (hybrid.split_problem)."""
    return [u for u in range(1, gpus + 1) if split_problem(gpus, u, model.heads, model.kv_heads) is None]


def choices(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, *, remat: bool = True) -> list[Choice]:
    """Every split's best outer schedule (module docstring); ``model``'s heads are those of one
    tensor-parallel rank."""
    if seq % (2 * gpus):
        raise ValueError(f"the sequence ({seq}) must split into 2 x {gpus} zigzag chunks")
    item, lse_item = model.dtype_bytes, 4
    found = []
    gemm = _gemm_seconds(model, seq // gpus, 1, 1) / (m.gemm_tflops * 1e12)
    for u in splits(model, gpus):
        q, split = gpus // u, HeadSplit(model.heads, model.kv_heads, u)
        kv_local = max(split.local_kv(j) for j in range(u))
        a2a_s, a2a_cross, a2a_all = _a2a(split, u, seq // gpus, model.headdim, item, lse_item, gpus_per_node, m) \
            if u > 1 else (0.0, 0, 0)
        node_of = np.arange(q) * u // gpus_per_node  # outer rank o's members o*U + i: node of i = 0
        best = None
        for schedule in SCHEDULES if q > 1 else SCHEDULES[:1]:
            steps = _outer_steps(q, seq // (2 * q), split.local_heads, kv_local, model.headdim, item, schedule,
                                 node_of, m)
            fwd, bwd = (_phase_seconds(*steps[ph][:2]) for ph in ("forward", "backward"))
            attention = fwd * (1 if remat else 2) + bwd
            cross = int(max(steps["forward"][2] * (1 if remat else 2) + steps["backward"][2]))
            total = int(max(steps["forward"][3] * (1 if remat else 2) + steps["backward"][3]))
            choice = Choice(u, schedule, gemm + attention + a2a_s, attention, a2a_s, cross + a2a_cross,
                            total + a2a_all, replicated_kv_heads(split), outer=q)
            best = choice if best is None else _faster(best, choice)
        found.append(best)
    return found


TIE = 1e-3  # predicted times closer than this fraction are a tie: the fewer cross-node bytes win


def _faster(a: Choice, b: Choice) -> Choice:
    if abs(a.seconds - b.seconds) <= TIE * min(a.seconds, b.seconds):
        return a if a.cross_node_bytes <= b.cross_node_bytes else b
    return a if a.seconds < b.seconds else b


def name_of(c: Choice) -> str:
    return "flat p2p" if c.inner == 1 else "ulysses (a2a)" if c.outer == 1 else f"hybrid a2a {c.inner} x p2p {c.outer}"


def flags_of(c: Choice, gpus: int) -> str:
    """Megatron's flags for a choice (report.lightseq_flags' recompute flags included)."""
    comm = "" if c.inner == 1 else " --cp-comm-type a2a" if c.outer == 1 else \
        f" --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes {c.inner} {c.outer}"
    return (f"--context-parallel-size {gpus}{comm} --attention-backend lightseq --lightseq-layout zigzag "
            f"--lightseq-schedule {c.schedule} --attention-dropout 0 --recompute-granularity full "
            f"--recompute-method uniform --recompute-num-layers 1")


def recommend(found: list[Choice]) -> Choice:
    """The fastest choice; among ties (TIE), the fewest cross-node bytes."""
    best = found[0]
    for c in found[1:]:
        best = _faster(best, c)
    return best


def why(model: ModelSpec, seq: int, found: list[Choice], best: Choice) -> str:
    """One sentence on the choice: what the split trades, K/V replication included."""
    flat = next(c for c in found if c.inner == 1)
    if best.inner == 1:
        return ("flat p2p: every split costs more here (its all-to-all of q, k, v, out and their gradients is not "
                "hidden behind compute)")
    gpus = flat.outer
    fewer = (f"{flat.cross_node_bytes / max(best.cross_node_bytes, 1):.1f}x fewer cross-node bytes per GPU"
             if flat.cross_node_bytes else "no cross-node bytes either way")
    parts = [f"{name_of(best)}: {best.seconds / flat.seconds:.2f}x the flat plan's time per layer, {fewer}; its outer "
             f"plan's blocks are {seq // (2 * best.outer) // 1024}K tokens long against the flat plan's "
             f"{seq // (2 * gpus) // 1024}K (block efficiency, ANCHORS.md)"]
    if best.replicated_kv_heads:
        parts.append(f"its all-to-all groups of {best.inner} ranks need {model.kv_heads} K/V head(s) between them and "
                     f"receive {model.kv_heads + best.replicated_kv_heads} ({best.replicated_kv_heads} copies, counted "
                     f"in the bytes), so the cross-node bytes fall less than U times")
    return "; ".join(parts)


def report(model: ModelSpec, seqs: list[int], gpus: int, gpus_per_node: int, m: Machine) -> tuple[str, dict]:
    """The ``plan`` command's hybrid table and its JSON: every split per sequence, the choice, why."""
    lines = [f"hybrid head x sequence parallelism on {gpus} GPUs, {gpus_per_node} per node ({model.heads} heads, "
             f"{model.kv_heads} K/V heads per TP rank; zigzag, causal, remat)",
             f"{'seq':>6} {'split':<26} {'schedule':<9} {'ms/layer':>9} {'a2a ms':>7} {'cross-node MiB/GPU':>19}"]
    data = {}
    for seq in seqs:
        found = choices(model, seq, gpus, gpus_per_node, m)
        best = recommend(found)
        for c in found:
            lines.append(f"{seq // 1024:>5}K {name_of(c):<26} {c.schedule:<9} {c.seconds * 1e3:>9.2f} "
                         f"{c.a2a_seconds * 1e3:>7.2f} {c.cross_node_bytes / 2**20:>19.1f}")
        lines.append(f"{'':>6} -> {why(model, seq, found, best)}: {flags_of(best, gpus)}")
        data[seq] = dict(choices=as_dicts(found), recommended=name_of(best), seconds=best.seconds,
                         flags=flags_of(best, gpus), why=why(model, seq, found, best))
    return "\n".join(lines), data


def overrides(recommended: tuple[str, str] | None, rows, pick: dict | None) -> tuple[str, str] | None:
    """The plan command's recommendation, or the hybrid split instead where one is faster than it
    (``rows``: the table's rows for the sequence; a recommendation exists only where a plan fits,
    and a split holds the same activations)."""
    if not recommended or not pick or pick["recommended"] == "flat p2p":
        return recommended
    seconds = next(r.seconds for r in rows if r.system == recommended[0])
    return (pick["recommended"], pick["flags"]) if pick["seconds"] < seconds else recommended


def as_dicts(found: list[Choice]) -> list[dict]:
    return [dict(dataclasses.asdict(c), name=name_of(c)) for c in found]
