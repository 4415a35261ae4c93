"""K/V in int8 on the wire (kv_wire="int8"): exactly the payloads that travel are quantized, once,
with the scheme of kernels/kv_wire.py, and the backward sees the forward's values (against
kv_wire_oracle.py, to float64 rounding); the bytes trace() counts are the plan's, about half of
bf16's; bad values fail before any transfer."""
import pytest
import torch

import megatron_lightseq as mls
from kv_wire_oracle import wire_reference
from mask_cases import documents
from megatron_lightseq.distattn.plan.call import resolve_plan
from megatron_lightseq.distattn.plan.mask import Mask
from megatron_lightseq.distattn.plan.plan import Shape, payload_bytes
from megatron_lightseq.distattn.run.emulate import emulate_dist_attn
from megatron_lightseq.kernels.kv_wire import dequantize_kv_torch, quantize_kv_torch

EXACT = dict(rtol=1e-10, atol=1e-10)


def _mask(kind: str, tokens: int) -> dict:
    return {"causal": dict(causal=True), "full": dict(causal=False),
            "documents": dict(causal=True, cu_seqlens=documents("long-tailed", tokens, seed=tokens)),
            "window": dict(causal=True, window_size=(tokens // 3, 0))}[kind]


EXACT_CASES = [  # (P, layout, schedule, mask, (H, G))
    (2, "zigzag", "ring", "causal", (4, 2)), (3, "contiguous", "lightseq", "causal", (2, 2)),
    (4, "contiguous", "ring", "full", (4, 1)), (4, "zigzag", "lightseq", "causal", (4, 2)),
    (3, "balanced", "lightseq", "documents", (4, 2)), (5, "contiguous", "ring", "window", (2, 2)),
    (4, "balanced", "ring", "window", (4, 2)),
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=["-".join(map(str, c)) for c in EXACT_CASES])
def test_dist_attn_quantizes_exactly_the_payloads_that_travel(case):
    p, layout, schedule, kind, (h, g) = case
    tokens = 2 * p * 12
    mask = _mask(kind, tokens)
    gen = torch.Generator().manual_seed(p)
    q, dout = (torch.randn(2, tokens, h, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, tokens, g, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    out, _, dq, dk, dv = emulate_dist_attn(q, k, v, dout, world_size=p, layout=layout, schedule=schedule,
                                           kv_wire="int8", **mask)
    want = wire_reference(q, k, v, dout, world_size=p, layout=layout, schedule=schedule, **mask)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        torch.testing.assert_close(a, b, **EXACT, msg=lambda m: f"{case}: {name}: {m}")
    plain = emulate_dist_attn(q, k, v, world_size=p, layout=layout, schedule=schedule, **mask)[0]
    assert (out - plain).abs().max() > 1e-6, "the int8 wire changed what was computed"


def test_quantization_is_the_documented_arithmetic():
    """K: one scale per (batch, head, channel) over the tokens, V: one per (batch, token, head);
    scale = amax / 127, round half to even, zeros stay zeros; dequantized within half a step."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 24, 3, 8, generator=gen) for _ in range(2))
    k[:, :, 1, 5] = 0  # a zero channel
    k8, ks, v8, vs = quantize_kv_torch(k, v)
    assert (k8.dtype, ks.shape, v8.dtype, vs.shape) == (torch.int8, (2, 1, 3, 8), torch.int8, (2, 24, 3, 1))
    torch.testing.assert_close(ks, k.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127)
    torch.testing.assert_close(vs, v.abs().amax(3, keepdim=True) / 127)
    assert (k8[:, :, 1, 5] == 0).all() and k8.abs().max() == 127 and v8.abs().amax(3).min() == 127
    k2, v2 = dequantize_kv_torch(k8, ks, v8, vs, torch.bfloat16)
    assert k2.dtype == v2.dtype == torch.bfloat16
    assert ((k2.float() - k).abs() <= ks * 0.51 + k.abs() * 2**-8).all()
    assert torch.equal(quantize_kv_torch(k, v)[0], k8), "deterministic"


def _bytes_by_kind(view, shape, phase):
    chunk = shape.seqlen_local // len(view.owned)
    found = {}
    for rs in view.steps(phase):
        for tr in rs.sends:
            found[tr.payload.kind] = found.get(tr.payload.kind, 0) + payload_bytes(
                tr.payload.kind, chunk * len(tr.payload.chunks), shape)
    return found


def test_trace_counts_the_plans_int8_bytes_half_of_bf16s():
    """The ring's forward sends <= 0.55x bf16's bytes and <= 0.28x float32's; the backward's kv
    part shrinks the same and its dkv part not at all; trace() measures the plan's bytes."""
    p, tokens, h, g, d = 4, 512, 4, 2, 64
    gen = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(1, tokens, h, d, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, tokens, g, d, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    with mls.trace() as t:
        emulate_dist_attn(q, k, v, world_size=p, layout="zigzag", schedule="ring", kernel="math", kv_wire="int8")
    shapes = {(dt, w): Shape(1, tokens // p, h, g, d, dt, w) for dt in (torch.bfloat16, torch.float32)
              for w in (None, "int8")}
    plan = resolve_plan(shapes[torch.bfloat16, "int8"], world_size=p, layout="zigzag", schedule="ring",
                        mask=Mask(causal=True))
    views = [plan.view(r) for r in range(p)]
    total = lambda key, phase: sum(v.traffic(shapes[key], phase) for v in views)  # noqa: E731
    assert t.bytes_sent == total((torch.bfloat16, "int8"), "forward")
    assert total((torch.bfloat16, "int8"), "forward") <= 0.55 * total((torch.bfloat16, None), "forward")
    assert total((torch.float32, "int8"), "forward") <= 0.28 * total((torch.float32, None), "forward")
    for view in views:
        wire, plain = (_bytes_by_kind(view, shapes[torch.bfloat16, w], "backward") for w in ("int8", None))
        assert wire.get("kv", 0) <= 0.55 * plain.get("kv", 0) and wire.get("dkv") == plain.get("dkv")


@pytest.mark.parametrize("bad", ["fp8", "INT8", 8, True])
def test_an_unknown_kv_wire_is_a_value_error(bad):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="kv_wire must be one of"):
        mls.dist_attn(q, q, q, kv_wire=bad)


ACCURACY_CASES = [  # (P, layout, schedule, mask, (H, G), head dim, keys with outlier channels)
    (2, "contiguous", "ring", "causal", (4, 4), 64, False), (3, "zigzag", "lightseq", "causal", (8, 2), 128, True),
    (4, "zigzag", "ring", "documents", (4, 2), 64, True), (5, "contiguous", "lightseq", "window", (4, 4), 128, False),
    (8, "zigzag", "lightseq", "causal", (8, 2), 64, True), (6, "balanced", "ring", "documents", (4, 2), 128, False),
    (8, "contiguous", "ring", "full", (4, 1), 64, True), (7, "balanced", "lightseq", "window", (8, 2), 64, False),
]


def _relative_error(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def kv_wire_error_ratios(p, layout, schedule, kind, heads, d, outliers, seed=0) -> dict[str, float]:
    """Per result (out, dq, dk, dv): the relative L2 error of dist_attn with int8 K/V on the wire
    (computing in float64, so that only the wire's rounding shows) over that of the float64
    oracle with K/V rounded to bf16, both against the exact oracle."""
    from mask_cases import dense_allowed, masked_reference

    tokens = 48 * p
    mask = _mask(kind, tokens)
    gen = torch.Generator().manual_seed(seed)
    (h, g) = heads
    q, dout = (torch.randn(1, tokens, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, tokens, g, d, generator=gen, dtype=torch.float64) for _ in range(2))
    if outliers:  # real keys carry a few fixed channels several times larger
        k[..., torch.randperm(d, generator=gen)[:4]] *= 8
    allowed = dense_allowed(tokens, **mask)
    exact = masked_reference(q, k, v, dout, allowed)
    bf16 = masked_reference(q, k.bfloat16().double(), v.bfloat16().double(), dout, allowed)
    got = emulate_dist_attn(q, k, v, dout, world_size=p, layout=layout, schedule=schedule, kv_wire="int8", **mask)
    pick = lambda r: (r[0], *r[2:])  # noqa: E731  (out, dq, dk, dv)
    return {name: _relative_error(a, e) / _relative_error(b, e)
            for name, a, b, e in zip(("out", "dq", "dk", "dv"), pick(got), pick(bf16), pick(exact))}


@pytest.mark.parametrize("case", ACCURACY_CASES, ids=["-".join(map(str, c)) for c in ACCURACY_CASES])
def test_int8_wire_error_is_within_five_times_bf16_rounding(case):
    ratios = kv_wire_error_ratios(*case)
    assert max(ratios.values()) <= 5, f"{case}: {ratios}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_add_at_most_five_bf16_roundings(dtype):
    """In the inputs' dtype, int8 on the wire adds at most 5x the error rounding K/V to bf16 makes
    to the dtype's own error (both against float64), and the results keep the inputs' dtype."""
    from oracle import reference_with_grads

    gen = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(1, 256, 4, 64, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 256, 2, 64, generator=gen, dtype=torch.float64) for _ in range(2))
    exact = reference_with_grads(q, k, v, dout, causal=True)
    bf16 = reference_with_grads(q, k.bfloat16().double(), v.bfloat16().double(), dout, causal=True)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    runs = {w: emulate_dist_attn(*low, world_size=4, layout="zigzag", schedule="ring", kernel="math", kv_wire=w)
            for w in (None, "int8")}
    assert [t.dtype for t in runs["int8"]] == [dtype, torch.float32, dtype, dtype, dtype]
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        plain, wire = (_relative_error(runs[w][i].double(), exact[i]) for w in (None, "int8"))
        assert wire <= plain + 5 * _relative_error(bf16[i], exact[i]), f"{dtype} {name}: {wire:.3g} vs {plain:.3g}"


def test_hybrid_sends_int8_between_groups_and_keeps_the_all_to_all_dtype():
    gen = torch.Generator().manual_seed(4)
    q, dout = (torch.randn(1, 128, 4, 16, generator=gen, dtype=torch.float32) for _ in range(2))
    k, v = (torch.randn(1, 128, 2, 16, generator=gen, dtype=torch.float32) for _ in range(2))
    traces, results = {}, {}
    for w in (None, "int8"):
        with mls.trace() as traces[w]:
            results[w] = emulate_dist_attn(q, k, v, dout, world_size=4, layout="zigzag", schedule="ring",
                                           heads_group=2, kv_wire=w)
    assert traces["int8"].a2a_bytes_sent == traces[None].a2a_bytes_sent
    assert traces["int8"].bytes_sent < 0.8 * traces[None].bytes_sent  # dkv keeps its dtype
    for a, b in zip(results["int8"], results[None]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
