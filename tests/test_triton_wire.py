"""The fused Triton quantize/dequantize of K/V (kernels/triton_wire.py, Triton's interpreter on
CPU) give the very bytes of the torch code (kernels/kv_wire.py), for every input dtype and for
inputs read through strides (views of Megatron's [s, b, h, d] tensors)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from megatron_lightseq.kernels.kv_wire import dequantize_kv_torch, quantize_kv_torch  # noqa: E402
from megatron_lightseq.kernels.triton_wire import dequantize_kv_fused, quantize_kv_fused  # noqa: E402


@pytest.mark.parametrize("dtype,strided", [(torch.bfloat16, True), (torch.float16, False), (torch.float32, True),
                                            (torch.float64, False)])
def test_fused_quantize_and_dequantize_equal_the_torch_code(dtype, strided):
    gen = torch.Generator().manual_seed(0)
    b, t, g, d = 2, 45, 3, 24  # tokens and head dim not multiples of the tiles
    k, v = (torch.randn(t, b, g, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k[..., 5] *= 8  # an outlier channel
    v[3] = 0  # a token of zeros: its scale stays positive, its values zero
    k[:, :, 1, 2] = 0.5 * torch.finfo(torch.bfloat16).eps  # a near-zero channel
    k, v = (x.to(dtype).transpose(0, 1) if strided else x.to(dtype).transpose(0, 1).contiguous() for x in (k, v))
    fused, plain = quantize_kv_fused(k, v), quantize_kv_torch(k, v)
    for name, a, e in zip(("k int8", "k scale", "v int8", "v scale"), fused, plain):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e), f"{name}: {(a.double() - e.double()).abs().max()}"
    for name, a, e in zip(("k", "v"), dequantize_kv_fused(*fused, dtype), dequantize_kv_torch(*plain, dtype)):
        assert a.dtype == dtype and torch.equal(a, e), name


def test_round_half_to_even_as_torch_rounds():
    """Values exactly half-way between two steps go to the even one, as torch.round does."""
    k = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]).view(1, 8, 1, 1).expand(1, 8, 1, 16).contiguous()
    fused, plain = quantize_kv_fused(k, k), quantize_kv_torch(k, k)
    assert torch.equal(fused[0], plain[0]) and fused[0][0, :, 0, 0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
