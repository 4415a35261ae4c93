"""Block-kernel registry. Names: "math" (plain torch, the oracle), "torch" (torch's flash ops,
CPU and CUDA), "cudnn" (torch's cuDNN op, CUDA), "flash-attn" (when flash_attn imports), "triton"
(the project's own kernels, when triton imports), and "auto".

``kernel="auto"``: of the kernels in ``AUTO_ORDER`` that support the inputs' device, dtype and
head dim, on CUDA the fastest for each kind of block, measured (auto.py); elsewhere the first
(on CPU "torch": torch's CPU flash op never materialises the scores, the math kernel does). The
math kernel joins a measurement only when nothing else can take the inputs. The executor never
names a kernel.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .auto import AutoKernel
from .base import BlockKernel
from .cudnn import CudnnKernel
from .math import MathKernel
from .merge import register_one_pass_merge
from .sdpa import TorchSdpaKernel

_FACTORIES: dict[str, Callable[[], BlockKernel]] = {}
_INSTANCES: dict[str, BlockKernel] = {}
_AUTO: dict[tuple[str, ...], AutoKernel] = {}
AUTO_ORDER: list[str] = []


def register_kernel(name: str, factory: Callable[[], BlockKernel], *, auto_rank: int | None = None) -> None:
    """Add a kernel; ``auto_rank`` places it in the ``auto`` preference order (0 = first)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    _AUTO.clear()
    if name in AUTO_ORDER:
        AUTO_ORDER.remove(name)
    if auto_rank is not None:
        AUTO_ORDER.insert(auto_rank, name)


# Kernels registered only where their package imports: what to tell a user who names one.
OPTIONAL = {"flash-attn": "the flash_attn package (flash-attn 2.x, built for your CUDA and torch)",
            "triton": "the triton package (pip install megatron-lightseq[triton])"}


def kernel_names() -> tuple[str, ...]:
    return tuple(_FACTORIES) + ("auto",)


def unknown_kernel(name: str) -> str:
    """The error for a kernel name that is not registered here."""
    needs = f": {name!r} needs {OPTIONAL[name]}, which does not import here" if name in OPTIONAL else ""
    return f"kernel must be one of {kernel_names()}, got {name!r}{needs}"


def get_kernel(name: str) -> BlockKernel:
    if name not in _FACTORIES:
        raise ValueError(unknown_kernel(name))
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def resolve_kernel(name: str, q: torch.Tensor, k: torch.Tensor) -> BlockKernel:
    """The kernel to run for these inputs; ValueError if the named one cannot take them."""
    if name == "auto":
        able = [n for n in AUTO_ORDER if get_kernel(n).supports(q, k)]
        if not able:
            raise ValueError(f"no kernel among {AUTO_ORDER} supports {q.dtype}, head dim {q.shape[-1]} on {q.device}")
        measured = [n for n in able if n != "math"]
        if q.device.type != "cuda" or len(measured) < 2:
            return get_kernel(able[0])
        if tuple(measured) not in _AUTO:
            _AUTO[tuple(measured)] = AutoKernel([get_kernel(n) for n in measured])
        return _AUTO[tuple(measured)]
    kernel = get_kernel(name)
    if not kernel.supports(q, k):
        raise ValueError(
            f"kernel {name!r} does not support dtype {q.dtype}, head dim {q.shape[-1]} on {q.device.type}")
    return kernel


register_kernel("math", MathKernel, auto_rank=0)
register_kernel("torch", TorchSdpaKernel, auto_rank=0)
register_kernel("cudnn", CudnnKernel, auto_rank=0)
try:  # optional: pip install megatron-lightseq[triton]
    from .triton_kernels import TritonKernel, merge_into as _triton_merge
except ImportError:
    pass
else:
    # On CPU it runs only under Triton's interpreter: last before math, so CPU `auto` stays on torch.
    register_kernel("triton", TritonKernel, auto_rank=AUTO_ORDER.index("math"))
    # One pass over the data where the eager merge takes several (fp32 accumulators on CUDA).
    register_one_pass_merge(lambda out: out.is_cuda and out.dtype == torch.float32, _triton_merge)
try:  # optional: flash-attn 2.x, built for the user's CUDA and torch
    import flash_attn.flash_attn_interface as _flash_attn_interface
except ImportError:
    pass
else:
    from .flash_attn_adapter import FlashAttnKernel, unknown_parameters

    if unknown_parameters(_flash_attn_interface):
        warnings.warn(f"flash-attn: _flash_attn_backward takes {sorted(unknown_parameters(_flash_attn_interface))}, "
                      "which this adapter does not know; kernel 'flash-attn' is not registered")
    else:
        register_kernel("flash-attn", FlashAttnKernel, auto_rank=1)
