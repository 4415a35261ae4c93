"""Single-process API: layouts, input checks, trace scoping."""
import numpy as np
import pytest
import torch

import megatron_lightseq as mls
from megatron_lightseq.kernels import kernel_names
from oracle import reference_attention


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_unshard_roundtrip(layout, world_size):
    full = torch.arange(2 * 2 * world_size * 3).view(2, -1)
    parts = [mls.shard(full, layout=layout, rank=r, world_size=world_size) for r in range(world_size)]
    assert torch.equal(mls.unshard(parts, layout=layout), full)


def test_zigzag_matches_megatron_cp_split():
    # Megatron-Core: 2P chunks, rank r keeps chunks r and 2P-1-r.
    full = torch.arange(16)[None]
    assert mls.shard(full, layout="zigzag", rank=1, world_size=4).tolist() == [[2, 3, 12, 13]]


def test_shard_errors():
    with pytest.raises(ValueError, match="must be a multiple of 6; got 8"):
        mls.shard(torch.zeros(1, 8), layout="zigzag", rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        mls.shard(torch.zeros(1, 8), layout="contiguous", rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        mls.shard(torch.zeros(1, 8), layout="contiguous", rank=0, world_size=0)
    with pytest.raises(ValueError, match="dim must index the tensor's 2 dims, got 5"):
        mls.shard(torch.zeros(1, 8), layout="contiguous", rank=0, world_size=2, dim=5)
    with pytest.raises(ValueError, match=r"tokens \(the sequence's length, >= 1\) or cu_seqlens, got -4"):
        mls.positions(layout="zigzag", rank=0, world_size=2, tokens=-4)


def test_integers_of_any_kind_are_accepted():
    """numpy and 0-d tensor integers, as sizes computed with them arrive; bools are not ranks."""
    full = torch.arange(8)[None]
    assert mls.shard(full, layout="zigzag", rank=np.int64(1), world_size=np.int32(2)).tolist() == [[2, 3, 4, 5]]
    assert mls.positions(layout="zigzag", rank=1, world_size=2, tokens=torch.tensor(8)).tolist() == [2, 3, 4, 5]
    plan = mls.build_plan("ring", layout="zigzag", world_size=2)
    sizes = dict(batch=1, seqlen_local=8, nheads=4, nheads_kv=2, headdim=8, dtype=torch.float32)
    assert plan.bytes_sent(np.int64(1), **dict(sizes, seqlen_local=np.int64(8))) == plan.bytes_sent(1, **sizes) > 0
    q = torch.randn(1, 8, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(mls.dist_attn(q, q, q, cu_seqlens=[0, np.int64(3), torch.tensor(8)]),
                               mls.dist_attn(q, q, q, cu_seqlens=[0, 3, 8]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank must be an int in"):
        mls.shard(full, layout="zigzag", rank=True, world_size=2)


@pytest.mark.parametrize("rank,sizes,message", [
    (9, {}, r"rank must be an int in \[0, 8\), got 9"),
    (1, dict(dtype="bf16"), "dtype must be a torch.dtype, got 'bf16'"),
    (1, dict(seqlen_local=-1024), r"must be positive ints, got \(1, -1024, 4, 2, 8\)"),
    (1, dict(seqlen_local=7), "seqlen_local must be a multiple of the 2 chunks a rank holds, got 7"),
    (1, dict(nheads=30, nheads_kv=8), r"nheads \(30\) must be a multiple of nheads_kv \(8\)"),
])
def test_plan_bytes_check_their_arguments(rank, sizes, message):
    plan = mls.build_plan("ring", layout="zigzag", world_size=8)
    with pytest.raises(ValueError, match=message):
        plan.bytes_sent(rank, **dict(dict(batch=1, seqlen_local=8, nheads=4, nheads_kv=2, headdim=8,
                                          dtype=torch.float32), **sizes))
    with pytest.raises(ValueError, match="shape must be a Shape"):
        mls.choose_schedule("zigzag", 8, True, (1, 8, 4, 2, 8))


def _qkv(**over):
    t = dict(q=torch.randn(1, 4, 4, 8), k=torch.randn(1, 4, 2, 8), v=torch.randn(1, 4, 2, 8))
    t.update(over)
    return t["q"], t["k"], t["v"]


@pytest.mark.parametrize("inputs,options,message", [
    (dict(q=torch.randn(4, 4, 8)), {}, r"q must be 4-D .* got shape \(4, 4, 8\)"),
    (dict(k=torch.randn(1, 4, 2, 8).double()), {}, "share one dtype"),
    (dict(q=torch.randn(1, 4, 4, 8).int()), {}, "share one dtype"),
    (dict(v=torch.randn(1, 4, 1, 8)), {}, r"k and v must have the same shape, got \(1, 4, 2, 8\) and \(1, 4, 1, 8\)"),
    (dict(k=torch.randn(1, 2, 2, 8), v=torch.randn(1, 2, 2, 8)), {}, r"expected \(1, 4, \*, 8\), got \(1, 2, 2, 8\)"),
    (dict(k=torch.randn(1, 4, 3, 8), v=torch.randn(1, 4, 3, 8)), {}, r"nheads \(4\) must be a multiple of nheads_kv \(3\)"),
    ({}, dict(layout="striped"), "layout must be one of"),
    ({}, dict(schedule="ulysses"), "schedule must be one of"),
    ({}, dict(kernel="flash3"), "kernel must be one of"),
    ({}, dict(softmax_scale=-1.0), "softmax_scale must be None or a positive"),
    ({}, dict(causal="yes"), "causal must be a bool"),
    (dict(q=torch.randn(1, 4, 4, 0), k=torch.randn(1, 4, 2, 0), v=torch.randn(1, 4, 2, 0)), {},
     "batch, nheads and headdim must be positive, got 1, 4 and 0"),
    (dict(q=torch.randn(1, 4, 0, 8)), {}, "batch, nheads and headdim must be positive, got 1, 0 and 8"),
    ({}, dict(timeout=0), "timeout must be a positive number of seconds, got 0"),
    (dict(q=torch.randn(1, 3, 4, 8), k=torch.randn(1, 3, 2, 8), v=torch.randn(1, 3, 2, 8)), dict(layout="zigzag"),
     "positive multiple of 2, got 3"),
    ({}, dict(cu_seqlens=[0, 1.5, 4]), r"cu_seqlens must be a sequence of at least two ints, got \(0, 1.5, 4\)"),
    ({}, dict(cu_seqlens=torch.tensor([0.0, 2.0, 4.0])), "cu_seqlens must be a sequence of at least two ints"),
    ({}, dict(cu_seqlens=[0, 1, 3]), r"cu_seqlens must cover the whole sequence: it ends at 3, .* got 4"),
    ({}, dict(group="cp"), "group must be a torch.distributed ProcessGroup or None, got 'cp'"),
])
def test_bad_input_raises_value_error(inputs, options, message):
    with pytest.raises(ValueError, match=message):
        mls.dist_attn(*_qkv(**inputs), **options)


def test_messages_say_what_to_do_instead():
    with pytest.raises(ValueError, match="for 'auto', build the one choose_schedule"):
        mls.build_plan("auto", layout="contiguous", world_size=8)
    if "flash-attn" not in kernel_names():  # flash_attn does not import here
        with pytest.raises(ValueError, match="'flash-attn' needs the flash_attn package"):
            mls.dist_attn(*_qkv(), kernel="flash-attn")


def test_single_process_call_and_trace_scope():
    q, k, v = (x.double().requires_grad_() for x in _qkv())
    out = mls.dist_attn(q, k, v)  # outside any trace: nothing is recorded anywhere
    with mls.trace() as outer:
        with mls.trace() as inner:
            out, lse = mls.dist_attn(q, k, v, return_lse=True, softmax_scale=0.5)
        out.sum().backward()
    assert inner.as_dict() == dict(bytes_sent=0, bytes_received=0, forward_calls=1, backward_calls=0, blocks=1,
                                   collectives=0, host_reads=0, a2a_bytes_sent=0, a2a_bytes_received=0)
    assert outer.as_dict() == dict(bytes_sent=0, bytes_received=0, forward_calls=1, backward_calls=1, blocks=2,
                                   collectives=0, host_reads=0, a2a_bytes_sent=0, a2a_bytes_received=0)
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, scale=0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert lse.dtype == torch.float64 and not lse.requires_grad
    mls.dist_attn(q, k, v).sum().backward()
    assert inner.blocks == 1 and outer.blocks == 2  # closed traces stay as they were


def test_cuda_graph_capture_is_refused_by_name(monkeypatch):
    """Inside a CUDA graph capture dist_attn says it cannot be captured, before anything that would
    break the capture (host reads, timing, allocations); elsewhere nothing changes."""
    from megatron_lightseq.distattn.transport.agreement import refuse_capture

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        refuse_capture(torch.device("cuda", 0))
    refuse_capture(torch.device("cpu"))  # CPU tensors are never captured
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(mls.dist_attn(q, q, q, kernel="math"), reference_attention(q, q, q, causal=True)[0])
