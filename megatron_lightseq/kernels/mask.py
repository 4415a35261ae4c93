"""The attention mask, as data: causal or not, document boundaries, a sliding window.

For every combination the keys a query at position i may see form one interval of positions,
[lo(i), hi(i)]:
- documents (``cu_seqlens``, flash-attn's varlen boundaries over the whole sequence: 0 first,
  the real length last): the query's document;
- ``causal``: up to i;
- ``window`` (left, right), flash-attn's convention, -1 unbounded: i - left .. i + right;
- a padding token (at or past the last boundary) is a document of its own that sees nothing:
  an empty interval (lo = i + 1, hi = i).
So a kernel needs only each query row's (lo, hi) and each key's position (:meth:`Mask.bounds`),
and both ends only grow with i, which is what lets kernels and plans skip whole tiles and chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNBOUNDED = 2**31 - 2  # "no limit" for hi; fits the int32 positions kernels use


@dataclass(frozen=True)
class Mask:
    causal: bool = True
    cu_seqlens: tuple[int, ...] | None = None
    window: tuple[int, int] = (-1, -1)

    @property
    def plain(self) -> bool:
        """No documents and no window: causal or nothing."""
        return self.cu_seqlens is None and self.window == (-1, -1)

    def bounds(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) int64, per query position: the first and last key position it may see."""
        p = positions.to(torch.int64)
        lo = torch.zeros_like(p)
        hi = torch.full_like(p, UNBOUNDED)
        if self.causal:
            hi = torch.minimum(hi, p)
        left, right = self.window
        if left >= 0:
            lo = torch.maximum(lo, p - left)
        if right >= 0:
            hi = torch.minimum(hi, p + right)
        if self.cu_seqlens is not None:
            cu = torch.tensor(self.cu_seqlens, dtype=torch.int64, device=p.device)
            doc = torch.searchsorted(cu, p, right=True) - 1
            padding = p >= cu[-1]
            doc = doc.clamp(max=len(cu) - 2)
            lo = torch.maximum(lo, cu[doc])
            hi = torch.minimum(hi, cu[doc + 1] - 1)
            lo = torch.where(padding, p + 1, lo)
            hi = torch.where(padding, p, hi)
        return lo, hi

    def problem(self) -> str | None:
        """What is wrong with this mask as given (before any sequence length is known), or None."""
        if not isinstance(self.causal, bool):
            return f"causal must be a bool, got {self.causal!r}"
        w = self.window
        if not (isinstance(w, tuple) and len(w) == 2 and all(isinstance(x, int) and x >= -1 for x in w)):
            return f"window_size must be a pair of ints >= -1 (left, right; -1 unbounded), got {w!r}"
        if self.causal and w[1] > 0:
            return f"a causal mask sees no key to the right: window_size right must be 0 or -1, got {w[1]}"
        cu = self.cu_seqlens
        if cu is not None:
            if not (isinstance(cu, tuple) and len(cu) >= 2 and all(isinstance(x, int) for x in cu)):
                return f"cu_seqlens must be a sequence of at least two ints, got {cu!r}"
            if cu[0] != 0:
                return f"cu_seqlens must start at 0, got {cu[0]}"
            bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
            if bad is not None:
                return (f"cu_seqlens must be strictly increasing (documents are not empty), got "
                        f"{cu[bad - 1]} then {cu[bad]} at index {bad}")
        return None


def make_mask(causal: bool = True, cu_seqlens=None, window_size=(-1, -1)) -> Mask:
    """A Mask from the user's arguments (cu_seqlens may be a list or an int tensor)."""
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens.tolist()
    window = tuple(window_size) if isinstance(window_size, (list, tuple)) else window_size
    return Mask(causal=causal, cu_seqlens=None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens),
                window=window)
