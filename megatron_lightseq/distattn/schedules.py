"""Plan builders: which rank computes which block at which step, and how the inputs travel.

Schedules (see docs/schedules.md for the trade-offs and the ``auto`` rule):
- ``ring``: every rank computes its own queries; K/V travel the ring (rank r forwards to r+1),
  whole, as in Megatron-Core's context parallelism and ring attention.
- ``lightseq``: blocks talk directly to the rank holding their input and only the chunks a block
  needs travel. On the contiguous causal layout, ranks whose own queries are done *help*: at step
  t a rank r < t receives the queries of rank r+P-t, computes them against its own K/V and sends
  (out, lse) back. Distances t and P-t are covered in one step, so the plan takes floor(P/2)+1
  steps for any P (odd P is perfectly balanced; even P idles half the ranks in the last step).
"""
from __future__ import annotations

from functools import lru_cache

from .layout import check_layout, owned_chunks
from .plan import Block, Payload, Plan, RankStep, Shape, Steps, Transfer, chunk_pair_work
from .plan_check import check_plan

SCHEDULES = ("ring", "lightseq")
SCHEDULE_CHOICES = SCHEDULES + ("auto",)  # what a user may ask for
Task = tuple[int, int, Block]  # (step, executing rank, block)


def pair_block(layout: str, world_size: int, causal: bool, q_owner: int, kv_owner: int) -> Block | None:
    """The one block holding all the work between q_owner's queries and kv_owner's keys, or None.

    With both layouts every such block is full or a causal diagonal aligned at its top-left, so a
    single kernel call does it without wasted work.
    """
    qs = owned_chunks(layout, q_owner, world_size)
    ks = owned_chunks(layout, kv_owner, world_size)
    need = [(qc, kc) for qc in qs for kc in ks if chunk_pair_work(causal, qc, kc)]
    if not need:
        return None
    q_chunks = tuple(c for c in qs if any(qc == c for qc, _ in need))
    kv_chunks = tuple(c for c in ks if any(kc == c for _, kc in need))
    return Block(q_owner, q_chunks, kv_owner, kv_chunks)


def _ring_tasks(layout: str, world_size: int, causal: bool) -> list[Task]:
    tasks = []
    for t in range(world_size):
        for r in range(world_size):
            block = pair_block(layout, world_size, causal, r, (r - t) % world_size)
            if block is not None:
                tasks.append((t, r, block))
    return tasks


def _lightseq_tasks(layout: str, world_size: int, causal: bool) -> list[Task]:
    if layout != "contiguous" or not causal:
        # Already balanced: every rank has one block per partner. Same steps as the ring.
        return _ring_tasks(layout, world_size, causal)
    p = world_size
    tasks = [(0, r, pair_block(layout, p, causal, r, r)) for r in range(p)]
    for t in range(1, p // 2 + 1):
        for r in range(p):
            if r >= t:  # own queries against the keys of distance t
                tasks.append((t, r, pair_block(layout, p, causal, r, r - t)))
            elif 2 * t != p:  # helper: queries at distance p-t against own keys
                tasks.append((t, r, pair_block(layout, p, causal, r + p - t, r)))
    return tasks


def _route(tasks: list[Task], layout: str, world_size: int, ring: bool, backward: bool) -> Steps:
    """Turn tasks into steps: add the transfer of every remote input and every partial result."""
    p = world_size
    q_kind, q_result = ("qg", "dq") if backward else ("q", "o")
    transfers: set[tuple[int, Transfer]] = set()
    for t, x, blk in tasks:
        if blk.q_owner != x:
            transfers.add((t, Transfer(blk.q_owner, x, Payload(q_kind, blk.q_owner, blk.q_chunks))))
            transfers.add((t + 2, Transfer(x, blk.q_owner, Payload(q_result, blk.q_owner, blk.q_chunks))))
        b = blk.kv_owner
        if b != x:
            if ring:  # the owner's whole K/V, forwarded hop by hop so it arrives for step t
                payload = Payload("kv", b, owned_chunks(layout, b, p))
                hops = (x - b) % p
                for i in range(1, hops + 1):
                    transfers.add((t - hops + i, Transfer((b + i - 1) % p, (b + i) % p, payload)))
            else:
                transfers.add((t, Transfer(b, x, Payload("kv", b, blk.kv_chunks))))
            if backward:
                transfers.add((t + 2, Transfer(x, b, Payload("dkv", b, blk.kv_chunks))))
    n_steps = max([t for t, _, _ in tasks] + [s for s, _ in transfers]) + 1
    steps = []
    for s in range(n_steps):
        here = sorted(tr for step, tr in transfers if step == s)
        steps.append(tuple(
            RankStep(
                blocks=tuple(blk for t, x, blk in tasks if t == s and x == r),
                sends=tuple(tr for tr in here if tr.src == r),
                # Sorted like the sender's list, so paired ops are posted in the same order.
                recvs=tuple(tr for tr in here if tr.dst == r),
            )
            for r in range(p)
        ))
    return tuple(steps)


@lru_cache(maxsize=None)
def build_plan(schedule: str, *, layout: str, world_size: int, causal: bool = True) -> Plan:
    """The validated plan of ``schedule`` ("ring" or "lightseq") for this layout and world size."""
    check_layout(layout)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULE_CHOICES}, got {schedule!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    tasks = (_ring_tasks if schedule == "ring" else _lightseq_tasks)(layout, world_size, causal)
    ring = schedule == "ring"
    plan = Plan(
        schedule=schedule, layout=layout, world_size=world_size, causal=causal,
        forward=_route(tasks, layout, world_size, ring, backward=False),
        backward=_route(tasks, layout, world_size, ring, backward=True),
    )
    check_plan(plan)
    return plan


@lru_cache(maxsize=256)
def choose_schedule(layout: str, world_size: int, causal: bool, shape: Shape) -> str:
    """The ``auto`` rule: least critical-path compute (``Plan.critical_work``), then least
    critical-path traffic (``Plan.critical_bytes``), then the ring, whose neighbour-only traffic
    crosses node boundaries least."""
    def cost(name: str):
        plan = build_plan(name, layout=layout, world_size=world_size, causal=causal)
        return plan.critical_work, plan.critical_bytes(shape), SCHEDULES.index(name)

    return min(SCHEDULES, key=cost)
