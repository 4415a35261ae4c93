"""What the commands say to a newcomer: every option's default (and unit) in --help, the plan
table's assumed machine and columns, plots that show every series and what the text prints, and a
missing matplotlib named with the extra to install. All in-process, no rank started."""
import argparse
import ast
import os
import re
import sys

import pytest

from megatron_lightseq.__main__ import main as cli_main
from megatron_lightseq.jobs import attn_demo, train
from megatron_lightseq.planner import cli as plan_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"plan": plan_cli.build_parser, "train": train.build_parser, "attn-demo": attn_demo.build_parser}


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return action.help % {**vars(action), "prog": parser.prog}  # what argparse prints for it


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_help_with_its_default(command):
    parser = PARSERS[command]()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 8
    for action in options:
        assert action.help, action.option_strings
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue  # a switch: off unless given
        text = _expanded_help(parser, action)
        match = re.search(r"\(default:? ([^)]*)", text)
        assert match, (action.option_strings, text)
        if action.default is not None:  # the real default, not a description that could drift from it
            shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert match.group(1).startswith(shown), (action.option_strings, text)


def test_plan_help_gives_units_and_the_machine_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert exit.value.code == 0
    for flag, unit in (("--nvlink-gbs", "GB/s"), ("--ib-gbs", "GB/s"), ("--gpu-memory-gib", "GiB")):
        assert f"{flag} {unit} " in text, flag  # the unit is the metavar
    assert text.count("10^9 bytes/s, not Gb/s") == 2 and "(default: 450)" in text and "(default: 50," in text
    assert "of which 90% is planned for" in text and "(default: 80)" in text and "(default: 128k)" in text


def test_attn_demo_help_names_every_kernel_present_or_not():
    parser = attn_demo.build_parser()
    text = _expanded_help(parser, next(a for a in parser._actions if "--kernel" in a.option_strings))
    from megatron_lightseq.kernels import OPTIONAL, kernel_names

    for name in (*kernel_names(), *OPTIONAL):
        assert name in text, name
    absent = [name for name in OPTIONAL if name not in kernel_names()]
    assert all(f"{name}, which needs" in text for name in absent) and "(default: auto" in text


def test_plan_header_states_the_machine_and_what_the_columns_count(capsys):
    # not the defaults, so that the header can only come from the flags
    assert plan_cli.main(["--seq", "32k", "--gpus", "16", "--gpus-per-node", "4", "--gpu-memory-gib", "141",
                          "--nvlink-gbs", "300", "--ib-gbs", "25", "--tp", "1", "--cp", "16", "--pp", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    columns = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seq", "system"])
    header = "\n".join(lines[:columns])
    assert lines[0].startswith("llama-7b: 32 layers, hidden 4096, 32 heads, 32 KV heads, bf16")
    assert "16 GPUs, 4 per node; 141 GiB per GPU, 90% usable (126.9 GiB)" in header
    assert "NVLink 300 GB/s within a node, network 25 GB/s between nodes" in header
    assert "GEMMs 550 TFLOP/s; attention 64..325 TFLOP/s" in header
    for column in ("MiB/GPU/layer", "steps", "ms/layer", "GiB/GPU", "max seq"):  # each column explained
        assert any(line.split()[:len(column.split())] == column.split() for line in lines[:columns]), column
    assert "bytes a GPU sends, forward + backward" in header
    assert "attention steps per pass" in header and "fits 126.9 GiB per GPU" in header


def test_plan_plot_tells_every_series_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_lightseq.planner import layer_table, plot

    args, model, machine = plan_cli.parse_args(["--seq", "32k..256k", "--gpus", "16", "--gpu-memory-gib", "60",
                                                "--tp", "1", "--cp", "16", "--pp", "1"])
    cfg = plan_cli._layer_config(args, model)
    by_seq = {seq: layer_table.rows_for(model, seq, cfg, args.gpus_per_node, machine) for seq in args.seq}
    fig = plot.layer_figure(by_seq, model, machine, "16 GPUs")
    try:
        for ax in fig.axes:
            lines = ax.get_lines()
            assert len(lines) == len(by_seq[args.seq[0]]) == len({(ln.get_marker(), ln.get_linestyle()) for ln in lines})
            assert [t.get_text() for t in ax.get_xticklabels()] == ["32K", "64K", "128K", "256K"]
            assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == len(lines)
            assert len(ax.get_yticks()) >= 3  # 1-2-5 per decade, not decades only
        oom = [t.get_text() for t in fig.axes[0].get_legend().get_texts() if "OOM" in t.get_text()]
        first = {r.system: r.seq // 1024 for rows in reversed(by_seq.values()) for r in rows
                 if r.memory_bytes > machine.budget_bytes}  # 60 GiB: some fit up to 128K, some not even that
        assert oom == [f"{name} (OOM from {k}K)" for name, k in first.items()] and 0 < len(oom) < len(lines)
    finally:
        plt.close(fig)


def test_demo_plot_shows_what_the_text_prints():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_lightseq.jobs.train_plot import figure

    results = {"lightseq": dict(losses=[6.2, 6.3], tokens_per_s=1599.0, bytes_per_layer=480 * 1024,
                                bytes_outside_layers=0, world=4),
               "tp": dict(losses=[6.2, 6.3], tokens_per_s=1973.0, bytes_per_layer=1536 * 1024,
                          bytes_outside_layers=777 * 1024, world=4)}
    fig = figure(results, {"lightseq": 480 * 1024, "tp": 1536 * 1024}, on_cpu=True)
    try:
        labels = {ax: [t.get_text() for t in ax.texts] for ax in fig.axes}
        _, traffic, speed = fig.axes
        assert labels[speed] == ["1599", "1973"] and "tokens" in speed.get_ylabel()
        assert "777" in labels[traffic] and labels[traffic].count("1536") == 2
        assert any("outside the layers" in t.get_text() for t in traffic.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_setup_has_the_extra_the_messages_name():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    assert "matplotlib" in extras["plot"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """As where matplotlib is not installed: its import fails (ModuleNotFoundError), in this process."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_plan_plot_without_matplotlib_names_the_extra_before_planning(no_matplotlib, tmp_path, capsys):
    png = tmp_path / "plan.png"
    with pytest.raises(SystemExit) as exit:
        cli_main(["plan", "--seq", "32k", "--gpus", "4", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == "" and not png.exists()
    assert "--plot needs matplotlib, which does not import here" in err and "pip install -e .[plot]" in err
    assert "Traceback" not in err


def test_train_without_matplotlib_skips_its_default_plot_and_refuses_an_asked_one(no_matplotlib, tmp_path, capsys,
                                                                                  monkeypatch):
    for launcher in ("SLURM_PROCID", "RANK", "WORLD_SIZE"):  # as a local run: rank 0 checks the files
        monkeypatch.delenv(launcher, raising=False)
    args = train.parse_args([])
    assert args.plot == ""
    note = capsys.readouterr().err
    assert note.startswith("note: no lightseq_vs_tp.png: the plot needs matplotlib") and ".[plot]" in note
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "needs matplotlib, which does not import here" in err and "--plot ''" in err
    assert train.parse_args(["--plot", ""]).plot == "" and capsys.readouterr().err == ""


def test_train_plots_by_default_where_matplotlib_imports(monkeypatch):
    pytest.importorskip("matplotlib")
    for launcher in ("SLURM_PROCID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(launcher, raising=False)
    args = train.parse_args(["--lightseq-schedule", "ring"])
    assert args.plot == train.DEFAULT_PLOT and args.lightseq.schedule == "ring"
    assert not any(name.startswith("lightseq_") for name in vars(args))  # the settings live in args.lightseq only


def test_plan_piped_into_head_ends_without_a_traceback():
    """`plan ... | head -1`: the closed pipe ends the output quietly (it printed a BrokenPipeError)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(f"{sys.executable} -m megatron_lightseq plan --seq 32k..512k --gpus 16 | head -1",
                          shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("llama-7b:"), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_top_level_help_is_plain_text_naming_every_command(capsys):
    from megatron_lightseq import run

    assert cli_main(["--help"]) == 0 and run.main(["--help"]) == 0
    said = capsys.readouterr().out
    assert "`" not in said, said  # reStructuredText markup reads as noise in a terminal
    for command in ("train", "plan", "attn-demo", "hf-flags"):
        assert f"\n  {command} " in said, command
