"""kernel="auto": the measured choice per kind of block (a candidate charged a second per run
loses, however loaded the machine), the group's agreed choice, and the static choice on CPU."""
import torch

from megatron_lightseq.kernels import get_kernel, resolve_kernel
from megatron_lightseq.kernels.auto import AutoKernel, device_time
from megatron_lightseq.kernels.base import BlockKernel
from megatron_lightseq.kernels.merge import merge_into
from oracle import CAUSAL
from harness import run_ranks
from test_kernels import _inputs


class _Slow(BlockKernel):
    """A kernel whose runs :meth:`timer` charges a second each, counting its calls (its merge is
    the unfused default)."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel, self.name, self.calls = kernel, name, 0

    def supports(self, q, k):
        return True

    def timer(self, fn, device):
        """device_time, plus a second per run of this kernel inside ``fn``."""
        before = self.calls
        return device_time(fn, device) + (self.calls - before)

    def _slow(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._slow(self.kernel.forward, *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._slow(self.kernel.backward, *args, **kwargs)


def test_auto_takes_the_measured_fastest_per_block_kind_and_measures_once():
    slow = _Slow(get_kernel("torch"), "slow-torch")
    auto = AutoKernel([slow, get_kernel("math")], timer=slow.timer)
    q, k, v, dout = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    blocks = [dict(q_span=((8, 16),), k_span=((8, 16),), mask=CAUSAL, scale=0.125),
              dict(q_span=((8, 16),), k_span=((0, 8),), mask=CAUSAL, scale=0.125)]
    for _ in range(2):  # the second round looks up what the first measured
        for block in blocks:
            out, lse = auto.forward(q, k, v, **block)
            want = get_kernel("math").forward(q, k, v, **block)
            torch.testing.assert_close((out, lse), want, rtol=0, atol=0)
            grads = auto.backward(dout, q, k, v, out, lse, **block)
            torch.testing.assert_close(grads, get_kernel("math").backward(dout, q, k, v, out, lse, **block),
                                       rtol=0, atol=0)
    assert set(auto.choices().values()) == {"math"}
    assert {kind.split("|")[0] for kind in auto.choices()} == {"forward", "backward"}
    assert {kind.split("|")[-1] for kind in auto.choices()} == {"causal", "full"}
    # measured once per (call, block kind): a warm-up and 3 timed runs; backward inputs made by
    # the first candidate's forward
    assert slow.calls == 2 * 2 * 4 + 2


def test_auto_forward_into_merges_like_forward_then_merge():
    slow = _Slow(get_kernel("math"), "slow-math")
    auto = AutoKernel([slow, get_kernel("torch")], timer=slow.timer)
    q, k, v, _ = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    block = dict(q_span=((8, 16),), k_span=((0, 8),), mask=CAUSAL, scale=0.125)
    first = get_kernel("math").forward(q, k, v, q_span=((8, 16),), k_span=((8, 16),), mask=CAUSAL, scale=0.125)
    out, lse = first[0].clone(), first[1].clone()
    auto.forward_into(q, k, v, out, lse, **block)  # measuring must leave these accumulators alone
    want_out, want_lse = first[0].clone(), first[1].clone()
    merge_into(want_out, want_lse, *get_kernel("torch").forward(q, k, v, **block))
    torch.testing.assert_close((out, lse), (want_out, want_lse), rtol=0, atol=0)
    assert set(auto.choices().values()) == {"torch"}


def test_auto_times_only_any_mask_kernels_on_general_blocks():
    """torch's flash op hands a block off the diagonal to another kernel: it is not timed there."""
    timed = []

    def timer(fn, device):
        timed.append(fn.__defaults__[0].name)
        return device_time(fn, device)

    auto = AutoKernel([get_kernel("torch"), get_kernel("math")], timer=timer)
    q, k, v, _ = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    general = dict(q_span=((4, 12),), k_span=((0, 8),), mask=CAUSAL, scale=0.125)
    torch.testing.assert_close(auto.forward(q, k, v, **general), get_kernel("math").forward(q, k, v, **general),
                               rtol=0, atol=0)
    assert timed == ["math"]
    auto.forward(q, k, v, q_span=((8, 16),), k_span=((8, 16),), mask=CAUSAL, scale=0.125)  # causal: both
    assert timed == ["math", "torch", "math"]


def test_auto_on_cpu_is_torchs_flash_op_without_measuring():
    q, k, _, _ = _inputs(8, 8, 4, 2, 64)
    assert resolve_kernel("auto", q, k) is get_kernel("torch")


def _agreed_choice(rank, world_size):
    import megatron_lightseq as mls
    import megatron_lightseq.distattn.run.pipeline as call_module

    auto = AutoKernel([get_kernel("torch"), get_kernel("math")])
    measured = []

    def timer(fn, device):  # rank 0 finds torch fastest, the others math: the sum picks math
        name = fn.__defaults__[0].name
        measured.append(name)
        return {"torch": 1.0 if rank == 0 else 5.0}[name] if name == "torch" else 2.0

    auto._timer = timer
    call_module.resolve_kernel = lambda name, q, k: auto if name == "auto" else get_kernel(name)
    rng = torch.get_rng_state()
    q, k, v = (x.float().requires_grad_() for x in _inputs(4, 4, 4, 2, 16, seed=rank)[:3])
    with mls.trace() as first:
        mls.dist_attn(q, k, v, kernel="auto").sum().backward()
    with mls.trace() as second:
        mls.dist_attn(q, k, v, kernel="auto").sum().backward()
    assert torch.equal(torch.get_rng_state(), rng), "measuring drew from the global generator"
    assert (first.collectives, second.collectives) == (2, 0)  # the inputs' agreement, then the choices'
    again = AutoKernel([get_kernel("torch"), get_kernel("math")], timer=lambda fn, device: 1 / 0)
    again.adopt(auto.choices())  # a recorded choice, reused without measuring
    block = dict(q_span=((4, 8),), k_span=((0, 4),), mask=CAUSAL, scale=0.25)  # rank 1's Q1K0: all keys seen
    out, lse = torch.zeros(2, 4, 4, 16), torch.full((2, 4, 4), float("-inf"))
    again.forward_into(q.detach(), k.detach(), v.detach(), out, lse, **block)
    return auto.choices(), len(measured), _raising_candidates(rank, call_module)


class _Raising(BlockKernel):
    """Raises on the ranks in ``on`` (as cuDNN's "no valid execution plan" or an OOM would; a
    single process is rank 0)."""

    def __init__(self, name, on):
        self.name, self.on = name, on

    def supports(self, q, k):
        return True

    def _fail(self):
        import torch.distributed as dist

        if (dist.get_rank() if dist.is_initialized() else 0) in self.on:
            raise RuntimeError(f"{self.name} cannot run this block")

    def forward(self, q, k, v, **block):
        self._fail()
        return get_kernel("math").forward(q, k, v, **block)

    def backward(self, *args, **block):
        self._fail()
        return get_kernel("math").backward(*args, **block)


def _raising_candidates(rank, call_module):
    """A candidate that raises on rank 1 while measured is dropped on both ranks (the call then
    runs, exact); when every candidate raises on rank 1, both ranks raise together."""
    import megatron_lightseq as mls

    def fast(fn, device):  # runs the candidate (which may raise) and says the raising one would win
        fn()
        return 0.0 if fn.__defaults__[0].name == "raising" else 1.0

    auto = AutoKernel([_Raising("raising", on={1}), get_kernel("math")], timer=fast)
    call_module.resolve_kernel = lambda name, q, k: auto
    q, k, v = (x.double().requires_grad_() for x in _inputs(4, 4, 4, 2, 16, seed=rank)[:3])
    out = mls.dist_attn(q, k, v, kernel="auto")
    out.sum().backward()
    chosen = set(auto.choices().values())
    hopeless = AutoKernel([_Raising("raising", on={1}), _Raising("also-raising", on={1})], timer=fast)
    call_module.resolve_kernel = lambda name, q, k: hopeless
    try:
        mls.dist_attn(*(x.detach().float() for x in (q, k, v)), kernel="auto")
    except RuntimeError as e:
        return chosen, str(e)
    return chosen, None


def test_auto_choice_is_agreed_by_the_group_and_can_be_reused():
    results = run_ranks(2, _agreed_choice)
    assert results[0][0] == results[1][0] and set(results[0][0].values()) == {"math"}
    assert results[0][1] > 0
    for rank, (_, _, (chosen, hopeless)) in enumerate(results):
        assert chosen == {"math"}, (rank, chosen)  # dropped on rank 0 too, where it ran
        assert hopeless and "no candidate of ['raising', 'also-raising'] runs" in hopeless and "rank(s) [1]" in hopeless
        if rank == 1:
            assert "RuntimeError: raising cannot run this block" in hopeless, hopeless


def test_auto_drops_a_candidate_that_raises_alone():
    auto = AutoKernel([_Raising("raising", on={0}), get_kernel("math")])
    q, k, v, dout = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    block = dict(q_span=((8, 16),), k_span=((0, 8),), mask=CAUSAL, scale=0.125)
    out, lse = auto.forward(q, k, v, **block)
    torch.testing.assert_close((out, lse), get_kernel("math").forward(q, k, v, **block), rtol=0, atol=0)
    torch.testing.assert_close(auto.backward(dout, q, k, v, out, lse, **block),
                               get_kernel("math").backward(dout, q, k, v, out, lse, **block), rtol=0, atol=0)
    assert set(auto.choices().values()) == {"math"}


def test_a_kind_new_after_the_group_settled_takes_the_nearest_choice_without_measuring():
    """New documents in steady state can make blocks of a kind the group never settled: no rank
    measures it alone (that would differ across ranks and sync mid-call); each takes the group's
    choice for the nearest settled kind of the same call and mask kind."""
    timer = lambda fn, device: (fn(), 1.0 if fn.__defaults__[0].name == "torch" else 2.0)[1]  # noqa: E731
    auto = AutoKernel([get_kernel("torch"), get_kernel("math")], timer=timer)
    q, k, v, _ = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    block = dict(q_span=((8, 16),), k_span=((8, 16),), mask=CAUSAL, scale=0.125)
    request = ("forward", tuple(q.shape), tuple(k.shape), q.dtype, q.device, block)
    auto.settle([request], lambda mine: [mine, mine])  # a group of two that agreed: torch
    auto._timer = lambda fn, device: 1 / 0  # nothing may be measured from here on
    q2, k2, v2, _ = (x.float() for x in _inputs(4, 4, 4, 2, 64))
    small = dict(q_span=((4, 8),), k_span=((4, 8),), mask=CAUSAL, scale=0.125)
    torch.testing.assert_close(auto.forward(q2, k2, v2, **small), get_kernel("torch").forward(q2, k2, v2, **small),
                               rtol=0, atol=0)
    assert auto.choices()[AutoKernel.kind("forward", q2.shape, k2.shape, q2.dtype, q2.device, small)] == "torch"
