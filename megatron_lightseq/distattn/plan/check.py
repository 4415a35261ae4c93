"""Properties every plan must have, checked by simulating it without processes.

- every causal (query chunk, key chunk) pair is computed exactly once, forward and backward;
- a block's chunks are some of its owner's, in the owner's local order (with the plain layouts a
  run of neighbours, so inputs are views: tests/test_plans.py checks that);
- every send has its receive in the same step, and no rank sends to itself;
- nothing is used or sent before it is there (the timing rules in plan.py);
- every partial result goes home exactly once.
A broken plan is a bug in a builder, so failures are AssertionErrors.
"""
from __future__ import annotations

from collections import Counter

from .plan import INPUT_KINDS, Block, Payload, Plan, Steps


def _is_run(chunks: tuple[int, ...], within: tuple[int, ...]) -> bool:
    """A run of neighbours in ``within``."""
    n = len(chunks)
    return n > 0 and any(within[i:i + n] == chunks for i in range(len(within) - n + 1))


def _in_order(chunks: tuple[int, ...], within: tuple[int, ...]) -> bool:
    """Some of ``within``'s chunks, in its order."""
    at = [within.index(c) if c in within else -1 for c in chunks]
    return len(chunks) > 0 and min(at) >= 0 and at == sorted(set(at))


def required_pairs(plan: Plan) -> Counter:
    pairs = Counter()
    for qc in range(plan.chunk_count):
        for kc in range(plan.chunk_count):
            if plan.work(qc, kc):
                pairs[qc, kc] += 1
    return pairs


def computed_pairs(plan: Plan, steps: Steps) -> Counter:
    pairs = Counter()
    for step in steps:
        for rs in step:
            for b in rs.blocks:
                for qc in b.q_chunks:
                    for kc in b.kv_chunks:
                        if plan.work(qc, kc):
                            pairs[qc, kc] += 1
    return pairs


def _results_of(rank: int, block: Block, backward: bool) -> list[Payload]:
    out = []
    if block.q_owner != rank:
        out.append(Payload("dq" if backward else "o", block.q_owner, block.q_chunks))
    if backward and block.kv_owner != rank:
        out.append(Payload("dkv", block.kv_owner, block.kv_chunks))
    return out


def _check_rank(plan: Plan, steps: Steps, rank: int, backward: bool) -> None:
    received: dict[Payload, int] = {}  # payload -> step it arrived
    produced: dict[Payload, int] = {}  # result -> step it was computed
    sent_results: set[Payload] = set()
    q_kind = "qg" if backward else "q"
    for s, step in enumerate(steps):
        for tr in step[rank].recvs:
            assert tr.payload not in received or tr.payload.kind not in INPUT_KINDS, f"{tr} received twice"
            received.setdefault(tr.payload, s)
        for tr in steps[s + 1][rank].sends if s + 1 < len(steps) else ():
            p = tr.payload
            if p.kind in INPUT_KINDS:
                local = p.owner == rank and _in_order(p.chunks, plan.owned(rank))
                assert local or received.get(p, s + 1) <= s, f"step {s + 1}: rank {rank} sends {p} it lacks"
            else:
                assert produced.get(p, s) <= s - 1, f"step {s + 1}: rank {rank} sends {p} before computing it"
                assert p not in sent_results, f"rank {rank} sends {p} twice"
                sent_results.add(p)
        for b in step[rank].blocks:
            assert _in_order(b.q_chunks, plan.owned(b.q_owner)), f"{b}: q chunks not the owner's, in order"
            assert _in_order(b.kv_chunks, plan.owned(b.kv_owner)), f"{b}: kv chunks not the owner's, in order"
            if b.q_owner != rank:
                assert received.get(Payload(q_kind, b.q_owner, b.q_chunks), s + 1) <= s, f"step {s}: {b} lacks q"
            if b.kv_owner != rank:
                assert any(p.kind == "kv" and p.owner == b.kv_owner and _in_order(b.kv_chunks, p.chunks)
                           for p in received), f"step {s}: rank {rank} lacks kv for {b}"
            for r in _results_of(rank, b, backward):
                assert r not in produced, f"rank {rank} produces {r} twice"
                produced[r] = s
    assert set(produced) == sent_results, f"rank {rank} never returns {set(produced) - sent_results}"


def check_steps(plan: Plan, steps: Steps, backward: bool) -> None:
    p = plan.world_size
    assert all(len(step) == p for step in steps), "every step needs one entry per rank"
    assert computed_pairs(plan, steps) == required_pairs(plan), "blocks do not cover the work exactly once"
    for s, step in enumerate(steps):
        sends = Counter(tr for rs in step for tr in rs.sends)
        recvs = Counter(tr for rs in step for tr in rs.recvs)
        assert sends == recvs, f"step {s}: sends and receives do not match"
        for r, rs in enumerate(step):
            assert all(tr.src == r and tr.dst != r for tr in rs.sends), f"step {s}: rank {r} bad send"
            assert all(tr.dst == r for tr in rs.recvs), f"step {s}: rank {r} bad receive"
    for r in range(p):
        _check_rank(plan, steps, r, backward)


def check_plan(plan: Plan) -> None:
    check_steps(plan, plan.forward, backward=False)
    check_steps(plan, plan.backward, backward=True)
    fwd = [[rs.blocks for rs in step] for step in plan.forward]
    bwd = [[rs.blocks for rs in step] for step in plan.backward]
    assert [b for b in fwd if any(b)] == [b for b in bwd if any(b)], "backward must mirror forward blocks"
