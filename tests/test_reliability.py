"""Failures inside the exchange on local gloo ranks: no rank waits past its deadline, every error
names where it happened; the agreement is skipped in steady state (packed documents included);
the NCCL path's watcher, exercised on gloo; results are bitwise repeatable. Each failure case runs in fresh processes (a failure aborts the group) under the harness's own
timeout, which fails the test on a hang."""
import re
import time

import pytest
import torch

import megatron_lightseq as mls
from harness import run_ranks

VICTIM = 1  # the rank that fails, stalls or skips
CHUNK = 2  # tokens per chunk


def _qkv(world_size, rank, *, requires_grad=True, tokens=CHUNK, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(1, 2 * tokens, 4, 8, generator=g)
    k, v = (torch.randn(1, 2 * tokens, 2, 8, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


class _Faulty(mls.kernels.get_kernel("math").__class__):
    """The math kernel, except on VICTIM at its ``at``-th call of ``phase``: raise, or sleep."""

    name = "faulty"
    mode, phase, at = "raise", "forward", 1

    def __init__(self):
        self.calls = {"forward": 0, "backward": 0}

    def _maybe_fail(self, phase):
        import torch.distributed as dist

        self.calls[phase] += 1
        if dist.get_rank() == VICTIM and phase == self.phase and self.calls[phase] == self.at:
            if self.mode == "raise":
                raise RuntimeError("injected kernel fault")
            time.sleep(4)  # past the 2 s deadline and the grace that follows it

    def forward(self, *args, **kwargs):
        self._maybe_fail("forward")
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self._maybe_fail("backward")
        return super().backward(*args, **kwargs)


def _failure(rank, world_size, mode, phase):
    """Run one forward+backward that fails on VICTIM; (error message, seconds until it came)."""
    _Faulty.mode, _Faulty.phase = mode, phase
    mls.kernels.register_kernel("faulty", _Faulty)
    q, k, v = _qkv(world_size, rank)
    timeout = 2.0 if mode != "raise" else 60.0  # a raised fault must travel at once, not at the deadline
    start = time.monotonic()
    try:
        out = mls.dist_attn(q, k, v, kernel="faulty", schedule="lightseq", timeout=timeout, label="test call")
        if mode == "skip" and rank == VICTIM:
            return None, 0.0  # this rank never runs its backward
        out.sum().backward()
    except mls.DistAttnError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


CASES = [("raise", "forward"), ("raise", "backward"), ("stall", "forward"), ("stall", "backward"),
         ("skip", "backward")]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("mode,phase", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_a_failing_rank_stops_every_rank_promptly_by_name(world_size, mode, phase):
    results = run_ranks(world_size, _failure, mode, phase, timeout=60)
    for rank, (message, seconds) in enumerate(results):
        if mode == "skip" and rank == VICTIM:
            continue
        assert message is not None, f"rank {rank} finished although rank {VICTIM} {mode}ed"
        # this rank's own phase may come later: a rank that needs nothing more of VICTIM's forward stops in backward
        assert re.search(rf"rank {rank} of {world_size} \((forward|backward) step \d+, test call\)", message), message
        first = re.search(r"rank (\d+) of \d+ \((forward|backward) step \d+, test call\): (.*)$", message)
        assert first, message
        if mode == "raise":
            assert (first.group(1), first.group(2)) == (str(VICTIM), phase), message
            assert "RuntimeError: injected kernel fault" in message, message
            assert seconds < 20, f"rank {rank} took {seconds:.1f}s: the fault did not travel"
        else:  # the first to fail timed out, maybe in a later phase, waiting for VICTIM or for ranks waiting for it
            missing = re.search(r"timed out waiting for rank\(s\) \[.*; missing: rank\(s\) \[([\d, ]+)\]", first.group(3))
            assert missing and str(VICTIM) in missing.group(1).split(", "), message
            if rank != VICTIM:
                assert seconds < 2.0 + 4.0, f"rank {rank} took {seconds:.1f}s for a 2 s deadline"


def _agreement(rank, world_size):
    """Disagreements raise on every rank and leave the group usable; the steady state makes no
    collective and reads nothing back; a bad input after agreement stops the peers by name."""
    q, k, v = _qkv(world_size, rank)
    scale = q.shape[-1] ** -0.5
    differing = {  # field -> (options of rank 0, options of the others), and the words expected
        "scale": (dict(softmax_scale=0.5), dict(softmax_scale=0.25), "softmax_scale: rank 0=0.5, rank 1=0.25"),
        "causal": (dict(causal=True), dict(causal=False), "causal: rank 0=True, rank 1=False"),
        "kernel": (dict(kernel="math"), dict(kernel="torch"), "kernel: rank 0=math, rank 1=torch"),
        "schedule": (dict(schedule="ring"), dict(schedule="lightseq"), "schedule: rank 0=ring, rank 1=lightseq"),
        "layout": (dict(layout="zigzag"), dict(layout="contiguous"), "layout: rank 0=zigzag, rank 1=contiguous"),
    }
    for field, (mine, others, words) in differing.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            mls.dist_attn(q, k, v, **({"schedule": "ring"} | (mine if rank == 0 else others)))
    no_grad = [x.detach() for x in (q, k, v)]
    with pytest.raises(ValueError, match=re.escape("backward: rank 0=True, rank 1=False")):
        mls.dist_attn(*((q, k, v) if rank == 0 else no_grad))
    # the same effective scale, given or not: agreed
    mls.dist_attn(q, k, v, softmax_scale=scale if rank == 0 else None).sum().backward()
    with mls.trace() as warm:
        mls.dist_attn(q, k, v).sum().backward()
    with mls.trace() as steady:
        for _ in range(100):
            mls.dist_attn(q, k, v).sum().backward()
    assert (steady.collectives, steady.host_reads, steady.forward_calls) == (0, 0, 100), steady
    packed = _packed_steady_state(rank, world_size)
    bigger = _qkv(world_size, rank, tokens=2 * CHUNK)
    with mls.trace() as new_shapes:
        mls.dist_attn(*bigger).sum().backward()
    assert (new_shapes.collectives, new_shapes.host_reads) == (1, 1), new_shapes
    # new shapes on one rank only, all of them new: caught by the agreement
    with pytest.raises(ValueError, match="seqlen_local"):
        mls.dist_attn(*(_qkv(world_size, rank, tokens=3 * CHUNK) if rank == 0 else _qkv(world_size, rank,
                                                                                      tokens=4 * CHUNK)))
    # a bad input on one rank while the others' call is agreed: the others stop at once, by name
    start = time.monotonic()
    try:
        mls.dist_attn(q.double() if rank == VICTIM else q, k, v, timeout=60)
    except (ValueError, mls.DistAttnError) as e:
        return type(e).__name__, str(e), time.monotonic() - start, warm.collectives, packed
    return None


def _packed_steady_state(rank, world_size, batches=4):
    """Packed batches whose documents change every step: the first batch of the shape agrees,
    the later ones make no collective and read nothing back; every batch matches the oracle."""
    from mask_cases import dense_allowed, documents, masked_reference

    tokens = 32 * world_size
    counts = []
    for step in range(batches):
        cu = documents("long-tailed", tokens, seed=step)
        mask = dict(causal=True, cu_seqlens=cu)
        g = torch.Generator().manual_seed(step)
        q, dout = (torch.randn(1, tokens, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, tokens, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
        mine = [mls.shard(x, layout="balanced", rank=rank, world_size=world_size, **mask).requires_grad_()
                for x in (q, k, v)]
        with mls.trace() as t:
            out = mls.dist_attn(*mine, layout="balanced", kernel="math", **mask)
            out.backward(mls.shard(dout, layout="balanced", rank=rank, world_size=world_size, **mask))
        counts.append((t.collectives, t.host_reads))
        want = masked_reference(q, k, v, dout, dense_allowed(tokens, **mask))
        for name, got, full in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in mine)), (want[0], *want[2:])):
            torch.testing.assert_close(got, mls.shard(full, layout="balanced", rank=rank, world_size=world_size,
                                                      **mask), rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    return counts


@pytest.mark.parametrize("world_size", [2, 4])
def test_agreement_steady_state_and_disagreements(world_size):
    for rank, (kind, message, seconds, warm_collectives, packed) in enumerate(
            run_ranks(world_size, _agreement, timeout=120)):
        assert packed[0] == (1, 1) and set(packed[1:]) == {(0, 0)}, packed  # new documents, no re-agreement
        assert warm_collectives == 0  # the call before was agreed already (same signature)
        assert seconds < 20, f"rank {rank} waited {seconds:.1f}s"
        if rank == VICTIM:
            assert kind == "ValueError" and "share one dtype" in message, message
        else:
            assert kind == "DistAttnError" and f"failed first on rank {VICTIM} of {world_size}" in message, message
            assert "ValueError: q, k and v must share one dtype" in message, message


def _results(rank, world_size, kernels):
    """Every CPU kernel's out and grads, twice in this launch."""
    runs = []
    for kernel in kernels:
        for _ in range(2):
            q, k, v = _qkv(world_size, rank, tokens=8)
            out = mls.dist_attn(q, k, v, kernel=kernel, schedule="lightseq")
            out.backward(torch.ones_like(out))
            runs.append((kernel, out.detach(), q.grad, k.grad, v.grad))
    return runs


def test_results_are_bitwise_repeatable_within_and_across_launches():
    kernels = [n for n in ("math", "torch", "triton") if n in mls.kernels.kernel_names()]
    launches = [run_ranks(3, _results, kernels) for _ in range(2)]
    for rank in range(3):
        runs = launches[0][rank] + launches[1][rank]
        for kernel in kernels:
            same = [r[1:] for r in runs if r[0] == kernel]
            assert len(same) == 4
            for other in same[1:]:
                assert all(torch.equal(a, b) for a, b in zip(same[0], other)), f"{kernel} on rank {rank}"


def _watched(rank, world_size, mode):
    """gloo run through the NCCL path, whose waits neither watch nor time out on the host: the
    group's watcher thread (failures.GroupWatcher) reads the failure record, or keeps the deadline,
    and aborts the group (NCCL: its kernels end; gloo: nothing, so the group's own 6 s timeout ends
    the blocked wait here). Returns (seconds until the abort, this rank's error)."""
    import datetime

    import torch.distributed as dist

    from megatron_lightseq.distattn.transport import exchange as exchange_module

    exchange_module.HOST_WAIT_BACKENDS = ()
    aborted = []
    exchange_module.abort_group = lambda group: aborted.append(time.monotonic())
    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=6))
    _Faulty.mode, _Faulty.phase = mode, "forward"
    mls.kernels.register_kernel("faulty", _Faulty)
    q, k, v = _qkv(world_size, rank)
    mls.dist_attn(q, k, v, group=group, kernel="math", schedule="lightseq")  # agreed: the next call skips it
    start = time.monotonic()
    try:
        for _ in range(3):  # the error comes from the call that failed, or the one after
            mls.dist_attn(q, k, v, group=group, kernel="faulty", schedule="lightseq", timeout=1.0, label="test call")
    except (mls.DistAttnError, RuntimeError) as e:
        assert len(aborted) == 1, aborted  # once, whether the failing call or the watcher came first
        return (aborted[0] - start if aborted else None), str(e)
    return (aborted[0] - start if aborted else None), None


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_the_nccl_path_watcher_stops_every_rank(mode):
    world_size = 3
    for rank, (seconds, message) in enumerate(run_ranks(world_size, _watched, mode, timeout=60)):
        assert message is not None, f"rank {rank} finished although rank {VICTIM} {mode}ed"
        if mode == "raise":
            assert f"rank {VICTIM} of {world_size} (forward step" in message and "injected kernel fault" in message, \
                message
            if rank != VICTIM:  # the watcher read the record within a few periods (not at the 6 s group timeout)
                assert seconds is not None and seconds < 3.0, (rank, seconds)
        else:  # a peer's watcher kept the 1 s deadline, named whom it waits for and the missing rank
            assert "timed out waiting for rank(s)" in message and f"missing: rank(s) [{VICTIM}]" in message, message
            assert seconds is not None and seconds < 1.0 + 4.0 - 0.5, (rank, seconds)  # before VICTIM woke


def _hybrid_failure(rank, world_size, phase):
    """A 2 x 2 hybrid call whose outer plan raises on VICTIM: (error message, seconds until it came)."""
    import torch.distributed as dist

    _Faulty.mode, _Faulty.phase = "raise", phase
    mls.kernels.register_kernel("faulty", _Faulty)
    inner = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    outer = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    q, k, v = _qkv(world_size, rank)
    start = time.monotonic()
    try:
        out = mls.dist_attn(q, k, v, group=outer, heads_group=inner, kernel="faulty", timeout=60.0, label="test call")
        out.sum().backward()
    except mls.DistAttnError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_failure_in_a_hybrid_call_stops_both_groups(phase):
    """VICTIM's outer plan fails: its outer peer stops through the outer group, its all-to-all
    peer and that one's outer peer through the inner group's record, all at once, naming it."""
    results = run_ranks(4, _hybrid_failure, phase, timeout=60)
    for rank, (message, seconds) in enumerate(results):
        assert message is not None, f"rank {rank} finished although rank {VICTIM} raised"
        assert "RuntimeError: injected kernel fault" in message, message
        assert seconds < 20, f"rank {rank} took {seconds:.1f}s: the fault did not travel to both groups"


def _mismatched_steady_calls(rank, world_size):
    """Ranks whose calls each match a shape the group agreed before, but different shapes: per
    layout and schedule, in a fresh group (a failure ends a group), the error each rank gets."""
    import torch.distributed as dist

    found = []
    for layout, schedule in (("contiguous", "ring"), ("contiguous", "lightseq"), ("zigzag", "ring")):
        group = dist.new_group(list(range(world_size)))
        small, large = (_qkv(world_size, rank, tokens=t, requires_grad=False) for t in (CHUNK, 2 * CHUNK))
        for agreed in (small, large):  # both shapes agreed together: later calls of either skip the agreement
            mls.dist_attn(*agreed, group=group, layout=layout, schedule=schedule)
        start = time.monotonic()
        try:
            mls.dist_attn(*(small if rank == 0 else large), group=group, layout=layout, schedule=schedule,
                          timeout=60)
            found.append((None, 0.0))
        except mls.DistAttnError as e:
            found.append((str(e), time.monotonic() - start))
    return found


def test_ranks_with_different_agreed_shapes_fail_by_name():
    """Steady state skips the agreement; the header each transfer carries still tells a rank that
    its peer runs another call (gloo: before the data lands, so no short fill and no abort)."""
    for rank, found in enumerate(run_ranks(2, _mismatched_steady_calls, timeout=120)):
        for message, seconds in found:
            assert message is not None and seconds < 20, (rank, message, seconds)
            assert "sent a transfer of another call" in message, (rank, message)
            assert re.search(r"seqlen_local \d+ there, \d+ here", message), (rank, message)
