"""Flat context-parallel plans per rank in closed form: what each rank computes and receives at
each step, written down with numpy instead of building the plan (a built P = 1024 plan takes
minutes; this takes milliseconds at P = 4096).

Plans (causal, plain sequence), as distattn/plan/schedules.py builds them:
- ``zigzag/ring``: 2P chunks, rank r holds r and 2P-1-r. Step 0 its own two chunks (a causal
  block of 2 chunks); step t >= 1 the keys of rank b = (r - t) mod P: 2 full chunk pairs, queries
  of 2 chunks against 1 (b < r) or of 1 against 2 (b > r). The owner's whole K/V travels the ring
  (from r - 1 every step); backward, dK/dV go straight home at t + 2 (only the chunks used).
- ``zigzag/lightseq``: the same blocks, K/V straight from the owner (only the chunks used).
- ``contiguous/ring``: rank r holds chunk r, computes (r, r - t) for t <= r; K/V forwarded hop by hop.
- ``contiguous/lightseq``: floor(P/2) + 1 steps; at step t rank r >= t computes (r, r - t) with
  K/V from r - t, rank r < t helps (queries of r + P - t against its own keys, sent back at t + 2).
- ``te/p2p``: TransformerEngine's p2p ring (Megatron's --cp-comm-type p2p): the zigzag ring's
  blocks; backward, K/V and the accumulated dK/dV travel the ring together, one message a step.

Timing (as timing.plan_seconds on a built plan): a step costs max(compute, next step's transfers)
on the busiest rank; a transfer takes NVLink within a node, the network across nodes, plus a
latency per transfer. Max over ranks of max(a, b) is max(max a, max b), so each step's busiest
rank for compute and for transfers is found apart.

Speed: which ranks to look at. At step s a rank's work and transfers depend on which side of s,
P - s, s - 2 and P - s + 2 it lies, and otherwise only on its place in its node, which repeats
every ``period`` ranks: so the first ``period`` ranks after each of those boundaries stand for
all the others (``weight``: how many each stands for, for the byte sums). Where the node pattern
does not repeat (a group not spanning whole nodes), every rank is looked at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..distattn import Shape, payload_bytes
from .model import Machine

KINDS = ("zigzag/ring", "zigzag/lightseq", "contiguous/ring", "contiguous/lightseq", "te/p2p")
FWD_SHARE, BWD_SHARE = 1 / 3.5, 2.5 / 3.5  # of fwd+bwd attention FLOPs (backward = 2.5x forward)
DTYPES = {2: torch.bfloat16, 4: torch.float32}  # a model's bytes per element -> the dtype they travel in


@dataclass(frozen=True)
class Group:
    """Where a group's ranks sit: rank r on GPU ``offset + r * stride``, ``gpus_per_node`` per node."""

    size: int
    stride: int
    gpus_per_node: int
    offset: int = 0

    def nodes(self, ranks):
        return (self.offset + np.asarray(ranks) * self.stride) // self.gpus_per_node

    @property
    def period(self) -> int | None:
        """Ranks after which the node pattern repeats, wrap-around included; None where it does not."""
        if self.nodes(0) == self.nodes(self.size - 1):
            return 1
        if (self.size * self.stride) % self.gpus_per_node:
            return None
        return self.gpus_per_node // math.gcd(self.stride, self.gpus_per_node)

    def placements(self) -> list["Group"]:
        """Every offset groups like this one take when they tile the GPUs (the slowest counts)."""
        span = math.gcd(self.size * self.stride, self.gpus_per_node)
        return [Group(self.size, self.stride, self.gpus_per_node, o) for o in range(0, self.gpus_per_node, span)]


@dataclass(frozen=True)
class Sizes:
    """Per token bytes of each payload (distattn's payload_tensors) and FLOPs of a chunk pair."""

    heads: int
    kv_heads: int
    headdim: int
    item: int
    chunk: int
    kv_wire: str | None = None  # distattn's Shape.kv_wire: None, or "int8"

    def per_token(self, kind: str) -> float:
        """distattn's own payload bytes (the one description of what travels) per token of a
        one-chunk payload (the int8 form's K scales shared by the chunk's tokens)."""
        shape = Shape(1, self.chunk, self.heads, self.kv_heads, self.headdim, DTYPES[self.item], self.kv_wire)
        return payload_bytes(kind, self.chunk, shape) / self.chunk

    @property
    def pair_flops(self) -> float:
        return 3.5 * 4 * self.chunk * self.chunk * self.headdim * self.heads


@dataclass(frozen=True)
class PhaseCost:
    seconds: float
    intra: float  # bytes a GPU receives within its node, mean over the group's GPUs
    inter: float  # ... across nodes
    per_rank: np.ndarray | None = None  # [ranks] all bytes received, where every rank was looked at


def steps(kind: str, q: int) -> int:
    """Attention steps per pass (the backward has as many)."""
    return q // 2 + 1 if kind == "contiguous/lightseq" else q


def _blocks(kind: str, q: int, s, r):
    """(active, query chunks of the block, full pairs, diagonal pair-equivalents) per (s, r)."""
    if kind == "contiguous/lightseq":
        helps = (r < s) & (2 * s != q)
        return [(s == 0, 1, 0.0, 0.5), ((s >= 1) & (s <= q // 2) & ((r >= s) | helps), 1, 1.0, 0.0)]
    if kind == "contiguous/ring":
        return [(s == 0, 1, 0.0, 0.5), ((s >= 1) & (s < q) & (r >= s), 1, 1.0, 0.0)]
    return [(s == 0, 2, 1.0, 1.0), ((s >= 1) & (s < q), np.where(r >= s, 2, 1), 2.0, 0.0)]


def _arrivals(kind: str, phase: str, q: int, s, r):
    """(active, source rank, chunks, payload kind, messages) of what rank r receives at step s."""
    back = phase == "backward"
    t = s - 2  # the task step whose results arrive at s
    if kind == "te/p2p":
        if not back:
            return [((s >= 1) & (s < q), r - 1, 2, "kv", 1)]
        # K/V and dK/dV in one message from r + 1; the last step carries dK/dV alone
        return [((s >= 1) & (s < q), r + 1, 2, "kv", 1), ((s >= 2) & (s <= q), r + 1, 2, "dkv", s == q)]
    if kind.startswith("zigzag"):
        kv = [((s >= 1) & (s < q), r - 1, 2, "kv", 1)] if kind.endswith("ring") else \
             [((s >= 1) & (s < q), r - s, np.where(r >= s, 1, 2), "kv", 1)]
        dkv = [((t >= 1) & (t < q), r + t, np.where(r + t < q, 1, 2), "dkv", 1)]
        return kv + (dkv if back else [])
    dkv = [((t >= 1) & (r + t < q) & (t <= (q // 2 if kind.endswith("lightseq") else q)), r + t, 1, "dkv", 1)]
    if kind == "contiguous/ring":
        return [((s >= 1) & (s <= r), r - 1, 1, "kv", 1)] + (dkv if back else [])
    half = q // 2
    own = [((s >= 1) & (s <= half) & (r >= s), r - s, 1, "kv", 1)]
    helped = [((s >= 1) & (s <= half) & (r < s) & (2 * s != q), r + q - s, 1, "qg" if back else "q", 1)]
    returned = [((t >= 1) & (t <= half) & (r >= q - t) & (2 * t != q), r + t - q, 1, "dq" if back else "o", 1)]
    return own + helped + returned + (dkv if back else [])


def _grid(q: int, rows: int, period: int | None):
    """(s, r, weight) arrays [rows, R]: the ranks to look at per step (module docstring)."""
    s = np.arange(rows)[:, None]
    if period is None or q <= 6 * period:
        return s, np.broadcast_to(np.arange(q), (rows, q)), np.ones((rows, q))
    bounds = np.sort(np.clip(np.hstack([np.zeros((rows, 1)), s, q - s, s - 2, q - s + 2, np.full((rows, 1), q)]),
                             0, q).astype(int), axis=1)
    lo, hi = bounds[:, :-1, None], bounds[:, 1:, None]  # [rows, intervals, 1]
    rank = lo + np.arange(period)  # [rows, intervals, period]
    valid = rank < hi
    weight = np.where(valid, -(-(hi - rank) // period), 0)
    return s, np.where(valid, rank, 0).reshape(rows, -1), weight.reshape(rows, -1).astype(float)


def phase_cost(kind: str, phase: str, group: Group, sizes: Sizes, m: Machine, *, every_rank: bool = False) -> PhaseCost:
    """One pass of the plan ``kind`` over ``group`` (module docstring), for one placement of it."""
    q = group.size
    rows = q + 3
    s, r, weight = _grid(q, rows, None if every_rank else group.period)
    work = np.zeros(r.shape)
    for active, q_chunks, full, diag in _blocks(kind, q, s, r):
        tokens = q_chunks * sizes.chunk
        seconds = sizes.pair_flops * (full / m.attn_rates(tokens, False) + diag / m.attn_rates(tokens, True))
        work += np.where(active, seconds, 0.0)
    work *= FWD_SHARE if phase == "forward" else BWD_SHARE
    intra, inter, count = np.zeros(r.shape), np.zeros(r.shape), np.zeros(r.shape)
    mine = group.nodes(r)
    for active, src, chunks, payload, messages in _arrivals(kind, phase, q, s, r):
        size = np.where(active, chunks * sizes.chunk * sizes.per_token(payload), 0)
        crossing = group.nodes(np.mod(src, q)) != mine
        inter += np.where(crossing, size, 0)
        intra += np.where(crossing, 0, size)
        count += np.where(active, messages, 0)
    comm = np.maximum(intra / (m.nvlink_gbs * 1e9), inter / (m.ib_gbs * 1e9)) + count * m.latency_us * 1e-6
    busiest_work, busiest_comm = work.max(1), comm.max(1)
    seconds = busiest_comm[0] + np.maximum(busiest_work[:-1], busiest_comm[1:]).sum()
    per_rank = (intra + inter).sum(0) if r.shape[1] == q and every_rank else None
    return PhaseCost(float(seconds), float((weight * intra).sum() / q), float((weight * inter).sum() / q), per_rank)


def plan_cost(kind: str, phase: str, group: Group, sizes: Sizes, m: Machine) -> PhaseCost:
    """The slowest placement's cost (groups that straddle nodes unevenly differ by placement)."""
    return max((phase_cost(kind, phase, g, sizes, m) for g in group.placements()), key=lambda c: c.seconds)
