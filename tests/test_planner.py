"""The planner's command: the search's answer (best LightSeq against best Megatron-native, flags,
sbatch line, JSON, plot), its speed at 4096 GPUs, the per-layer table for one configuration, its
errors; traffic pinned to hand-derived formulas and to what gloo runs send; every defect of the
old planner that the output showed."""
import dataclasses
import json
import os
import re
import shlex
import sys
import time

import pytest
import torch

import megatron_lightseq as mls
from harness import run_ranks
from megatron_lightseq.__main__ import main as cli_main
from megatron_lightseq.planner import search as search_module
from megatron_lightseq.planner.arguments import parse_seq_range
from megatron_lightseq.planner.cli import main as plan_main
from megatron_lightseq.planner.model import MODELS, Machine, ModelSpec, token_label
from megatron_lightseq.planner.search import search
from megatron_lightseq.planner.traffic import lightseq_traffic, tp_traffic

TINY = ModelSpec("tiny", layers=2, hidden=16, heads=4, kv_heads=2, ffn=32, vocab=64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ["--seq", "128k", "--gpus", "64", "--gpus-per-node", "8", "--global-batch", "16"]


def test_tp_traffic_hand_derived():
    # seq 8 x hidden 16 x 2 B = 256 B per activation; TP = 2 sends half of it per ring pass.
    no_sp = tp_traffic(TINY, 8, 2, sequence_parallel=False, recompute=False)
    assert (no_sp.forward, no_sp.backward) == (2 * 256, 2 * 256)  # 2 all-reduces each way, 2*(1/2)*256
    sp = tp_traffic(TINY, 8, 2, sequence_parallel=True, recompute=False)
    assert (sp.forward, sp.backward) == (4 * 128, 6 * 128)  # AG+RS per block fwd; AG+AG+RS per block bwd
    tp2 = tp_traffic(TINY, 8, 2, sequence_parallel=False, recompute=True)
    assert tp2.forward == 2 * no_sp.forward and tp2.backward == no_sp.backward  # recompute repeats the forward's
    # TP = 4 > 2 KV heads: Megatron also gathers the QKV output (8 x (16 + 2*8) x 2 B = 512 B) forward
    # and reduce-scatters its grad backward, 3/4 of it per GPU each.
    tp4 = tp_traffic(TINY, 8, 4, sequence_parallel=False, recompute=False)
    assert (tp4.forward, tp4.backward) == (2 * 2 * 192 + 384, 2 * 2 * 192 + 384)


def test_lightseq_traffic_hand_derived():
    # P = 2, 8 tokens: a rank's K or V is 4 tokens x 2 heads x 4 dims x 2 B = 64 B.
    ring = lightseq_traffic(TINY, 8, 2, "contiguous", "ring")
    assert (ring.forward, ring.backward) == (128, 128)  # busiest: rank 0 sends k,v; rank 1 returns dk,dv
    assert lightseq_traffic(TINY, 8, 2, "contiguous", "ring", remat=False).forward == 256  # the recompute's again


def _measured(rank, world_size, layout, schedule):
    q = torch.randn(1, 32 // world_size, TINY.heads, TINY.headdim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 32 // world_size, TINY.kv_heads, TINY.headdim, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    with mls.trace() as t:
        out = mls.dist_attn(q, k, v, layout=layout, schedule=schedule)
        fwd = t.bytes_sent
        out.sum().backward()
    return fwd, t.bytes_sent - fwd


@pytest.mark.parametrize("layout,schedule", [("contiguous", "lightseq"), ("zigzag", "ring")])
def test_plan_traffic_equals_gloo_measurement(layout, schedule):
    measured = run_ranks(4, _measured, layout, schedule)
    predicted = lightseq_traffic(TINY, 32, 4, layout, schedule)
    assert (predicted.forward, predicted.backward) == (max(f for f, _ in measured), max(b for _, b in measured))


def test_seq_range_parsing_and_labels():
    assert parse_seq_range("32k..256k") == [32768, 65536, 131072, 262144]
    assert parse_seq_range("1.5k") == [1536]
    assert [token_label(n) for n in (1536, 131072, 2**20, 640, 3 * 2**19)] == ["1.5K", "128K", "1M", "640", "1.5M"]


@pytest.mark.parametrize("kv_heads", [32, 8, 1])
def test_target_64_gpus_keeps_cp_in_a_node_and_states_the_speedup(kv_heads, capsys):
    assert plan_main([*TARGET, "--kv-heads", str(kv_heads), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS from the constants above, not measurements" in out
    assert re.search(r"LightSeq's predicted speedup over the best Megatron-native configuration on the same 64 GPUs: "
                     r"\d+\.\d\dx", out)
    assert "CP traffic stays inside a node" in out or "CP traffic crosses nodes (" in out
    assert "ANCHORS" not in out and "planner/model.py" in out


def test_target_json_and_flags(capsys):
    assert plan_main([*TARGET, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ls, mg = report["best"]["lightseq"], report["best"]["megatron"]
    for best in (ls, mg):
        assert {"tp", "cp", "pp", "dp", "cp_comm_type", "step_ms", "tokens_per_s_per_gpu", "mfu", "memory_gib",
                "flags"} <= set(best)
        assert best["tp"] * best["cp"] * best["pp"] * best["dp"] == 64 and best["memory_gib"] <= 72
        assert f"--context-parallel-size {best['cp']}" in best["flags"]
    for best in (ls, mg):  # no recompute: no --recompute flag, and the config that drops llama7b.sh's
        assert ("--recompute-granularity" in best["flags"]) == (best["recompute"] == "full")
        assert ("recompute/none" in best["sbatch"]) == (best["recompute"] == "none")
    assert "--attention-backend lightseq" in ls["flags"] and "--attention-backend auto" in mg["flags"]
    assert report["speedup"] == pytest.approx(ls["tokens_per_s_per_gpu"] / mg["tokens_per_s_per_gpu"])
    configs = re.search(r'CONFIGS="([^"]*)"', ls["sbatch"]).group(1).split()
    assert all(os.path.exists(os.path.join(ROOT, "configs", c + ".sh")) for c in configs), configs
    assert shlex.split(ls["sbatch"])[3] == "scripts/lightseq.sbatch"


def test_4096_gpus_1m_tokens_in_under_10_seconds():
    start = time.perf_counter()
    result = search(MODELS["llama-7b"], 2**20, 4096, 8, Machine(), progress=False)
    assert time.perf_counter() - start < 10 and result.best["lightseq"] and result.best["megatron"]
    assert result.searched > 1000 and result.global_batch * result.seq > 0


def test_progress_bar_on_stderr_past_2_seconds(monkeypatch):
    seen = {}

    def fake_tqdm(items, **kwargs):
        seen.update(kwargs)
        return items

    monkeypatch.setattr(search_module, "tqdm", fake_tqdm)
    search(TINY, 64, 4, 4, Machine(), global_batch=4)
    assert seen["delay"] == 2 and seen["file"] is sys.stderr and not seen["disable"]


def test_layer_table_max_seq_at_128_gpus(capsys):
    """The old table printed 0K for every TP row at 128 GPUs (2 x gpus x 1024 granularity)."""
    assert plan_main(["--seq", "128k", "--gpus", "128", "--tp", "1", "--cp", "128", "--pp", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(r["max_seq"] >= 128 * 1024 for r in rows if r["memory_bytes"] <= Machine().budget_bytes)
    assert any(r["system"].startswith("megatron TP=8") for r in rows)  # TP within the node, not TP=32


def test_layer_table_and_splits_agree_when_nothing_fits(capsys):
    """llama-13b, 8 GPUs, CP 8: the table said nothing fits while the split section gave a2a flags."""
    argv = ["--model", "llama-13b", "--seq", "128k", "--gpus", "8", "--tp", "1", "--cp", "8", "--pp", "1"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "-> no LightSeq plan fits" in out and "--cp-comm-type" not in out
    assert plan_main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recommended"] == {"131072": None} and report["hybrid"]["131072"]["best_split"] is None


def test_layer_table_labels_and_plot(tmp_path, capsys):
    png = tmp_path / "layer.png"
    assert plan_main(["--seq", "1.5k", "--gpus", "2", "--tp", "1", "--cp", "2", "--pp", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert " 1.5K lightseq" in out and " 1K lightseq" not in out and png.stat().st_size > 10_000


def test_search_plot(tmp_path, capsys):
    png = tmp_path / "search.png"
    assert plan_main(["--seq", "32k", "--gpus", "16", "--plot", str(png), "--no-progress"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out and png.stat().st_size > 10_000


def test_nothing_fits_recommends_nothing(capsys):
    assert plan_main(["--seq", "32k", "--gpus", "4", "--gpu-memory-gib", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best"] == {"lightseq": None, "megatron": None} and report["speedup"] is None
    assert plan_main(["--seq", "32k", "--gpus", "4", "--gpu-memory-gib", "1"]) == 0
    assert "-> no LightSeq plan fits 1 GiB per GPU at 32K" in capsys.readouterr().out


def test_documents_and_window_settle_the_flags(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3000 100 7000 12000 500\n")
    assert plan_main(["--seq", "32k", "--gpus", "8", "--tp", "1", "--cp", "8", "--pp", "1", "--docs", str(lengths),
                      "--window", "2k"]) == 0
    out = capsys.readouterr().out
    assert "Megatron THD would pad" in out and "window 2048" in out
    recommended = next(line for line in out.splitlines() if line.lstrip().startswith("->"))
    assert "--window-size 2048,0" in recommended


def test_documents_keep_the_plugin_on_flat_plans(capsys):
    """The plugin refuses hybrid CP on packed data: the search offers only its flat plans, and
    TransformerEngine's p2p (THD), for --docs."""
    assert plan_main(["--seq", "128k", "--gpus", "64", "--docs", "fixed:4k", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert best["lightseq"]["cp_comm_type"] == "p2p" and "--lightseq-layout auto" in best["lightseq"]["flags"]
    assert best["megatron"]["cp_comm_type"] in (None, "p2p")


@pytest.mark.parametrize("argv,message", [
    (["--seq", "32x"], "expected a token count"),
    (["--seq", "32k..64k", "--plot", "x.png"], "--plot draws one search: give one --seq length"),
    (["--seq", "1004", "--tp", "1", "--cp", "4", "--pp", "1"], "multiple of 2 x CP = 8"),
    (["--seq", "32k..40k"], "40960 is not 32768 x 2^n"),
    (["--heads", "5"], "hidden (4096) must divide by heads (5)"),
    (["--kv-heads", "5"], "heads (32) must divide by kv-heads (5)"),
    (["--gpus", "0"], "argument --gpus: expected an integer > 0, got '0'"),
    (["--kv-heads", "0"], "argument --kv-heads: expected an integer > 0"),
    (["--gpus-per-node", "0"], "argument --gpus-per-node: expected an integer > 0"),
    (["--nvlink-gbs", "0"], "argument --nvlink-gbs: expected a number > 0"),
    (["--attn-full", "1k:x"], "expected TOKENS:TFLOPS pairs"),
    (["--tp", "3"], "no configuration Megatron accepts"),
    (["--tp", "1", "--cp", "8", "--pp", "1"], "must divide --gpus 4"),
    (["--window", "-3"], "expected a window of >= 0 tokens, or -1 for none, got '-3'"),
    (["--plot", "/nonexistent/dir/x.png"], "the folder /nonexistent/dir does not exist"),
    (["--docs", "fixed:0"], "fixed: length must be >= 1 token, got 0"),
    (["--docs", "gauss:mean=2k"], "unknown distribution 'gauss' (known: lognormal, fixed), and no file named"),
])
def test_plan_command_errors(argv, message, capsys):
    # in-process through the command dispatcher: every error comes from parse_args, before any planning
    with pytest.raises(SystemExit) as exit:
        cli_main(["plan", "--seq", "32k", "--gpus", "4", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_model_sizes_override_the_preset(capsys):
    argv = ["--seq", "32k", "--gpus", "8", "--layers", "4", "--ffn", "8192", "--no-swiglu", "--json"]
    assert plan_main(argv) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["layers"], model["ffn"], model["swiglu"]) == (4, 8192, False)
    assert dataclasses.replace(MODELS["llama-7b"], layers=4).layer_params == MODELS["llama-7b"].layer_params


def test_paper_is_what_the_planner_writes():
    """docs/paper.md is regenerated by the planner (python -m megatron_lightseq.planner.paper), not edited."""
    from megatron_lightseq.planner import paper

    with open(os.path.join(ROOT, "docs", "paper.md")) as f:
        assert f.read() == paper.render(), "regenerate: python -m megatron_lightseq.planner.paper > docs/paper.md"
