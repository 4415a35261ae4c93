"""Packed documents and sliding windows through Megatron: a tiny GPTModel with the lightseq
backend at CP = P against the same weights at CP = 1 (loss, gradients and weights after three
SGD steps), with a per-token loss over uneven loss masks, as Megatron's
--calculate-per-token-loss computes it. The CP = 1 run is Megatron's own local attention with a
dense mask wherever it can express the case (a window; documents with positions over the whole
sequence); for "thd" documents, whose RoPE restarts per document, only the TransformerEngine
backend can, so there it is the lightseq backend on one rank."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from gpt_cases import VOCAB, Case, build_model, init_parallel, setup_rank  # noqa: E402
from harness import run_ranks  # noqa: E402
from mask_cases import dense_allowed, documents, padded  # noqa: E402

TOKENS = 24


@dataclasses.dataclass(frozen=True)
class Packed:
    case: Case
    docs: str | None = "long-tailed"  # mask_cases.documents kind
    qkv_format: str = "thd"  # thd: RoPE per document; sbhd: over the whole sequence
    te_padding: bool = False  # cu_seqlens_padded: every document padded to a multiple of 2 CP
    batch: int = 1


def _data(p: Packed):
    """tokens, labels, loss mask (uneven: some whole documents and scattered tokens left out),
    position ids, and the documents (cu_seqlens, cu_seqlens_padded) over the whole sequence."""
    g = torch.Generator().manual_seed(7)
    cu = documents(p.docs, TOKENS, seed=3) if p.docs else None
    cu_pad = padded(cu, p.case.cp) if p.te_padding else None
    n = cu_pad[-1] if cu_pad else TOKENS
    tokens = torch.randint(0, VOCAB, (p.batch, n), generator=g)
    labels = torch.randint(0, VOCAB, (p.batch, n), generator=g)
    loss_mask = (torch.rand(p.batch, n, generator=g) > 0.3).float()
    loss_mask[:, : n // 3] = 0  # the first third counts for nothing: ranks holding it have little loss
    if cu_pad:  # TE's padding tokens carry no loss
        real = dense_allowed(n, causal=False, cu_seqlens=cu, cu_seqlens_padded=cu_pad).any(1)
        loss_mask *= real.float()
    positions = torch.arange(n).expand(p.batch, n).contiguous()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions), cu, cu_pad


def _packed_params(cu, cu_pad, qkv_format):
    from megatron.core.packed_seq_params import PackedSeqParams

    if cu is None:
        return None
    as_tensor = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=as_tensor(cu), cu_seqlens_kv=as_tensor(cu),
                           cu_seqlens_q_padded=as_tensor(cu_pad), cu_seqlens_kv_padded=as_tensor(cu_pad))


def _steps(model, batch, params, attention_mask, group, steps=3):
    """Per-token loss: sum(loss * mask) over all ranks / mask tokens over all ranks; the CP ranks'
    gradients summed (Megatron's DP x CP reduction with --calculate-per-token-loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        per_token = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                          packed_seq_params=params)
        local = (per_token * batch["loss_mask"]).sum()
        count = batch["loss_mask"].sum()
        if group is not None:
            count = count.clone()
            dist.all_reduce(count, group=group)
        (local / count).backward()
        total = local.detach().clone()
        if group is not None:
            for q in model.parameters():
                dist.all_reduce(q.grad, group=group)
            dist.all_reduce(total, group=group)
        grads = grads or {n: q.grad.clone() for n, q in model.named_parameters()}
        losses.append((total / count).item())
        opt.step()
    return losses, grads, {n: q.detach().clone() for n, q in model.named_parameters()}


def _independent_baseline(p: Packed) -> bool:
    return p.qkv_format == "sbhd" or p.docs is None


def _compare(rank, world_size, p: Packed):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnBackend

    from megatron_lightseq.distattn import layout as layouts

    layouts.MIN_CHUNK_TOKENS = 2  # several chunks a rank in this short sequence (this process only)
    case = p.case
    mlm = setup_rank(case)
    batch, cu, cu_pad = _data(p)
    # CP = 1
    init_parallel(case, 1)
    if _independent_baseline(p):
        model = build_model(dataclasses.replace(case, window=None) if p.docs else case, cp=1,
                            backend=AttnBackend.local)
        allowed = dense_allowed(batch["tokens"].shape[1], causal=True, cu_seqlens=cu, window_size=case.window or
                                (-1, -1), cu_seqlens_padded=cu_pad) if p.docs else None
        mask, params = (None if allowed is None else ~allowed[None, None]), None
    else:
        model = build_model(case, cp=1, backend=mlm.lightseq_backend())
        mask, params = None, _packed_params(cu, cu_pad, p.qkv_format)
    start = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    base = _steps(model, batch, params, mask, None)
    # CP = P, the lightseq backend
    init_parallel(case, case.cp)
    model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
    model.load_state_dict(start)
    params = _packed_params(cu, cu_pad, p.qkv_format)
    layout = mlm.LightSeqConfig(layout=case.layout)
    from megatron_lightseq.megatron.config import layout_for

    local = mlm.get_batch_on_this_cp_rank(dict(batch), layout=layout_for(layout, packed=cu is not None),
                                          cu_seqlens=cu, cu_seqlens_padded=cu_pad)
    ours = _steps(model, local, params, None, ps.get_context_parallel_group())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(base[0]), **tol)
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], base[1][name], **tol, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(ours[2][name], base[2][name], **tol, msg=lambda m: f"param {name}: {m}")
    return ours[0]


CASES = {
    "cp2-thd-long-tailed-rope-gqa": Packed(Case(cp=2, layout="auto")),
    "cp3-thd-te-padded-rope": Packed(Case(cp=3, layout="auto"), te_padding=True),
    "cp4-sbhd-short-docs-rope-local-baseline": Packed(Case(cp=4, layout="balanced", layers=1), docs="short",
                                                      qkv_format="sbhd", batch=2),
    "tp2-cp2-thd-odd-docs": Packed(Case(tp=2, cp=2, layout="auto"), docs="odd"),
    "cp2-window-contiguous-local-baseline": Packed(Case(cp=2, layout="contiguous", window=(5, 0)), docs=None,
                                                   batch=2),
    "cp3-thd-docs-and-window-zigzag-learned": Packed(Case(cp=3, layout="zigzag", window=(6, 0),
                                                          position="learned_absolute"), docs="odd"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_and_windowed_gpt_matches_cp1(name):
    p = CASES[name]
    losses = run_ranks(p.case.tp * p.case.cp, _compare, p)
    assert all(ls == losses[0] for ls in losses)


def _remat_with_documents(rank, world_size):
    """Full recompute with remat on packed documents: one attention forward per layer, the
    gradients of the run without recompute (float64)."""
    import megatron_lightseq as mls
    from megatron.core import parallel_state as ps

    base = Packed(Case(cp=2, layers=3, dtype=torch.float64, layout="auto"), docs="odd")
    mlm = setup_rank(base.case)
    batch, cu, _ = _data(base)
    found = {}
    for name, case in {"plain": base.case, "remat": dataclasses.replace(base.case, recompute="uniform")}.items():
        init_parallel(case, case.cp)
        model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
        local = mlm.get_batch_on_this_cp_rank(dict(batch), layout="balanced", cu_seqlens=cu)
        with mls.trace() as t:
            _steps(model, local, _packed_params(cu, None, "thd"), None, ps.get_context_parallel_group(), steps=1)
        found[name] = ({n: q.grad.clone() for n, q in model.named_parameters()}, t)
    for n, g in found["remat"][0].items():
        torch.testing.assert_close(g, found["plain"][0][n], rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")
    assert found["remat"][1].forward_calls == found["plain"][1].forward_calls == base.case.layers
    assert found["remat"][1].bytes_sent == found["plain"][1].bytes_sent
    return True


def test_remat_with_packed_documents():
    assert run_ranks(2, _remat_with_documents) == [True, True]
