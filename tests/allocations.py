"""Bytes of the tensors torch code creates, counted as they are made and freed: a
TorchDispatchMode sees every op's outputs; an output whose storage is none of its inputs' is a
new allocation, alive until the last tensor seen on that storage is gone. Works on CPU and on
meta tensors (nothing computed), which is how the memory model is checked at real sizes."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Allocations(TorchDispatchMode):
    """``with Allocations() as a:``; then ``a.peak`` (most bytes alive at once, of those made
    inside), ``a.total`` (bytes made), ``a.made`` ((op name, bytes) of each allocation).
    ``device``: count only tensors on devices of this type (e.g. "meta", leaving out the small
    CPU tensors that positions and masks are computed with)."""

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.now = self.peak = self.total = 0
        self.made: list[tuple[str, int]] = []
        self._refs: dict[int, int] = {}  # storage -> tensors alive on it
        self._bytes: dict[int, int] = {}
        self._ops: dict[int, str] = {}
        self.at_peak: list[tuple[str, int]] = []  # (op, bytes) of what was alive at the peak

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.now -= self._bytes.pop(key)
            del self._refs[key], self._ops[key]

    def _track(self, t: torch.Tensor, key: int) -> None:
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage()._cdata for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or (self.device and t.device.type != self.device):
                continue
            key = t.untyped_storage()._cdata
            if key in self._refs:  # a view (or the same tensor) of one made here
                self._track(t, key)
            elif key not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self._refs[key], self._bytes[key] = 0, nbytes
                self.now += nbytes
                self.total += nbytes
                self._ops[key] = str(func)
                if self.now > self.peak:
                    self.peak = self.now
                    self.at_peak = [(self._ops[k], self._bytes[k]) for k in self._bytes]
                self.made.append((str(func), nbytes))
                self._track(t, key)
        return out
