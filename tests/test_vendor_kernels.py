"""Adapters of vendor ops, as far as a CPU can check them: torch's cuDNN and flash ops called
on meta tensors (the installed torch's schemas and meta kernels: argument order, LSE shape, GQA
heads summed back), and the flash-attn adapter against stand-ins carrying the parameter lists of
flash-attn 2.3.6 and 2.8.3 (read from their sources), computing with the math kernel. The real ops
run in test_gpu_kernels.py."""
import inspect
import types

import pytest
import torch

from megatron_lightseq.kernels import get_kernel
from megatron_lightseq.kernels.base import mask_kind
from megatron_lightseq.kernels.cudnn import CudnnKernel
from megatron_lightseq.kernels.flash_attn_adapter import FlashAttnKernel, unknown_parameters
from megatron_lightseq.distattn.plan.mask import Mask
from megatron_lightseq.kernels.sdpa import TorchSdpaKernel
from oracle import CAUSAL, allowed_by_hand, block_reference
from test_kernels import MASKED, SPANS, _inputs, assert_matches, masked_case


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
    calls = []

    def spans(q, k):
        return dict(q_span=((0, q.shape[1]),), k_span=((0, k.shape[1]),))

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        return_attn_probs=False):
        assert dropout_p == 0.0 and window_size == (-1, -1) and return_attn_probs
        calls.append("forward")
        out, lse = math.forward(q, k, v, mask=Mask(causal=causal), scale=softmax_scale, **spans(q, k))
        return out, lse, None

    signature = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                   for n in backward_params.split()])

    def backward(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        assert a["dropout_p"] == 0.0 and a["rng_state"] is None
        assert a.get("window_size", (-1, -1)) == (-1, -1) and a.get("window_size_left", -1) == -1
        calls.append("backward")
        grads = math.backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["softmax_lse"], mask=Mask(causal=a["causal"]),
                              scale=a["softmax_scale"], **spans(a["q"], a["k"]))
        for buf, g in zip((a["dq"], a["dk"], a["dv"]), grads):
            buf.copy_(g)
        return a["softmax_lse"]

    backward.__signature__ = signature
    fn = backward
    if custom_op:  # 2.7+: a torch custom op object, its Python function in _init_fn
        fn = type("CustomOpDef", (), {"_init_fn": staticmethod(backward), "__call__": staticmethod(backward)})()
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, _flash_attn_backward=fn, calls=calls)


@pytest.mark.parametrize("release,params,custom_op", [("2.3.6", BACKWARD_2_3_6, False),
                                                      ("2.8.3", BACKWARD_2_8_3, True)])
@pytest.mark.parametrize("spans", ["full", "diagonal", "offset causal"])
def test_flash_attn_adapter_across_releases(release, params, custom_op, spans):
    interface = _stand_in(params, custom_op)
    assert not unknown_parameters(interface)
    q_span, k_span = SPANS[spans]
    q, k, v, dout = _inputs(4, 4, 6, 2, 64)
    ref = block_reference(q, k, v, dout, allowed_by_hand(q_span, k_span), 0.3)
    kernel = FlashAttnKernel(interface)
    out, lse = kernel.forward(q, k, v, q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.3)
    grads = kernel.backward(dout, q, k, v, ref[0], ref[1], q_span=q_span, k_span=k_span, mask=CAUSAL, scale=0.3)
    for got, want in zip((out, lse, *grads), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flash_attn_adapter_refuses_a_parameter_it_does_not_know():
    assert unknown_parameters(_stand_in(BACKWARD_2_8_3 + " sink_tokens", True)) == {"sink_tokens"}


def test_vendor_adapter_hands_on_what_its_op_cannot_mask():
    """Through the flash-attn adapter (its op a stand-in that knows no mask but the plain triangle):
    every MASKED block exact at float64, the op called exactly for the blocks whose mask is none
    or the triangle (a diagonal block inside one document), the others handed on."""
    interface = _stand_in(BACKWARD_2_8_3, True)
    kernel = FlashAttnKernel(interface)
    for name in MASKED:
        q, k, v, dout, block, ref = masked_case(name, (6, 2), 64)
        interface.calls.clear()
        out, lse = kernel.forward(q, k, v, **block)
        grads = kernel.backward(dout, q, k, v, out, lse, **block)
        assert_matches((out, lse, *grads), ref, case=name, rtol=1e-10, atol=1e-10)
        by_op = mask_kind(block["q_span"], block["k_span"], block["mask"]) != "general"
        assert interface.calls == (["forward", "backward"] if by_op else []), name
    assert mask_kind(*MASKED["one document"][:2], Mask(cu_seqlens=(0, 96))) == "causal"


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's same_strides (MHA.cpp): equal strides over the dims longer than 1."""
    return [s for s, n in zip(a.stride(), a.shape) if n > 1] == [s for s, n in zip(b.stride(), b.shape) if n > 1]


def _in_stride_order_of(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t rebuilt dense in o's stride order, as torch does to d_out before cuDNN 9.5.1."""
    order = sorted(range(o.dim()), key=lambda i: -o.stride(i))
    return t.permute(order).contiguous().permute([order.index(i) for i in range(o.dim())])


class _StrictCudnnOps:
    """torch.ops.aten whose cuDNN backward first applies torch's layout rules (MHA.cpp,
    run_cudnn_SDP_bprop, torch 2.5-2.13), then runs the meta kernel: before cuDNN 9.5.1 d_out is
    rebuilt in out's stride order and must then have out's strides; with ragged offsets
    (TORCH_CUDNN_SDPA_AVOID_RECOMPILE and dense [B, S, H, D] tensors) batch i's LSE is read at
    i * S * (its token stride)."""

    def __init__(self, ragged: bool) -> None:
        self.ragged = ragged
        self._scaled_dot_product_cudnn_attention = torch.ops.aten._scaled_dot_product_cudnn_attention
        self.calls = 0

    def _scaled_dot_product_cudnn_attention_backward(self, grad_out, q, k, v, out, lse, *rest, **kw):
        do = grad_out if _same_strides(out, grad_out) else _in_stride_order_of(out, grad_out)
        assert _same_strides(out, do), f"cuDNN SDPA expected grad_output.strides() {do.stride()} == output.strides() {out.stride()}"
        dense_bshd = all(x.transpose(1, 2).is_contiguous() for x in (q, k, v, out))
        if self.ragged and dense_bshd:
            assert lse.stride(0) == q.shape[2] * lse.stride(2), f"ragged LSE offsets miss: strides {lse.stride()}"
        self.calls += 1
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(grad_out, q, k, v, out, lse, *rest, **kw)


def _megatron_like(s, b, heads, d=64):
    """Meta tensors as the executor hands them to a kernel at micro-batch b: q, k, v, d_out as
    Megatron's [s, b, h, d] seen as [b, s, h, d]; out and lse the second chunk of a 2s-token
    result (zigzag's second chunk, a strided slice); all for a (h, g) head split."""
    h, g = heads
    sbhd = lambda n: torch.empty(s, b, n, d, device="meta", dtype=torch.bfloat16).transpose(0, 1)
    out = torch.empty(b, 2 * s, h, d, device="meta", dtype=torch.bfloat16)[:, s:]
    lse = torch.empty(b, h, 2 * s, device="meta", dtype=torch.float32)[:, :, s:]
    return sbhd(h), sbhd(g), sbhd(g), out, lse, sbhd(h)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "avoid-recompile"])
def test_cudnn_backward_meets_torch_layout_rules_at_micro_batch_2(monkeypatch, heads, ragged):
    """Megatron's layouts at micro-batch 2 (out a strided slice, d_out in [s, b, h, d] order) and
    dense ones, under torch's rules for cuDNN < 9.5.1 and for TORCH_CUDNN_SDPA_AVOID_RECOMPILE."""
    from megatron_lightseq.kernels import cudnn

    ops = _StrictCudnnOps(ragged)
    monkeypatch.setattr(cudnn, "aten", ops)
    if ragged:
        monkeypatch.setenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")
    kernel = CudnnKernel()
    q, k, v, out, lse, dout = _megatron_like(128, 2, heads)
    dense = [x.contiguous() for x in (q, k, v, out)] + [lse.contiguous(), dout.contiguous()]
    for args in ((q, k, v, out, lse, dout), dense):
        dq, dk, dv = kernel._backward(args[5], *args[:5], True, 0.125)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert ops.calls == 2


def test_cudnn_ragged_lse_layout_is_the_forwards():
    """With ragged offsets torch's forward lays its LSE out [B, S, H]; the backward is given that."""
    from megatron_lightseq.kernels.cudnn import lse_for_backward, lse_is_4d

    lse = torch.randn(2, 4, 16)
    for ragged, strides in ((False, (64, 16, 1)), (True, (64, 1, 4))):
        got = lse_for_backward(lse, ragged)
        flat = got.squeeze(-1) if lse_is_4d() else got
        assert flat.stride() == strides and torch.equal(flat, lse)


def test_cudnn_schema_check():
    """The installed torch has the schemas the adapter calls; a torch whose op takes no attn_bias
    (before 2.5) is refused in supports(), not called with shifted arguments."""
    from megatron_lightseq.kernels.cudnn import BACKWARD_ARGS, FORWARD_ARGS, ops_fit

    assert ops_fit(torch.ops.aten)

    def op(args):
        schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=a) for a in args])
        return types.SimpleNamespace(default=types.SimpleNamespace(_schema=schema))

    without_bias = lambda args: tuple(a for a in args if a != "attn_bias")
    old = types.SimpleNamespace(_scaled_dot_product_cudnn_attention=op(without_bias(FORWARD_ARGS)),
                                _scaled_dot_product_cudnn_attention_backward=op(without_bias(BACKWARD_ARGS)))
    assert not ops_fit(old) and not ops_fit(types.SimpleNamespace())
    current = types.SimpleNamespace(_scaled_dot_product_cudnn_attention=op(FORWARD_ARGS),
                                    _scaled_dot_product_cudnn_attention_backward=op(BACKWARD_ARGS))
    assert ops_fit(current)
