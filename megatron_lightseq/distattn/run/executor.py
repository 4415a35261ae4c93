"""Runs one rank's side of a plan, forward or backward. No rank arithmetic lives here: what to
compute, send and receive at each step is read from the plan.

Legend: B batch, S local tokens, H query heads, G key/value heads, D head dim.
Running results (out and lse forward; dq, dk, dv backward) accumulate in float32, or float64
for float64 inputs, and are cast to the inputs' dtype at the end.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from ...kernels.base import BlockKernel, accum_dtype
from ...kernels.merge import merge_into
from ..plan.plan import INPUT_KINDS, Block, Payload, RankPlan, Shape, payload_tensors
from ..plan.runs import one_run, span_of
from ..transport.exchange import Exchange, Pending
from ..transport.trace import count
from .rows import Rows, add_to, pick, rows_in, stretches
from .wire import KvWire

Tensors = tuple[torch.Tensor, ...]


class _RankRun:
    """State of one rank while it walks the steps of one phase."""

    def __init__(self, view: RankPlan, phase: str, exchange: Exchange, shape: Shape, local: dict[str, Tensors]) -> None:
        assert exchange.rank == view.rank, "the exchange's rank runs this view"
        self.view, self.phase, self.exchange, self.shape = view, phase, exchange, shape
        self.steps = view.steps(phase)
        self.rank = view.rank
        self.chunk_len = shape.seqlen_local // len(view.owned)
        self.local = local  # kind -> this rank's own tensors for that kind (whole local sequence), accumulators too
        self.held: dict[tuple[str, int], tuple[Payload, Tensors]] = {}  # received inputs
        self.results: dict[Payload, Tensors] = {}  # computed for other ranks, not yet sent
        self.done_after = drop_after(view, phase)
        self.device_ = next(iter(local.values()))[0].device
        self.buffers = receive_buffers(view, phase, shape)
        self.views: dict[tuple[str, tuple[int, ...]], Tensors] = {}  # views of local tensors' rows taken so far
        dtype = local["kv"][0].dtype
        self.wire = KvWire(view, phase, dtype) if shape.kv_wire == "int8" else None  # kv payloads in 8 bits

    def rows(self, chunks: tuple[int, ...], within: tuple[int, ...]) -> Rows:
        """Where ``chunks`` sit in a tensor of ``within``'s chunks (rows.py)."""
        return rows_in(chunks, within, self.chunk_len, self.device_)

    def take(self, kind: str, owner: int, chunks: tuple[int, ...]) -> Tensors:
        """``chunks`` of owner's ``kind`` tensors, local ones or a received payload: views when the
        chunks are neighbours there (always, with the plain layouts), else one copy per tensor."""
        if owner == self.rank:
            taken = self.views.get((kind, chunks))
            if taken is None:
                rows = self.rows(chunks, self.view.owned)
                taken = tuple(pick(t, rows) for t in self.local[kind])
                if isinstance(rows, tuple):  # views of tensors that live the whole call: kept (not copies,
                    self.views[kind, chunks] = taken  # nor a received payload's, kept past its drop)
            return taken
        payload, tensors = self.held[kind, owner]
        if chunks == payload.chunks:  # all of them, in their order: the tensors themselves
            return tensors
        rows = self.rows(chunks, payload.chunks)
        return tuple(pick(t, rows) for t in tensors)

    def post(self, t: int) -> tuple[Pending, list[tuple[Payload, Tensors]]]:
        if t >= len(self.steps):
            return Pending([]), []
        mine = self.steps[t]
        sends = []
        for tr in mine.sends:
            p = tr.payload
            if p.kind == "kv" and self.wire is not None:
                tensors = self.wire.outgoing(p, self.take)
            else:
                tensors = self.take(p.kind, p.owner, p.chunks) if p.kind in INPUT_KINDS else self.results.pop(p)
            sends.append((tr.dst, tuple(x.contiguous() for x in tensors)))
        recvs = [(tr.payload, tuple(torch.empty(shape, dtype=dtype, device=self.device_) for shape, dtype in specs))
                 for tr, specs in zip(mine.recvs, self.buffers[t])]
        pending = self.exchange.post(sends, [(tr.src, bufs) for tr, (_, bufs) in zip(mine.recvs, recvs)],
                                     f"{self.phase} step {t}")
        return pending, recvs

    def arrive(self, arriving: list[tuple[Payload, Tensors]], absorb: Callable[[Payload, Tensors], None]) -> None:
        """Hold received inputs, absorb received results. A method of its own so that no loop
        variable keeps the last payload alive after the next post (planner/memory.py counts none)."""
        for payload, tensors in arriving:
            if payload.kind == "kv" and self.wire is not None:
                self.held["kv", payload.owner] = (payload, self.wire.arrived(payload, tensors))
            elif payload.kind in INPUT_KINDS:
                self.held[payload.kind, payload.owner] = (payload, tensors)
            else:
                absorb(payload, tensors)

    def run(self, compute: Callable[[Block], None], absorb: Callable[[Payload, Tensors], None]):
        """The loop of plan.py: wait for step t, post step t+1, compute step t. A generator that
        yields before each wait, when this rank has posted everything the wait needs from others:
        real ranks run it straight through (:func:`drive`); emulated ranks run in lockstep.
        Whatever fails on the way (a wait, a kernel) goes through the exchange's failure
        protocol, named by phase and step."""
        t = 0
        try:
            pending, arriving = self.post(0)
            for t in range(len(self.steps)):
                yield
                pending.wait()
                self.arrive(arriving, absorb)
                pending, arriving = self.post(t + 1)
                blocks = self.steps[t].blocks
                for block in blocks:
                    compute(block)
                count(blocks=len(blocks))
                for key in self.done_after[t]:
                    self.held.pop(key, None)
                    if self.wire is not None and key[0] == "kv":
                        self.wire.drop(key[1])
            t = len(self.steps)
            yield
            pending.wait()
        except Exception as e:  # noqa: BLE001 - re-raised, named
            raise self.exchange.fail(f"{self.phase} step {t}", e) from e


def receive_buffers(view: RankPlan, phase: str, shape: Shape) -> tuple[tuple[tuple, ...], ...]:
    """Per step, per receive, the (shape, dtype) of each buffer it lands in; once per view,
    phase and shape."""
    cache = view.runtime.setdefault("receive_buffers", {})
    key = phase, shape
    if key not in cache:
        chunk_len = shape.seqlen_local // len(view.owned)
        cache[key] = tuple(tuple(tuple((size, dtype) for size, dtype, _ in
                                       payload_tensors(tr.payload.kind, len(tr.payload.chunks) * chunk_len, shape))
                                 for tr in step.recvs) for step in view.steps(phase))
    return cache[key]


def drop_after(view: RankPlan, phase: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Per iteration t, the received inputs (kind, owner) no later iteration needs (for a block,
    or for a send posted during iteration t-1 for step t): dropped after t. The executor's
    lifetimes, which the memory model (memory.py) reads too; once per view and phase."""
    cache = view.runtime.setdefault("drop_after", {})
    if phase not in cache:
        q_kind = "q" if phase == "forward" else "qg"
        steps = view.steps(phase)
        last: dict[tuple[str, int], int] = {}
        for t, mine in enumerate(steps):
            for b in mine.blocks:
                last[q_kind, b.q_owner] = t
                last["kv", b.kv_owner] = t
            for tr in mine.sends:
                if tr.payload.kind in INPUT_KINDS:
                    k = (tr.payload.kind, tr.payload.owner)
                    last[k] = max(last.get(k, 0), t - 1)
        done = [[] for _ in steps]
        for k, t in last.items():
            done[max(t, 0)].append(k)
        cache[phase] = tuple(tuple(d) for d in done)
    return cache[phase]


@lru_cache(maxsize=4096)
def _block_spans(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], chunk_len: int) -> dict:
    return dict(q_span=span_of(q_chunks, chunk_len), k_span=span_of(kv_chunks, chunk_len))


def forward_call(view: RankPlan, b: Block) -> str:
    """How the forward runs the view's block ``b``: "forward_into" for its own queries in one run
    of rows (merged in place), else "forward" (merged after, or sent back to their owner). The
    executor, kernel="auto"'s settlement and the memory model all ask here."""
    return "forward_into" if b.q_owner == view.rank and one_run(b.q_chunks, view.owned) else "forward"


def drive(steps):
    """Run a generator of the executor to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _spans(run: _RankRun, b: Block):
    return _block_spans(b.q_chunks, b.kv_chunks, run.chunk_len)


def kernel_calls(view: RankPlan, shape: Shape, device: torch.device, scale: float,
                 backward: bool) -> list[tuple]:
    """Every kernel call this rank's view makes, as (call, q shape, k shape, dtype, device,
    block): what kernel="auto" settles with the group before the first transfer."""
    chunk_len = shape.seqlen_local // len(view.owned)
    found = []
    for phase in ("forward", "backward") if backward else ("forward",):
        for rs in view.steps(phase):
            for b in rs.blocks:
                q_shape = (shape.batch, len(b.q_chunks) * chunk_len, shape.nheads, shape.headdim)
                k_shape = (shape.batch, len(b.kv_chunks) * chunk_len, shape.nheads_kv, shape.headdim)
                kind = "backward" if phase == "backward" else forward_call(view, b)
                block = dict(_block_spans(b.q_chunks, b.kv_chunks, chunk_len), mask=view.mask, scale=scale)
                found.append((kind, q_shape, k_shape, shape.dtype, device, block))
    return found


def forward_steps(view: RankPlan, kernel: BlockKernel, scale: float, exchange: Exchange, q, k, v, *,
                  kv_wire: str | None = None):
    """This rank's (out_BSHD, lse_BHS) of attention over the whole sequence, as a generator
    (see _RankRun.run; :func:`drive` runs it straight through). ``kv_wire``: the form K/V
    travel in (Shape.kv_wire; wire.py)."""
    rank, mask = view.rank, view.mask
    shape = Shape.of(q, k, kv_wire)
    acc = accum_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((shape.batch, shape.nheads, shape.seqlen_local), float("-inf"), dtype=acc, device=q.device)
    run = _RankRun(view, "forward", exchange, shape, {"q": (q,), "kv": (k, v), "acc": (out, lse)})
    owned = view.owned

    def merge(chunks, part_out, part_lse) -> None:
        if isinstance(run.rows(chunks, owned), tuple):  # one stretch: the part is its rows
            merge_into(*run.take("acc", rank, chunks), part_out, part_lse)
            return
        for here, there in stretches(chunks, owned, run.chunk_len):  # in place, no copy of the rows
            merge_into(pick(out, there), pick(lse, there), pick(part_out, here), pick(part_lse, here))

    def compute(b: Block) -> None:
        (q_,), (k_, v_) = run.take("q", b.q_owner, b.q_chunks), run.take("kv", b.kv_owner, b.kv_chunks)
        block = dict(mask=mask, scale=scale, **_spans(run, b))
        if forward_call(view, b) == "forward_into":  # own queries, one run of rows
            kernel.forward_into(q_, k_, v_, *run.take("acc", rank, b.q_chunks), **block)
        elif b.q_owner == rank:
            merge(b.q_chunks, *kernel.forward(q_, k_, v_, **block))
        else:
            o, l = kernel.forward(q_, k_, v_, **block)
            run.results[Payload("o", b.q_owner, b.q_chunks)] = (o, l.to(acc))

    def absorb(p: Payload, tensors: Tensors) -> None:  # a helper's partial result for our queries
        merge(p.chunks, *tensors)

    yield from run.run(compute, absorb)
    count(forward_calls=1)
    return out.to(q.dtype), lse


def backward_steps(view: RankPlan, kernel: BlockKernel, scale: float, exchange: Exchange, dout, q, k, v, out, lse, *,
                   kv_wire: str | None = None):
    """This rank's (dq, dk, dv) from the saved forward results (the forward is not re-run), as a
    generator (see _RankRun.run). K/V that travel in int8 (``kv_wire``) are quantized as the
    forward quantized them, so the gradients are those of the values the forward computed with,
    passed straight through to k and v."""
    rank, mask = view.rank, view.mask
    acc = accum_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    local = {"qg": (q, out, lse, dout), "kv": (k, v), "dq": (dq,), "dkv": (dk, dv)}
    run = _RankRun(view, "backward", exchange, Shape.of(q, k, kv_wire), local)
    owned = view.owned

    def add(kind, chunks, *parts):  # in place (``acc[rows] += x`` would also copy it back)
        if isinstance(run.rows(chunks, owned), tuple):  # one stretch: into the call's kept views
            for acc, part in zip(run.take(kind, rank, chunks), parts):
                acc.add_(part)
            return
        for acc, part in zip(run.local[kind], parts):  # several (rows.add_to)
            add_to(acc, chunks, owned, run.chunk_len, part)

    def compute(b: Block) -> None:
        q_, o_, l_, do_ = run.take("qg", b.q_owner, b.q_chunks)
        k_, v_ = run.take("kv", b.kv_owner, b.kv_chunks)
        dq_, dk_, dv_ = kernel.backward(do_, q_, k_, v_, o_, l_, mask=mask, scale=scale, **_spans(run, b))
        if b.q_owner == rank:
            add("dq", b.q_chunks, dq_)
        else:
            run.results[Payload("dq", b.q_owner, b.q_chunks)] = (dq_,)
        if b.kv_owner == rank:
            add("dkv", b.kv_chunks, dk_, dv_)
        else:
            run.results[Payload("dkv", b.kv_owner, b.kv_chunks)] = (dk_, dv_)

    def absorb(p: Payload, tensors) -> None:
        add(p.kind, p.chunks, *tensors)

    yield from run.run(compute, absorb)
    count(backward_calls=1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
