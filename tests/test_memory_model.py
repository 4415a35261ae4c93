"""The memory model of dist_attn (distattn/run/memory.py: attention_bytes) against the tensors the
executor and kernels create, counted as they are made and freed (allocations.py) while one rank
of a plan runs forward and backward on meta tensors (real sizes, nothing computed) with
Megatron's layout ([s, b, h, d] views) and a transport that delivers nothing but keeps what it
sends until the step's wait, as NCCL's does. Kernels: cuDNN's adapter through the op's meta
kernels; Triton's adapter with its launches left out (the kernels allocate nothing themselves)
and the one-pass merge it registers on CUDA."""
import pytest
import torch

from allocations import Allocations
from megatron_lightseq.distattn.plan.call import resolve_plan
from megatron_lightseq.distattn.transport.exchange import Exchange, Pending
from megatron_lightseq.distattn.run.executor import backward_steps, drive, forward_steps
from megatron_lightseq.distattn.plan.plan import Shape
from megatron_lightseq.kernels import merge
from megatron_lightseq.kernels.cudnn import CudnnKernel
from megatron_lightseq.distattn.plan.mask import Mask
from megatron_lightseq.distattn import attention_bytes, attention_rank_bytes
from megatron_lightseq.planner.memory import lightseq_memory
from megatron_lightseq.planner.model import MODELS

triton_kernels = pytest.importorskip("megatron_lightseq.kernels.triton_kernels")


class _Keeping(Exchange):
    """Delivers nothing (meta buffers hold no data); keeps the sends alive until the wait."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def _post(self, sends, recvs, where):
        return Pending([], keep=sends)

    def agree(self, values):
        return [list(values)] * self.world_size


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def meta_kernels(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(triton_kernels, "_delta", _NoLaunch())
    monkeypatch.setattr(triton_kernels, "_merge", _NoLaunch())
    monkeypatch.setattr(merge, "_ONE_PASS", [(lambda out: out.device.type == "meta", triton_kernels.merge_into)])
    return {"triton": triton_kernels.TritonKernel(), "cudnn": CudnnKernel()}


def _measured(kernel, plan, rank, batch, seqlen, heads, headdim=64, kv_wire=None):
    sbhd = lambda n: torch.empty(seqlen, batch, n, headdim, device="meta", dtype=torch.bfloat16).transpose(0, 1)
    q, k, v, dout = sbhd(heads[0]), sbhd(heads[1]), sbhd(heads[1]), sbhd(heads[0])
    view, scale = plan.view(rank), headdim ** -0.5
    with Allocations("meta") as fwd:
        out, lse = drive(forward_steps(view, kernel, scale, _Keeping(rank, plan.world_size), q, k, v, kv_wire=kv_wire))
    with Allocations("meta") as bwd:
        drive(backward_steps(view, kernel, scale, _Keeping(rank, plan.world_size), dout, q, k, v, out, lse,
                             kv_wire=kv_wire))
    return fwd.peak, bwd.peak


CASES = [  # (world size, layout, schedule, (H, G), micro-batch)
    (2, "zigzag", "ring", (8, 8), 2), (3, "zigzag", "lightseq", (8, 2), 1), (3, "contiguous", "ring", (8, 1), 2),
    (4, "contiguous", "lightseq", (8, 2), 2), (8, "zigzag", "ring", (8, 2), 1), (8, "contiguous", "lightseq", (8, 8), 2),
]


@pytest.mark.parametrize("kernel", ["triton", "cudnn"])
@pytest.mark.parametrize("world_size,layout,schedule,heads,batch", CASES, ids=[f"P{c[0]}-{c[1]}-{c[2]}-{c[3][0]}x{c[3][1]}-b{c[4]}"
                                                                            for c in CASES])
def test_memory_model_bounds_what_the_executor_and_kernels_allocate(meta_kernels, kernel, world_size, layout,
                                                                     schedule, heads, batch):
    """On every rank, forward and backward: the model is never below the peak of the bytes made,
    and at most 4% above it (it counts the Triton tile tables of every block as alive at once)."""
    seqlen = 1024
    shape = Shape(batch, seqlen, *heads, 64, torch.bfloat16)
    plan = resolve_plan(shape, world_size=world_size, layout=layout, schedule=schedule, mask=Mask(causal=True))
    for rank in range(world_size):
        got = _measured(meta_kernels[kernel], plan, rank, batch, seqlen, heads)
        for phase, peak in zip(("forward", "backward"), got):
            model = attention_rank_bytes(plan.view(rank), shape, phase, kernel)
            assert peak <= model <= 1.04 * peak, (rank, phase, peak, model)
    assert attention_bytes(plan, shape, kernel=kernel) == max(
        attention_rank_bytes(plan.view(r), shape, p, kernel) for r in range(world_size) for p in ("forward", "backward"))


WIRE_CASES = [(2, "zigzag", "ring", (8, 2), 2), (4, "contiguous", "lightseq", (8, 2), 1),
              (5, "zigzag", "ring", (8, 8), 1), (4, "contiguous", "lightseq", (4, 4), 2)]


@pytest.mark.parametrize("world_size,layout,schedule,heads,batch", WIRE_CASES,
                         ids=[f"P{c[0]}-{c[1]}-{c[2]}-{c[3][0]}x{c[3][1]}-b{c[4]}" for c in WIRE_CASES])
def test_memory_model_bounds_the_int8_wire(meta_kernels, monkeypatch, world_size, layout, schedule, heads, batch):
    """kv_wire="int8" through the fused quantize/dequantize (their launches left out): the model
    holds what the executor holds, on every rank, within the same 4%."""
    from megatron_lightseq.kernels import kv_wire, triton_wire

    monkeypatch.setattr(kv_wire, "_fused", lambda x: True)
    monkeypatch.setattr(triton_wire, "_launch", lambda *args, **kwargs: None)
    seqlen = 1024
    shape = Shape(batch, seqlen, *heads, 64, torch.bfloat16, "int8")
    plan = resolve_plan(shape, world_size=world_size, layout=layout, schedule=schedule, mask=Mask(causal=True))
    for rank in range(world_size):
        got = _measured(meta_kernels["triton"], plan, rank, batch, seqlen, heads, kv_wire="int8")
        for phase, peak in zip(("forward", "backward"), got):
            model = attention_rank_bytes(plan.view(rank), shape, phase, "triton")
            assert peak <= model <= 1.04 * peak, (rank, phase, peak, model)


def test_memory_model_counts_what_the_old_estimate_left_out():
    """The per-GPU estimate now holds dist_attn's fp32 accumulators and chunks in flight, and a
    vendor op's repeated K/V where GQA makes it repeat: more than the activations alone."""
    llama = MODELS["llama-7b"]
    gqa = MODELS["llama-7b"].__class__("gqa", kv_heads=8)
    for model in (llama, gqa):
        # at least the backward's fp32 dq, dk, dv per token
        floor = 4 * (model.hidden + 2 * model.kv_heads * model.headdim) * 2**17 // 8
        base = lightseq_memory(model, 2**17, 8, kernel="triton")
        assert base - _without_attention(model, 2**17, 8) >= floor
    assert lightseq_memory(gqa, 2**17, 8, kernel="cudnn") > lightseq_memory(gqa, 2**17, 8, kernel="triton")


def _without_attention(model, seq, gpus):
    from megatron_lightseq.planner import memory

    tokens = seq // gpus
    return lightseq_memory(model, seq, gpus, kernel="triton") - tokens * memory._attention_bytes_per_token(
        model, gpus, "zigzag", "ring", "triton")
