"""The model and the machine the planner works from: every constant, and where it comes from.

Everything the planner prints is a prediction from these numbers, not a measurement of a run.

Sources (the facts, copied here so that the project carries them; docs/planner.md has the tables):
- Attention rates: torch 2.11's FLASH (FA2) SDPA backend on one NVIDIA H200, bf16, 32 heads x 128,
  batch 1, forward + backward of one S/P x S/P block cut from a 32K sequence, measured 2026-11-28
  (FLOPs counted as 4 S^2 D H, halved for a causal block; forward + backward = 3.5 x forward):
  block 1K/2K/4K/8K/32K tokens: off-diagonal 120/234/290/309/323 TFLOP/s, causal diagonal
  64/150/230/285/325 TFLOP/s. The planner reads a block's rate by its query length, whatever its
  head count (a rank of a head split runs fewer heads per call, which an H200 fills less well).
- GEMMs: bf16 8192^3 matmul measured at 739 TFLOP/s on the same H200; layer-sized GEMMs taken at
  0.75 of that, 550 TFLOP/s (an estimate).
- Peak for MFU: 989 TFLOP/s, the dense bf16 datasheet figure of an H100/H200 SXM.
- Links (datasheets): NVLink 4 (H100/H200) 900 GB/s per GPU, 450 each way; InfiniBand NDR
  400 Gb/s = 50 GB/s per GPU and direction across nodes (one NIC per GPU). A group of k GPUs
  per node reduces across nodes at k x 50 GB/s (NCCL runs one ring per NIC).
- Memory: 80 GiB per GPU (H100), of which 90% is planned for (allocator slack, CUDA context,
  NCCL buffers: an estimate).
- Latency: 10 us per transfer or collective step (an estimate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    vocab: int = 32000
    swiglu: bool = True  # gated MLP: three h x ffn matrices and a 2 x ffn activation; else GeLU, two
    dropout: bool = False  # hidden dropout: Megatron keeps a 1-byte mask per dropped activation
    dtype_bytes: int = 2  # bf16 activations and weights

    @property
    def headdim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_gemm_params(self) -> int:
        """The weights one layer's GEMMs multiply by (2 FLOPs per weight per token and pass)."""
        kv = self.kv_heads * self.headdim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + (3 if self.swiglu else 2) * self.hidden * self.ffn

    @property
    def layer_params(self) -> int:
        return self.layer_gemm_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def params(self) -> int:
        """Untied input embedding and output layer, as Llama and configs/llama7b.sh have them."""
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden


MODELS = {
    "llama-7b": ModelSpec("llama-7b"),
    "llama-13b": ModelSpec("llama-13b", layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824),
    "llama3-8b": ModelSpec("llama3-8b", kv_heads=8, ffn=14336, vocab=128256),
    "llama-70b": ModelSpec("llama-70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672),
}


@dataclass(frozen=True)
class Machine:
    """An H100/H200-class cluster (module docstring: the sources)."""

    gpu_memory_gib: float = 80.0
    usable_fraction: float = 0.9
    nvlink_gbs: float = 450.0  # per GPU and direction
    ib_gbs: float = 50.0  # per GPU and direction
    latency_us: float = 10.0
    gemm_tflops: float = 550.0
    peak_tflops: float = 989.0  # for MFU only
    # (block tokens, fwd+bwd TFLOP/s): off-diagonal (full) blocks and causal diagonal blocks
    attn_full: tuple = ((1024, 120.0), (2048, 234.0), (4096, 290.0), (8192, 309.0), (32768, 323.0))
    attn_diag: tuple = ((1024, 64.0), (2048, 150.0), (4096, 230.0), (8192, 285.0), (32768, 325.0))

    @property
    def budget_bytes(self) -> float:
        """What a GPU may hold for the model and its activations."""
        return self.gpu_memory_gib * 2**30 * self.usable_fraction

    def attn_rates(self, tokens, diagonal: bool) -> np.ndarray:
        """FLOP/s of blocks of ``tokens`` queries (an array): interpolated in log2 of the block size
        from the measured table, flat past its end; below its first row the rate falls in
        proportion (small blocks are launch-bound)."""
        table = np.array(self.attn_diag if diagonal else self.attn_full, dtype=float)
        tokens = np.maximum(np.asarray(tokens, dtype=float), 1.0)
        inside = np.interp(np.log2(tokens), np.log2(table[:, 0]), table[:, 1])
        below = table[0, 1] * tokens / table[0, 0]
        return np.where(tokens <= table[0, 0], below, inside) * 1e12

    def attn_tflops(self, tokens: int, diagonal: bool) -> float:
        return float(self.attn_rates(tokens, diagonal)) / 1e12


def sources(m: Machine) -> list[str]:
    """The header lines that say which constants the predictions use and where they come from."""
    full = "/".join(f"{r:g}" for _, r in m.attn_full)
    diag = "/".join(f"{r:g}" for _, r in m.attn_diag)
    sizes = "/".join(f"{t // 1024}K" for t, _ in m.attn_full)
    return [
        f"constants (planner/model.py, docs/planner.md): attention fwd+bwd TFLOP/s by block of {sizes} tokens, "
        f"full {full}, causal diagonal {diag} (FA2 in torch 2.11 on one H200, measured); GEMMs "
        f"{m.gemm_tflops:g} TFLOP/s (0.75 x a measured 739); MFU against {m.peak_tflops:g} TFLOP/s (H100/H200 "
        f"bf16 datasheet); NVLink {m.nvlink_gbs:g} GB/s, network {m.ib_gbs:g} GB/s per GPU and direction "
        f"(NVLink 4, InfiniBand NDR datasheets); {m.latency_us:g} us per transfer (estimate)",
    ]


def model_text(model: ModelSpec) -> str:
    """'llama-7b: 32 layers, hidden 4096, ...': the sizes every header starts with."""
    dtype = {2: "bf16", 4: "fp32"}.get(model.dtype_bytes, f"{model.dtype_bytes}-byte values")
    return (f"{model.name}: {model.layers} layers, hidden {model.hidden}, {model.heads} heads, {model.kv_heads} KV "
            f"heads, {dtype}, FFN {model.ffn} ({'SwiGLU' if model.swiglu else 'GeLU'}), vocab {model.vocab}")


def machine_lines(m: Machine, gpus: int, gpus_per_node: int) -> list[str]:
    """The header lines on the machine: GPUs, memory, links, rates and where each constant comes from."""
    rates = sorted(rate for _, rate in m.attn_full + m.attn_diag)
    return [f"machine: {gpus} GPUs, {gpus_per_node} per node; {m.gpu_memory_gib:g} GiB per GPU, "
            f"{m.usable_fraction:.0%} usable ({m.budget_bytes / 2**30:.1f} GiB); per GPU and direction NVLink "
            f"{m.nvlink_gbs:g} GB/s within a node, network {m.ib_gbs:g} GB/s between nodes (GB/s: 10^9 bytes/s), "
            f"{m.latency_us:g} us per transfer",
            f"compute: GEMMs {m.gemm_tflops:g} TFLOP/s; attention {rates[0]:g}..{rates[-1]:g} TFLOP/s by block size",
            *sources(m)]


def token_label(tokens: int) -> str:
    """1536 -> '1.5K', 131072 -> '128K', 1048576 -> '1M', 640 -> '640': exact to a tenth of a K or M."""
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if tokens >= size:
            value = tokens / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{math.floor(value * 10) / 10:g}{unit}"
    return str(tokens)
