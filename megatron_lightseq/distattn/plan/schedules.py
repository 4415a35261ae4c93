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

import heapq
from collections import defaultdict
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from .mask import Mask, mask_of
from .layout import Layout, check_place, layout_of
from .plan import Block, PairWork, Payload, Plan, RankPlan, RankStep, Shape, Steps, Transfer, payload_bytes
from .check import check_plan

SCHEDULES = ("ring", "lightseq")
SCHEDULE_CHOICES = SCHEDULES + ("auto",)  # what a user may ask for
Task = tuple[int, int, Block]  # (step, executing rank, block)


def pair_block(work: PairWork, q_owner: int, kv_owner: int) -> Block | None:
    """The one block holding all the work between q_owner's queries and kv_owner's keys, or None
    (PairWork.blocks). With the plain layouts every such block is full or a causal diagonal
    aligned at its top-left, so a single kernel call does it without wasted work."""
    return work.block(q_owner, kv_owner)


def _plain_tasks(schedule: str, layout: Layout, work: PairWork) -> tuple[int, Callable[[int, int], Block | None]]:
    """(steps, task) for a plain layout: ``task(t, x)`` is the block rank x computes at step t,
    or None. A rank's task touches only rank x and rank (x-t) mod P or its mirror, so one rank's
    tasks are found among two candidates a step (_tasks_of) without listing every rank's."""
    p = layout.world_size
    if schedule == "lightseq" and layout.name == "contiguous" and work.causal:
        def lightseq(t: int, x: int) -> Block | None:
            if x >= t:  # own queries against the keys of distance t (t = 0: the diagonal)
                return pair_block(work, x, x - t)
            return pair_block(work, x + p - t, x) if 2 * t != p else None  # helper: distance p-t, own keys

        return p // 2 + 1, lightseq
    # The ring, and lightseq where every rank has one block per partner already (balanced).
    return p, lambda t, x: pair_block(work, x, (x - t) % p)


def _all_tasks(steps: int, task, p: int) -> list[Task]:
    return [(t, x, b) for t in range(steps) for x in range(p) if (b := task(t, x)) is not None]


def _tasks_of(steps: int, task, p: int, rank: int) -> list[Task]:
    """The tasks that touch ``rank`` (it computes them, or owns their queries or keys): with both
    plain schedules those of rank itself and of rank (rank+t) mod P at step t."""
    found = []
    for t in range(steps):
        for x in sorted({rank, (rank + t) % p}):
            b = task(t, x)
            if b is not None and (x == rank or rank in (b.q_owner, b.kv_owner)):
                found.append((t, x, b))
    return found


def _lengths(tasks) -> tuple[int, int]:
    """The plan's forward and backward step counts: a task's inputs travel at its step or before
    it, its partial results (o, dq, dkv) two steps after."""
    fwd = bwd = 0
    for t, x, b in tasks:
        fwd = max(fwd, t + 2 * (b.q_owner != x))
        bwd = max(bwd, t + 2 * (b.q_owner != x or b.kv_owner != x))
    return fwd + 1, bwd + 1


def _plain_lengths(steps: int, task, p: int) -> tuple[int, int]:
    """_lengths of the whole plain plan from its last two steps with work (only tasks there can
    end past the last step); the top step is found from above, in O(P) on the plain layouts."""
    last = next(t for t in reversed(range(steps)) if any(task(t, x) is not None for x in range(p)))
    return _lengths([(t, x, b) for t in range(max(last - 1, 0), last + 1) for x in range(p)
                     if (b := task(t, x)) is not None])


def _masked_tasks(layout: Layout, work: PairWork, helpers: bool) -> list[Task]:
    """Plans for documents and windows: one block per pair of ranks whose chunks share work,
    computed by the queries' owner with only the needed K/V chunks sent to it, nearest partner
    first (with a window a rank talks only to the ranks within it). With ``helpers`` (the
    lightseq schedule) the most loaded ranks hand blocks to the K/V's owner, who receives the
    queries and returns (out, lse), as long as that lowers the larger of the two loads."""
    p = layout.world_size
    executor = _masked_executors(work, p, helpers)
    order = defaultdict(list)  # executor -> its blocks: own queries nearest first, then those it helps with
    for (x, y), block in work.blocks.items():
        order[executor[x, y]].append(((executor[x, y] != x, (x - y) % p, x), block))
    return [(t, r, block) for r, mine in order.items() for t, (_, block) in enumerate(sorted(mine, key=lambda e: e[0]))]


@lru_cache(maxsize=8)
def _masked_plan(schedule: str, layout: Layout, mask: Mask) -> tuple[PairWork, list[Task], tuple[int, int]]:
    """(work, every task, step counts) of a masked plan: global, but linear in its blocks, and
    shared by the ranks one process builds (emulation) and by auto_schedule."""
    work = PairWork(layout, mask)
    tasks = _masked_tasks(layout, work, helpers=schedule == "lightseq")
    return work, tasks, _lengths(tasks)


def _masked_executors(work: PairWork, p: int, helpers: bool) -> dict[tuple[int, int], int]:
    """(q owner, kv owner) -> the rank that computes their block: the queries' owner, unless
    ``helpers`` hands it to the K/V's owner (_hand_over)."""
    executor = {key: key[0] for key in work.blocks}
    if helpers:
        sizes = work.pair_sizes.tolist()
        _hand_over(executor, {key: sizes[key[0]][key[1]] for key in executor}, p)
    return executor


def _hand_over(executor: dict, sizes: dict, p: int) -> None:
    """Move blocks from the most loaded rank to the K/V owners while the larger load drops.
    The most loaded rank comes from a heap (stale entries skipped) and only its own remaining
    blocks are weighed, so a move costs O(its blocks + log P), not a scan of every block."""
    load = [0.0] * p
    mine = defaultdict(list)  # rank -> its own blocks it still computes, with another rank's keys
    for key, rank in executor.items():
        load[rank] += sizes[key]
        if rank == key[0] != key[1]:
            mine[rank].append(key)
    heap = [(-load[r], r) for r in range(p)]
    heapq.heapify(heap)
    while True:
        while -heap[0][0] != load[heap[0][1]]:  # stale: that rank's load changed since
            heapq.heappop(heap)
        x = heap[0][1]  # the most loaded, the lowest such rank on ties (as max(load, -r))
        best = min(((max(load[x] - sizes[key], load[key[1]] + sizes[key]), key) for key in mine[x]), default=None)
        if best is None or best[0] >= load[x]:
            return
        key = best[1]
        executor[key] = key[1]
        mine[x].remove(key)
        load[x] -= sizes[key]
        load[key[1]] += sizes[key]
        for r in (x, key[1]):
            heapq.heappush(heap, (-load[r], r))


def _task_transfers(task: Task, layout: Layout, kv: str, backward: bool):
    """(step, Transfer) of every input a task needs from elsewhere and every partial result it
    sends home. ``kv``: "hops" (the ring: the owner's whole K/V, forwarded hop by hop so it
    arrives for the task's step), "direct" (only the needed chunks, from the owner) or "none"."""
    t, x, blk = task
    q_kind, q_result = ("qg", "dq") if backward else ("q", "o")
    if blk.q_owner != x:
        yield t, Transfer(blk.q_owner, x, Payload(q_kind, blk.q_owner, blk.q_chunks))
        yield t + 2, Transfer(x, blk.q_owner, Payload(q_result, blk.q_owner, blk.q_chunks))
    b, p = blk.kv_owner, layout.world_size
    if b == x:
        return
    if kv == "hops":
        payload, hops = Payload("kv", b, layout.owners[b]), (x - b) % p
        for i in range(1, hops + 1):
            yield t - hops + i, Transfer((b + i - 1) % p, (b + i) % p, payload)
    elif kv == "direct":
        yield t, Transfer(b, x, Payload("kv", b, blk.kv_chunks))
    if backward:
        yield t + 2, Transfer(x, b, Payload("dkv", b, blk.kv_chunks))


def _ring_forwards(layout: Layout, causal: bool, sender: int) -> list[tuple[int, Transfer]]:
    """The K/V forwards ``sender`` posts in a ring plan on a plain layout, in O(P): at step i it
    passes owner b = sender-i+1's whole K/V to sender+1 while some rank further on, at distance
    >= i from b (one of sender+1 .. sender+P-i), computes with it, that is (causal) holds a query
    chunk at or past b's first chunk: a running maximum over the ranks ahead."""
    p, owners = layout.world_size, layout.owners
    steps = np.arange(1, p)
    owner = (sender - steps + 1) % p
    if causal:
        top = np.fromiter((max(c) for c in owners), dtype=np.int64, count=p)
        ahead = np.maximum.accumulate(np.roll(top, -(sender + 1)))  # [k]: max over sender+1 .. sender+1+k
        low = np.fromiter((min(c) for c in owners), dtype=np.int64, count=p)
        keep = ahead[p - steps - 1] >= low[owner]
        steps, owner = steps[keep], owner[keep]
    nxt = (sender + 1) % p
    return [(i, Transfer(sender, nxt, Payload("kv", b, owners[b]))) for i, b in zip(steps.tolist(), owner.tolist())]


def _order(e):
    """Both sides list a pair's transfers in one order (by plain tuples: fast)."""
    s, tr = e
    return s, tr.src, tr.dst, tr.payload.kind, tr.payload.owner, tr.payload.chunks


def _rows(tasks, transfers, n_steps: int, ranks) -> list[tuple[RankStep, ...]]:
    """Each of ``ranks``' steps: its blocks in task order, its transfers sorted (_order)."""
    blocks, sends, recvs = defaultdict(list), defaultdict(list), defaultdict(list)
    for t, x, blk in tasks:
        blocks[t, x].append(blk)
    for s, tr in sorted(transfers, key=_order):
        sends[s, tr.src].append(tr)
        recvs[s, tr.dst].append(tr)
    none = ()
    return [tuple(RankStep(tuple(blocks.get((s, r), none)), tuple(sends.get((s, r), none)),
                           tuple(recvs.get((s, r), none))) for s in range(n_steps)) for r in ranks]


def _route(tasks: list[Task], layout: Layout, ring: bool, backward: bool) -> Steps:
    """Turn every task into steps: add the transfer of every remote input and every partial result."""
    transfers = {tr for task in tasks for tr in _task_transfers(task, layout, "hops" if ring else "direct", backward)}
    n_steps = max([t for t, _, _ in tasks] + [s for s, _ in transfers]) + 1
    return tuple(zip(*_rows(tasks, transfers, n_steps, range(layout.world_size))))


def _route_rank(tasks: list[Task], layout: Layout, causal: bool, ring: bool, backward: bool, rank: int,
                n_steps: int) -> tuple[RankStep, ...]:
    """_route's rows for ``rank`` from the tasks that touch it (the ring's K/V forwards from
    _ring_forwards, since those pass through ranks no task of its names)."""
    p = layout.world_size
    transfers = {tr for task in tasks for tr in _task_transfers(task, layout, "none" if ring else "direct", backward)
                 if rank in (tr[1].src, tr[1].dst)}
    if ring and p > 1:
        transfers.update(_ring_forwards(layout, causal, rank))
        transfers.update(e for e in _ring_forwards(layout, causal, (rank - 1) % p) if e[1].dst == rank)
    return _rows([task for task in tasks if task[1] == rank], transfers, n_steps, (rank,))[0]


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
    """Rank ``rank``'s view of the plan of ``schedule`` on a built layout, equal to
    ``plan_for(...).view(rank)`` but built from the tasks that touch it: O(P log P) on the plain
    layouts; with documents or a window the executors and step counts stay global (linear in the
    blocks, :func:`_masked_plan`). Cached, since a rank asks for it once per shape (and once per
    batch of new documents)."""
    _check_schedule(schedule)
    p = layout.world_size
    if layout.padded_tokens is None:
        steps, task = _plain_tasks(schedule, layout, PairWork(layout, mask))
        tasks, lengths, ring = _tasks_of(steps, task, p, rank), _plain_lengths(steps, task, p), schedule == "ring"
    else:
        _, every, lengths = _masked_plan(schedule, layout, mask)
        tasks, ring = [e for e in every if e[1] == rank or rank in (e[2].q_owner, e[2].kv_owner)], False
    fwd, bwd = (_route_rank(tasks, layout, mask.causal, ring, backward, rank, n)
                for backward, n in ((False, lengths[0]), (True, lengths[1])))
    return RankPlan(schedule, layout, mask, rank, fwd, bwd)


def _check_schedule(schedule: str) -> None:
    if schedule == "auto":  # resolved by the caller (dist_attn does), since it depends on the shapes too
        raise ValueError(f"a plan is of a named schedule, one of {SCHEDULES}: for 'auto', build the one "
                         "choose_schedule(...) returns")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULE_CHOICES}, got {schedule!r}")


@lru_cache(maxsize=128)
def plan_for(schedule: str, layout: Layout, mask: Mask) -> Plan:
    """The whole plan of ``schedule`` on a built layout (every rank's steps: the checks, the
    tests, describe()); cached. Plans for plain masks are validated here (check.py), once."""
    _check_schedule(schedule)
    if layout.padded_tokens is None:  # the plain layouts, any length
        work = PairWork(layout, mask)
        steps, task = _plain_tasks(schedule, layout, work)
        tasks, ring = _all_tasks(steps, task, layout.world_size), schedule == "ring"
    else:
        (work, tasks, _), ring = _masked_plan(schedule, layout, mask), False
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
    crosses node boundaries least. Decided without building any plan's steps: closed forms on
    the plain layouts (:func:`_plain_auto`), per-step sums over the tasks otherwise."""
    if layout.padded_tokens is None:
        return _plain_auto(layout, mask)
    # Documents or a window: ring and lightseq differ only in helpers.
    work = _masked_plan("ring", layout, mask)[0]
    if _masked_executors(work, layout.world_size, True) == _masked_executors(work, layout.world_size, False):
        return "ring"  # no block is handed over: the same plan, and ties go to the ring

    def cost(name: str):
        work, tasks, _ = _masked_plan(name, layout, mask)
        return (*_critical(work, tasks, layout, shape), SCHEDULES.index(name))

    return min(SCHEDULES, key=cost)


def _plain_auto(layout: Layout, mask: Mask) -> str:
    """The rule on the plain layouts (tests/test_plans.py checks it against the whole plans'
    numbers). Without a causal mask both schedules run the same blocks and every rank receives
    the same whole K/V a step either way: a tie, the ring. Causal, contiguous: lightseq's critical
    work, floor(P/2) + 1/2, is below the ring's P - 1/2 from P = 3 (at P <= 2 the plans are the
    same). Causal, zigzag: the same blocks, but lightseq sends only the K/V chunks a block needs,
    and from P = 4 some step's busiest rank receives less than the ring's whole K/V plus dK/dV;
    only K/V and dK/dV travel, so the shape does not matter."""
    if not mask.causal:
        return "ring"
    return "lightseq" if layout.world_size >= (3 if layout.name == "contiguous" else 4) else "ring"


def _critical(work: PairWork, tasks: list[Task], layout: Layout, shape: Shape) -> tuple[float, int]:
    """(Plan.critical_work, Plan.critical_bytes) of a masked plan from its tasks, summed per step
    in the same order as the whole plan's properties, so that the floats are the same."""
    load = defaultdict(lambda: defaultdict(float))  # step -> rank -> work
    for t, x, blk in tasks:
        load[t][x] += work.size(blk)
    critical_work = 0.0
    for t in range(max(load) + 1):
        critical_work += max(load[t].values(), default=0.0)
    chunk = shape.seqlen_local // layout.chunks_per_rank
    total = 0
    for backward in (False, True):
        received = defaultdict(lambda: defaultdict(int))  # step -> rank -> bytes
        for s, tr in {tr for task in tasks for tr in _task_transfers(task, layout, "direct", backward)}:
            received[s][tr.dst] += payload_bytes(tr.payload.kind, chunk * len(tr.payload.chunks), shape)
        total += sum(max(r.values()) for r in received.values())
    return critical_work / layout.chunks_per_rank**2, total
