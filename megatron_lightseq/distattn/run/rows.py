"""Token rows of a rank's tensors, as the executor and the all-to-all take and land them.

Some chunks of a tensor (plan/runs.py finds their runs) are its token rows: one stretch, which a
view takes, or several, which one index takes (a copy, ``index_select``) and lands (``index_copy_``,
``index_add_``): one op per tensor whatever the number of runs, instead of a view, an op and a
concatenation per run. Tensors are [B, S, ...], or [B, H, S] for the lse.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..plan.runs import Run, chunk_runs

Rows = tuple[int, int] | torch.Tensor  # one stretch [start, stop), or the index of several, in order


def seq_dim(x: torch.Tensor) -> int:
    return 2 if x.dim() == 3 else 1  # lse [B, H, S]; the rest [B, S, H, D]


@lru_cache(maxsize=1024)
def rows_of(runs: tuple[Run, ...], chunk_len: int, device: torch.device) -> Rows:
    """The rows of ``runs`` (chunk_runs: where some chunks sit in a tensor of others), in the
    chunks' order. An index is made on ``device`` (no copy from the host, which would wait for
    the stream) once per runs, chunk length and device: runs are positions among a rank's few
    chunks, so batches of new documents mostly meet the same ones."""
    if len(runs) == 1:
        _, at, n = runs[0]
        return at * chunk_len, (at + n) * chunk_len
    return torch.cat([torch.arange(at * chunk_len, (at + n) * chunk_len, device=device) for _, at, n in runs])


def rows_in(chunks: tuple[int, ...], within: tuple[int, ...], chunk_len: int, device: torch.device) -> Rows:
    """Where ``chunks`` sit in a tensor of ``within``'s chunks."""
    return rows_of(chunk_runs(chunks, within), chunk_len, device)


@lru_cache(maxsize=4096)
def stretches(chunks: tuple[int, ...], within: tuple[int, ...], chunk_len: int) -> tuple[tuple[Rows, Rows], ...]:
    """Per run of ``chunks`` in a tensor of ``within``'s: (its rows in a tensor of ``chunks``, its
    rows in the tensor of ``within``), for what must go stretch by stretch, in place."""
    n = chunk_len
    return tuple(((i * n, (i + c) * n), (at * n, (at + c) * n)) for i, at, c in chunk_runs(chunks, within))


def pick(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """x's ``rows``: x itself when they are all of it, a view of a stretch, a copy of an index's."""
    if isinstance(rows, tuple):
        start, stop = rows
        dim = seq_dim(x)
        return x if start == 0 and stop == x.shape[dim] else x.narrow(dim, start, stop - start)
    return x.index_select(seq_dim(x), rows)


def place(out: torch.Tensor, rows: Rows, piece: torch.Tensor) -> None:
    """out's ``rows`` := piece."""
    if isinstance(rows, tuple):
        pick(out, rows).copy_(piece)
    else:
        out.index_copy_(seq_dim(out), rows, piece)


def add_to(acc: torch.Tensor, chunks: tuple[int, ...], within: tuple[int, ...], chunk_len: int,
           part: torch.Tensor) -> None:
    """The rows of ``chunks`` in ``acc`` (a tensor of ``within``'s chunks) += part, in place: into a
    view of one stretch; over several, one index_add_ where part is in acc's dtype (each row once:
    deterministic, and torch runs it deterministically on CUDA under use_deterministic_algorithms),
    else stretch by stretch, since add_ casts (a bf16 part into float32) as it adds where
    index_add_ would need a copy of the part."""
    rows = rows_in(chunks, within, chunk_len, acc.device)
    if isinstance(rows, tuple):
        pick(acc, rows).add_(part)
    elif part.dtype == acc.dtype:
        acc.index_add_(seq_dim(acc), rows, part)
    else:
        for here, there in stretches(chunks, within, chunk_len):
            pick(acc, there).add_(pick(part, here))
