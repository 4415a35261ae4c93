"""The per-layer table's head x sequence splits (planner/hybrid.py): the choice, its reason and the
defects the old section had (a tie left unstated, "fall less than U times" on one node)."""
import dataclasses
import time

from megatron_lightseq.planner import hybrid
from megatron_lightseq.planner.model import MODELS, Machine
from megatron_lightseq.planner.search import TIE

LLAMA = MODELS["llama-7b"]


def test_fast_at_512_gpus():
    start = time.perf_counter()
    found = hybrid.choices(LLAMA, 512 * 1024, 512, 8, Machine())
    assert time.perf_counter() - start < 5 and [c.inner for c in found] == [1, 2, 4, 8, 16, 32]


def test_llama7b_128k_on_64_gpus():
    """MHA: the 8 x 8 split (all-to-all inside a node) is far faster than the flat plan and sends
    U times fewer bytes across nodes or better; MQA: a split still wins, on block length, and the
    reason names the K/V copies and that the cross-node bytes rise."""
    m = Machine()
    found = hybrid.choices(LLAMA, 128 * 1024, 64, 8, m)
    best, flat = hybrid.recommend(found), found[0]
    assert (best.inner, best.outer) == (8, 8), best
    assert best.seconds <= 0.5 * flat.seconds and best.cross_node_bytes * 6 <= flat.cross_node_bytes
    mqa = dataclasses.replace(LLAMA, kv_heads=1)
    found = hybrid.choices(mqa, 128 * 1024, 64, 8, m)
    best = hybrid.recommend(found)
    reason = hybrid.why(mqa, 128 * 1024, found, best)
    assert best.inner > 1 and best.replicated_kv_heads == best.inner - 1
    assert "7 copies, counted in the bytes" in reason and "more cross-node bytes" in reason
    assert "fall less than U times" not in reason  # they do not fall at all


def test_one_node_says_nothing_about_cross_node_bytes_falling():
    mqa = dataclasses.replace(LLAMA, kv_heads=1)
    found = hybrid.choices(mqa, 128 * 1024, 8, 8, Machine())
    reason = hybrid.why(mqa, 128 * 1024, found, hybrid.recommend(found))
    assert "no cross-node bytes either way (one node)" in reason and "fall less" not in reason


def test_a_tie_is_stated_with_its_rule():
    """Within TIE of a faster split the fewer cross-node bytes win, and the sentence says so."""
    found = hybrid.choices(LLAMA, 1024 * 1024, 64, 8, Machine())
    best = hybrid.recommend(found)
    faster = [c for c in found if c.system == "lightseq" and c.fits and c.seconds < best.seconds]
    reason = hybrid.why(LLAMA, 1024 * 1024, found, best)
    assert faster and all(c.cross_node_bytes > best.cross_node_bytes for c in faster)
    assert all(best.seconds - c.seconds <= TIE * c.seconds for c in faster)
    assert f"within {TIE:.1%} of" in reason and "a tie, which the fewer cross-node bytes win" in reason
