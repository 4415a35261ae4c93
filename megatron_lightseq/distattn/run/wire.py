"""The int8 wire form of ``kv`` payloads on one rank for one phase (``Shape.kv_wire == "int8"``,
docs/kv_wire.md).

Every kv payload is quantized once, by its owner, from its own K/V; a rank that passes a payload
on (the ring's hops) sends the bytes it received, never quantizing again; a receiver holds the
payload dequantized into the inputs' dtype for its blocks. A rank's own K/V are never quantized
for its own blocks. The backward quantizes its payloads again from the same K/V: the
quantization is deterministic and each payload's chunks are the forward's, so the backward
computes with exactly the forward's values, at the cost of one more quantize pass per payload
instead of keeping the forward's received K/V alive until the backward.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from ...kernels.kv_wire import dequantize_kv, quantize_kv
from ..plan.plan import Payload, RankPlan

Tensors = tuple[torch.Tensor, ...]


class KvWire:
    """What one rank keeps of the wire form while it walks one phase's steps."""

    def __init__(self, view: RankPlan, phase: str, dtype: torch.dtype) -> None:
        self.rank, self.dtype = view.rank, dtype
        # own payloads: how many sends each still has, and the quantized form until the last
        self.uses, self.passed_on = own_sends(view, phase), passed_on(view, phase)
        self.packed: dict[Payload, Tensors] = {}
        self.received: dict[int, tuple[Payload, Tensors]] = {}  # owner -> a payload as it came, to pass on

    def outgoing(self, p: Payload, take: Callable[[str, int, tuple[int, ...]], Tensors]) -> Tensors:
        """The wire tensors of kv payload ``p`` this rank sends now."""
        if p.owner != self.rank:
            came, wire = self.received[p.owner]
            assert came == p, f"a kv payload is passed on whole, as it came: {came} then {p}"
            return wire
        if p not in self.packed:
            self.packed[p] = quantize_kv(*take("kv", p.owner, p.chunks))
        self.uses[p] -= 1
        return self.packed[p] if self.uses[p] else self.packed.pop(p)

    def arrived(self, p: Payload, wire: Tensors) -> Tensors:
        """(k, v) in the compute dtype of a kv payload that came in wire form, kept as it came
        if this rank passes it on."""
        if p.owner in self.passed_on:
            self.received[p.owner] = (p, wire)
        return dequantize_kv(*wire, self.dtype)

    def drop(self, owner: int) -> None:
        self.received.pop(owner, None)


def own_sends(view: RankPlan, phase: str) -> Counter:
    """Payload -> how many times the view's rank sends it, for its own kv payloads: quantized at
    the first send, kept until the last (the memory model reads this too)."""
    return Counter(tr.payload for rs in view.steps(phase) for tr in rs.sends
                   if tr.payload.kind == "kv" and tr.payload.owner == view.rank)


def passed_on(view: RankPlan, phase: str) -> frozenset:
    """The owners whose kv payloads the view's rank passes on: it keeps those in wire form."""
    return frozenset(tr.payload.owner for rs in view.steps(phase) for tr in rs.sends
                     if tr.payload.kind == "kv" and tr.payload.owner != view.rank)
