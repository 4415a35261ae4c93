"""Megatron-LM's own pretrain_gpt.py with hybrid CP: ``--cp-comm-type a2a+p2p
--hierarchical-context-parallel-sizes 2 2`` (and plain ``a2a``) through the lightseq backend
gives Megatron's tensor-parallel losses at every iteration, a flag changed and nothing else.
Needs MEGATRON_LM (a Megatron-LM checkout, core_v0.16.1 or core_v0.19.0) and einops, which
Megatron's hierarchical groups use; both as for tests/test_pretrain_gpt.py."""
import os

import pytest

MEGATRON_LM = os.environ.get("MEGATRON_LM")
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM, reason="MEGATRON_LM is not set (a Megatron-LM checkout: core_v0.16.1 or core_v0.19.0)")

from pretrain_gpt_runs import ITERATIONS, checkout_copy, lightseq, pretrain  # noqa: E402


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    pytest.importorskip("einops")
    return checkout_copy(MEGATRON_LM, str(tmp_path_factory.mktemp("megatron-lm")))


@pytest.mark.parametrize("args", [
    ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2"],
    ["--cp-comm-type", "a2a"],
], ids=["a2a+p2p-2x2", "a2a"])
def test_hybrid_cp_gives_megatrons_losses(checkout, args, tmp_path):
    reference = pretrain(checkout, 2, ["--tensor-model-parallel-size", "2"], model="rope-gqa", plugin=False)
    got = pretrain(checkout, 4, lightseq(4) + args, model="rope-gqa", trace_dir=str(tmp_path))
    assert sorted(got.losses) == list(range(1, ITERATIONS + 1)), got.output[-3000:]
    assert got.losses == pytest.approx(reference.losses, rel=1e-5)
    # the flag is honoured: every rank ran the all-to-all, and point to point only with a p2p level
    assert all(c["a2a_bytes_sent"] > 0 and (c["bytes_sent"] > 0) == ("a2a+p2p" in args) for c in got.counters)
