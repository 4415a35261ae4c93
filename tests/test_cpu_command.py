"""`run --cpu` takes the cluster's command unchanged: the flags that need CUDA become their local
equivalents, each change reported, the rest of the command left as it was."""
import pytest

from megatron_lightseq.jobs.megatron_cpu import cpu_command

CLUSTER = ["pretrain_gpt.py", "--num-layers", "2", "--transformer-impl", "transformer_engine", "--use-flash-attn",
           "--attention-backend", "flash", "--tp-comm-overlap", "--distributed-backend=nccl", "--no-rope-fusion",
           "--context-parallel-size", "2", "--lightseq-layout", "zigzag"]


def test_cluster_flags_replaced_and_each_change_said():
    argv, env = list(CLUSTER), {}
    notes = cpu_command(argv, env)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    kept = ["pretrain_gpt.py", "--num-layers", "2", "--no-rope-fusion", "--context-parallel-size", "2",
            "--lightseq-layout", "zigzag"]
    assert argv[:len(kept)] == kept
    added = argv[len(kept):]
    assert added[:6] == ["--distributed-backend", "gloo", "--transformer-impl", "local", "--attention-backend", "auto"]
    assert sorted(added[6:]) == sorted(["--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                                        "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
                                        "--no-bias-gelu-fusion"])
    assert "--use-flash-attn" not in argv and "--tp-comm-overlap" not in argv
    said = "\n".join(notes)
    for fragment in ("CUDA_DEVICE_MAX_CONNECTIONS=1 set", "--distributed-backend=nccl -> --distributed-backend gloo",
                     "--transformer-impl transformer_engine -> --transformer-impl local", "--use-flash-attn -> dropped",
                     "--attention-backend flash -> --attention-backend auto", "--no-persist-layer-norm added"):
        assert fragment in said, said
    assert "--no-rope-fusion added" not in said  # already there: nothing to say
    assert len(notes) == 6 + 5


def test_a_command_already_local_changes_only_the_defaults():
    argv = ["pretrain_gpt.py", "--attention-backend", "lightseq", "--transformer-impl", "local"]
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    notes = cpu_command(argv, env)
    assert argv[:5] == ["pretrain_gpt.py", "--attention-backend", "lightseq", "--transformer-impl", "local"]
    assert notes[0] == "--distributed-backend (default) -> --distributed-backend gloo: NCCL needs GPUs; gloo runs on CPU processes"
    assert not any("transformer-impl" in n or "attention-backend" in n for n in notes)


def test_dataset_helpers_are_built_for_this_interpreter(monkeypatch):
    """Megatron's own make, told this interpreter's suffix and headers (a checkout's .python-version
    must not choose them); without pybind11, the one install command."""
    import subprocess
    import sys
    import sysconfig

    from megatron_lightseq.jobs import dataset_helpers

    answers = {}
    monkeypatch.setattr(dataset_helpers.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, answers["rc"], stdout="-I/py/include -I/pybind11/include", stderr=""))
    answers["rc"] = 0
    command = dataset_helpers.make_command("/ckpt/megatron/core/datasets")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert command == ["make", "-C", "/ckpt/megatron/core/datasets", f"LIBEXT={suffix}",
                       "CPPFLAGS=-I/py/include -I/pybind11/include"]
    assert dataset_helpers.helpers_file("/d") == f"/d/helpers_cpp{suffix}"
    answers["rc"] = 1
    with pytest.raises(SystemExit) as refused:
        dataset_helpers.make_command("/ckpt/megatron/core/datasets")
    assert str(refused.value).endswith(f"building them needs pybind11, which it lacks: {sys.executable} -m pip "
                                       f"install pybind11")


def test_the_python_311_note_only_for_checkouts_that_need_it(tmp_path, monkeypatch):
    """core_v0.16.1 runs on Python 3.11 as it is: its smoke runs print no typing.override note;
    0.17 and later (Python >= 3.12 on the GPUs) do."""
    import sys
    import typing

    from megatron_lightseq.jobs import megatron_cpu

    for tag, minor in (("v16", 16), ("v19", 19)):
        info = tmp_path / tag / "megatron" / "core" / "package_info.py"
        info.parent.mkdir(parents=True)
        info.write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = 1\n")
    assert megatron_cpu.megatron_version([str(tmp_path / "nowhere"), str(tmp_path / "v19")]) == (0, 19)
    assert megatron_cpu.megatron_version([str(tmp_path / "nowhere")]) is None
    notes = {}
    monkeypatch.setattr(typing, "override", None, raising=False)  # so that the test leaves typing as it was
    for tag in ("v16", "v19"):
        monkeypatch.delattr(typing, "override", raising=False)  # as on Python 3.11
        monkeypatch.setattr(sys, "path", [str(tmp_path / tag), *sys.path])
        notes[tag] = megatron_cpu._python_311_typing()
        assert typing.override is not None  # put in place either way
    assert notes["v16"] is None
    assert notes["v19"].startswith("note: Python 3.11: typing.override taken from typing_extensions")
