"""The ranks' agreement on a call, before any transfer: one way for flat and hybrid calls.

Every rank holds a description of its call (plan/call.py) or the reason its inputs are bad. The
ranks gather the description's signature with one small all_gather over their group (a hybrid
call: over the all-to-all group, then what each all-to-all group found over the outer group,
which reaches every rank), then raise together: a rank whose inputs are bad, or ranks that
disagree, never leave the others waiting in a transfer that will not come.

A call whose steady-state key the group has agreed before is not agreed again: in steady state a
call makes no collective and reads nothing back from the device (trace() counts both). What that
leaves to the deadline is written in docs/reliability.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .exchange import Exchange
from .failures import DistAttnError, TransferError

PASSED, REJECTED, GROUP_REJECTED = 0.0, 1.0, 2.0  # a signature's first number


def refuse_capture(device: torch.device) -> None:
    """dist_attn cannot run inside a CUDA graph capture: its first call of a shape reads the
    agreement back to the host, ``kernel="auto"`` times kernels, the plan's receive buffers are
    allocated per call and the waits of a failing group are watched from the host. Say so before
    any of that fails obscurely (or, worse, is captured and replayed with stale buffers)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("dist_attn cannot be captured in a CUDA graph (the current stream is capturing): run "
                           "the attention layers outside the graph (Megatron: leave --enable-cuda-graph / "
                           "--external-cuda-graph off, or exclude the attention with --cuda-graph-scope)")


def agree(exchanges: Sequence[Exchange], call, problem: str | None, fields: Sequence[str],
          settle: Callable[[], None] | None = None) -> None:
    """Return once every rank of ``exchanges`` holds an equal ``call`` (one exchange: a flat
    call's group; two: the all-to-all group, then the outer group), else raise ValueError on every
    rank together. ``problem``: what is wrong with this rank's inputs (``call`` is then None).
    ``call``: a description with ``signature()`` (0, then a number per ``fields`` entry),
    ``steady_key`` and ``show(field, value)`` (plan/call.py's Call).
    ``settle``: what the first agreement of a key also settles with the group (``kernel="auto"``)."""
    home = exchanges[0]
    for ex in exchanges:
        if ex.failure:
            raise DistAttnError(f"dist_attn: this group failed earlier ({ex.failure}); it cannot be used")
    if all(ex.world_size == 1 for ex in exchanges):
        if problem:
            raise ValueError(problem)
        return
    key = None if problem else call.steady_key
    if key is not None and key in home.agreed:
        return  # steady state: agreed before, no collective
    if problem and home.agreed:
        # Peers whose inputs match an agreed key skip the agreement and go on to the transfers:
        # tell them through the failure protocol rather than leave them to the deadline.
        home.fail("forward input checks", ValueError(problem))
        raise ValueError(problem)
    rows, groups = _gather(exchanges, problem, call, len(fields))
    if problem:
        raise ValueError(problem)
    _raise_differences(rows, call, fields, "group" if len(exchanges) == 1 else "all-to-all group", "rank")
    if groups is not None:
        _raise_differences(groups, call, fields, "outer group", "outer rank")
    if settle is not None:
        settle()
    home.agreed.add(key)


def _gather(exchanges: Sequence[Exchange], problem: str | None, call, n: int) -> tuple[list, list | None]:
    """Every rank's signature in the first group, and each first group's finding in the second."""
    signature = (REJECTED,) + (0.0,) * n if problem else call.signature()
    home = exchanges[0]
    try:
        rows, groups = home.agree(signature), None
        if len(exchanges) > 1:
            same = all(row[0] == PASSED for row in rows) and all(row == rows[0] for row in rows)
            groups = exchanges[1].agree(tuple(rows[0]) if same else (GROUP_REJECTED,) + tuple(signature[1:]))
    except TransferError as e:  # a peer failed (or skipped, having agreed before): stop every group
        raise home.fail("forward input agreement", e) from e
    if any(ex.failure for ex in exchanges):  # NCCL: the watcher aborted the gather: its rows are void
        raise DistAttnError(f"dist_attn: this group failed during the input agreement "
                            f"({next(ex.failure for ex in exchanges if ex.failure)})")
    return rows, groups


def _raise_differences(rows: list, call, fields: Sequence[str], group: str, member: str) -> None:
    bad = [r for r, row in enumerate(rows) if row[0] != PASSED]
    if bad:
        why = "rejected their inputs" if all(rows[r][0] == REJECTED for r in bad) else \
            "rejected their inputs or disagree"
        raise ValueError(f"dist_attn: {member}(s) {bad} of the {group} {why} (see their error)")
    if any(row != rows[0] for row in rows):
        diffs = [f"{name}: " + ", ".join(f"{member} {r}={call.show(name, row[i + 1])}" for r, row in enumerate(rows))
                 for i, name in enumerate(fields) if len({row[i + 1] for row in rows}) > 1]
        raise ValueError("dist_attn: every rank must pass the same sizes and options; expected equal, got "
                         + "; ".join(diffs))
