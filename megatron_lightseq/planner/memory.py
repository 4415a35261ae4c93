"""Memory per GPU for training with full activation recompute (one layer per checkpoint), batch 1.

- Model states (Megatron's distributed optimizer): bf16 params 2 B and fp32 grads 4 B per
  parameter on each GPU of its TP shard; Adam's fp32 master, m and v (12 B) sharded over all
  GPUs of the job. With ``fsdp`` (Megatron-FSDP, ``--use-megatron-fsdp``) params and grads are
  sharded over the GPUs too, which is what lets sequence parallelism alone hold a 7B model.
- Activations: each layer keeps its input (the checkpoint); with remat also the attention's out
  and fp32 lse. One layer's full working set is live during its recompute+backward; the logits
  (bf16, plus fp32 for the loss) of the GPU's tokens over its vocabulary shard.
- dist_attn's own working memory during that layer's attention (``attention_bytes``, below): its
  fp32 accumulators, the chunks in flight, the kernels' buffers (K/V repeated for GQA by the
  vendor ops), for the plan of the chosen layout and schedule.
"""
from __future__ import annotations

import functools
import math

from ..distattn.plan import INPUT_KINDS, Payload, Plan, Shape, payload_bytes, payload_tensors
from ..kernels.base import accum_dtype
from ..distattn.schedules import build_plan
from .model import Machine, ModelSpec
from .timing import tp_degree
from .traffic import attention_shape


def _states(model: ModelSpec, tp: int, gpus: int, fsdp: bool = False) -> float:
    return (18 if fsdp else 6 * gpus / tp + 12) * model.params / gpus


def _working_set(model: ModelSpec, tokens: int, split: int, split_norms: bool) -> float:
    """Bytes per token of one layer's activations during its backward (bf16, lse fp32)."""
    h, kv = model.hidden, model.kv_heads * model.headdim
    split_part = 2 * (h + 2 * kv) + 2 * h + 4 * model.heads + 6 * model.ffn  # qkv, attn out, lse, fc1, act
    norm_part = 2 * h * 4  # layer input, ln1 out, residual, ln2 out
    return tokens * (split_part / split + norm_part / (split if split_norms else 1))


def lightseq_memory(model: ModelSpec, seq: int, gpus: int, *, remat: bool = True, fsdp: bool = False,
                    layout: str = "zigzag", schedule: str = "ring", kernel: str = "cudnn") -> float:
    """``kernel``: whose buffers to count (``KERNELS``); "cudnn", the one that repeats K/V for
    GQA, is what ``auto`` picks on Hopper for most blocks, and the larger of the two."""
    tokens = seq // gpus
    keep = 2 * model.hidden + (2 * model.hidden + 4 * model.heads if remat else 0)
    attention = tokens * _attention_bytes_per_token(model, gpus, layout, schedule, kernel)
    return (_states(model, 1, gpus, fsdp) + model.layers * tokens * keep + _working_set(model, tokens, 1, True)
            + attention + tokens * model.vocab * 6)


@functools.lru_cache(maxsize=256)
def _attention_bytes_per_token(model: ModelSpec, gpus: int, layout: str, schedule: str, kernel: str) -> float:
    """attention_bytes per local token (it grows linearly with the tokens), at 16K tokens a rank."""
    plan = build_plan(schedule, layout=layout, world_size=gpus, causal=True)
    shape = attention_shape(model, 2**14 * gpus, gpus)
    return attention_bytes(plan, shape, kernel=kernel) / shape.seqlen_local


def tp_memory(model: ModelSpec, seq: int, gpus: int, *, sequence_parallel: bool, fsdp: bool = False) -> float:
    tp = tp_degree(model, gpus)
    kept_tokens = seq // tp if sequence_parallel else seq
    return (_states(model, tp, gpus, fsdp) + model.layers * kept_tokens * 2 * model.hidden
            + _working_set(model, seq, tp, sequence_parallel) + seq * model.vocab / tp * 6)


def max_sequence(memory_of, m: Machine, granularity: int) -> int:
    """The longest multiple of ``granularity`` tokens whose memory fits (0 if none)."""
    lo, hi = 0, granularity
    while memory_of(hi) <= m.budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 2**26:
            return lo
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        lo, hi = (mid, hi) if memory_of(mid) <= m.budget_bytes else (lo, mid)
    return lo


# --- dist_attn's own working memory --------------------------------------------------------------
# What one dist_attn call allocates on a rank besides its inputs, step by step as the executor
# holds it (distattn/executor.py): the running results in the accumulation dtype (fp32 out and
# lse forward; fp32 dq, dk, dv backward) and their casts to the inputs' dtype at the end; every
# receive buffer from the step that posts it (while step t computes, step t+1's arrive) to the
# last step that reads it; the copies of inputs being sent (made dense for the transport: views of
# Megatron's [s, b, h, d] tensors at micro-batch > 1 are not) and results waiting to go, until
# their step's wait; and per block what the kernel makes (``block_bytes``). Checked against the
# tensors the executor and kernels create, counted on meta tensors (tests/test_memory_model.py).

# "cudnn" stands for the vendor ops' adapters that repeat K/V (cuDNN, torch's flash op on CUDA).
KERNELS = ("triton", "cudnn")


def block_bytes(kernel: str, call: str, sq: int, sk: int, shape: Shape, *, out_dense: bool = True,
                dout_dense: bool = True, lse_dense: bool = True) -> int:
    """Bytes a kernel allocates for one block of ``sq`` queries and ``sk`` keys, its results
    included (``call``: "forward_into", "forward", "backward"; the ``*_dense`` flags: whether the
    backward's out, d_out and lse come in dense, which a copy makes them where a kernel needs it).

    - triton: GQA natively (no K/V repeated; dK/dV summed over a K/V head's query heads inside
      the kernel); forward_into merges in place; backward: delta and a dense LSE;
    - cudnn: K/V repeated to H heads for GQA, and dK/dV made with H heads before their sum;
      backward: out, d_out and the LSE dense (the op's stride rules, kernels/cudnn.py).
    What an op allocates inside itself beyond its results (cuDNN's workspace) is not counted.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    b, h, g, d, e = shape.batch, shape.nheads, shape.nheads_kv, shape.headdim, shape.dtype.itemsize
    q_, kv_, lse_ = b * sq * h * d * e, b * sk * g * d * e, b * h * sq * 4
    repeated = b * sk * h * d * e if kernel == "cudnn" and g < h else 0  # one of K, V with H heads
    if call in ("forward", "forward_into"):
        made = 2 * repeated + (0 if kernel == "triton" else q_ + lse_ + 16)  # + the op's int64 seed, offset
        return made + (q_ + lse_ if call == "forward" and kernel == "triton" else 0)
    grads = q_ + 2 * kv_ + 2 * repeated
    copies = (0 if lse_dense else lse_) + (lse_ if kernel == "triton" else
                                          (0 if out_dense else q_) + (0 if dout_dense else q_))
    return 2 * repeated + copies + grads + (0 if kernel == "triton" else 8)  # the op's (cached) int64 zero seed


def attention_rank_bytes(plan: Plan, shape: Shape, rank: int, phase: str, kernel: str = "triton") -> int:
    """The most bytes dist_attn holds at once on ``rank`` in ``phase`` ("forward", "backward"), by
    the lifetimes above, for inputs in Megatron's layout (q, k, v, d_out views of [s, b, h, d]
    tensors: dense at micro-batch 1 only)."""
    steps = getattr(plan, phase)
    chunk = shape.seqlen_local // plan.layout.chunks_per_rank
    size = lambda p: payload_bytes(p.kind, chunk * len(p.chunks), shape)
    acc = accum_dtype(shape.dtype).itemsize
    b, s, h, g, d, e = shape.batch, shape.seqlen_local, shape.nheads, shape.nheads_kv, shape.headdim, shape.dtype.itemsize
    if phase == "forward":
        accumulators, casts = b * s * h * (d + 1) * acc, b * s * h * d * e
    else:
        accumulators, casts = b * s * (h + 2 * g) * d * acc, b * s * (h + 2 * g) * d * e
    if kernel == "triton":  # its tile tables, cached per block (kernels/tiles.py): int32 per token and granule
        spans = {(blk.q_chunks, blk.kv_chunks) for step in steps for blk in step[rank].blocks}
        sizes = [(len(qc) * chunk, len(kc) * chunk) for qc, kc in spans]
        accumulators += sum(4 * (2 * sq + sk + 4 * -(-sq // 16) + 4 * -(-sk // 16)) for sq, sk in sizes)
    q_kind = "q" if phase == "forward" else "qg"
    last: dict[tuple[str, int], int] = {}  # the executor's _last_uses
    for t, step in enumerate(steps):
        for blk in step[rank].blocks:
            last[q_kind, blk.q_owner] = last["kv", blk.kv_owner] = t
        for tr in step[rank].sends:
            if tr.payload.kind in INPUT_KINDS:
                key = (tr.payload.kind, tr.payload.owner)
                last[key] = max(last.get(key, 0), t - 1)
    owned = plan.owned(rank)
    held: dict[tuple[str, int], int] = {}
    held_chunks: dict[tuple[str, int], tuple[int, ...]] = {}
    results: dict = {}  # computed for other ranks, not yet posted

    def single_run(chunks: tuple[int, ...], within: tuple[int, ...]) -> bool:
        at = [within.index(c) for c in chunks]
        return at == list(range(at[0], at[0] + len(at)))

    def dense(name: str, local: bool, whole: bool) -> bool:
        """Whether the rows of tensor ``name`` a block or send takes are dense: Megatron's q, k, v,
        d_out at micro-batch 1 only; the executor's out and lse, and received payloads, when taken
        whole or (out) at micro-batch 1; an lse [B, H, S] slice of rows only if B * H is 1."""
        if local and name in ("q", "k", "v", "dout"):
            return b == 1
        return whole or (b * h == 1 if name == "lse" else b == 1)

    def send_bytes(p: Payload) -> int:
        """Bytes sending ``p`` allocates: results move, inputs are made dense for the transport."""
        if p.kind not in INPUT_KINDS:
            return size(p)
        local = p.owner == rank
        within = owned if local else held_chunks[p.kind, p.owner]
        if not single_run(p.chunks, within):
            return size(p)  # rows of several runs are concatenated
        whole = len(p.chunks) == len(within)
        names = {"kv": ("k", "v"), "q": ("q",), "qg": ("q", "out", "lse", "dout")}[p.kind]
        return sum(math.prod(shp) * dt.itemsize for name, (shp, dt, _) in
                   zip(names, payload_tensors(p.kind, chunk * len(p.chunks), shape)) if not dense(name, local, whole))

    def posted(t: int) -> tuple[int, int, list]:
        """(bytes of step t's sends (copies and results), of its receive buffers, the receives)."""
        if t >= len(steps):
            return 0, 0, []
        mine = steps[t][rank]
        return sum(send_bytes(tr.payload) for tr in mine.sends), sum(size(tr.payload) for tr in mine.recvs), mine.recvs

    sending, receiving, arriving = posted(0)
    peak = accumulators + sending + receiving
    for t, step in enumerate(steps):
        # wait: step t's sends are done; its inputs are held, its results merged (their buffers
        # alive until the next post replaces them)
        absorbed = 0
        for tr in arriving:
            if tr.payload.kind in INPUT_KINDS:
                held[tr.payload.kind, tr.payload.owner] = size(tr.payload)
                held_chunks[tr.payload.kind, tr.payload.owner] = tr.payload.chunks
            else:
                absorbed += size(tr.payload)
        for tr in steps[t + 1][rank].sends if t + 1 < len(steps) else ():
            results.pop(tr.payload, None)
        sending, receiving, arriving = posted(t + 1)
        base = accumulators + sum(held.values()) + sum(results.values()) + sending + receiving
        peak = max(peak, base + absorbed)
        for blk in step[rank].blocks:
            sq, sk = chunk * len(blk.q_chunks), chunk * len(blk.kv_chunks)
            local = blk.q_owner == rank
            if phase == "forward":
                call = "forward_into" if local and single_run(blk.q_chunks, owned) else "forward"  # as the executor
                made = block_bytes(kernel, call, sq, sk, shape)
            else:
                whole = len(blk.q_chunks) == len(owned if local else held_chunks["qg", blk.q_owner])
                made = block_bytes(kernel, "backward", sq, sk, shape, out_dense=dense("out", local, whole),
                                   dout_dense=dense("dout", local, whole), lse_dense=dense("lse", local, whole))
            peak = max(peak, base + made)
            if phase == "forward" and not local:
                results[Payload("o", blk.q_owner, blk.q_chunks)] = b * sq * h * (d * e + 4)
            if phase == "backward":
                if not local:
                    results[Payload("dq", blk.q_owner, blk.q_chunks)] = b * sq * h * d * e
                if blk.kv_owner != rank:
                    results[Payload("dkv", blk.kv_owner, blk.kv_chunks)] = 2 * b * sk * g * d * e
            base = accumulators + sum(held.values()) + sum(results.values()) + sending + receiving
        for key in [k for k in held if last.get(k, -1) <= t]:
            del held[key]
    return max(peak, accumulators + sending + receiving + casts)


def attention_bytes(plan: Plan, shape: Shape, *, kernel: str = "triton", backward: bool = True) -> int:
    """The most bytes one dist_attn call holds at once on any rank (forward, and backward when
    ``backward``), beyond its inputs."""
    phases = ("forward", "backward") if backward else ("forward",)
    return max(attention_rank_bytes(plan, shape, r, p, kernel) for r in range(plan.world_size) for p in phases)
