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

    from megatron_lightseq.distattn.plan import layout as layouts

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


# Documents from Megatron's own dataloader, in the batches it builds (megatron-core alone: the
# dataset's own mask builder, and core_v0.19.0's cu_seqlens rows as its GPTDataset lays them out),
# micro-batch 2: lightseq at CP = P against Megatron's local attention at CP = 1 reading the
# dataset's dense mask. Its RoPE runs over each whole sample, the lightseq thd path's restarts per
# document: the same attention (RoPE is relative and no query sees another document).
EOD, SAMPLES = VOCAB - 1, 2


def _dataloader_batch(reset_position_ids: bool):
    """What Megatron's GPTDataset gives for SAMPLES samples of TOKENS tokens with documents ending
    in EOD: (the collated batch with its dense mask, the documents' cu_seqlens rows as
    --dataloader-inter-document-masking pads them)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    g = torch.Generator().manual_seed(11)
    samples, rows = [], []
    for j, kind in enumerate(("long-tailed", "odd")[:SAMPLES]):
        cu = documents(kind, TOKENS, seed=j)
        tokens = torch.randint(0, EOD, (TOKENS,), generator=g)
        for end in cu[1:-1]:
            tokens[end - 1] = EOD
        tokens[-1] = EOD if j == 0 else tokens[-1]  # a sample ending in EOD, and one cut mid-document
        mask, loss_mask, positions = _get_ltor_masks_and_position_ids(tokens, EOD, reset_position_ids, True, True, True)
        labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
        samples.append(dict(tokens=tokens, labels=labels, attention_mask=mask, loss_mask=loss_mask,
                            position_ids=positions))
        row = torch.full((TOKENS + 1,), TOKENS, dtype=torch.int32)
        row[:len(cu)] = torch.tensor(cu)
        rows.append(row)
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    return batch, torch.stack(rows)


def _dataloader_documents(rank, world_size, position):
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnBackend

    from megatron_lightseq.distattn.plan import layout as layouts
    from megatron_lightseq.megatron.batch import get_document_batch_on_this_cp_rank

    layouts.MIN_CHUNK_TOKENS = 2
    case = Case(cp=world_size, layout="auto", position=position)
    mlm = setup_rank(case)
    losses = []
    # (documents read from reset position ids | after EOD | from core_v0.19.0's cu_seqlens rows)
    for source in ("positions", "eod", "rows"):
        batch, rows = _dataloader_batch(reset_position_ids=source != "eod")
        init_parallel(case, 1)
        model = build_model(case, cp=1, backend=AttnBackend.local)
        start = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
        plain = {k: v for k, v in batch.items() if k != "attention_mask"}
        base = _steps(model, plain, None, batch["attention_mask"], None)  # [b, 1, s, s], True: hidden
        init_parallel(case, case.cp)
        model = build_model(case, cp=case.cp, backend=mlm.lightseq_backend())
        model.load_state_dict(start)
        group, params = ps.get_context_parallel_group(), None
        if source == "rows":  # what core_v0.19.0's pretrain_gpt.py hands the split, and builds from it
            local = mlm.get_batch_on_this_cp_rank(dict(plain, cu_seqlens=rows))
            cu = local["cu_seqlens"].squeeze(0)
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
            assert local["tokens"].shape[0] == 1 and cu[-1] == SAMPLES * TOKENS
        else:
            local = get_document_batch_on_this_cp_rank(dict(batch), eod=EOD if source == "eod" else None)
            assert local["attention_mask"].numel() == 0  # the documents, not a dense mask
        ours = _steps(model, local, params, local.get("attention_mask"), group)
        tol = dict(rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(base[0]), **tol)
        for name in ours[1]:
            torch.testing.assert_close(ours[1][name], base[1][name], **tol, msg=lambda m: f"{source} grad {name}: {m}")
            torch.testing.assert_close(ours[2][name], base[2][name], **tol, msg=lambda m: f"{source} param {name}: {m}")
        losses.append(ours[0])
    return losses


@pytest.mark.parametrize("world_size,position", [(2, "rope"), (3, "learned_absolute")])
def test_documents_from_megatrons_dataloader_match_cp1_dense_mask(world_size, position):
    losses = run_ranks(world_size, _dataloader_documents, position)
    assert all(ls == losses[0] for ls in losses)


def test_document_boundaries_read_from_the_batch():
    """The boundaries each source gives, and bad rows named."""
    from megatron_lightseq.megatron.documents import merged_cu_seqlens, starts_from_eod, starts_from_positions

    tokens = torch.tensor([[5, 9, 1, 9, 3, 4], [9, 2, 2, 9, 8, 7]])  # EOD 9
    positions = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1]])
    assert starts_from_eod(tokens, 9) == (0, 2, 4, 6, 7, 10, 12)
    assert starts_from_positions(positions) == (0, 2, 4, 6, 7, 10, 12)
    assert merged_cu_seqlens(torch.tensor([[0, 2, 4, 6, 6, 6, 6], [0, 1, 4, 6, 6, 6, 6]]), 6) == (0, 2, 4, 6, 7, 10, 12)
    with pytest.raises(ValueError, match="row 1 must run from 0 to the sample's length 6"):
        merged_cu_seqlens([[0, 6, 6], [0, 3, 5]], 6)
    with pytest.raises(ValueError, match="must increase"):
        merged_cu_seqlens([[0, 3, 3, 6]], 6)
