"""The runner refuses, before any start-up work and on rank 0 once, the commands that Megatron or the
plugin would refuse later (bare asserts, raw KeyErrors, errors once per layer after seconds of
start-up) or run other than asked; each message says what was expected, what was given, what to do."""
import os
import warnings

import pytest

from megatron_lightseq import run
from megatron_lightseq.megatron.flags import check_backend_name, check_command, last_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGHTSEQ = ["--context-parallel-size", "4", "--attention-backend", "lightseq", "--attention-dropout", "0"]


@pytest.mark.parametrize("argv,message", [
    (["--context-parallel-size", "2", "--lightseq-schedule", "ring", "--lightseq-layout=contiguous"],
     "--lightseq-layout, --lightseq-schedule set options of the lightseq attention backend, but the command has no "
     "--attention-backend (Megatron's default: auto): add --attention-backend lightseq"),
    (["--attention-backend", "lightseq", "--attention-backend", "flash", "--lightseq-kernel", "torch"],
     "but the command has --attention-backend flash: add --attention-backend lightseq"),  # argparse keeps the last
    (["--context-parallel-size", "2", "--attention-backend", "lightseq"],
     "--attention-backend lightseq has no attention dropout; --attention-dropout is not given (Megatron's default: "
     "0.1): add --attention-dropout 0"),
    (["--attention-backend=lightseq", "--attention-dropout", "0.1"], "--attention-dropout is 0.1: add --attention-dropout 0"),
    (LIGHTSEQ + ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "3"],
     "--hierarchical-context-parallel-sizes 2 3 multiplies to 6, but --context-parallel-size is 4: give sizes whose "
     "product is the context-parallel size (at CP = 4, e.g. 2 2"),
    (LIGHTSEQ + ["--hierarchical-context-parallel-sizes", "2", "x"], "--hierarchical-context-parallel-sizes takes "
                                                                      "whole numbers, got '2 x'"),
    (LIGHTSEQ + ["--cp-comm-type", "a2a+p2p"], "--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A P"),
])
def test_a_command_megatron_would_refuse_later_is_refused_first(argv, message):
    with pytest.raises(ValueError) as raised:
        check_command(argv)
    assert message in str(raised.value)


def test_commands_that_run_pass():
    for argv in ([], ["--attention-backend", "flash"], LIGHTSEQ + ["--lightseq-schedule", "ring"],
                 LIGHTSEQ + ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2"],
                 ["--attention-backend", "lightseq", "--yaml-cfg", "run.yaml"]):  # dropout may come from the YAML
        check_command(argv)
    assert last_values(["--a", "1", "--a=2"], "--a") == ["2"] and last_values(["--b"], "--a") is None


def test_a_misspelt_backend_names_the_choices():
    backends = ["flash", "fused", "unfused", "local", "auto", "lightseq"]
    with pytest.raises(ValueError, match="--attention-backend must be one of flash, fused, unfused, local, auto, "
                                         "lightseq; got 'lightsq': did you mean 'lightseq'"):
        check_backend_name(["--attention-backend", "lightsq"], backends)
    check_backend_name(["--attention-backend", "lightseq"], backends)


def _script(tmp_path, source):
    path = tmp_path / "pretrain_stand_in.py"
    path.write_text(source)
    return str(path)


def test_runner_says_it_once_on_rank_0(tmp_path, capsys, monkeypatch):
    script = _script(tmp_path, "raise SystemExit('never run')\n")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run.main([script, "--lightseq-schedule", "ring"]) == 2
        err = capsys.readouterr().err
        assert ("error: --lightseq-schedule set options of the lightseq attention backend" in err) == said, err
        assert err.count("error:") == int(said)


def test_runner_without_cuda_asks_for_cpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    script = _script(tmp_path, "from megatron.training import pretrain\nraise SystemExit('never run')\n")
    assert run.main([script, *LIGHTSEQ]) == 2
    err = capsys.readouterr().err
    assert "error: no CUDA device here (torch.cuda.is_available() is False), and pretrain_stand_in.py needs one" in err
    assert f"add --cpu: python -m megatron_lightseq.run --cpu {script} ..." in err


def test_runner_names_the_backends_for_a_misspelt_one(tmp_path, capsys, monkeypatch):
    """Through the runner (Megatron's parser would end on a bare KeyError: 'lightsq'), before the script runs."""
    import sys

    pytest.importorskip("megatron.core")
    from megatron.core.models.gpt.gpt_model import GPTModel

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("RANK", raising=False)
    defaults = getattr(GPTModel.__init__, "lightseq_defaults", None)  # setup() registers the backend's defaults
    script = _script(tmp_path, "raise SystemExit('never run')\n")
    try:
        assert run.main([script, "--context-parallel-size", "2", "--attention-backend", "lightsq"]) == 2
    finally:
        if defaults is not None:
            GPTModel.__init__.lightseq_defaults = defaults
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert "error: --attention-backend must be one of " in err and "got 'lightsq': did you mean 'lightseq'?" in err, err


def test_cpu_mode_filters_only_the_listed_warnings():
    from megatron_lightseq.jobs.quiet import WARNINGS, quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        for message, _ in WARNINGS:
            warnings.warn(f"{message}. Falling back.", UserWarning)
        warnings.warn("Transformer Engine is required for this flag", UserWarning)
    assert [str(w.message) for w in caught] == ["Transformer Engine is required for this flag"]
