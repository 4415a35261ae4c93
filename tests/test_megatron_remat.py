"""Rematerialization-aware checkpointing inside Megatron's recompute (float64, CPU gloo)."""
import dataclasses
import warnings
import gc
import weakref

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_lightseq as mls  # noqa: E402
from gpt_cases import Case, build_model, full_batch, init_parallel, setup_rank, total_loss  # noqa: E402
from harness import run_ranks  # noqa: E402

F64 = Case(cp=2, layers=3, dtype=torch.float64)
EXACT = dict(rtol=1e-10, atol=1e-10)


def _model_and_batch(case, mlm, seed=0):
    init_parallel(case, case.cp)
    model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
    batch = full_batch()
    if seed:  # another microbatch: other tokens
        g = torch.Generator().manual_seed(seed)
        batch["tokens"] = torch.randint(0, 96, batch["tokens"].shape, generator=g)
    return model, mlm.get_batch_on_this_cp_rank(batch, layout=case.layout)


def _step(case, mlm):
    """Grads and this rank's trace of one fwd+bwd."""
    model, batch = _model_and_batch(case, mlm)
    with mls.trace() as t:
        total_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, t


def _recompute_variants(rank, world_size):
    mlm = setup_rank(F64)
    reference, plain = _step(F64, mlm)
    layers = F64.layers
    report = {}
    for name, case in {
        "uniform-1": dataclasses.replace(F64, recompute="uniform", recompute_layers=1),
        "uniform-3": dataclasses.replace(F64, recompute="uniform", recompute_layers=3),
        "block-2": dataclasses.replace(F64, recompute="block", recompute_layers=2),
        "selective": dataclasses.replace(F64, recompute="selective"),
        "uniform-1-no-remat": dataclasses.replace(F64, recompute="uniform", recompute_layers=1, remat=False),
    }.items():
        grads, t = _step(case, mlm)
        for n, g in grads.items():
            torch.testing.assert_close(g, reference[n], **EXACT, msg=lambda m: f"{name} {n}: {m}")
        recomputed = {"uniform-1-no-remat": layers, "block-2": 0}.get(name, 0)
        assert t.forward_calls == layers + recomputed, (name, t.forward_calls)
        assert t.backward_calls == layers, name
        report[name] = t.bytes_sent
    forward_bytes = report["uniform-1-no-remat"] - plain.bytes_sent  # what the repeated forwards sent
    assert forward_bytes > 0 and all(report[n] == plain.bytes_sent for n in report if "no-remat" not in n)
    _remat_agrees_backward_kernels(mlm, reference)
    return report


def _remat_agrees_backward_kernels(mlm, reference):
    """kernel="auto" under remat: the first pass (under no_grad) settles the backward kernels with
    the group too, once for all layers; the recompute and the backward settle and measure nothing."""
    import megatron_lightseq.distattn.run.pipeline as call_module
    from megatron_lightseq.kernels import get_kernel
    from megatron_lightseq.kernels.auto import AutoKernel

    auto = AutoKernel([get_kernel("torch"), get_kernel("math")], timer=lambda fn, device: (fn(), 1.0)[1])
    settles, settle = [], auto.settle
    auto.settle = lambda requests, agree: (settles.append((torch.is_grad_enabled(), {r[0] for r in requests})),
                                           settle(requests, agree))[1]
    resolve = call_module.resolve_kernel
    call_module.resolve_kernel = lambda name, q, k: auto if name == "auto" else resolve(name, q, k)
    try:
        grads, t = _step(dataclasses.replace(F64, recompute="uniform", recompute_layers=1), mlm)
    finally:
        call_module.resolve_kernel = resolve
    for n, g in grads.items():
        torch.testing.assert_close(g, reference[n], **EXACT, msg=lambda m: f"auto remat {n}: {m}")
    assert len(settles) == 1 and settles[0][0] is False and "backward" in settles[0][1], settles
    assert t.collectives == 2, t  # the inputs' agreement and the kernels', both in the first layer's first pass


def test_remat_gradients_and_forward_counts():
    """Full recompute (uniform, block), selective core_attn: the same grads as no recompute, one
    attention forward per layer (no-remat: two) and no forward traffic repeated."""
    reports = run_ranks(2, _recompute_variants)
    assert reports[0]["uniform-1-no-remat"] > reports[0]["uniform-1"]


def _microbatches_in_flight(rank, world_size, order):
    mlm = setup_rank(F64)
    case = dataclasses.replace(F64, recompute="uniform", recompute_layers=1)
    seeds = (1, 2, 3)
    expected = []
    for seed in seeds:  # each microbatch alone, without recompute
        model, batch = _model_and_batch(F64, mlm, seed)
        total_loss(model, batch).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model, _ = _model_and_batch(case, mlm)
    losses = [total_loss(model, _model_and_batch(case, mlm, s)[1]) for s in seeds]  # all in flight
    stashes = [layer.self_attention.core_attention.stash for layer in model.decoder.layers]
    assert [len(s) for s in stashes] == [len(seeds)] * case.layers
    saved = [weakref.ref(out) for s in stashes for _, out, _ in s._waiting]
    if list(order) != sorted(order):  # Megatron never does this: the stash is a FIFO, and says so
        with pytest.raises(RuntimeError, match="not those of the oldest saved first pass"):
            losses[order[0]].backward()
        return True
    for i in order:
        for p in model.parameters():
            p.grad = None
        losses[i].backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[i][n], **EXACT, msg=lambda m: f"microbatch {i} {n}: {m}")
    del losses
    gc.collect()
    assert [len(s) for s in stashes] == [0] * case.layers  # nothing left behind
    assert all(ref() is None for ref in saved)  # and the saved outputs are freed
    return True


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)], ids=["forward-order", "out-of-order-refused"])
def test_several_microbatches_in_flight(order):
    assert run_ranks(2, _microbatches_in_flight, order) == [True, True]


def _no_growth(rank, world_size):
    mlm = setup_rank(F64)
    case = dataclasses.replace(F64, recompute="uniform", recompute_layers=1)
    model, batch = _model_and_batch(case, mlm)
    stashes = [layer.self_attention.core_attention.stash for layer in model.decoder.layers]
    live = []
    for _ in range(6):
        total_loss(model, batch).backward()
        gc.collect()
        live.append(sum(len(s) for s in stashes) + sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    assert live[1:] == live[1:2] * 5, live  # the same tensors alive after every step
    return True


def test_memory_returns_after_each_step():
    assert run_ranks(2, _no_growth) == [True, True]


def test_remat_under_fp8_says_it_is_off():
    """With --fp8 Megatron checkpoints through TransformerEngine, where is_checkpointing() is False:
    remat cannot work there, and the core attention says so when it is built (not silently)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lightseq.megatron.config import LightSeqConfig
    from megatron_lightseq.megatron.core_attention import LightSeqAttention

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                               attention_dropout=0.0, recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1)
    one_rank = type("OneRank", (), {"size": lambda self: 1, "rank": lambda self: 0})()
    cp = type("Groups", (), {"cp": one_rank})()
    for fp8, remat, warns in (("hybrid", True, True), (None, True, False), ("hybrid", False, False)):
        object.__setattr__(config, "fp8", fp8)  # fp8 validation wants TransformerEngine; the flag is what is read
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            LightSeqAttention(config, 1, AttnMaskType.causal, pg_collection=cp, settings=LightSeqConfig(remat=remat))
        said = [str(w.message) for w in seen if "lightseq remat is off" in str(w.message)]
        assert bool(said) == warns, (fp8, remat, said)
