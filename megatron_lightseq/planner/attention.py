"""One transformer layer's attention under context parallelism, per GPU, for every way the CP
group can talk: the plugin's flat plans and head x sequence splits (docs/hybrid.md), and
Megatron's own CP through TransformerEngine (--cp-comm-type p2p, a2a, a2a+p2p) as the baseline.

Facts about TransformerEngine's CP read in its attention/dot_product_attention/context_parallel.py:
p2p is the ring on Megatron's zigzag split (K/V forwarded each step; backward K/V and dK/dV travel
the ring in one message); a2a scatters heads with torch's all_to_all (q, k, v in; out back;
d_out in; dq, dk, dv back) and needs the Q and K/V heads per TP rank to divide by the group;
a2a+p2p is that all-to-all over the first hierarchical group around the ring over the second.
Megatron's full recompute runs the attention forward again, transfers included; the plugin's
rematerialization skips it (its all-to-all of q, k, v, out, lse still runs again, docs/hybrid.md).
The all-to-all is not overlapped, by either.
The plugin's plans may also send K/V in int8 (``kv_wire``, docs/kv_wire.md): the plan's bytes
come from distattn's payload description, plus a quantize and a dequantize pass over each K/V
payload at the GPU's memory bandwidth, on the critical path (a pass a step at most: it pays where
the exchange is exposed, across nodes, and loses a little where it is hidden).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from ..distattn import HeadSplit, split_problem
from .closed_form import BWD_SHARE, FWD_SHARE, Group, PhaseCost, Sizes, plan_cost, steps
from .model import Machine, ModelSpec

PLUGIN_FLAT = (("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq"), ("contiguous", "ring"))
HBM_GBS = 3000.0  # an H100's memory bandwidth, what the int8 wire's quantize/dequantize passes run at
# bytes moved per int8 byte of K/V: quantize reads bf16 (2) and writes int8 (1); dequantize the reverse
WIRE_PASS_BYTES = 6.0


@dataclass(frozen=True)
class Comm:
    """How a CP group talks. ``system``: "lightseq" (the plugin) or "megatron" (TransformerEngine).
    ``inner``: the all-to-all group U (1: none; the CP size: all-to-all only). ``layout`` and
    ``schedule``: the plugin's plan (over the whole group, or the outer group of a split);
    Megatron's ring is "zigzag"/"p2p"."""

    system: str
    inner: int = 1
    layout: str = "zigzag"
    schedule: str = "ring"
    kv_wire: str | None = None  # the plugin's K/V on the wire: None (the model's dtype) or "int8"

    def comm_type(self, cp: int) -> str:
        """Megatron's --cp-comm-type for this."""
        return "p2p" if self.inner == 1 else "a2a" if self.inner == cp else "a2a+p2p"

    def name(self, cp: int) -> str:
        if cp == 1:
            return "no CP"
        plan = "p2p" if self.system == "megatron" else f"{self.layout}/{self.schedule}"
        kind = self.comm_type(cp)
        wire = " int8 K/V" if self.kv_wire else ""
        return {"p2p": plan, "a2a": "a2a", "a2a+p2p": f"a2a {self.inner} x {plan} {cp // self.inner}"}[kind] + wire


NO_CP = Comm("megatron", 1, "zigzag", "p2p")


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def heads_per_rank(model: ModelSpec, tp: int) -> tuple[int, int]:
    """(query heads, K/V heads) on one TP rank: Megatron replicates K/V heads when TP exceeds them."""
    return model.heads // tp, max(1, model.kv_heads // tp)


def comms(model: ModelSpec, tp: int, cp: int) -> list[Comm]:
    """Every way a CP group of ``cp`` GPUs can talk with these heads: the plugin's flat plans and
    splits (U dividing CP and the query heads per TP rank; K/V heads fewer than U are sent to
    each rank that needs them), TransformerEngine's p2p and its splits (U must divide the query
    and the K/V heads per TP rank)."""
    if cp == 1:
        return [NO_CP]
    h, g = heads_per_rank(model, tp)
    found = [Comm("lightseq", 1, layout, schedule) for layout, schedule in PLUGIN_FLAT]
    for u in divisors(cp)[1:]:
        if split_problem(cp, u, h, g) is None:
            found += [Comm("lightseq", u, "zigzag", s) for s in (("ring", "lightseq") if u < cp else ("ring",))]
    found += [replace(c, kv_wire="int8") for c in found if c.inner < cp]  # a plan sends K/V: int8 may pay
    found.append(Comm("megatron", 1, "zigzag", "p2p"))
    found += [Comm("megatron", u, "zigzag", "p2p") for u in divisors(cp)[1:] if h % u == 0 and g % u == 0]
    return found


@dataclass(frozen=True)
class AttentionCost:
    """One layer's attention for one micro-batch on one GPU (batch 1), seconds on the critical path."""

    forward: float
    backward: float
    recompute: float  # the forward again under full recompute (0 with the plugin's remat)
    intra: float  # bytes a GPU receives per layer (forward, recompute, backward), within its node
    inter: float  # ... across nodes
    steps: int  # attention steps per pass
    a2a: float = 0.0  # of the seconds, the all-to-all's

    @property
    def seconds(self) -> float:
        return self.forward + self.backward + self.recompute


def _single_call(tokens: int, heads: int, headdim: int, m: Machine) -> tuple[float, float]:
    """(forward, backward) seconds of one causal call over the whole sequence (no CP, or a2a)."""
    total = 3.5 * 2 * tokens * tokens * headdim * heads / float(m.attn_rates(tokens, True))
    return total * FWD_SHARE, total * BWD_SHARE


@functools.lru_cache(maxsize=4096)
def attention_cost(comm: Comm, model: ModelSpec, seq: int, tp: int, cp: int, gpus_per_node: int, m: Machine,
                   recompute: str) -> AttentionCost:
    """``recompute``: "full" (Megatron repeats the forward; the plugin does not) or "none"."""
    h, g = heads_per_rank(model, tp)
    d, item = model.headdim, model.dtype_bytes
    again = 1.0 if recompute == "full" and comm.system == "megatron" else 0.0
    u, q = comm.inner, cp // comm.inner
    split = HeadSplit(h, g, u)
    kv = g // u if comm.system == "megatron" else max(split.local_kv(j) for j in range(u))
    kind = "te/p2p" if comm.system == "megatron" else f"{comm.layout}/{comm.schedule}"
    if q == 1:  # no CP, or the all-to-all only: one causal call over the whole sequence
        fwd, bwd = _single_call(seq, split.local_heads, d, m)
        intra = inter = 0.0
    else:
        chunk = seq // (q * (1 if comm.layout == "contiguous" else 2))
        sizes, group = Sizes(split.local_heads, kv, d, item, chunk, comm.kv_wire), Group(q, u * tp, gpus_per_node)
        f, b = (plan_cost(kind, phase, group, sizes, m) for phase in ("forward", "backward"))
        wire = wire_seconds(comm, f)
        fwd, bwd = f.seconds + wire, b.seconds + wire  # the backward quantizes the same payloads again
        intra, inter = f.intra * (1 + again) + b.intra, f.inter * (1 + again) + b.inter
    a2a = A2A() if u == 1 else all_to_all(comm, h, g, seq // cp, d, item, Group(u, tp, gpus_per_node), m, recompute)
    return AttentionCost(fwd + a2a.forward, bwd + a2a.backward, again * fwd + a2a.recompute, intra + a2a.intra,
                         inter + a2a.inter, 1 if cp == 1 else steps(kind, q),
                         a2a.forward + a2a.backward + a2a.recompute)


def wire_seconds(comm: Comm, forward: PhaseCost) -> float:
    """The int8 wire's quantize and dequantize passes in one pass of the plan, bounded by the
    bytes a GPU receives in the forward (all K/V on the ring plans) as if each were quantized
    and dequantized once."""
    if comm.kv_wire is None:
        return 0.0
    return WIRE_PASS_BYTES * (forward.intra + forward.inter) / (HBM_GBS * 1e9)


@dataclass(frozen=True)
class A2A:
    """One layer's all-to-all on one GPU: seconds per round (the slowest rank's), bytes received
    (the mean over the group)."""

    forward: float = 0.0
    recompute: float = 0.0
    backward: float = 0.0
    intra: float = 0.0
    inter: float = 0.0


def a2a_bytes(comm: Comm, h: int, g: int, tokens: int, headdim: int, item: int, u: int,
              recompute: str) -> dict[str, np.ndarray]:
    """Bytes inner rank i receives from j per round, [U, U]: forward q, k, v in and out back;
    backward d_out in, dq, dk, dv back; the recompute: Megatron's forward again, the plugin's
    q, k, v and its saved out and lse (HybridPlan.bytes' terms)."""
    split = HeadSplit(h, g, u)
    kv = np.array([g // u if comm.system == "megatron" else split.kv_count(j) for j in range(u)])
    local, token = split.local_heads, tokens * headdim * item
    heads = {"forward": np.broadcast_to(2 * local + 2 * kv[:, None], (u, u)),  # to i: its K/V heads
             "backward": np.broadcast_to(2 * local + 2 * kv[None, :], (u, u))}  # back to i: j's dK/dV
    found = {name: (n * token).astype(float) for name, n in heads.items()}
    if recompute == "full":
        found["recompute"] = found["forward"] + (4 * tokens * local if comm.system == "lightseq" else 0)
    return {name: np.where(np.eye(u, dtype=bool), 0.0, v) for name, v in found.items()}


def all_to_all(comm: Comm, h: int, g: int, tokens: int, headdim: int, item: int, group: Group, m: Machine,
               recompute: str) -> A2A:
    """One layer's all-to-all over ``group``, its slowest placement."""
    worst = None
    rounds = a2a_bytes(comm, h, g, tokens, headdim, item, group.size, recompute)
    for placed in group.placements():
        nodes = placed.nodes(np.arange(group.size))
        crossing = nodes[:, None] != nodes[None, :]
        seconds, intra, inter = {}, 0.0, 0.0
        for name, size in rounds.items():
            near, far = np.where(crossing, 0, size).sum(1), np.where(crossing, size, 0).sum(1)
            busiest = np.maximum(near / (m.nvlink_gbs * 1e9), far / (m.ib_gbs * 1e9)).max()
            seconds[name] = float(busiest) + 2 * (group.size - 1) * m.latency_us * 1e-6
            intra, inter = intra + float(near.mean()), inter + float(far.mean())  # plain floats: JSON
        found = A2A(seconds["forward"], seconds.get("recompute", 0.0), seconds["backward"], intra, inter)
        if worst is None or sum(seconds.values()) > worst.forward + worst.recompute + worst.backward:
            worst = found
    return worst
