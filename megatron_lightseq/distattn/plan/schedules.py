"""Plan builders: which rank computes which block at which step, and how the inputs travel.

Schedules (see docs/schedules.md for the trade-offs and the ``auto`` rule):
- ``ring``: every rank computes its own queries; K/V travel the ring (rank r forwards to r+1),
  whole, as in Megatron-Core's context parallelism and ring attention.
- ``lightseq``: blocks talk directly to the rank holding their input and only the chunks a block
  needs travel. On the contiguous causal layout, ranks whose own queries are done *help*: at step
  t a rank r < t receives the queries of rank r+P-t, computes them against its own K/V and sends
  (out, lse) back. Distances t and P-t are covered in one step, so the plan takes floor(P/2)+1
  steps for any P (odd P is perfectly balanced; even P idles half the ranks in the last step).

Both are built as tasks (step, executing rank, block), then routed: every remote input and
partial result becomes a transfer. The whole plan (:func:`plan_for`) routes every task; a
running rank's view (:func:`rank_plan`) routes only the tasks that touch it and knows the
whole plan's step counts from its last steps, so it costs O(P log P) on the plain layouts, not
the whole plan's O(P^2) and more. With documents or a window the blocks, who computes them and
when are [P, P] matrices over rank pairs (numpy, :class:`_Masked`), and a view takes its row
and column. ``auto`` compares the schedules' critical work and bytes without any plan's steps.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

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
    or None. In both schedules it pairs rank x with rank (x - t) mod P alone (a helper's queries
    come from x + P - t, the same rank), so the tasks touching a rank r at step t are those of r
    and of (r + t) mod P (_tasks_of), found without listing every rank's."""
    p = layout.world_size
    if schedule == "lightseq" and layout.name == "contiguous" and work.causal:
        def lightseq(t: int, x: int) -> Block | None:
            if x >= t:  # own queries against the keys of distance t (t = 0: the diagonal)
                return pair_block(work, x, x - t)
            return pair_block(work, x + p - t, x) if 2 * t != p else None  # helper: distance p-t, own keys

        return p // 2 + 1, lightseq
    # The ring, and lightseq where every rank has one block per partner already (balanced).
    return p, lambda t, x: pair_block(work, x, (x - t) % p)


def _all_tasks(steps: range, task, p: int) -> list[Task]:
    return [(t, x, b) for t in steps for x in range(p) if (b := task(t, x)) is not None]


def _tasks_of(steps: int, task, p: int, rank: int) -> list[Task]:
    """The tasks that touch ``rank`` (it computes them, or owns their queries or keys), in the
    whole plan's order: at step t those of rank itself and of (rank + t) mod P (_plain_tasks)."""
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
    return _lengths(_all_tasks(range(max(last - 1, 0), last + 1), task, p))


class _Masked(NamedTuple):
    """A plan for documents or a window, as [P, P] matrices over (q owner, kv owner) pairs."""

    work: PairWork
    has: np.ndarray  # the pair has a block (some work between its chunks)
    executor: np.ndarray  # the rank that computes it
    step: np.ndarray  # the step it computes it at
    lengths: tuple[int, int]  # the forward's and the backward's step counts

    def tasks(self, xs: np.ndarray, ys: np.ndarray) -> list[Task]:
        """The tasks of the pairs (xs[i], ys[i]), each with a block."""
        return list(zip(self.step[xs, ys].tolist(), self.executor[xs, ys].tolist(), self.work.blocks_of(xs, ys)))

    def tasks_of(self, rank: int) -> list[Task]:
        """The tasks that touch ``rank``: its row and column of pairs (it computes only blocks of
        its own queries or keys)."""
        ys, = np.nonzero(self.has[rank])
        xs, = np.nonzero(self.has[:, rank])
        xs = xs[xs != rank]
        return self.tasks(np.concatenate([np.full(len(ys), rank), xs]), np.concatenate([ys, np.full(len(xs), rank)]))


@lru_cache(maxsize=8)
def _masked_plan(schedule: str, layout: Layout, mask: Mask) -> _Masked:
    """Plans for documents and windows: one block per pair of ranks whose chunks share work,
    computed by the queries' owner with only the needed K/V chunks sent to it, nearest partner
    first (with a window a rank talks only to the ranks within it). With the lightseq schedule
    the most loaded ranks hand blocks to the K/V's owner, who receives the queries and returns
    (out, lse), as long as that lowers the larger of the two loads (_hand_over). Global, but
    numpy over rank pairs; cached for the ranks one process builds (emulation) and for auto."""
    work = PairWork(layout, mask)
    p = layout.world_size
    has = work.pair_sizes > 0
    executor = _masked_executors(work, has, schedule == "lightseq")
    step = _masked_steps(has, executor)
    rows, cols = np.nonzero(has)
    helped = executor[rows, cols] != rows
    fwd = int((step[rows, cols] + 2 * helped).max()) + 1
    bwd = int((step[rows, cols] + 2 * (rows != cols)).max()) + 1  # off the diagonal dK/dV or dq go home
    return _Masked(work, has, executor, step, (fwd, bwd))


def _masked_executors(work: PairWork, has: np.ndarray, helpers: bool) -> np.ndarray:
    """[P, P]: the rank that computes each pair's block: the queries' owner, unless ``helpers``
    hands it to the K/V's owner (_hand_over)."""
    p = len(has)
    executor = np.repeat(np.arange(p)[:, None], p, 1)
    if helpers:
        xs, ys = np.nonzero(has)
        moved = _hand_over(xs, ys, work.pair_sizes[xs, ys], p)
        executor[xs[moved], ys[moved]] = ys[moved]
    return executor


def _masked_steps(has: np.ndarray, executor: np.ndarray) -> np.ndarray:
    """[P, P]: each pair's step. An executor computes its own queries' blocks first, nearest
    partner first (distance (x - y) mod P), then the blocks it helps with, nearest first. Rolled
    so that column d is distance d, a running count along it is the step."""
    p = len(has)
    me, d = np.arange(p)[:, None], np.arange(p)[None, :]
    partner, helped_of = (me - d) % p, (me + d) % p  # pair (me, partner) and (helped_of, me) at distance d
    own = has[me, partner] & (executor[me, partner] == me)
    helps = has[helped_of, me] & (executor[helped_of, me] == me) & (d != 0)
    step = np.full((p, p), -1, dtype=np.int64)
    rows = np.broadcast_to(me, (p, p))
    step[rows[own], partner[own]] = (np.cumsum(own, 1) - 1)[own]
    step[helped_of[helps], rows[helps]] = (own.sum(1, keepdims=True) + np.cumsum(helps, 1) - 1)[helps]
    return step


def _hand_over(xs: np.ndarray, ys: np.ndarray, sizes: np.ndarray, p: int) -> list[int]:
    """Which of the pairs (xs[i], ys[i]) (row-major, all computed by their queries' owner) to
    hand to the K/V owner: move blocks from the most loaded rank while the larger of the two
    loads drops (ties: the lowest K/V owner). The most loaded rank comes from a heap (stale
    entries skipped) and only its own remaining blocks are weighed, so a move costs O(its
    blocks + log P), not a scan of every block."""
    load = np.bincount(xs, weights=sizes, minlength=p)  # summed in pair order, as the moves' checks assume
    first = np.searchsorted(xs, np.arange(p + 1))  # rank x's pairs: first[x]:first[x + 1]
    free = xs != ys  # blocks with another rank's keys that x still computes
    heap = [(-load[r], r) for r in range(p)]
    heapq.heapify(heap)
    moved = []
    while True:
        while -heap[0][0] != load[heap[0][1]]:  # stale: that rank's load changed since
            heapq.heappop(heap)
        x = heap[0][1]  # the most loaded, the lowest such rank on ties
        mine = slice(first[x], first[x + 1])
        size = sizes[mine]
        after = np.where(free[mine], np.maximum(load[x] - size, load[ys[mine]] + size), np.inf)
        i = int(after.argmin()) if len(after) else 0
        if not len(after) or after[i] >= load[x]:
            return moved
        pair = first[x] + i
        y, s = ys[pair], size[i]
        moved.append(pair)
        free[pair] = False
        load[x] -= s
        load[y] += s
        for r in (x, y):
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
        masked = _masked_plan(schedule, layout, mask)
        tasks, lengths, ring = masked.tasks_of(rank), masked.lengths, False
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
        tasks, ring = _all_tasks(range(steps), task, layout.world_size), schedule == "ring"
    else:
        masked, ring = _masked_plan(schedule, layout, mask), False
        work, tasks = masked.work, masked.tasks(*np.nonzero(masked.has))
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
    plans = {name: _masked_plan(name, layout, mask) for name in SCHEDULES}
    if (plans["lightseq"].executor == plans["ring"].executor).all():
        return "ring"  # no block is handed over: the same plan, and ties go to the ring
    return min(SCHEDULES, key=lambda name: (*_critical(plans[name], shape), SCHEDULES.index(name)))


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


def _critical(plan: _Masked, shape: Shape) -> tuple[float, int]:
    """(Plan.critical_work, Plan.critical_bytes) of a masked plan from its matrices: one block per
    executor and step, and no transfer twice, so per-step maxima of sums need no steps. The work
    is summed step by step as the Plan sums it, so that the floats are the same."""
    layout, rows, cols = plan.work.layout, *np.nonzero(plan.has)
    step, executor = plan.step[rows, cols], plan.executor[rows, cols]
    busiest = np.zeros(plan.lengths[0])
    np.maximum.at(busiest, step, plan.work.pair_sizes[rows, cols])
    critical_work = 0.0
    for w in busiest.tolist():
        critical_work += w
    q_chunks, kv_chunks = (need.sum(1) for need in plan.work.needed(rows, cols))
    chunk = shape.seqlen_local // layout.chunks_per_rank
    unit = {kind: payload_bytes(kind, chunk, shape) for kind in ("q", "o", "qg", "dq", "kv", "dkv")}  # linear in tokens
    helped, remote = executor != rows, executor != cols
    total = 0
    for backward, n in zip((False, True), plan.lengths):
        received = np.zeros((n + 2, layout.world_size), dtype=np.int64)
        q_kind, q_result = ("qg", "dq") if backward else ("q", "o")
        parts = [(helped, step, executor, q_chunks * unit[q_kind]), (helped, step + 2, rows, q_chunks * unit[q_result]),
                 (remote, step, executor, kv_chunks * unit["kv"])]
        if backward:
            parts.append((remote, step + 2, cols, kv_chunks * unit["dkv"]))
        for where, at, dst, size in parts:
            np.add.at(received, (at[where], dst[where]), size[where])
        total += int(received.max(1).sum())
    return critical_work / layout.chunks_per_rank**2, total
