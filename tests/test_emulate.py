"""Virtual ranks in one process: the executor in lockstep against the float64 oracle."""
SEED = 2  # a deal of documents in which a rank's own queries sit in several runs (checked)
import pytest
import torch

import megatron_lightseq as mls
from megatron_lightseq.distattn.run.emulate import emulate_dist_attn
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



def test_kernel_calls_name_the_calls_the_executor_makes():
    """What kernel="auto" settles before the first transfer (executor.kernel_calls) is what the
    executor then calls, on every rank: with the balanced layout a rank's own queries may sit in
    several runs of rows, which the forward runs as "forward" and merges after, not "forward_into"."""
    from megatron_lightseq.distattn.plan.call import resolve_plan
    from megatron_lightseq.distattn.run.executor import forward_call, kernel_calls
    from megatron_lightseq.kernels import get_kernel, register_kernel
    from megatron_lightseq.kernels.auto import AutoKernel
    from megatron_lightseq.kernels.base import BlockKernel
    from megatron_lightseq.distattn.plan.mask import mask_of
    from mask_cases import documents

    made, math = [], get_kernel("math")

    class Recording(BlockKernel):
        name = "recording"
        supports = math.supports

        def _record(self, call, q, k, block):
            made.append(AutoKernel.kind(call, q.shape, k.shape, q.dtype, q.device, block))

        def forward_into(self, q, k, v, out_acc, lse_acc, **block):
            self._record("forward_into", q, k, block)
            return math.forward_into(q, k, v, out_acc, lse_acc, **block)

        def forward(self, q, k, v, **block):
            self._record("forward", q, k, block)
            return math.forward(q, k, v, **block)

        def backward(self, dout, q, k, v, out, lse, **block):
            self._record("backward", q, k, block)
            return math.backward(dout, q, k, v, out, lse, **block)

    register_kernel("recording", Recording)
    p, tokens = 4, 4 * 64
    mask = dict(causal=True, cu_seqlens=documents("short", tokens, seed=SEED))
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, tokens, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, tokens, 1, 8, generator=g, dtype=torch.float64) for _ in range(2))
    emulate_dist_attn(q, k, v, dout, world_size=p, layout="balanced", schedule="ring", kernel="recording", **mask)
    q0, k0 = (mls.shard(x, layout="balanced", rank=0, world_size=p, **mask) for x in (q, k))
    shape = mls.Shape.of(q0, k0)
    views = [resolve_plan(shape, world_size=p, layout="balanced", schedule="ring", mask=mask_of(**mask), rank=r)
             for r in range(p)]
    own_split = [b for view in views for rs in view.forward for b in rs.blocks
                 if b.q_owner == view.rank and forward_call(view, b) == "forward"]
    assert own_split, "the case must have a rank's own queries in several runs"
    settled = [AutoKernel.kind(*c) for view in views for c in kernel_calls(view, shape, q.device, 8 ** -0.5, True)]
    assert sorted(settled) == sorted(made)


def test_bf16_balanced_documents_within_twice_plain_bf16():
    """bf16 inputs on the balanced layout, whose chunks sit in several runs of a rank's rows:
    partial dq/dK/dV arrive in bf16 and are added into float32 accumulators across those runs.
    flash-attn's rule against the float64 oracle, for outputs and gradients."""
    from megatron_lightseq.distattn.plan.runs import one_run
    from mask_cases import dense_allowed, documents, masked_reference
    from oracle import assert_within_twice_plain

    p, tokens = 4, 4 * 64
    mask = dict(causal=True, cu_seqlens=documents("short", tokens, seed=SEED))
    g = torch.Generator().manual_seed(1)
    full64 = [torch.randn(1, tokens, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]  # q, k, v, dout
    full16 = [x.to(torch.bfloat16) for x in full64]
    allowed = dense_allowed(tokens, **mask)
    ref, plain = (masked_reference(*xs, allowed) for xs in (full64, full16))
    got = emulate_dist_attn(*full16, world_size=p, layout="balanced", schedule="lightseq", kernel="math", **mask)
    assert_within_twice_plain(got, plain, ref, label="bf16")
    views = [mls.build_plan("lightseq", layout="balanced", world_size=p, rank=r, **mask) for r in range(p)]
    arriving = [(v, tr.payload.chunks) for v in views for rs in v.backward for tr in rs.recvs
                if tr.payload.kind in ("dq", "dkv")]
    assert any(not one_run(chunks, v.owned) for v, chunks in arriving), \
        "the case must add partial gradients into several runs of a rank's rows"
