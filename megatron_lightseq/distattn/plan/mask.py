"""The attention mask, as data: causal or not, document boundaries, a sliding window.

For every combination the keys a query at position i may see form one interval of positions,
[lo(i), hi(i)]:
- documents (``cu_seqlens``, flash-attn's varlen boundaries over the whole sequence: 0 first,
  the real length last): the query's document; with ``cu_seqlens_padded`` (TransformerEngine's
  convention) document d starts at cu_seqlens_padded[d] and its last tokens up to the next
  padded boundary are padding;
- ``causal``: up to i;
- ``window`` (left, right), flash-attn's convention, -1 unbounded: i - left .. i + right;
- a padding token (at or past the last boundary) is a document of its own that sees nothing:
  an empty interval (lo = i + 1, hi = i).
So a kernel needs only each query row's (lo, hi) and each key's position (:meth:`Mask.bounds`),
and both ends only grow with i, which is what lets kernels and plans skip whole tiles and chunks.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch

UNBOUNDED = 2**31 - 2  # "no limit" for hi; fits the int32 positions kernels use


@dataclass(frozen=True)
class Mask:
    causal: bool = True
    cu_seqlens: tuple[int, ...] | None = None
    window: tuple[int, int] = (-1, -1)
    cu_seqlens_padded: tuple[int, ...] | None = None

    @property
    def plain(self) -> bool:
        """No documents and no window: causal or nothing."""
        return self.cu_seqlens is None and self.window == (-1, -1)

    @property
    def length(self) -> int | None:
        """The sequence length the documents cover (their padding included), or None."""
        cu = self.cu_seqlens_padded or self.cu_seqlens
        return None if cu is None else cu[-1]

    def bounds(self, positions):
        """(lo, hi) per query position: the first and last key position it may see. Works alike on
        an int64 torch tensor (any device) and an int64 numpy array of increasing positions (the
        plans use numpy: their arrays are small enough that torch's threads cost more than they
        bring)."""
        p = positions
        lib = torch if isinstance(p, torch.Tensor) else sys.modules.get("numpy") or __import__("numpy")
        lo = lib.zeros_like(p)
        hi = lib.full_like(p, UNBOUNDED)
        if self.causal:
            hi = lib.minimum(hi, p)
        left, right = self.window
        if left >= 0:
            lo = lib.maximum(lo, p - left)
        if right >= 0:
            hi = lib.minimum(hi, p + right)
        if self.cu_seqlens is not None:
            starts = self.cu_seqlens_padded or self.cu_seqlens
            ends = [a + b - c for a, b, c in zip(starts, self.cu_seqlens[1:], self.cu_seqlens)]  # real ends
            as_array = (lambda x: torch.tensor(x, dtype=torch.int64, device=p.device)) if lib is torch else (
                lambda x: lib.asarray(x, dtype=lib.int64))
            starts, ends = as_array(starts), as_array(ends)
            if lib is torch:
                doc = (torch.searchsorted(starts, p, right=True) - 1).clip(min=0, max=len(ends) - 1)
            else:  # numpy: increasing positions (the plans' whole sequences): a search per document, not per token
                doc = lib.repeat(lib.arange(len(ends)), lib.diff(lib.searchsorted(p, starts[:-1]), append=len(p)))
            padding = p >= ends[doc]  # past its document's real end, or past the last document
            lo, hi = lib.maximum(lo, starts[doc]), lib.minimum(hi, ends[doc] - 1)
            if lib is torch or padding.any():  # (numpy only: a host read is free there)
                lo, hi = lib.where(padding, p + 1, lo), lib.where(padding, p, hi)
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
        padded = self.cu_seqlens_padded
        if padded is not None:
            if cu is None:
                return "cu_seqlens_padded needs cu_seqlens (the documents' real boundaries)"
            if not (isinstance(padded, tuple) and len(padded) == len(cu) and padded[0] == 0):
                return (f"cu_seqlens_padded must start at 0 and have one boundary per cu_seqlens entry ({len(cu)}), "
                        f"got {padded!r}")
            short = next((d for d in range(len(cu) - 1) if padded[d + 1] - padded[d] < cu[d + 1] - cu[d]), None)
            if short is not None:
                return (f"cu_seqlens_padded must leave each document at least its real length: document {short} "
                        f"has {cu[short + 1] - cu[short]} tokens but {padded[short + 1] - padded[short]} padded")
        return None


def _index_or_self(x):
    try:
        return operator.index(x)
    except TypeError:  # a float, a float or multi-element tensor, a list, ...
        return x


def mask_of(causal: bool = True, cu_seqlens=None, window_size=(-1, -1), cu_seqlens_padded=None) -> Mask:
    """The Mask of flash-attn's keywords (boundaries may be lists or int tensors), built once at
    the public API and carried whole from there; ValueError saying what is wrong with them."""
    def boundaries(cu):
        if isinstance(cu, torch.Tensor):
            cu = cu.tolist()
        # Integers of any kind become ints; anything else stays as given, for Mask.problem to name
        # (int() would truncate 10.5 to a boundary nobody asked for).
        if cu is None:
            return None
        cu = tuple(cu)  # plain ints, as Megatron's path gives them, pass as they are (this runs every call)
        return cu if all(type(x) is int for x in cu) else tuple(_index_or_self(x) for x in cu)

    try:
        window = tuple(window_size) if isinstance(window_size, (list, tuple)) else window_size
        mask = Mask(causal=causal, cu_seqlens=boundaries(cu_seqlens), window=window,
                    cu_seqlens_padded=boundaries(cu_seqlens_padded))
    except (TypeError, ValueError) as e:
        raise ValueError(f"cu_seqlens must be a sequence of ints and window_size a pair of ints, got {cu_seqlens!r} "
                         f"and {window_size!r} ({e})") from None
    problem = mask.problem()
    if problem:
        raise ValueError(problem)
    return mask
