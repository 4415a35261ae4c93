"""Block-kernel registry. ``kernel="auto"`` takes the first name in ``AUTO_ORDER`` whose kernel
supports the inputs' device, dtype and head dim. New kernels (flash-attn, Triton) register a
factory here; the executor never names a kernel."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .base import BlockKernel
from .math import MathKernel
from .sdpa import TorchSdpaKernel

_FACTORIES: dict[str, Callable[[], BlockKernel]] = {}
_INSTANCES: dict[str, BlockKernel] = {}
AUTO_ORDER: list[str] = []


def register_kernel(name: str, factory: Callable[[], BlockKernel], *, auto_rank: int | None = None) -> None:
    """Add a kernel; ``auto_rank`` places it in the ``auto`` preference order (0 = first)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    if name in AUTO_ORDER:
        AUTO_ORDER.remove(name)
    if auto_rank is not None:
        AUTO_ORDER.insert(auto_rank, name)


def kernel_names() -> tuple[str, ...]:
    return tuple(_FACTORIES) + ("auto",)


def get_kernel(name: str) -> BlockKernel:
    if name not in _FACTORIES:
        raise ValueError(f"kernel must be one of {kernel_names()}, got {name!r}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def resolve_kernel(name: str, q: torch.Tensor, k: torch.Tensor) -> BlockKernel:
    """The kernel to run for these inputs; ValueError if the named one cannot take them."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            kernel = get_kernel(candidate)
            if kernel.supports(q, k):
                return kernel
        raise ValueError(f"no kernel among {AUTO_ORDER} supports {q.dtype} on {q.device}")
    kernel = get_kernel(name)
    if not kernel.supports(q, k):
        raise ValueError(
            f"kernel {name!r} does not support dtype {q.dtype}, head dim {q.shape[-1]} on {q.device.type}")
    return kernel


register_kernel("math", MathKernel, auto_rank=0)
register_kernel("torch", TorchSdpaKernel, auto_rank=0)
try:  # optional: pip install megatron-lightseq[triton]
    from .triton_kernels import TritonKernel
except ImportError:
    pass
else:
    # Named only: `auto` takes it once the GPU benchmark shows it ahead of torch's ops for a shape.
    register_kernel("triton", TritonKernel)
