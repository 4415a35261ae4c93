"""How a rank of a process group waits with a deadline, and how a failure travels to its peers
(docs/reliability.md).

Every wait of a gloo group runs in a helper thread while the caller watches two things: the
deadline (the call's ``timeout``), and the group's store, where the first rank to fail records
what happened. So a rank whose kernel raised, or who gave up waiting, stops every peer within a
fraction of a second, whatever they wait for, and each names the rank that failed first. A gloo
group cannot be aborted from a live process (its connections stay open), hence the store.

A rank that times out may be waiting for a rank that waits too. Before it records, it writes
whom it waits for, gives the others a grace to write theirs, and follows the waits to the ranks
that wrote nothing (stalled, or not in this exchange): those are named as missing.

NCCL waits do not block the host (a deadline there would sync every step), so a group whose
waits only order streams has a :class:`GroupWatcher` instead: a daemon thread per group that
reads the same failure record in the store and tracks each step's completion (a CUDA event the
host records after the step's waits, queried, never waited on). When a peer records a failure,
or a step passes its deadline (then this rank records it, naming whom it waits for as above),
the watcher aborts the group's communicator: its NCCL kernels end on every rank within a few
poll periods instead of at NCCL's watchdog (10 minutes in Megatron), and the next dist_attn call
raises the first failure by name.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for one step's transfers; well below Megatron's 10 min
FAILURE_KEY = "megatron_lightseq/first_failure"
WAITING_KEY = "megatron_lightseq/waiting/{rank}"  # "peer,peer|where" of a rank that timed out
POLL_SECONDS = 0.05  # how often a waiting rank looks at the store
WATCH_SECONDS = 0.5  # how often a GroupWatcher looks (one store read per group and period)


class DistAttnError(RuntimeError):
    """dist_attn failed inside an exchange, on this rank or on a peer (the message says which)."""


class TransferError(RuntimeError):
    """A wait that failed: the peers whose transfers had not arrived, and why."""

    def __init__(self, owed: list[int], timed_out: bool, detail: str = "") -> None:
        self.owed, self.timed_out = owed, timed_out
        what = "timed out" if timed_out else f"failed ({detail.splitlines()[0] if detail else 'no detail'})"
        super().__init__(f"{what} waiting for rank(s) {owed}")


class WrongCall(RuntimeError):
    """A peer's transfer belongs to another call: its header (exchange.py) differs from this rank's."""

    def __init__(self, peer: int, differences: list[str]) -> None:
        super().__init__(f"rank {peer} sent a transfer of another call ({'; '.join(differences)}): every rank must "
                         "make the same calls, in the same order, with the same shapes and options (a call whose "
                         "shapes were agreed before skips the agreement, docs/reliability.md)")


class PeerFailed(TransferError):
    """A wait given up because another rank recorded a failure."""

    def __init__(self, owed: list[int], record: str) -> None:
        super().__init__(owed, False, "a peer failed")
        self.record = record


class Agreed:
    """The signatures a group has agreed on, at most ``size``, the oldest dropped first. Entries
    are added only by an agreement, which every rank makes together, so every rank keeps and drops
    the same ones (a lookup changes nothing: ranks may look up in different numbers)."""

    def __init__(self, size: int = 256) -> None:
        self.size, self._keys = size, {}

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, key) -> None:
        self._keys[key] = None
        while len(self._keys) > self.size:
            del self._keys[next(iter(self._keys))]


@dataclass
class GroupState:
    """What this process knows of one group: the signatures agreed, and its failure if any."""

    agreed: Agreed = field(default_factory=Agreed)
    failure: str | None = None
    watcher: "GroupWatcher | None" = None  # groups whose waits do not block the host (NCCL)
    aborted: bool = False  # its communicator, by this rank (exchange.abort_once)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def describe(error: Exception) -> str:
    return str(error) if isinstance(error, TransferError) else f"{type(error).__name__}: {error}"


class _Waiter:
    """A daemon thread that blocks in waits for the caller. Replaced when a wait is abandoned:
    the old thread ends with that wait's own timeout."""

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    @classmethod
    def submit(cls, fn, *args) -> concurrent.futures.Future:
        with cls._lock:
            if cls._pool is None:
                cls._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lightseq-wait")
            return cls._pool.submit(fn, *args)

    @classmethod
    def abandon(cls) -> None:
        with cls._lock:
            if cls._pool is not None:
                cls._pool.shutdown(wait=False)
            cls._pool = None


def watched_wait(works: list, peers: list[list[int]], keep: object, timeout: float, store) -> None:
    """Wait for every work (``peers[i]``: whom work i waits for) within ``timeout`` seconds,
    raising TransferError when it passes or a work fails, PeerFailed as soon as ``store``
    holds a failure. ``keep``: tensors the works read or write, alive until they end."""
    deadline = time.monotonic() + timeout
    progress = [0]  # index of the work the helper thread waits on

    def wait_all(keep_alive):
        for i, work in enumerate(works):
            progress[0] = i
            work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.0) + 1.0))
        progress[0] = len(works)

    future = _Waiter.submit(wait_all, keep)
    owed = lambda: sorted({p for ps in peers[progress[0]:] for p in ps})
    while True:
        try:
            future.result(timeout=POLL_SECONDS)
            return
        except concurrent.futures.TimeoutError:
            pass
        except RuntimeError as e:  # the transport's own error (a peer's process died, say)
            raise TransferError(owed(), time.monotonic() >= deadline, str(e)) from e
        if store.check([FAILURE_KEY]):
            _Waiter.abandon()
            raise PeerFailed(owed(), store.get(FAILURE_KEY).decode())
        if time.monotonic() >= deadline:
            _Waiter.abandon()
            raise TransferError(owed(), True)


def record_failure(store, mine: str, error: Exception, *, rank: int, where: str, timeout: float) -> str:
    """Record ``mine`` as the group's first failure unless one is recorded already; the first."""
    if isinstance(error, PeerFailed):
        return error.record
    if isinstance(error, TransferError) and error.timed_out:
        mine += _missing(store, rank, where, error.owed, grace=min(timeout / 4, 30.0))
    return store.compare_set(FAILURE_KEY, "", mine).decode()


def _missing(store, rank: int, where: str, owed: list[int], grace: float) -> str:
    """Who this rank really waits for: says whom it waits for, lets the others say theirs for
    ``grace`` seconds (or until a failure is recorded), and follows the waits to the ranks that
    said nothing."""
    store.set(WAITING_KEY.format(rank=rank), f"{','.join(map(str, owed))}|{where}")
    end = time.monotonic() + grace
    while time.monotonic() < end and not store.check([FAILURE_KEY]):
        time.sleep(POLL_SECONDS)
    waits, frontier, missing, seen = [], list(owed), [], {rank}
    while frontier:
        r = frontier.pop(0)
        if r in seen:
            continue
        seen.add(r)
        key = WAITING_KEY.format(rank=r)
        if not store.check([key]):
            missing.append(r)
            continue
        peers, their_where = store.get(key).decode().split("|", 1)
        waits.append(f"rank {r} ({their_where}) waits for rank(s) [{peers}]")
        frontier += [int(p) for p in peers.split(",")]
    chain = "".join(f"; {w}" for w in waits)
    return f"{chain}; missing: rank(s) {sorted(missing)}" if missing else f"{chain}; the waits form a circle"


class GroupWatcher:
    """Watches a group whose waits do not block the host (module docstring). ``on_failure(record)``
    runs once, on the watcher's thread, when the group's first failure is known: a peer's record,
    or this rank's own timeout, which the watcher records first."""

    def __init__(self, store, rank: int, world_size: int, on_failure, period: float = WATCH_SECONDS) -> None:
        self._store, self._on_failure, self._period = store, on_failure, period
        self._rank, self._world_size = rank, world_size
        self._steps: collections.deque = collections.deque()  # (done, peers, deadline, timeout, where), oldest first
        self._thread = threading.Thread(target=self._run, name="lightseq-watch", daemon=True)
        self._thread.start()

    def watch(self, done, peers: list[int], timeout: float, where: str) -> None:
        """A step whose transfers with ``peers`` end when ``done()`` turns True (polled, never
        waited on), within ``timeout`` seconds from now. Steps end in the order they are given."""
        if self._thread.is_alive():  # once it has fired (or the store went away) nothing is watched
            self._steps.append((done, peers, time.monotonic() + timeout, timeout, where))

    def _run(self) -> None:
        try:
            while True:
                time.sleep(self._period)
                record = self._check()
                if record is not None:
                    self._on_failure(record)
                    return
        except Exception:  # noqa: BLE001 - the store or the group went away (shutdown): nothing to watch
            return

    def _check(self) -> str | None:
        if self._store.check([FAILURE_KEY]):
            return self._store.get(FAILURE_KEY).decode()
        while self._steps and self._steps[0][0]():
            self._steps.popleft()
        if self._steps and time.monotonic() >= self._steps[0][2]:
            _, peers, _, timeout, where = self._steps[0]
            error = TransferError(sorted(set(peers)), True)
            mine = f"rank {self._rank} of {self._world_size} ({where}): {describe(error)}"
            return record_failure(self._store, mine, error, rank=self._rank, where=where, timeout=timeout)
        return None
