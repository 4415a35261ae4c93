"""Tiny GPTModels on CPU gloo ranks: the CP = 1 model with Megatron's own attention against the
same weights with the lightseq backend at CP = P (shared by the Megatron tests)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

SEQ, VOCAB, BATCH = 24, 96, 2


@dataclass(frozen=True)
class Case:
    tp: int = 1
    cp: int = 2
    heads: int = 4
    groups: int = 2
    layers: int = 2
    position: str = "rope"
    layout: str = "zigzag"
    schedule: str = "auto"
    kernel: str = "auto"
    dtype: torch.dtype = torch.float32
    recompute: str | None = None  # None; "uniform" or "block" (full recompute); "selective" (core_attn)
    recompute_layers: int = 1
    remat: bool = True
    sequence_parallel: bool = False
    window: tuple[int, int] | None = None  # TransformerConfig.window_size
    cp_comm_type: str | tuple | None = None  # TransformerConfig.cp_comm_type (a tuple: one per layer)
    hcp: tuple[int, int] | None = None  # --hierarchical-context-parallel-sizes (a2a size, p2p size)
    hidden: int = 32
    kv_wire: str = "none"  # LightSeqConfig.kv_wire


def _config(case: Case, *, cp: int, backend):
    from megatron.core.transformer import TransformerConfig

    extra = {}
    if case.recompute == "selective":
        extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif case.recompute:
        extra = dict(recompute_granularity="full", recompute_method=case.recompute,
                     recompute_num_layers=case.recompute_layers)
    config = TransformerConfig(
        num_layers=case.layers, hidden_size=case.hidden, num_attention_heads=case.heads, num_query_groups=case.groups,
        ffn_hidden_size=64, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=case.tp, context_parallel_size=cp, attention_backend=backend,
        params_dtype=case.dtype, bf16=case.dtype == torch.bfloat16, sequence_parallel=case.sequence_parallel,
        window_size=case.window, hierarchical_context_parallel_sizes=list(case.hcp) if case.hcp and cp > 1 else None,
        cp_comm_type=list(case.cp_comm_type) if isinstance(case.cp_comm_type, tuple) else case.cp_comm_type, **extra)
    config.lightseq = settings(case)  # read only when the backend is lightseq
    return config


def settings(case: Case):
    from megatron_lightseq.megatron.config import LightSeqConfig

    return LightSeqConfig(layout=case.layout, schedule=case.schedule, kernel=case.kernel, remat=case.remat,
                          kv_wire=case.kv_wire)


def build_model(case: Case, *, cp: int, backend):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(1234)
    model = GPTModel(_config(case, cp=cp, backend=backend), get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type=case.position)
    # Megatron keeps some parameters (embeddings, norms) in float32 whatever params_dtype says.
    return model.to(case.dtype) if case.dtype == torch.float64 else model


def full_batch():
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"tokens": tokens, "labels": labels, "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


def total_loss(model, batch):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()


def setup_rank(case: Case):
    import megatron_lightseq.megatron as mlm
    from megatron_lightseq.jobs.cpu_shims import install

    install()
    mlm.register()
    return mlm


def _einops_standin(ps) -> None:
    """parallel_state builds hierarchical groups with one einops.rearrange, "(l s u) -> (l u) s";
    the test environment has no einops (Megatron-LM's training environment does)."""
    import types

    import numpy as np

    def rearrange(a, pattern, *, u, s, l):  # noqa: E741 - einops' own names
        assert pattern == "(l s u) -> (l u) s", pattern
        return np.asarray(a).reshape(l, s, u).transpose(0, 2, 1).reshape(l * u, s)

    if not getattr(ps, "HAVE_EINOPS", True):
        ps.einops, ps.HAVE_EINOPS = types.SimpleNamespace(rearrange=rearrange), True


def init_parallel(case: Case, cp: int) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    hierarchical = list(case.hcp) if case.hcp and cp > 1 else None
    if hierarchical:
        _einops_standin(ps)
    ps.initialize_model_parallel(case.tp, 1, context_parallel_size=cp, create_gloo_process_groups=False,
                                 hierarchical_context_parallel_sizes=hierarchical)


def baseline(case: Case, steps: int = 1):
    """CP = 1, Megatron's local attention: per-step total loss and the weights after each step."""
    from megatron.core.transformer.enums import AttnBackend

    init_parallel(case, 1)
    model = build_model(case, cp=1, backend=AttnBackend.local)
    start = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the grads: no Adam-amplified round-off
    losses, grads = [], None
    batch = full_batch()
    for _ in range(steps):
        opt.zero_grad()
        loss = total_loss(model, batch)
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(loss.item())
        opt.step()
    return start, losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def lightseq_run(case: Case, mlm, start, steps: int = 1):
    """CP = case.cp, lightseq backend, same weights: per-step CP-summed loss, CP-summed first grads."""
    from megatron.core import parallel_state as ps

    init_parallel(case, case.cp)
    model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the grads: no Adam-amplified round-off
    group = ps.get_context_parallel_group()
    batch = mlm.get_batch_on_this_cp_rank(full_batch(), layout=case.layout)
    losses, grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = total_loss(model, batch)
        loss.backward()
        for p in model.parameters():  # what Megatron's DP/CP grad all-reduce does
            dist.all_reduce(p.grad, group=group)
        summed = loss.detach().clone()
        dist.all_reduce(summed, group=group)
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(summed.item())
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}
