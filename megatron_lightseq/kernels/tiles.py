"""Which tiles of a block a mask hides: the tables the Triton kernels read to skip tiles no row
sees and to leave unmasked the tiles every row sees whole.

A query row at position i sees the keys at positions [lo(i), hi(i)] (mask.py). When both sides'
positions increase (every block of the built-in layouts), lo and hi do not decrease from row to
row, so each row sees one run of key *indices* [first, stop), and each key is seen by one run
of rows [first, stop), both runs' ends never moving back. Per 16-token granule of either side
the tables give four indices of the other side:

    any_lo, any_hi   every index any item of the granule sees lies in [any_lo, any_hi)
    all_lo, all_hi   every item of the granule sees every index in [all_lo, all_hi)

A tile of several granules takes any_lo and all_hi from its first granule and any_hi and all_lo
from its last (the ends never move back; any_lo and any_hi are made monotone across granules
whose items see nothing), so one table serves every tile size that is a multiple of 16. A
kernel loops over [any_lo, any_hi) and masks only tiles not inside [all_lo, all_hi).

Positions that do not increase get tables that skip nothing and mask everything, which is
always exact. A mask that hides keys only from above (causal, as before documents and windows)
gives query granules all_lo 0 and key granules all_hi Sq: the kernels then check only the other
end (``cut_lo`` False), exactly the causal tables and checks they had before.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .base import MaskLike, Span, positions

GRANULE = 16


class Tiles(NamedTuple):
    """A block's mask as the Triton kernels read it; int32 tensors on the block's device, views
    of one buffer copied there in one non-blocking transfer (:func:`_upload`)."""
    q_lo: torch.Tensor  # [Sq] per query row, the first key position it may see
    q_hi: torch.Tensor  # [Sq] ... and the last (lo > hi: a row that sees no key)
    k_pos: torch.Tensor  # [Sk] key positions
    kv: torch.Tensor  # [ceil(Sq/16), 4] per query granule: key indices (any_lo, any_hi, all_lo, all_hi)
    q: torch.Tensor  # [ceil(Sk/16), 4] per key granule: query rows (any_lo, any_hi, all_lo, all_hi)
    cut_hi: bool  # some row may not see some key past its hi: kernels compare k_pos <= q_hi
    cut_lo: bool  # some row may not see some key before its lo: kernels compare k_pos >= q_lo


def _increasing(x: torch.Tensor) -> bool:
    return bool((x[1:] > x[:-1]).all())


def _sorted(x: torch.Tensor) -> bool:
    return bool((x[1:] >= x[:-1]).all())


def _granule_table(first: torch.Tensor, stop: torch.Tensor, n_other: int) -> torch.Tensor:
    """int64 [ceil(n/16), 4] (any_lo, any_hi, all_lo, all_hi) from each item's run [first, stop)
    of the other side's indices (both ends non-decreasing over items; first >= stop: sees none)."""
    n = len(first)
    idx = torch.arange(-(-n // GRANULE) * GRANULE).clamp(max=n - 1).view(-1, GRANULE)  # pad: repeat the last
    f, s = first[idx], stop[idx]
    sees = f < s
    # Items that see nothing would pull any_lo up (a padding row's lo is past every key) or any_hi
    # down; leave them out, then make both monotone so that the first and last granule of a tile
    # bound the whole tile.
    any_lo = torch.where(sees, f, n_other).amin(1).flip(0).cummin(0).values.flip(0)
    any_hi = torch.where(sees, s, 0).amax(1).cummax(0).values
    # Runs only move forward: what all items see is from the last item's first to the first item's
    # stop (empty, all_lo >= all_hi, as soon as one item sees nothing).
    return torch.stack([any_lo, any_hi, f[:, -1], s[:, 0]], 1)


def _everything(n: int, n_other: int, mask_all: bool) -> torch.Tensor:
    """A table that skips nothing; with ``mask_all``, no tile is inside (all_lo > all_hi)."""
    row = (0, n_other, n_other, 0) if mask_all else (0, n_other, 0, n_other)
    return torch.tensor(row, dtype=torch.int64).repeat(-(-n // GRANULE), 1)


@functools.lru_cache(maxsize=256)
def tile_tables(q_span: Span, k_span: Span, mask: MaskLike, device: torch.device) -> Tiles:
    """The block's :class:`Tiles` on ``device``, built once per (spans, mask, device)."""
    qp, kp = positions(q_span, torch.device("cpu")), positions(k_span, torch.device("cpu"))
    lo, hi = mask.bounds(qp)
    sq, sk = len(qp), len(kp)
    cut_hi, cut_lo = bool(hi.min() < kp.max()), bool(lo.max() > kp.min())
    if not (cut_hi or cut_lo):  # every row sees every key
        kv, q = _everything(sq, sk, False), _everything(sk, sq, False)
    elif _increasing(qp) and _increasing(kp) and _sorted(lo) and _sorted(hi):
        # Row r sees key indices [first, stop); key j is seen by rows [after hi, up to lo).
        kv = _granule_table(torch.searchsorted(kp, lo), torch.searchsorted(kp, hi, right=True), sk)
        q = _granule_table(torch.searchsorted(hi, kp), torch.searchsorted(lo, kp, right=True), sq)
    else:
        kv, q = _everything(sq, sk, True), _everything(sk, sq, True)
    parts = [t.clamp(max=2**31 - 1).to(torch.int32).reshape(-1) for t in (lo, hi, kp, kv, q)]
    lo, hi, kp, kv, q = _upload(torch.cat(parts), device).split([len(p) for p in parts])
    return Tiles(lo, hi, kp, kv.view(-1, 4), q.view(-1, 4), cut_hi, cut_lo)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` in one copy that does not wait for the device: from pinned memory,
    non-blocking, on CUDA (a pageable copy synchronises the host with the GPU, once per new block,
    every batch with packed documents). The pinned buffer may be freed at once: torch's pinned
    allocator keeps it until the copy that reads it has run."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
