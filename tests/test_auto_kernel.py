"""kernel="auto": the measured choice per kind of block (a candidate made 60 ms slower per call
loses on any machine), and the static choice on CPU."""
import time

import torch

from megatron_lightseq.kernels import get_kernel, resolve_kernel
from megatron_lightseq.kernels.auto import AutoKernel
from megatron_lightseq.kernels.base import BlockKernel
from megatron_lightseq.kernels.merge import merge_into
from test_kernels import _inputs


class _Slow(BlockKernel):
    """A kernel that sleeps before each call, counting its calls (its merge is the unfused default)."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel, self.name, self.calls = kernel, name, 0

    def supports(self, q, k):
        return True

    def _slow(self, fn, *args, **kwargs):
        self.calls += 1
        time.sleep(0.06)  # well above scheduling noise on a loaded 2-core machine
        return fn(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._slow(self.kernel.forward, *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._slow(self.kernel.backward, *args, **kwargs)


def test_auto_takes_the_measured_fastest_per_block_kind_and_measures_once():
    slow = _Slow(get_kernel("torch"), "slow-torch")
    auto = AutoKernel([slow, get_kernel("math")])
    q, k, v, dout = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    blocks = [dict(q_span=((8, 16),), k_span=((8, 16),), causal=True, scale=0.125),
              dict(q_span=((8, 16),), k_span=((0, 8),), causal=True, scale=0.125)]
    for _ in range(2):  # the second round looks up what the first measured
        for block in blocks:
            out, lse = auto.forward(q, k, v, **block)
            want = get_kernel("math").forward(q, k, v, **block)
            torch.testing.assert_close((out, lse), want, rtol=0, atol=0)
            grads = auto.backward(dout, q, k, v, out, lse, **block)
            torch.testing.assert_close(grads, get_kernel("math").backward(dout, q, k, v, out, lse, **block),
                                       rtol=0, atol=0)
    assert set(auto.choices().values()) == {"math"}
    assert {key[0] for key in auto.choices()} == {"forward", "backward"}
    assert {key[-1] for key in auto.choices()} == {"causal", "full"}
    # measured once per (call, block kind): a warm-up and 3 timed runs; backward inputs made by
    # the first candidate's forward
    assert slow.calls == 2 * 2 * 4 + 2


def test_auto_forward_into_merges_like_forward_then_merge():
    auto = AutoKernel([_Slow(get_kernel("math"), "slow-math"), get_kernel("torch")])
    q, k, v, _ = (x.float() for x in _inputs(8, 8, 4, 2, 64))
    block = dict(q_span=((8, 16),), k_span=((0, 8),), causal=True, scale=0.125)
    first = get_kernel("math").forward(q, k, v, q_span=((8, 16),), k_span=((8, 16),), causal=True, scale=0.125)
    out, lse = first[0].clone(), first[1].clone()
    auto.forward_into(q, k, v, out, lse, **block)  # measuring must leave these accumulators alone
    want_out, want_lse = first[0].clone(), first[1].clone()
    merge_into(want_out, want_lse, *get_kernel("torch").forward(q, k, v, **block))
    torch.testing.assert_close((out, lse), (want_out, want_lse), rtol=0, atol=0)
    assert set(auto.choices().values()) == {"torch"}


def test_auto_on_cpu_is_torchs_flash_op_without_measuring():
    q, k, _, _ = _inputs(8, 8, 4, 2, 64)
    assert resolve_kernel("auto", q, k) is get_kernel("torch")
