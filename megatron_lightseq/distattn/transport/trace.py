"""Counters of what dist_attn did on this rank, inside a ``with trace() as t:`` block.

Counting happens only while some trace is open (nested traces all count); nothing is recorded
otherwise. The open traces are held per process, not per thread, because autograd may run the
backward on one of its own threads.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields

_lock = threading.Lock()
_open: list["Trace"] = []


@dataclass(eq=False)  # traces are told apart by identity
class Trace:
    bytes_sent: int = 0  # by the plan's point-to-point transfers
    bytes_received: int = 0
    a2a_bytes_sent: int = 0  # by the hybrid's all-to-all inside its inner group (hybrid.py)
    a2a_bytes_received: int = 0
    forward_calls: int = 0
    backward_calls: int = 0
    blocks: int = 0  # kernel calls
    collectives: int = 0  # besides the plan's transfers (the input agreement)
    host_reads: int = 0  # values read back from a collective's result (a device sync on GPUs)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@contextmanager
def trace():
    t = Trace()
    with _lock:
        _open.append(t)
    try:
        yield t
    finally:
        with _lock:
            _open.remove(t)


def tracing() -> bool:
    """Whether some trace is open: callers skip working out what they would count otherwise."""
    return bool(_open)


def count(**amounts: int) -> None:
    """Add to every open trace (a no-op when none is open)."""
    if not _open:
        return
    with _lock:
        for t in _open:
            for name, n in amounts.items():
                setattr(t, name, getattr(t, name) + n)
