"""GPTModel with the lightseq backend at CP = P equals the CP = 1 model with Megatron's attention."""
import pytest
import torch

pytest.importorskip("megatron.core")

from gpt_cases import Case, baseline, lightseq_run, setup_rank  # noqa: E402
from harness import run_ranks  # noqa: E402


def _compare(rank, world_size, case: Case, steps: int, close: float = 1e-5):
    mlm = setup_rank(case)
    start, base_losses, base_grads, base_params = baseline(case, steps)
    losses, grads, params = lightseq_run(case, mlm, start, steps)
    tol = dict(rtol=close, atol=close)
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


def test_int8_kv_wire_trains_as_cp1_within_its_rounding():
    """--lightseq-kv-wire int8: the K/V of the CP exchange are rounded to int8, so losses,
    gradients and weights stay within that rounding of the CP = 1 model's (and every rank agrees)."""
    case = Case(cp=2, kv_wire="int8")
    losses = run_ranks(2, _compare, case, 2, 3e-2)
    assert all(ls == losses[0] for ls in losses)
