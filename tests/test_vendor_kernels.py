"""Adapters of vendor ops, as far as a CPU can check them: torch's cuDNN and flash ops called
on meta tensors (the installed torch's schemas and meta kernels: argument order, LSE shape, GQA
heads summed back), and the flash-attn adapter against stand-ins carrying the parameter lists of
flash-attn 2.3.6 and 2.8.3 (read from their sources), computing with the math kernel. The real ops
run in test_gpu_kernels.py."""
import inspect
import types

import pytest
import torch
from megatron_lightseq.kernels.mask import Mask

from megatron_lightseq.kernels import get_kernel
from megatron_lightseq.kernels.cudnn import CudnnKernel
from megatron_lightseq.kernels.flash_attn_adapter import FlashAttnKernel, unknown_parameters
from megatron_lightseq.kernels.sdpa import TorchSdpaKernel
from oracle import CAUSAL
from test_kernels import SPANS, _block_reference, _inputs


@pytest.mark.parametrize("kernel", [CudnnKernel(), TorchSdpaKernel()], ids=["cudnn", "torch-cuda"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
def test_cuda_op_adapters_fit_the_installed_schemas(kernel, heads):
    meta = lambda s, h: torch.empty(2, s, h, 64, device="meta", dtype=torch.bfloat16)
    q, k, v, dout = meta(128, heads[0]), meta(96, heads[1]), meta(96, heads[1]), meta(128, heads[0])
    out, lse = kernel._forward(q, k, v, False, 0.125)
    assert out.shape == q.shape and lse.shape == (2, heads[0], 128) and lse.dtype == torch.float32
    dq, dk, dv = kernel._backward(dout, q, k, v, out, lse, False, 0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


BACKWARD_2_3_6 = ("dout q k v out softmax_lse dq dk dv dropout_p softmax_scale causal window_size rng_state")
BACKWARD_2_8_3 = ("dout q k v out softmax_lse dq dk dv dropout_p softmax_scale causal window_size_left "
                  "window_size_right softcap alibi_slopes deterministic rng_state")


def _stand_in(backward_params: str, custom_op: bool) -> types.ModuleType:
    """A flash_attn_interface whose _flash_attn_backward has exactly these parameters (binding
    fails on any other call) and whose maths is the math kernel's (causal = top-left, Sq == Sk)."""
    math = get_kernel("math")

    def spans(q, k):
        return dict(q_span=((0, q.shape[1]),), k_span=((0, k.shape[1]),))

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        return_attn_probs=False):
        assert dropout_p == 0.0 and window_size == (-1, -1) and return_attn_probs
        out, lse = math.forward(q, k, v, mask=Mask(causal=causal), scale=softmax_scale, **spans(q, k))
        return out, lse, None

    signature = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                   for n in backward_params.split()])

    def backward(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        assert a["dropout_p"] == 0.0 and a["rng_state"] is None
        assert a.get("window_size", (-1, -1)) == (-1, -1) and a.get("window_size_left", -1) == -1
        grads = math.backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["softmax_lse"], mask=Mask(causal=a["causal"]),
                              scale=a["softmax_scale"], **spans(a["q"], a["k"]))
        for buf, g in zip((a["dq"], a["dk"], a["dv"]), grads):
            buf.copy_(g)
        return a["softmax_lse"]

    backward.__signature__ = signature
    fn = backward
    if custom_op:  # 2.7+: a torch custom op object, its Python function in _init_fn
        fn = type("CustomOpDef", (), {"_init_fn": staticmethod(backward), "__call__": staticmethod(backward)})()
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, _flash_attn_backward=fn)


@pytest.mark.parametrize("release,params,custom_op", [("2.3.6", BACKWARD_2_3_6, False),
                                                      ("2.8.3", BACKWARD_2_8_3, True)])
@pytest.mark.parametrize("spans", ["full", "diagonal", "offset causal"])
def test_flash_attn_adapter_across_releases(release, params, custom_op, spans):
    interface = _stand_in(params, custom_op)
    assert not unknown_parameters(interface)
    q_span, k_span = SPANS[spans]
    q, k, v, dout = _inputs(4, 4, 6, 2, 64)
    ref = _block_reference(q, k, v, dout, q_span, k_span, True, 0.3)
    kernel = FlashAttnKernel(interface)
    out, lse = kernel.forward(q, k, v, q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.3)
    grads = kernel.backward(dout, q, k, v, ref[0], ref[1], q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.3)
    for got, want in zip((out, lse, *grads), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flash_attn_adapter_refuses_a_parameter_it_does_not_know():
    assert unknown_parameters(_stand_in(BACKWARD_2_8_3 + " sink_tokens", True)) == {"sink_tokens"}
