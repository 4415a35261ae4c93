"""Model and machine descriptions the planner works from, with every default stated."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008  # SwiGLU: three h x ffn matrices
    vocab: int = 32000
    dtype_bytes: int = 2  # bf16 activations and weights

    @property
    def headdim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.headdim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden


MODELS = {
    "llama-7b": ModelSpec("llama-7b"),
    "llama-13b": ModelSpec("llama-13b", layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824),
}


@dataclass(frozen=True)
class Machine:
    """Defaults: H100/H200-class nodes. Link figures are datasheet numbers (ANCHORS.md); the
    attention rates are torch's FA2 fwd+bwd on one H200 (ANCHORS.md), by block size."""

    gpu_memory_gib: float = 80.0
    usable_fraction: float = 0.9  # allocator slack, CUDA context, NCCL buffers
    nvlink_gbs: float = 450.0  # per direction per GPU
    ib_gbs: float = 50.0  # InfiniBand NDR 400 Gb/s per GPU
    latency_us: float = 10.0  # per transfer or collective step
    gemm_tflops: float = 550.0  # 739 measured for bf16 8192^3, times 0.75 for layer-sized GEMMs
    # (block tokens, fwd+bwd TFLOP/s): off-diagonal (full) blocks and causal diagonal blocks
    attn_full: tuple = ((1024, 120.0), (2048, 234.0), (4096, 290.0), (8192, 309.0), (32768, 323.0))
    attn_diag: tuple = ((1024, 64.0), (2048, 150.0), (4096, 230.0), (8192, 285.0), (32768, 325.0))

    @property
    def budget_bytes(self) -> float:
        """What a GPU may hold for the model and its activations."""
        return self.gpu_memory_gib * 2**30 * self.usable_fraction

    def attn_tflops(self, tokens: int, diagonal: bool) -> float:
        """Interpolated (in log2 of the block size) from the measured table; flat outside it."""
        import math

        table = self.attn_diag if diagonal else self.attn_full
        if tokens <= table[0][0]:
            return table[0][1] * tokens / table[0][0]  # small blocks: launch-bound, rate falls
        for (t0, r0), (t1, r1) in zip(table, table[1:]):
            if tokens <= t1:
                w = (math.log2(tokens) - math.log2(t0)) / (math.log2(t1) - math.log2(t0))
                return r0 + w * (r1 - r0)
        return table[-1][1]
