"""dist_attn's own working memory on one rank, step by step as the executor holds it (executor.py).

What one call allocates besides its inputs: the running results in the accumulation dtype (fp32
out and lse forward; fp32 dq, dk, dv backward) and their casts to the inputs' dtype at the end;
every receive buffer from the step that posts it (while step t computes, step t+1's arrive) to
the last step that reads it (the executor's own :func:`executor.drop_after`); the copies of
inputs being sent (made dense for the transport: views of Megatron's [s, b, h, d] tensors at
micro-batch > 1 are not) and results waiting to go, until their step's wait; and per block what
the kernel makes (``block_bytes``). Checked against the tensors the executor and kernels create,
counted on meta tensors (tests/test_memory_model.py). The planner reads it (planner/memory.py).
With int8 K/V on the wire (``shape.kv_wire``, run/wire.py): receive buffers in wire form, a
received payload held dequantized (plus its wire form where the rank passes it on), an owner's
quantized payload from its first send to its last; the fused kernels make nothing else.
"""
from __future__ import annotations

import dataclasses
import math

from ...kernels.base import accum_dtype
from ..plan.plan import INPUT_KINDS, Payload, Plan, RankPlan, Shape, payload_bytes, payload_tensors
from ..plan.runs import one_run
from .executor import drop_after, forward_call
from .wire import own_sends, passed_on

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


def attention_rank_bytes(view: RankPlan, shape: Shape, phase: str, kernel: str = "triton") -> int:
    """The most bytes dist_attn holds at once on the view's rank in ``phase`` ("forward",
    "backward"), by the lifetimes above, for inputs in Megatron's layout (q, k, v, d_out views of
    [s, b, h, d] tensors: dense at micro-batch 1 only)."""
    return _RankMemory(view, shape, phase, kernel).peak()


class _RankMemory:
    """One rank's walk through one phase's steps, counting what the executor holds."""

    def __init__(self, view: RankPlan, shape: Shape, phase: str, kernel: str) -> None:
        self.view, self.shape, self.phase, self.kernel = view, shape, phase, kernel
        self.steps, self.rank, self.owned = view.steps(phase), view.rank, view.owned
        self.chunk = shape.seqlen_local // len(self.owned)
        b, s, h, g, d, e = shape.batch, shape.seqlen_local, shape.nheads, shape.nheads_kv, shape.headdim, shape.dtype.itemsize
        acc = accum_dtype(shape.dtype).itemsize
        if phase == "forward":
            self.accumulators, self.casts = b * s * h * (d + 1) * acc, b * s * h * d * e
        else:
            self.accumulators, self.casts = b * s * (h + 2 * g) * d * acc, b * s * (h + 2 * g) * d * e
        if kernel == "triton":  # its tile tables, cached per block (kernels/tiles.py): int32 per token and granule
            spans = {(blk.q_chunks, blk.kv_chunks) for step in self.steps for blk in step.blocks}
            sizes = [(len(qc) * self.chunk, len(kc) * self.chunk) for qc, kc in spans]
            self.accumulators += sum(4 * (2 * sq + sk + 4 * -(-sq // 16) + 4 * -(-sk // 16)) for sq, sk in sizes)
        self.wire = _WireBytes(view, phase, shape, self.size)
        self.held: dict[tuple[str, int], int] = {}
        self.held_chunks: dict[tuple[str, int], tuple[int, ...]] = {}
        self.results: dict = {}  # computed for other ranks, not yet posted

    def size(self, p: Payload) -> int:
        return payload_bytes(p.kind, self.chunk * len(p.chunks), self.shape)

    def dense(self, name: str, local: bool, whole: bool) -> bool:
        """Whether the rows of tensor ``name`` a block or send takes are dense: Megatron's q, k, v,
        d_out at micro-batch 1 only; the executor's out and lse, and received payloads, when taken
        whole or (out) at micro-batch 1; an lse [B, H, S] slice of rows only if B * H is 1."""
        b = self.shape.batch
        if local and name in ("q", "k", "v", "dout"):
            return b == 1
        return whole or (b * self.shape.nheads == 1 if name == "lse" else b == 1)

    def send_bytes(self, p: Payload) -> int:
        """Bytes sending ``p`` allocates: results move, inputs are made dense for the transport."""
        if p.kind not in INPUT_KINDS:
            return self.size(p)
        if self.wire.on and p.kind == "kv":
            return self.wire.send(p)
        local = p.owner == self.rank
        within = self.owned if local else self.held_chunks[p.kind, p.owner]
        if not one_run(p.chunks, within):
            return self.size(p)  # rows of several runs are concatenated
        whole = len(p.chunks) == len(within)
        names = {"kv": ("k", "v"), "q": ("q",), "qg": ("q", "out", "lse", "dout")}[p.kind]
        return sum(math.prod(shp) * dt.itemsize for name, (shp, dt, _) in
                   zip(names, payload_tensors(p.kind, self.chunk * len(p.chunks), self.shape))
                   if not self.dense(name, local, whole))

    def posted(self, t: int) -> tuple[int, int, list]:
        """(bytes of step t's sends (copies and results), of its receive buffers, the receives)."""
        if t >= len(self.steps):
            return 0, 0, []
        mine = self.steps[t]
        return (sum(self.send_bytes(tr.payload) for tr in mine.sends), sum(self.size(tr.payload) for tr in mine.recvs),
                mine.recvs)

    def arrive(self, arriving) -> int:
        """Step t's wait: its inputs are held, its results merged; the merged results' bytes (their
        buffers alive until the next post replaces them)."""
        absorbed = 0
        for tr in arriving:
            key = tr.payload.kind, tr.payload.owner
            if self.wire.on and tr.payload.kind == "kv":
                self.held[key], freed = self.wire.arrived(tr.payload)
                absorbed += freed
                self.held_chunks[key] = tr.payload.chunks
            elif tr.payload.kind in INPUT_KINDS:
                self.held[key], self.held_chunks[key] = self.size(tr.payload), tr.payload.chunks
            else:
                absorbed += self.size(tr.payload)
        return absorbed

    def block(self, blk) -> int:
        """Bytes the kernel makes for ``blk``; its results for other ranks are held from then on."""
        b, h, g, d, e = self.shape.batch, self.shape.nheads, self.shape.nheads_kv, self.shape.headdim, self.shape.dtype.itemsize
        sq, sk = self.chunk * len(blk.q_chunks), self.chunk * len(blk.kv_chunks)
        local = blk.q_owner == self.rank
        if self.phase == "forward":
            made = block_bytes(self.kernel, forward_call(self.view, blk), sq, sk, self.shape)
            if not local:
                self.results[Payload("o", blk.q_owner, blk.q_chunks)] = b * sq * h * (d * e + 4)
            return made
        whole = len(blk.q_chunks) == len(self.owned if local else self.held_chunks["qg", blk.q_owner])
        made = block_bytes(self.kernel, "backward", sq, sk, self.shape, out_dense=self.dense("out", local, whole),
                           dout_dense=self.dense("dout", local, whole), lse_dense=self.dense("lse", local, whole))
        if not local:
            self.results[Payload("dq", blk.q_owner, blk.q_chunks)] = b * sq * h * d * e
        if blk.kv_owner != self.rank:
            self.results[Payload("dkv", blk.kv_owner, blk.kv_chunks)] = 2 * b * sk * g * d * e
        return made

    def peak(self) -> int:
        steps, drops = self.steps, drop_after(self.view, self.phase)
        sending, receiving, arriving = self.posted(0)
        peak = self.accumulators + sending + receiving
        for t, step in enumerate(steps):
            absorbed = self.arrive(arriving)
            for tr in steps[t + 1].sends if t + 1 < len(steps) else ():
                self.results.pop(tr.payload, None)
            sending, receiving, arriving = self.posted(t + 1)
            live = self.accumulators + sending + receiving
            base = live + sum(self.held.values()) + sum(self.results.values()) + self.wire.kept()
            peak = max(peak, base + absorbed)
            for blk in step.blocks:
                made = self.block(blk)
                peak = max(peak, base + made)
                base = live + sum(self.held.values()) + sum(self.results.values()) + self.wire.kept()
            for key in drops[t]:
                self.held.pop(key, None)
        return max(peak, self.accumulators + sending + receiving + self.casts)


class _WireBytes:
    """What run/wire.py holds of the int8 wire form, step by step (nothing unless ``kv_wire``)."""

    def __init__(self, view: RankPlan, phase: str, shape: Shape, size) -> None:
        self.on, self.size = shape.kv_wire == "int8", size
        self.plain = dataclasses.replace(shape, kv_wire=None)
        self.chunk = shape.seqlen_local // len(view.owned)
        self.uses = own_sends(view, phase) if self.on else {}
        self.passed_on = passed_on(view, phase) if self.on else frozenset()
        self.packed: dict[Payload, int] = {}  # own payloads quantized, kept for a later send

    def send(self, p: Payload) -> int:
        """Bytes a kv send allocates: an owner's quantized copy at its last send (kept until then);
        a payload passed on is sent as held."""
        if p not in self.uses:  # not its own
            return 0
        self.uses[p] -= 1
        if self.uses[p]:
            self.packed[p] = self.size(p)
            return 0
        self.packed.pop(p, None)
        return self.size(p)

    def arrived(self, p: Payload) -> tuple[int, int]:
        """(bytes held for a kv payload that arrived, bytes of its receive buffer freed after)."""
        dequantized = payload_bytes("kv", self.chunk * len(p.chunks), self.plain)
        kept = p.owner in self.passed_on
        return dequantized + (self.size(p) if kept else 0), 0 if kept else self.size(p)

    def kept(self) -> int:
        return sum(self.packed.values())


def attention_bytes(plan: Plan | list[RankPlan], shape: Shape, *, kernel: str = "triton",
                    backward: bool = True) -> int:
    """The most bytes one dist_attn call holds at once on any rank of ``plan`` (a whole plan, or
    the views to look at), forward and, when ``backward``, backward, beyond its inputs."""
    views = [plan.view(r) for r in range(plan.world_size)] if isinstance(plan, Plan) else plan
    phases = ("forward", "backward") if backward else ("forward",)
    return max(attention_rank_bytes(v, shape, p, kernel) for v in views for p in phases)
