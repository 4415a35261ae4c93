"""Megatron's ``cp_comm_type`` (``--cp-comm-type``, one value or one per layer) as the lightseq
backend runs it, and the process groups each value needs (docs/hybrid.md):

- ``p2p`` (Megatron's default, also None): the plan over the whole CP group.
- ``all_gather``: TransformerEngine gathers every rank's K/V before computing; the p2p plans
  move the same K/V or less, overlapped with compute, so it runs as ``p2p``.
- ``a2a``: Ulysses over the whole CP group (dist_attn ``heads_group`` = the CP group, no outer).
- ``a2a+p2p``: Megatron's hierarchical CP groups (``--hierarchical-context-parallel-sizes A P``,
  parallel_state's ``get_hierarchical_context_parallel_groups`` or ``pg_collection.hcp``): the
  all-to-all over the A consecutive CP ranks of the first level, the plan over the second.

Megatron numbers CP rank = p2p rank x A + a2a rank (``create_hierarchical_groups``), which is
what dist_attn's hybrid path assumes, so Megatron's own zigzag batch split and rotary positions
stay as they are: tokens never change rank outside the attention.
"""
from __future__ import annotations

from megatron.core import parallel_state

CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")


def cp_comm_of(cp_comm_type, layer_number: int) -> str:
    """This layer's value ("p2p", "a2a" or "a2a+p2p"); a per-layer list is indexed by the
    1-based layer number. ValueError naming the choices for anything else."""
    if isinstance(cp_comm_type, (list, tuple)):
        if not 1 <= layer_number <= len(cp_comm_type):
            raise ValueError(f"cp_comm_type lists {len(cp_comm_type)} layers, got layer {layer_number}")
        cp_comm_type = cp_comm_type[layer_number - 1]
    if cp_comm_type is None or cp_comm_type == "all_gather":
        return "p2p"
    if cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES} (or a list of them, one per layer), "
                         f"got {cp_comm_type!r}")
    return cp_comm_type


def _size(group) -> int:
    return 1 if group is None else group.size()


def _rank(group) -> int:
    return 0 if group is None else group.rank()


def attention_groups(comm: str, cp_group, pg_collection) -> dict:
    """dist_attn's ``group`` and ``heads_group`` for ``comm`` (cp_comm_of's value)."""
    if _size(cp_group) == 1 or comm == "p2p":
        return dict(group=cp_group)
    if comm == "a2a":
        return dict(group=None, heads_group=cp_group)
    hcp = getattr(pg_collection, "hcp", None) if pg_collection is not None else None
    hcp = hcp or parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not hcp:
        raise ValueError(f"--cp-comm-type a2a+p2p needs Megatron's hierarchical context-parallel groups: pass "
                         f"--hierarchical-context-parallel-sizes A P (A the all-to-all size, A x P = the context-"
                         f"parallel size {_size(cp_group)}); none were built")
    if len(hcp) != 2:
        raise ValueError(f"--cp-comm-type a2a+p2p takes two levels of --hierarchical-context-parallel-sizes "
                         f"(all-to-all, then p2p), got {len(hcp)}")
    a2a, p2p = hcp
    if _size(a2a) * _size(p2p) != _size(cp_group) or _rank(cp_group) != _rank(p2p) * _size(a2a) + _rank(a2a):
        raise ValueError(f"the hierarchical context-parallel groups ({_size(a2a)} x {_size(p2p)}) must split the "
                         f"context-parallel group of {_size(cp_group)} ranks as Megatron numbers them (CP rank = "
                         f"p2p rank x {_size(a2a)} + a2a rank); CP rank {_rank(cp_group)} is a2a rank {_rank(a2a)}, "
                         f"p2p rank {_rank(p2p)}")
    if _size(a2a) == 1:
        return dict(group=cp_group)
    return dict(group=p2p if _size(p2p) > 1 else None, heads_group=a2a)
