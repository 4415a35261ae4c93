"""Point-to-point exchange over a process group.

Plans speak in group ranks; this is the one place they become global ranks, as
``torch.distributed`` point-to-point ops require. Every byte sent or received is counted here.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.distributed as dist

from .trace import count


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


@lru_cache(maxsize=64)
def _global_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """Global rank of each group rank; looked up once per group, not on every call."""
    if group is None:  # single process, nothing to talk to
        return (0,)
    return tuple(dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)))


class Exchange:
    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._global = _global_ranks(group)

    def post(self, sends: Sequence[tuple[int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[int, Sequence[torch.Tensor]]]) -> Pending:
        """Start sending/receiving each (group rank, tensors) pair, in the order given.

        Both sides list the tensors between a pair of ranks in the same order, which is what
        pairs them up (NCCL ignores tags).
        """
        ops = []
        for peer, tensors in sends:
            for t in tensors:
                ops.append(dist.P2POp(dist.isend, t, self._global[peer], self.group))
        for peer, tensors in recvs:
            for t in tensors:
                ops.append(dist.P2POp(dist.irecv, t, self._global[peer], self.group))
        if not ops:
            return Pending([])
        count(
            bytes_sent=sum(t.numel() * t.element_size() for _, ts in sends for t in ts),
            bytes_received=sum(t.numel() * t.element_size() for _, ts in recvs for t in ts),
        )
        return Pending(dist.batch_isend_irecv(ops), keep=sends)
