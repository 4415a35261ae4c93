"""The exchange between the ranks of a sequence-parallel group: one interface, two transports.

- :class:`GroupExchange`: point-to-point ops over a ``torch.distributed`` process group. Plans
  speak in group ranks; this is the one place they become global ranks, as point-to-point ops
  require.
- :class:`VirtualExchange`: P virtual ranks in one process (emulate.py); a send is a device copy
  into a mailbox.

Both count every byte in :meth:`Exchange.post` and offer :meth:`Exchange.agree`, the one
collective the input checks use.

A call's header: in steady state the ranks skip the agreement, so ranks that call with different
shapes would post transfers that do not fit (gloo fills a larger buffer with a shorter message
silently, and aborts the process on a longer one; NCCL hangs or truncates). So a
:class:`GroupExchange` given a ``header`` (the call's key and sizes, a few numbers) sends it to
each peer ahead of the step's data, in the same batch. On gloo the data is received only once
the headers are checked (a wrong size never lands), and a difference raises :class:`WrongCall`
naming the sizes on both sides; on NCCL the check is a device-side assert after the wait (no
host sync). The headers are not counted in trace()'s bytes: those are the plan's.

Waits with deadlines, and how a failure travels to the peers: failures.py.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .failures import (DEFAULT_TIMEOUT, FAILURE_KEY, DistAttnError, GroupState, GroupWatcher, WrongCall, describe,
                       record_failure, watched_wait)
from .trace import count, tracing

Batch = Sequence[tuple[int, Sequence[torch.Tensor]]]  # (group rank of the peer, tensors)
# Backends whose waits block the host, watched in the waiting thread (failures.watched_wait); the
# others (NCCL) only order streams and have a GroupWatcher. A fact about backends, not a setting:
# the tests empty it to run gloo through the NCCL path.
HOST_WAIT_BACKENDS = ("gloo",)


class Pending:
    """Transfers in flight; ``wait()`` blocks until all are done."""

    def __init__(self, works: list, keep: object = None) -> None:
        self._works = works
        self._keep = keep  # tensors being sent: alive until the transfer is done

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []
        self._keep = None


class Exchange(ABC):
    rank: int
    world_size: int
    timeout: float = DEFAULT_TIMEOUT  # seconds, per step
    label: str | None = None  # names the call in errors, e.g. "layer 3"
    failure: str | None = None  # the group's first failure, once this rank knows of one
    # A hybrid call's other group (run/pipeline.py): its ranks wait on this rank too, so a
    # failure recorded here is recorded there as well.
    linked: "GroupExchange | None" = None
    # (names, values) that every transfer of the current call carries to check that the peer runs
    # the same call (module docstring): a checksum of the call first, then sizes; None: no header
    # (virtual ranks run one call by construction)
    header: tuple[tuple[str, ...], tuple[float, ...]] | None = None

    def post(self, sends: Batch, recvs: Batch, where: str = "", *,
             counters=("bytes_sent", "bytes_received")) -> Pending:
        """Start sending/receiving each (group rank, tensors) pair, in the order given; ``where``
        names the step in a timeout's error.

        Both sides list the tensors between a pair of ranks in the same order, which is what
        pairs them up (NCCL ignores tags). ``counters``: the trace() fields the bytes go to (the
        hybrid's all-to-all counts apart from the plan's transfers).
        """
        if self.failure:
            raise DistAttnError(f"dist_attn: this group failed earlier ({self.failure}); it cannot be used")
        if tracing():
            count(**{counters[0]: sum(t.numel() * t.element_size() for _, ts in sends for t in ts),
                     counters[1]: sum(t.numel() * t.element_size() for _, ts in recvs for t in ts)})
        return self._post(sends, recvs, where)

    @abstractmethod
    def _post(self, sends: Batch, recvs: Batch, where: str) -> Pending: ...

    @abstractmethod
    def agree(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on every rank), in rank order."""

    def fail(self, where: str, error: Exception) -> Exception:
        """The error to raise for ``error``, which happened ``where`` (e.g. "forward step 2")."""
        return DistAttnError(f"dist_attn failed on rank {self.rank} of {self.world_size} ({self._at(where)}): "
                             f"{describe(error)}")

    def _at(self, where: str) -> str:
        return where + (f", {self.label}" if self.label else "")


@lru_cache(maxsize=None)  # per group, for the group's life
def _global_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """Global rank of each group rank; looked up once per group, not on every call."""
    if group is None:  # single process, nothing to talk to
        return (0,)
    return tuple(dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)))


@lru_cache(maxsize=None)  # never evicted: every rank must remember the same signatures
def group_state(group: dist.ProcessGroup | None) -> GroupState:
    return GroupState()


class _WatchedPending(Pending):
    """Works of one step on a host-waiting (gloo) group, each with the peers it waits for."""

    def __init__(self, works: list, peers: list[list[int]], keep: object, exchange: "GroupExchange") -> None:
        super().__init__(works, keep)
        self._peers, self._exchange = peers, exchange

    def wait(self) -> None:
        watched_wait(self._works, self._peers, self._keep, self._exchange.timeout, self._exchange.store)
        self._works, self._keep = [], None


def abort_group(group: dist.ProcessGroup) -> None:
    """End the group's communicator: NCCL kernels waiting on it return (gloo: no effect)."""
    group.abort()


def abort_once(state: GroupState, group: dist.ProcessGroup) -> bool:
    """abort_group, unless this rank (its failing call, or its watcher) aborted the group already;
    whether it did now."""
    with state.lock:
        if state.aborted:
            return False
        state.aborted = True
    abort_group(group)
    return True


class _StreamPending(Pending):
    """Works of one step on a group whose waits only order streams (NCCL): waiting enqueues them,
    and the group's watcher is told when the step will be done (failures.GroupWatcher)."""

    def __init__(self, works: list, peers: list[int], keep: object, exchange: "GroupExchange", where: str) -> None:
        super().__init__(works, keep)
        self._peers, self._exchange, self._where = peers, exchange, where

    def wait(self) -> None:
        works, x = self._works, self._exchange
        where = x._at(self._where or "a step")
        if x.on_cuda:
            super().wait()
            done = torch.cuda.Event()
            done.record()  # after the waits on the current stream: queried by the watcher, never waited on
            x.watcher().watch(done.query, self._peers, x.timeout, where)
        else:  # a host backend run this way (the tests), whose wait blocks: the works say when they are done
            x.watcher().watch(lambda: all(w.is_completed() for w in works), self._peers, x.timeout, where)
            super().wait()


def _peers(batch: Batch) -> list[int]:
    return list(dict.fromkeys(peer for peer, _ in batch))


class _CheckedPending(Pending):
    """gloo with headers: wait for the headers, check them, receive the data, then end the sends."""

    def __init__(self, heads: Pending, sends: Pending, peers: list[int], theirs: torch.Tensor, recvs: Batch,
                 exchange: "GroupExchange", where: str) -> None:
        super().__init__([])
        self._heads, self._sends, self._peers, self._theirs, self._recvs = heads, sends, peers, theirs, recvs
        self._exchange, self._where = exchange, where

    def wait(self) -> None:
        self._heads.wait()
        self._exchange.check_headers(self._peers, self._theirs)
        self._exchange._post_ops([], self._recvs, self._where).wait()
        self._sends.wait()


class _AssertedPending(Pending):
    """NCCL with headers: after the stream waits, a device-side assert that every header is this
    rank's (a mismatch stops the process with CUDA's device-side assert; no host sync)."""

    def __init__(self, pending: Pending, theirs: torch.Tensor, mine: torch.Tensor) -> None:
        super().__init__([])
        self._pending, self._theirs, self._mine = pending, theirs, mine

    def wait(self) -> None:
        self._pending.wait()
        torch._assert_async((self._theirs == self._mine).all(),
                            "dist_attn: a peer sent a transfer of another call (its shapes or options differ)")


class GroupExchange(Exchange):
    """Over ``group``; None means the default group, or a single process when torch.distributed
    is not initialised."""

    def __init__(self, group: dist.ProcessGroup | None, *, timeout: float = DEFAULT_TIMEOUT,
                 label: str | None = None) -> None:
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"group must be a torch.distributed ProcessGroup or None, got {group!r}")
        self.group, self.timeout, self.label = group, timeout, label
        self._global = _global_ranks(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.world_size = len(self._global)
        self.state = group_state(group)
        self.agreed = self.state.agreed
        self._backend = None if group is None else dist.get_backend(group)
        # gloo waits on the host, so a wait can be watched; NCCL's only orders streams, so a
        # watcher thread keeps its deadlines and failures instead (failures.py).
        self._host_waits = self._backend in HOST_WAIT_BACKENDS
        self.on_cuda = self._backend == "nccl"

    def watcher(self) -> GroupWatcher:
        """The group's watcher (failures.GroupWatcher), started on first use."""
        state = self.state
        if state.watcher is None:
            group, rank = self.group, self.rank

            def abort(record: str) -> None:
                if state.failure is None:
                    state.failure = record
                if abort_once(state, group):
                    print(f"dist_attn: rank {rank}: aborted the group's communicator, because it failed first on "
                          f"{record}", file=sys.stderr, flush=True)

            state.watcher = GroupWatcher(self.store, rank, self.world_size, abort)
        return state.watcher

    @property
    def store(self):
        return c10d._get_process_group_store(self.group)

    @property
    def failure(self) -> str | None:
        return self.state.failure

    def _post(self, sends: Batch, recvs: Batch, where: str) -> Pending:
        if self.header is None or not (sends or recvs):
            return self._post_ops(sends, recvs, where)
        mine = self._header_tensor()
        # one header per peer, ahead of that peer's data: transfers pair up in posting order
        sends = [(peer, (mine,)) for peer in _peers(sends)] + list(sends)
        peers = _peers(recvs)
        theirs = torch.empty(len(peers), mine.numel(), dtype=mine.dtype, device=mine.device)
        heads = [(peer, (theirs[i],)) for i, peer in enumerate(peers)]
        if self._host_waits:  # the data is received once its header is checked: a wrong size never lands
            # the sends wait apart: they end only when the peer, having checked its headers, receives
            return _CheckedPending(self._post_ops([], heads, where), self._post_ops(sends, [], where), peers, theirs,
                                   recvs, self, where)
        return _AssertedPending(self._post_ops(sends, heads + list(recvs), where), theirs, mine)

    def _post_ops(self, sends: Batch, recvs: Batch, where: str) -> Pending:
        ops = [(peer, dist.P2POp(dist.isend, t, self._global[peer], self.group)) for peer, ts in sends for t in ts]
        ops += [(peer, dist.P2POp(dist.irecv, t, self._global[peer], self.group)) for peer, ts in recvs for t in ts]
        if not ops:
            return Pending([])
        works = dist.batch_isend_irecv([op for _, op in ops])
        if not self._host_waits:
            return _StreamPending(works, sorted({peer for peer, _ in ops}), sends, self, where)
        # gloo returns a work per op
        return _WatchedPending(works, [[peer] for peer, _ in ops], (sends, recvs), self)

    def _header_tensor(self) -> torch.Tensor:
        """The header as a tensor on the transport's device, made once per call (the exchange is)."""
        if getattr(self, "_header", None) is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else "cpu"
            self._header = torch.tensor(self.header[1], dtype=torch.float64, device=device)
        return self._header

    def check_headers(self, peers: list[int], theirs: torch.Tensor) -> None:
        """WrongCall if a peer's header differs from this rank's (gloo: on the host)."""
        names, mine = self.header
        for peer, row in zip(peers, theirs.tolist()):
            if row != list(mine):  # the first value is a checksum of the call: its name says what it covers
                raise WrongCall(peer, [names[0] + " differ" if i == 0 else f"{n} {a:g} there, {b:g} here"
                                       for i, (n, a, b) in enumerate(zip(names, row, mine)) if a != b])

    def agree(self, values: Sequence[float]) -> list[list[float]]:
        if self.world_size == 1:
            return [list(values)]
        # NCCL gathers only device tensors; gloo only host ones.
        device = torch.device("cuda", torch.cuda.current_device()) if self._backend == "nccl" else "cpu"
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(every, mine, group=self.group, async_op=True)
        others = [r for r in range(self.world_size) if r != self.rank]
        if self._host_waits:
            _WatchedPending([work], [others], (mine, every), self).wait()
        else:  # the read below blocks the host: the watcher aborts the group if a peer never comes
            _StreamPending([work], others, (mine, every), self, "input agreement").wait()
        count(collectives=1, host_reads=1)
        return torch.stack(every).tolist()  # one read back, not one per rank

    def relay(self, record: str) -> None:
        """Take ``record``, the first failure of a linked group (Exchange.linked), as this group's
        own unless it has one: written to this group's store, where its peers look."""
        if self.group is None or self.failure is not None:
            return
        self.state.failure = self.store.compare_set(FAILURE_KEY, "", record).decode()
        if not self._host_waits:
            abort_once(self.state, self.group)

    def fail(self, where: str, error: Exception) -> Exception:
        """Record the group's first failure in its store (unless a peer's came first), so that
        every peer stops, and return the error that names the first failure."""
        if self.group is None:
            return super().fail(where, error)
        where = self._at(where)
        mine = f"rank {self.rank} of {self.world_size} ({where}): {describe(error)}"
        first = record_failure(self.store, mine, error, rank=self.rank, where=where, timeout=self.timeout)
        self.state.failure = first
        if not self._host_waits:
            abort_once(self.state, self.group)  # NCCL: end this rank's kernels (its peers' watchers abort theirs)
        if self.linked is not None:
            self.linked.relay(first)
        if first.startswith(mine):
            return DistAttnError(f"dist_attn failed on {first}")
        return DistAttnError(f"dist_attn stopped on rank {self.rank} of {self.world_size} ({where}) "
                             f"because it failed first on {first}")


class Mailbox:
    """Tensors in flight between virtual ranks, in order per (src, dst) pair."""

    def __init__(self) -> None:
        self.queues: dict[tuple[int, int], deque] = defaultdict(deque)

    def empty(self) -> bool:
        return not any(self.queues.values())


class _Delivery(Pending):
    def __init__(self, mailbox: Mailbox, rank: int, recvs: Batch) -> None:
        super().__init__([])
        self._mailbox, self._rank, self._recvs = mailbox, rank, recvs

    def wait(self) -> None:
        for peer, buffers in self._recvs:
            for buf in buffers:
                buf.copy_(self._mailbox.queues[peer, self._rank].popleft())
        self._recvs = []


class VirtualExchange(Exchange):
    """One virtual rank of ``world_size`` sharing ``mailbox``. The ranks must run in lockstep
    (every rank posts a step before any waits on it), as emulate.py drives them."""

    def __init__(self, mailbox: Mailbox, rank: int, world_size: int, state: GroupState | None = None) -> None:
        self._mailbox, self.rank, self.world_size = mailbox, rank, world_size
        self.state = GroupState() if state is None else state  # what this virtual rank has agreed
        self.agreed = self.state.agreed

    def _post(self, sends: Batch, recvs: Batch, where: str) -> Pending:
        for peer, tensors in sends:
            for t in tensors:
                self._mailbox.queues[self.rank, peer].append(t.clone())
        return _Delivery(self._mailbox, self.rank, recvs)

    def agree(self, values: Sequence[float]) -> list[list[float]]:
        # Virtual ranks are cut from one call's whole-sequence tensors: they agree by construction.
        # Counted as a collective all the same, so that trace() shows what a group would make.
        count(collectives=1)
        return [list(values)] * self.world_size
