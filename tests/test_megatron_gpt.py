"""GPTModel with the lightseq backend at CP = P equals the CP = 1 model with Megatron's attention."""
import pytest
import torch

pytest.importorskip("megatron.core")

from gpt_cases import Case, baseline, lightseq_run, setup_rank  # noqa: E402
from harness import run_ranks  # noqa: E402


def _compare(rank, world_size, case: Case, steps: int):
    mlm = setup_rank(case)
    start, base_losses, base_grads, base_params = baseline(case, steps)
    losses, grads, params = lightseq_run(case, mlm, start, steps)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), **tol)
    for name, g in grads.items():
        torch.testing.assert_close(g, base_grads[name], **tol, msg=lambda m: f"grad {name}: {m}")
    for name, p in params.items():
        torch.testing.assert_close(p, base_params[name], **tol, msg=lambda m: f"param {name}: {m}")
    return losses


CASES = {
    "cp2-zigzag-rope-gqa": Case(cp=2),
    "cp3-contiguous-learned-gqa": Case(cp=3, position="learned_absolute", layout="contiguous"),
    "cp4-zigzag-rope-lightseq": Case(cp=4, schedule="lightseq", layers=3),
    "cp2-contiguous-rope-mqa": Case(cp=2, groups=1, layout="contiguous", schedule="lightseq"),
    "tp2-cp2-zigzag-rope-gqa": Case(tp=2, cp=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lightseq_matches_cp1_megatron_attention(name):
    case = CASES[name]
    losses = run_ranks(case.tp * case.cp, _compare, case, 3)
    assert all(ls == losses[0] for ls in losses)
