"""The planner: traffic pinned to hand-derived formulas, plan traffic equal to what gloo runs send,
the CLI's output and errors."""
import dataclasses
import json

import pytest
import torch

import megatron_lightseq as mls
from harness import run_ranks
from megatron_lightseq.__main__ import main as cli_main
from megatron_lightseq.planner.cli import main as plan_main, parse_seq_range
from megatron_lightseq.planner.masks import documents
from megatron_lightseq.planner.memory import lightseq_memory, max_sequence, tp_memory
from megatron_lightseq.planner.model import MODELS, Machine, ModelSpec
from megatron_lightseq.planner.traffic import lightseq_traffic, megatron_cp_traffic, tp_traffic

TINY = ModelSpec("tiny", layers=2, hidden=16, heads=4, kv_heads=2, ffn=32, vocab=64)


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


def test_lightseq_and_cp_traffic_hand_derived():
    # P = 2, 8 tokens: a rank's K or V is 4 tokens x 2 heads x 4 dims x 2 B = 64 B.
    ring = lightseq_traffic(TINY, 8, 2, "contiguous", "ring")
    assert (ring.forward, ring.backward) == (128, 128)  # busiest: rank 0 sends k,v; rank 1 returns dk,dv
    no_remat = lightseq_traffic(TINY, 8, 2, "contiguous", "ring", remat=False)
    assert no_remat.forward == 256  # the recompute sends the forward's K/V again
    cp = megatron_cp_traffic(TINY, 8, 2, recompute=False)
    assert (cp.forward, cp.backward) == (128, 256)


def _measured(rank, world_size, layout, schedule):
    q = torch.randn(1, 32 // world_size, TINY.heads, TINY.headdim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 32 // world_size, TINY.kv_heads, TINY.headdim, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    with mls.trace() as t:
        out = mls.dist_attn(q, k, v, layout=layout, schedule=schedule)
        fwd = t.bytes_sent
        out.sum().backward()
    return fwd, t.bytes_sent - fwd


@pytest.mark.parametrize("layout,schedule", [("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq")])
def test_plan_traffic_equals_gloo_measurement(layout, schedule):
    measured = run_ranks(4, _measured, layout, schedule)
    predicted = lightseq_traffic(TINY, 32, 4, layout, schedule)
    assert (predicted.forward, predicted.backward) == (max(f for f, _ in measured), max(b for _, b in measured))


def test_memory_model_and_max_sequence():
    m = Machine()
    llama = MODELS["llama-7b"]
    assert lightseq_memory(llama, 2**16, 8) < lightseq_memory(llama, 2**17, 8)
    assert lightseq_memory(llama, 2**16, 8, remat=False) < lightseq_memory(llama, 2**16, 8)
    assert tp_memory(llama, 2**16, 8, sequence_parallel=True) < tp_memory(llama, 2**16, 8, sequence_parallel=False)
    longest = max_sequence(lambda n: lightseq_memory(llama, n, 8), m, 16 * 1024)
    budget = m.gpu_memory_gib * 2**30 * m.usable_fraction
    assert lightseq_memory(llama, longest, 8) <= budget < lightseq_memory(llama, longest + 16 * 1024, 8)
    # Fewer heads cap Megatron's TP degree, not LightSeq's sequence split.
    few = dataclasses.replace(llama, heads=8, kv_heads=8)
    assert max_sequence(lambda n: tp_memory(few, n, 16, sequence_parallel=True), m, 32768) < \
        max_sequence(lambda n: tp_memory(llama, n, 16, sequence_parallel=True), m, 32768)


def test_seq_range_parsing():
    assert parse_seq_range("32k..256k") == [32768, 65536, 131072, 262144]
    assert parse_seq_range("4096") == [4096]
    assert parse_seq_range("32k..32k") == [32768]


def test_plan_command_table_json_and_plot(tmp_path, capsys):
    assert plan_main(["--seq", "32k..64k", "--gpus", "8", "--kv-heads", "8"]) == 0
    table = capsys.readouterr().out
    assert "lightseq contiguous/lightseq" in table and "megatron TP=8+SP" in table and "--attention-backend lightseq" in table
    png = tmp_path / "plan.png"
    assert plan_main(["--seq", "32k..64k", "--gpus", "16", "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rows"]) == 2 * 6 and set(report["recommended"]) == {"32768", "65536"}
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["--seq", "32x"], "expected a token count"),
    (["--seq", "1000", "--gpus", "8"], "multiple of 2 x gpus = 16"),
    (["--seq", "32k..40k"], "40960 is not 32768 x 2^n"),  # the doubling would stop at 32K
    (["--heads", "5"], "hidden (4096) must divide by heads (5)"),
    (["--kv-heads", "5"], "heads (32) must divide by kv-heads (5)"),
    (["--gpus", "0"], "argument --gpus: expected an integer > 0, got '0'"),
    (["--gpus", "-4"], "argument --gpus: expected an integer > 0, got '-4'"),
    (["--kv-heads", "0"], "argument --kv-heads: expected an integer > 0"),  # these four divided by zero
    (["--heads", "0"], "argument --heads: expected an integer > 0"),
    (["--gpus-per-node", "0"], "argument --gpus-per-node: expected an integer > 0"),
    (["--nvlink-gbs", "0"], "argument --nvlink-gbs: expected a number > 0"),
    (["--ib-gbs", "-1"], "argument --ib-gbs: expected a number > 0"),
    (["--layers", "-2"], "argument --layers: expected an integer > 0"),
    (["--gpu-memory-gib", "0"], "argument --gpu-memory-gib: expected a number > 0"),
    (["--window", "-3"], "expected a window of >= 0 tokens, or -1 for none, got '-3'"),
    (["--plot", "/nonexistent/dir/x.png"], "the folder /nonexistent/dir does not exist"),
    (["--docs", "fixed:0"], "fixed: length must be >= 1 token, got 0"),  # used to loop forever
    (["--docs", "fixed:-5"], "fixed: length must be >= 1 token, got -5"),
    (["--docs", "lognormal:median=2k,mean=1k"], "at least the median"),
    (["--docs", "lognormal:median=0"], "the median must be >= 1 token, got 0"),
    (["--docs", "lognormal:median=abc"], "median: expected a token count like 2k or 2048, got 'abc'"),
    (["--docs", "lognormal:median=2k=3"], "expected key=value pairs separated by commas, got 'median=2k=3'"),
    (["--docs", "lognormal:median=2k,mean=8k,foo=1"], "unknown parameter 'foo'; it takes median, mean"),
    (["--docs", "gauss:mean=2k"], "unknown distribution 'gauss' (known: lognormal, fixed), and no file named"),
    (["--docs", "LENGTHS"], "line 2: expected positive integer document lengths separated by whitespace, got 'abc'"),
])
def test_plan_command_errors(argv, message, tmp_path, capsys):
    # in-process through the command dispatcher: every error comes from parse_args, before any planning
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3000 100\nabc\n")
    with pytest.raises(SystemExit) as exit:
        cli_main(["plan", "--seq", "32k", "--gpus", "4", *[str(lengths) if a == "LENGTHS" else a for a in argv]])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_plan_command_recommends_nothing_that_does_not_fit(capsys):
    assert plan_main(["--seq", "32k", "--gpus", "4", "--gpu-memory-gib", "1"]) == 0
    assert "-> no LightSeq plan fits 1 GiB per GPU at 32K" in capsys.readouterr().out
    assert plan_main(["--seq", "32k", "--gpus", "4", "--gpu-memory-gib", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"] == {"32768": None}


def test_plan_command_reports_documents_and_windows(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3000 100 7000 12000 500\n")
    assert plan_main(["--seq", "32k", "--gpus", "8", "--docs", str(lengths), "--window", "2k"]) == 0
    out = capsys.readouterr().out
    assert "Megatron THD would pad" in out and "window 2048" in out
    masked = [line for line in out.splitlines() if line.strip().startswith(("balanced", "zigzag ", "contiguous"))]
    assert len(masked) == 7 and all(line.split()[-1] == "0" for line in masked)  # the plain row too; 32K: no padding
    # the flags follow the masked table, not the plain causal one: auto (balanced for packed documents)
    # rather than a zigzag that would override it, and the model's window
    recommended = next(line for line in out.splitlines() if "->" in line)
    assert "--lightseq-layout auto" in recommended and recommended.endswith("--window-size 2048,0")


def test_plan_command_counts_padded_documents(capsys):
    """A length the documents' chunks do not divide is padded: bytes for what each rank holds."""

    assert plan_main(["--seq", "32766", "--gpus", "3", "--docs", "fixed:1k", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["masks"]["32766"]
    got = next(r for r in rows if (r["layout"], r["schedule"]) == ("balanced", "ring"))
    plan = mls.build_plan("ring", layout="balanced", world_size=3, cu_seqlens=documents("fixed:1k", 32766))
    shape = mls.Shape(1, plan.layout.padded_tokens // 3, 32, 32, 128, torch.bfloat16)  # llama-7b
    assert got["padding"] == plan.layout.padded_tokens - 32766 > 0
    assert got["bytes_per_gpu"] == max(plan.traffic(r, shape) for r in range(3))
