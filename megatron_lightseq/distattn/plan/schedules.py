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

from collections import defaultdict
from functools import lru_cache

from .mask import Mask, mask_of
from .layout import Layout, check_place, layout_of
from .plan import Block, PairWork, Payload, Plan, RankPlan, RankStep, Shape, Steps, Transfer
from .check import check_plan

SCHEDULES = ("ring", "lightseq")
SCHEDULE_CHOICES = SCHEDULES + ("auto",)  # what a user may ask for
Task = tuple[int, int, Block]  # (step, executing rank, block)


def pair_block(work: PairWork, q_owner: int, kv_owner: int) -> Block | None:
    """The one block holding all the work between q_owner's queries and kv_owner's keys, or None
    (PairWork.blocks). With the plain layouts every such block is full or a causal diagonal
    aligned at its top-left, so a single kernel call does it without wasted work."""
    return work.blocks.get((q_owner, kv_owner))


def _ring_tasks(layout: Layout, work: PairWork) -> list[Task]:
    p = layout.world_size
    tasks = []
    for t in range(p):
        for r in range(p):
            block = pair_block(work, r, (r - t) % p)
            if block is not None:
                tasks.append((t, r, block))
    return tasks


def _lightseq_tasks(layout: Layout, work: PairWork) -> list[Task]:
    if layout.name != "contiguous" or not work.causal:
        # Already balanced: every rank has one block per partner. Same steps as the ring.
        return _ring_tasks(layout, work)
    p = layout.world_size
    tasks = [(0, r, pair_block(work, r, r)) for r in range(p)]
    for t in range(1, p // 2 + 1):
        for r in range(p):
            if r >= t:  # own queries against the keys of distance t
                tasks.append((t, r, pair_block(work, r, r - t)))
            elif 2 * t != p:  # helper: queries at distance p-t against own keys
                tasks.append((t, r, pair_block(work, r + p - t, r)))
    return tasks


def _masked_tasks(layout: Layout, work: PairWork, helpers: bool) -> list[Task]:
    """Plans for documents and windows: one block per pair of ranks whose chunks share work,
    computed by the queries' owner with only the needed K/V chunks sent to it, nearest partner
    first (with a window a rank talks only to the ranks within it). With ``helpers`` (the
    lightseq schedule) the most loaded ranks hand blocks to the K/V's owner, who receives the
    queries and returns (out, lse), as long as that lowers the larger of the two loads."""
    p = layout.world_size
    blocks = work.blocks
    executor = _masked_executors(work, p, helpers)
    order = defaultdict(list)  # executor -> its blocks: own queries nearest first, then those it helps with
    for (x, y), block in blocks.items():
        order[executor[x, y]].append(((executor[x, y] != x, (x - y) % p, x), block))
    return [(t, r, block) for r, mine in order.items() for t, (_, block) in enumerate(sorted(mine, key=lambda e: e[0]))]


def _masked_executors(work: PairWork, p: int, helpers: bool) -> dict[tuple[int, int], int]:
    """(q owner, kv owner) -> the rank that computes their block: the queries' owner, unless
    ``helpers`` hands it to the K/V's owner (_hand_over)."""
    executor = {key: key[0] for key in work.blocks}
    if helpers:
        area = work.area  # numpy, in full chunk pairs
        sizes = {key: float(area[list(b.q_chunks)][:, list(b.kv_chunks)].sum()) for key, b in work.blocks.items()}
        _hand_over(executor, sizes, p)
    return executor


def _hand_over(executor: dict, sizes: dict, p: int) -> None:
    """Move blocks from the most loaded rank to the K/V owners while the larger load drops."""
    load = [0.0] * p
    for key, rank in executor.items():
        load[rank] += sizes[key]
    while True:
        x = max(range(p), key=lambda r: (load[r], -r))
        moves = [(max(load[x] - sizes[key], load[key[1]] + sizes[key]), key) for key, rank in executor.items()
                 if rank == x == key[0] and key[1] != x]
        best = min(moves, default=None)
        if best is None or best[0] >= load[x]:
            return
        key = best[1]
        executor[key] = key[1]
        load[x] -= sizes[key]
        load[key[1]] += sizes[key]


def _route(tasks: list[Task], layout: Layout, ring: bool, backward: bool) -> Steps:
    """Turn tasks into steps: add the transfer of every remote input and every partial result."""
    p = layout.world_size
    q_kind, q_result = ("qg", "dq") if backward else ("q", "o")
    transfers: set[tuple[int, Transfer]] = set()
    for t, x, blk in tasks:
        if blk.q_owner != x:
            transfers.add((t, Transfer(blk.q_owner, x, Payload(q_kind, blk.q_owner, blk.q_chunks))))
            transfers.add((t + 2, Transfer(x, blk.q_owner, Payload(q_result, blk.q_owner, blk.q_chunks))))
        b = blk.kv_owner
        if b != x:
            if ring:  # the owner's whole K/V, forwarded hop by hop so it arrives for step t
                payload = Payload("kv", b, layout.owners[b])
                hops = (x - b) % p
                for i in range(1, hops + 1):
                    transfers.add((t - hops + i, Transfer((b + i - 1) % p, (b + i) % p, payload)))
            else:
                transfers.add((t, Transfer(b, x, Payload("kv", b, blk.kv_chunks))))
            if backward:
                transfers.add((t + 2, Transfer(x, b, Payload("dkv", b, blk.kv_chunks))))
    n_steps = max([t for t, _, _ in tasks] + [s for s, _ in transfers]) + 1
    blocks, sends, recvs = defaultdict(list), defaultdict(list), defaultdict(list)
    for t, x, blk in tasks:
        blocks[t, x].append(blk)
    # Sorted, so that both sides list a pair's transfers in one order (by plain tuples: fast).
    order = lambda e: (e[0], e[1].src, e[1].dst, e[1].payload.kind, e[1].payload.owner, e[1].payload.chunks)
    for s, tr in sorted(transfers, key=order):
        sends[s, tr.src].append(tr)
        recvs[s, tr.dst].append(tr)
    none = ()
    return tuple(tuple(RankStep(tuple(blocks.get((s, r), none)), tuple(sends.get((s, r), none)),
                                tuple(recvs.get((s, r), none))) for r in range(p)) for s in range(n_steps))


def build_plan(schedule: str, *, layout: str, world_size: int, causal: bool = True, cu_seqlens=None,
               window_size=(-1, -1), cu_seqlens_padded=None, tokens: int | None = None,
               rank: int | None = None) -> Plan | RankPlan:
    """The plan of ``schedule`` ("ring" or "lightseq") for this layout, world size and mask:
    ``cu_seqlens`` document boundaries over the whole sequence and ``window_size`` (left, right)
    as in flash-attn; ``tokens``, the sequence's length, is needed for a window without
    documents and for the balanced layout without documents. With ``rank``, only that rank's
    view (:class:`RankPlan`), equal to the whole plan's rows for it; without, the whole plan."""
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    lay = layout_of(layout, world_size, mask, tokens)
    if rank is None:
        return plan_for(schedule, lay, mask)
    check_place(rank, lay.world_size)
    return rank_plan(schedule, lay, mask, rank)


@lru_cache(maxsize=256)
def rank_plan(schedule: str, layout: Layout, mask: Mask, rank: int) -> RankPlan:
    """Rank ``rank``'s view of the plan of ``schedule`` on a built layout; cached, since a rank
    asks for it once per shape (and once per batch of new documents)."""
    return plan_for(schedule, layout, mask).view(rank)


@lru_cache(maxsize=128)
def plan_for(schedule: str, layout: Layout, mask: Mask) -> Plan:
    """The plan of ``schedule`` on a built layout; cached, since plans for documents are asked
    for once per batch. Plans for plain masks are validated here (plan_check.py), once."""
    if schedule == "auto":  # resolved by the caller (dist_attn does), since it depends on the shapes too
        raise ValueError(f"a plan is of a named schedule, one of {SCHEDULES}: for 'auto', build the one "
                         "choose_schedule(...) returns")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULE_CHOICES}, got {schedule!r}")
    work = PairWork(layout, mask)
    if layout.padded_tokens is None:  # the plain layouts, any length
        tasks = (_ring_tasks if schedule == "ring" else _lightseq_tasks)(layout, work)
        ring = schedule == "ring"
    else:
        tasks, ring = _masked_tasks(layout, work, helpers=schedule == "lightseq"), False
    plan = Plan(schedule, layout, mask, forward=_route(tasks, layout, ring, backward=False),
                backward=_route(tasks, layout, ring, backward=True), work=work)
    if layout.padded_tokens is None:
        check_plan(plan)
    return plan


def choose_schedule(layout: str, world_size: int, causal: bool, shape: Shape, cu_seqlens=None,
                    window_size=(-1, -1), cu_seqlens_padded=None) -> str:
    """The ``auto`` rule (:func:`auto_schedule`) for this layout, world size and mask."""
    mask = mask_of(causal, cu_seqlens, window_size, cu_seqlens_padded)
    problem = Shape.problem(shape)
    if problem:
        raise ValueError(problem)
    tokens = mask.length or shape.seqlen_local * world_size
    return auto_schedule(layout_of(layout, world_size, mask, tokens), mask, shape)


@lru_cache(maxsize=256)
def auto_schedule(layout: Layout, mask: Mask, shape: Shape) -> str:
    """Least critical-path compute (``Plan.critical_work``, the real unmasked work), then least
    critical-path traffic (``Plan.critical_bytes``), then the ring, whose neighbour-only traffic
    crosses node boundaries least."""
    def cost(name: str):
        plan = plan_for(name, layout, mask)
        return plan.critical_work, plan.critical_bytes(shape), SCHEDULES.index(name)

    if layout.padded_tokens is not None:  # documents or a window: ring and lightseq differ only in helpers
        work = plan_for("ring", layout, mask).work
        if _masked_executors(work, layout.world_size, True) == _masked_executors(work, layout.world_size, False):
            return "ring"  # no block is handed over: the same plan, and ties go to the ring
    return min(SCHEDULES, key=cost)
