"""``kernel="auto"`` where several kernels can take the inputs: for each kind of block (shapes,
dtype, device, mask kind) the fastest kernel, measured once per process on random tensors of the
block's shapes, separately for the three ways the executor calls a kernel (forward merged into
the running result, plain forward, backward). A forward and a backward may go to different
kernels: every backward starts from the merged (out, lse), so any pairing is exact.
dist_attn settles the kinds of a plan with the whole group before its first transfer, so every
rank runs the same kernels; later calls look up.

A candidate that raises while it is measured (cuDNN's "no valid execution plan", Triton's
OutOfResources, an out-of-memory) is out for that kind of block: its time is infinite, on every
rank through the agreement, so every rank drops it together. Only when no candidate runs on some
rank do all ranks raise, together, naming each candidate's error.

A kind of block that first appears after the group settled (new documents in steady state,
which dist_attn does not agree again) is not measured by one rank alone: it takes, on every rank
alike, what the group chose for the nearest settled kind (same call, dtype, device and mask kind;
the closest block size), else the first candidate that ran.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .base import BlockKernel, MaskLike, Span, mask_kind

Timer = Callable[[Callable[[], object], torch.device], float]
_CALLS = ("forward_into", "forward", "backward")
_MASK_KINDS = ("full", "causal", "general")
_DTYPES = ("torch.float64", "torch.float32", "torch.bfloat16", "torch.float16")
_DEVICES = ("cpu", "cuda", "meta", "xpu", "mps")
# The kinds one rank's blocks can take: 3 calls x 3 mask kinds x 8 x 8 block lengths in chunks
# (a block holds 1 to 8 of a rank's chunks a side, distattn/plan/layout.MAX_CHUNKS_PER_RANK).
KINDS_PER_RANK = 3 * 3 * 8 * 8
_CODE = 11  # numbers per kind: call, mask kind, dtype, device, q shape (4), k's sequence and heads, a spare


def _encode(kind: str) -> list[float]:
    """A kind (AutoKernel.kind) as numbers that travel in settle()'s row; _decode reverses it."""
    call, q_shape, k_shape, dtype, device, mask = kind.split("|")
    b, sq, h, d = (int(x) for x in q_shape.split("x"))
    _, sk, g, _ = (int(x) for x in k_shape.split("x"))
    return [float(x) for x in (_CALLS.index(call), _MASK_KINDS.index(mask), _DTYPES.index(dtype),
                               _DEVICES.index(device), b, sq, h, d, sk, g, 0)]


def _decode(code: tuple) -> str:
    call, mask, dtype, device, b, sq, h, d, sk, g, _ = (int(x) for x in code)
    return "|".join((_CALLS[call], f"{b}x{sq}x{h}x{d}", f"{b}x{sk}x{g}x{d}", _DTYPES[dtype], _DEVICES[device],
                     _MASK_KINDS[mask]))


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
        self._errors: dict[str, dict[str, str]] = {}  # kind of block -> candidate -> what it raised
        self._grouped = False  # settled with a group: unsettled kinds are not measured alone

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
        """Choose, with the group, the kernel for every kind of block any rank runs, before any
        runs. ``requests``: this rank's kernel calls ((call, q shape, k shape, dtype, device,
        block) each). Each rank measures its own kinds it has not measured yet; ``agree`` (one
        collective) gathers every rank's kinds and times in a row of fixed size; for each kind
        the least total over the ranks that run it wins (ties: the candidates' order). Every
        rank records every kind's choice, so that later lookups (:meth:`_nearest`) agree."""
        kinds = {}
        for request in requests:
            kinds.setdefault(self.kind(*request), request)
        if len(kinds) > KINDS_PER_RANK:
            raise RuntimeError(f"kernel='auto': {len(kinds)} kinds of block on one rank, more than the "
                               f"{KINDS_PER_RANK} a settlement carries")
        n = len(self.candidates)
        mine = []
        for kind, request in kinds.items():
            if kind not in self._times:
                self._times[kind] = self._measure(*request)
            mine += _encode(kind) + [self._times[kind].get(c.name, float("inf")) for c in self.candidates]
        mine += [-1.0] * ((KINDS_PER_RANK - len(kinds)) * (_CODE + n))
        every = agree(mine)
        self._grouped = self._grouped or len(every) > 1
        totals: dict[tuple, list[float]] = {}
        failed: dict[tuple, list[int]] = {}
        for rank, row in enumerate(every):
            for i in range(0, len(row), _CODE + n):
                code, times = tuple(row[i:i + _CODE]), row[i + _CODE:i + _CODE + n]
                if code[0] < 0:
                    break
                totals[code] = [a + b for a, b in zip(totals.get(code, [0.0] * n), times)]
                if all(t == float("inf") for t in times):
                    failed.setdefault(code, []).append(rank)
        for code in sorted(totals):
            kind, total = _decode(code), totals[code]
            best = min(range(n), key=lambda j: (total[j], j))
            if total[best] == float("inf"):  # some rank could run none of them
                errors = "; ".join(f"{c}: {e}" for c, e in self._errors.get(kind, {}).items()) or "see that rank's error"
                raise RuntimeError(f"kernel='auto': no candidate of {[c.name for c in self.candidates]} runs the "
                                   f"blocks {kind} on rank(s) {failed.get(code)} ({errors}); name a kernel that can")
            self._chosen[kind] = self.candidates[best]

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
        else:  # random inputs with their own, consistent (out, lse), from the first candidate that makes them
            args = None
            for c in able:
                try:
                    args = (rand(q_shape), q, k, v, *c.forward(q, k, v, **block))
                    break
                except Exception as e:  # noqa: BLE001 - recorded; its backward is tried all the same
                    self._note(call, q_shape, k_shape, dtype, device, block, c, e)
            if args is None:
                return {}
            run = lambda c: c.backward(*args, **block)
        times = {}
        for c in able:
            try:
                times[c.name] = self._timer(lambda c=c: run(c), q.device)
            except Exception as e:  # noqa: BLE001 - out of this kind's choice, on every rank (settle)
                self._note(call, q_shape, k_shape, dtype, device, block, c, e)
        return times

    def _note(self, call, q_shape, k_shape, dtype, device, block, candidate: BlockKernel, error: Exception) -> None:
        kind = self.kind(call, q_shape, k_shape, dtype, device, block)
        self._errors.setdefault(kind, {})[candidate.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # what an out-of-memory candidate left cached

    def _pick(self, call: str, q, k, block: dict) -> BlockKernel:
        """The settled kernel; a kind not settled (a single process, the emulation) is measured
        here and chosen by this process alone."""
        kind = self.kind(call, q.shape, k.shape, q.dtype, q.device, block)
        if kind not in self._chosen:
            if self._grouped:
                self._chosen[kind] = self._nearest(kind)
            else:
                self.settle([(call, tuple(q.shape), tuple(k.shape), q.dtype, q.device, block)], lambda t: [t])
        return self._chosen[kind]

    def _nearest(self, kind: str) -> BlockKernel:
        """The group's choice for the settled kind most like ``kind`` (module docstring): the same on
        every rank, since every rank settled the same kinds the same way."""
        call, q_shape, k_shape, *rest = kind.split("|")
        size = lambda shape: math.prod(int(x) for x in shape.split("x"))
        alike = [(abs(math.log(size(q) * size(kk) / (size(q_shape) * size(k_shape)))), other)
                 for other in self._chosen
                 for c, q, kk, *r in [other.split("|")] if c == call and r == rest]
        if alike:
            return self._chosen[min(alike)[1]]
        ran = [c for c in self.candidates if not any(c.name in e for e in self._errors.values())]
        return (ran or self.candidates)[0]

    def forward_into(self, q, k, v, out_acc, lse_acc, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        self._pick("forward_into", q, k, block).forward_into(q, k, v, out_acc, lse_acc, **block)

    def forward(self, q, k, v, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        return self._pick("forward", q, k, block).forward(q, k, v, **block)

    def backward(self, dout, q, k, v, out, lse, *, q_span: Span, k_span: Span, mask: MaskLike, scale: float):
        block = dict(q_span=q_span, k_span=k_span, mask=mask, scale=scale)
        return self._pick("backward", q, k, block).backward(dout, q, k, v, out, lse, **block)
