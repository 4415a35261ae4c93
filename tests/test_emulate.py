"""Virtual ranks in one process: the executor in lockstep against the float64 oracle."""
import pytest
import torch

import megatron_lightseq as mls
from megatron_lightseq.distattn.emulate import emulate_dist_attn
from oracle import reference_with_grads


@pytest.mark.parametrize("world_size", [2, 3, 8])
@pytest.mark.parametrize("layout,schedule", [("contiguous", "lightseq"), ("contiguous", "ring"),
                                             ("zigzag", "ring"), ("zigzag", "lightseq")])
@pytest.mark.parametrize("causal", [True, False])
def test_emulated_ranks_match_the_oracle(world_size, layout, schedule, causal):
    g = torch.Generator().manual_seed(world_size)
    n = 2 * world_size * 3
    q, dout = (torch.randn(2, n, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, n, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    with mls.trace() as t:
        got = emulate_dist_attn(q, k, v, dout, world_size=world_size, layout=layout, schedule=schedule, causal=causal)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, reference_with_grads(q, k, v, dout, causal=causal)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    plan = mls.build_plan(schedule, layout=layout, world_size=world_size, causal=causal)
    sizes = dict(batch=2, seqlen_local=n // world_size, nheads=6, nheads_kv=2, headdim=16, dtype=torch.float64)
    assert t.bytes_sent == sum(plan.bytes_sent(r, **sizes) for r in range(world_size))
    assert t.forward_calls == t.backward_calls == world_size
