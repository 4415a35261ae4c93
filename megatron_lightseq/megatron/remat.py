"""Rematerialization-aware checkpointing (PAPER.md): under Megatron's activation recompute, the
attention's first pass keeps its (out, lse), and the recompute pass answers from them instead of
running the distributed attention forward and its communication again. The backward needs only
(q, k, v, out, lse), and the recompute provides q, k, v.

Megatron runs a checkpointed region twice: first under ``torch.no_grad()``, then in backward with
grad enabled; ``tensor_parallel.random.is_checkpointing()`` is True in both (DESIGN.md). Each core
attention keeps its own queue of saved results, so several microbatches can be in flight
(pipeline schedules). Megatron's schedules recompute a model chunk's microbatches in the order
they ran forward (1F1B and interleaved alike), so the oldest entry is the one wanted: no search.
The order is still checked, without a host sync: a fingerprint of (q, k, v) saved with the entry
is compared on the device by an asynchronous assert (on CUDA it stops the process at a later
kernel launch; on CPU at once), so a recompute that takes another microbatch's (out, lse) is an
error, never a silently wrong gradient.
"""
from __future__ import annotations

from collections import deque

import torch


def fingerprint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 sums of q, k and v: equal for bitwise-equal inputs, which a recompute produces."""
    return torch.stack([t.sum(dtype=torch.float64) for t in (q, k, v)])


OUT_OF_ORDER = ("lightseq remat: the recomputed q, k, v are not those of the oldest saved first pass (a "
                "recompute out of forward order, or not bitwise reproducible); use --lightseq-no-remat")


class AttentionStash:
    """The (out, lse) of first passes awaiting their recompute, oldest first."""

    def __init__(self) -> None:
        self._waiting: deque = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, q, k, v, out: torch.Tensor, lse: torch.Tensor) -> None:
        self._waiting.append((fingerprint(q, k, v), out, lse))

    def pop(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._waiting:
            raise RuntimeError(
                "lightseq remat: a recompute found no saved attention output; was the first pass run "
                "outside Megatron's checkpoint? Use --lightseq-no-remat to recompute instead")
        saved, out, lse = self._waiting.popleft()
        torch._assert_async((saved == fingerprint(q, k, v)).all(), OUT_OF_ORDER)  # CPU: raises RuntimeError now
        return out, lse
