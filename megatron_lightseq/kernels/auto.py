"""``kernel="auto"`` where several kernels can take the inputs: for each kind of block (shapes,
dtype, device, mask kind) the fastest kernel, measured once per process on random tensors of the
block's shapes, separately for the three ways the executor calls a kernel (forward merged into
the running result, plain forward, backward). A forward and a backward may go to different
kernels: every backward starts from the merged (out, lse), so any pairing is exact.
The first block of each kind pays the measurement (a few runs per candidate); later ones look up.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .base import BlockKernel, Span, mask_kind

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
    """A block kernel that hands each call to the fastest of ``candidates`` for that block."""

    name = "auto"

    def __init__(self, candidates: Sequence[BlockKernel], timer: Timer = device_time) -> None:
        self.candidates, self._timer = tuple(candidates), timer
        self._chosen: dict[tuple, BlockKernel] = {}

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        return any(c.supports(q, k) for c in self.candidates)

    def choices(self) -> dict[tuple, str]:
        """(call, q shape, k shape, dtype, device, mask kind) -> chosen kernel name, for reports."""
        return {key: kernel.name for key, kernel in self._chosen.items()}

    def _pick(self, call: str, q, k, block: dict, run: Callable[[BlockKernel, tuple], object],
              make_args: Callable[[BlockKernel], tuple]) -> BlockKernel:
        key = (call, tuple(q.shape), tuple(k.shape), q.dtype, str(q.device),
               mask_kind(block["q_span"], block["k_span"], block["causal"]))
        if key not in self._chosen:
            able = [c for c in self.candidates if c.supports(q, k)]
            args = make_args(able[0])
            times = {c.name: self._timer(lambda c=c: run(c, args), q.device) for c in able}
            self._chosen[key] = min(able, key=lambda c: times[c.name])
        return self._chosen[key]

    @staticmethod
    def _random_qkv(q, k):
        return torch.randn_like(q), torch.randn_like(k), torch.randn_like(k)

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        block = dict(q_span=q_span, k_span=k_span, causal=causal, scale=scale)

        def make_args(_):  # a running result as after a first block: finite lse, out ~ 1
            return (*self._random_qkv(q, k), torch.randn_like(out_acc), torch.randn_like(lse_acc))

        kernel = self._pick("forward_into", q, k, block, lambda c, a: c.forward_into(*a, **block), make_args)
        kernel.forward_into(q, k, v, out_acc, lse_acc, **block)

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        block = dict(q_span=q_span, k_span=k_span, causal=causal, scale=scale)
        kernel = self._pick("forward", q, k, block, lambda c, a: c.forward(*a, **block),
                            lambda _: self._random_qkv(q, k))
        return kernel.forward(q, k, v, **block)

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, causal: bool, scale: float):
        block = dict(q_span=q_span, k_span=k_span, causal=causal, scale=scale)

        def make_args(first: BlockKernel):  # random inputs with their own, consistent (out, lse)
            qkv = self._random_qkv(q, k)
            return (torch.randn_like(dout), *qkv, *first.forward(*qkv, **block))

        kernel = self._pick("backward", q, k, block, lambda c, a: c.backward(*a, **block), make_args)
        return kernel.backward(dout, q, k, v, out, lse, **block)
