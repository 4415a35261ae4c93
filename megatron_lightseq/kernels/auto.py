"""``kernel="auto"`` where several kernels can take the inputs: for each kind of block (shapes,
dtype, device, mask kind) the fastest kernel, measured once per process on random tensors of the
block's shapes, separately for the three ways the executor calls a kernel (forward merged into
the running result, plain forward, backward). A forward and a backward may go to different
kernels: every backward starts from the merged (out, lse), so any pairing is exact.
dist_attn settles the kinds of a plan with the whole group before its first transfer, so every
rank runs the same kernels; later calls look up.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .base import BlockKernel, Span, mask_kind
from .mask import Mask

Timer = Callable[[Callable[[], object], torch.device], float]


def device_time(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up run (which also absorbs compilation and tuning)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class AutoKernel(BlockKernel):
    """A block kernel that hands each call to the fastest of ``candidates`` for that kind of block.

    Under dist_attn the choice is agreed by the group before the first transfer (:meth:`settle`):
    every rank runs the same kernel for the same block. It is measured on random inputs from a
    generator of its own (the training's random stream is left alone), and a recorded choice
    (:meth:`choices`) can be reused by another run (:meth:`adopt`)."""

    def __init__(self, candidates: Sequence[BlockKernel], timer: Timer = device_time) -> None:
        self.candidates, self._timer = tuple(candidates), timer
        self.name = "auto:" + "+".join(c.name for c in self.candidates)  # ranks must agree on the candidates
        self._times: dict[str, dict[str, float]] = {}  # kind of block -> candidate -> seconds
        self._chosen: dict[str, BlockKernel] = {}

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        return any(c.supports(q, k) for c in self.candidates)

    @staticmethod
    def kind(call: str, q_shape, k_shape, dtype: torch.dtype, device: torch.device, block: dict) -> str:
        """The kind of a block a choice holds for: call, shapes, dtype, device type, mask kind."""
        mask = mask_kind(block["q_span"], block["k_span"], block["mask"])
        return "|".join((call, "x".join(map(str, q_shape)), "x".join(map(str, k_shape)), str(dtype),
                         torch.device(device).type, mask))

    def choices(self) -> dict[str, str]:
        """Kind of block -> chosen kernel name: a record another run can :meth:`adopt`."""
        return {kind: kernel.name for kind, kernel in self._chosen.items()}

    def adopt(self, choices: dict[str, str]) -> None:
        """Take recorded choices (of candidates this kernel has) instead of measuring them."""
        names = {c.name: c for c in self.candidates}
        for kind, name in choices.items():
            if name not in names:
                raise ValueError(f"recorded choice {name!r} for {kind} is not among the candidates {list(names)}")
            self._chosen[kind] = names[name]
            self._times[kind] = {c: 0.0 if c == name else 1.0 for c in names}  # a vote in settle()

    def settle(self, requests, agree) -> None:
        """Choose, with the group, the kernel for every kind of block in ``requests`` ((call,
        q shape, k shape, dtype, device, block) each, the same list on every rank), before any
        runs: each rank measures what it has not yet, ``agree`` (one collective) gathers every
        rank's times, and the least total wins (ties: the candidates' order)."""
        kinds = {}
        for call, q_shape, k_shape, dtype, device, block in requests:
            kinds.setdefault(self.kind(call, q_shape, k_shape, dtype, device, block),
                             (call, q_shape, k_shape, dtype, device, block))
        mine = []
        for kind, request in kinds.items():
            if kind not in self._times:
                self._times[kind] = self._measure(*request)
            mine += [self._times[kind].get(c.name, float("inf")) for c in self.candidates]
        every = agree(mine)
        n = len(self.candidates)
        for i, kind in enumerate(kinds):
            totals = [sum(row[i * n + j] for row in every) for j in range(n)]
            self._chosen[kind] = self.candidates[min(range(n), key=lambda j: (totals[j], j))]

    def _measure(self, call: str, q_shape, k_shape, dtype, device, block: dict) -> dict[str, float]:
        """Seconds of ``call`` on random inputs of these shapes, per candidate that can take them."""
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda shape, dt=dtype: torch.randn(shape, generator=gen, dtype=dt, device=device)
        q, k, v = rand(q_shape), rand(k_shape), rand(k_shape)
        able = [c for c in self.candidates if c.supports(q, k)]
        if mask_kind(block["q_span"], block["k_span"], block["mask"]) == "general":
            # Vendor adapters hand these blocks on to a kernel that takes any mask: timing them
            # would time that kernel again under another name.
            able = [c for c in able if c.any_mask] or able
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if call == "forward_into":  # a running result as after a first block: finite lse, out ~ 1
            args = (q, k, v, rand(q_shape, acc), rand((q_shape[0], q_shape[2], q_shape[1]), acc))
            run = lambda c: c.forward_into(*args, **block)
        elif call == "forward":
            run = lambda c: c.forward(q, k, v, **block)
        else:  # random inputs with their own, consistent (out, lse)
            args = (rand(q_shape), q, k, v, *able[0].forward(q, k, v, **block))
            run = lambda c: c.backward(*args, **block)
        return {c.name: self._timer(lambda c=c: run(c), q.device) for c in able}

    def _pick(self, call: str, q, k, block: dict) -> BlockKernel:
        """The settled kernel; a kind not settled (a single process, the emulation) is measured
        here and chosen by this process alone."""
        kind = self.kind(call, q.shape, k.shape, q.dtype, q.device, block)
        if kind not in self._chosen:
            self.settle([(call, tuple(q.shape), tuple(k.shape), q.dtype, q.device, block)], lambda t: [t])
        return self._chosen[kind]

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, mask: Mask, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        self._pick("forward_into", q, k, block).forward_into(q, k, v, out_acc, lse_acc, **block)

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: Mask, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        return self._pick("forward", q, k, block).forward(q, k, v, **block)

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: Mask, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        return self._pick("backward", q, k, block).backward(dout, q, k, v, out, lse, **block)
