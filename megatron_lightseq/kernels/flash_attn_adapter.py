"""flash-attn 2.x as a block kernel ("flash-attn"), registered when ``flash_attn`` imports.

Forward: the public ``flash_attn_func(..., return_attn_probs=True)``, which returns
(out, softmax_lse, _) in every 2.x release. Backward: the private ``_flash_attn_backward``, fed the
merged (out, lse), so no forward runs again. Its parameters changed across releases (2.3:
``window_size``; 2.4-2.5: ``alibi_slopes``, ``deterministic``; 2.6: ``softcap``; 2.7+:
``window_size_left``/``_right`` and a torch custom op): it is called by keyword, each parameter
given the value its name calls for, so one call fits every release, and a parameter this adapter
does not know stops the registration with a warning instead of a wrong call. flash-attn takes
GQA/MQA natively (fewer K/V heads) and [B, S, H, D] tensors as they are.
"""
from __future__ import annotations

import inspect
from types import ModuleType

import torch

from .vendor import FixedMaskKernel

_TENSORS = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")
_NO_EXTRAS = dict(dropout_p=0.0, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=False, rng_state=None)


def backward_parameters(interface: ModuleType) -> tuple[str, ...]:
    """Parameter names of the release's ``_flash_attn_backward`` (a plain function, or a torch
    custom op from 2.7 on, whose Python function sits in ``_init_fn``)."""
    fn = interface._flash_attn_backward
    return tuple(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


def unknown_parameters(interface: ModuleType) -> set[str]:
    known = set(_TENSORS) | set(_NO_EXTRAS) | {"softmax_scale", "causal"}
    return set(backward_parameters(interface)) - known


class FlashAttnKernel(FixedMaskKernel):
    name = "flash-attn"

    def __init__(self, interface: ModuleType | None = None) -> None:
        if interface is None:
            import flash_attn.flash_attn_interface as interface
        self._fa = interface
        self._bwd_params = backward_parameters(interface)

    def supports(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        d = q.shape[-1]
        return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256

    def _forward(self, q, k, v, causal: bool, scale: float):
        out, lse, _ = self._fa.flash_attn_func(q, k, v, 0.0, softmax_scale=scale, causal=causal,
                                               return_attn_probs=True)
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        given = dict(zip(_TENSORS, (dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv)),
                     softmax_scale=scale, causal=causal, **_NO_EXTRAS)
        self._fa._flash_attn_backward(**{name: given[name] for name in self._bwd_params})  # fills dq, dk, dv
        return dq, dk, dv
