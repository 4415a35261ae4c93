"""The Megatron glue around the core attention: registration, spec rewrite, flags, runner, refusals."""
import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_lightseq.megatron as mlm  # noqa: E402
from gpt_cases import Case, build_model, init_parallel, setup_rank  # noqa: E402
from harness import run_ranks  # noqa: E402
from megatron.core.transformer.enums import AttnBackend, AttnMaskType  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_register_is_idempotent_and_enum_round_trips():
    mlm.register()
    init = __import__("megatron.core.models.gpt.gpt_model", fromlist=["GPTModel"]).GPTModel.__init__
    mlm.register()
    assert __import__("megatron.core.models.gpt.gpt_model", fromlist=["GPTModel"]).GPTModel.__init__ is init
    assert [b.name for b in AttnBackend].count("lightseq") == 1
    assert AttnBackend["lightseq"] is AttnBackend("lightseq") is mlm.lightseq_backend()
    assert pickle.loads(pickle.dumps(AttnBackend["lightseq"])) is AttnBackend["lightseq"]


def test_flag_parses_the_way_megatron_builds_it():
    # Megatron 0.16+ builds --attention-backend from the TransformerConfig field:
    # choices=list(AttnBackend), type=AttnBackend[name] (argument_utils.ArgumentGroupFactory).
    mlm.register()
    parser = argparse.ArgumentParser()
    parser.add_argument("--attention-backend", type=lambda s: AttnBackend[s], choices=list(AttnBackend))
    assert parser.parse_args(["--attention-backend", "lightseq"]).attention_backend is AttnBackend["lightseq"]


def _megatron_training_arguments():
    """megatron.training.arguments, or a skip that says why it does not import here: the wheels
    before 0.17 hold megatron.core only; 0.17+ hold megatron.training too, which needs Python >= 3.12
    (typing.override, PEP 698). The CPU mode (run --cpu) puts a typing.override in place for its
    smoke runs, which this test of the released package does not."""
    from importlib.metadata import version

    try:
        with warnings.catch_warnings():  # its import's warnings (no TransformerEngine, no apex), as importorskip
            warnings.simplefilter("ignore")
            from megatron.training import arguments
    except ImportError as e:
        wheel = f"megatron-core {version('megatron-core')}"
        if "override" in str(e) and sys.version_info < (3, 12):
            pytest.skip(f"megatron.training of {wheel} needs Python >= 3.12 (typing.override), this is Python "
                        f"{sys.version_info.major}.{sys.version_info.minor}; run --cpu shims it for CPU smoke "
                        "runs only")
        if isinstance(e, ModuleNotFoundError) and e.name == "megatron.training":
            pytest.skip(f"{wheel} ships megatron.core only; megatron.training is in a Megatron-LM checkout")
        pytest.skip(f"megatron.training.arguments does not import with {wheel}: {e}")
    return arguments


def test_flag_parses_through_megatron_training_parser():
    arguments = _megatron_training_arguments()
    mlm.register()
    sys_argv = sys.argv
    try:
        sys.argv = ["pretrain_gpt.py", "--attention-backend", "lightseq", "--lightseq-layout", "contiguous"]
        args = arguments.parse_args(extra_args_provider=mlm.add_lightseq_args, ignore_unknown_args=True)
    finally:
        sys.argv = sys_argv
    assert args.attention_backend is AttnBackend["lightseq"] and args.lightseq_layout == "contiguous"


@pytest.mark.parametrize("argv,message", [
    (["--lightseq-schedule", "striped"], "invalid choice: 'striped'"),
    (["--lightseq-layout", "diagonal"], "invalid choice: 'diagonal'"),
    (["--lightseq-kernel", "cutlass"], "invalid choice: 'cutlass'"),
    (["--lightseq-kv-wire", "fp8"], "invalid choice: 'fp8'"),
    (["--lightseq-schedul", "ring"], "unknown ['--lightseq-schedul']"),
])
def test_flags_are_validated(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mlm.parse_lightseq_args(argv)


def test_main_job_flags_are_checked_before_any_process_starts(capsys, monkeypatch):
    """Each mistake is one flag error, not a traceback on every rank."""
    from megatron_lightseq.jobs.train import parse_args

    for launcher in ("SLURM_PROCID", "RANK", "WORLD_SIZE"):  # the processes this job would start: --local-ranks
        monkeypatch.delenv(launcher, raising=False)
    for argv, message in [
        (["--seq", "95", "--local-ranks", "2"], "--seq (95) must be a multiple of 4: the zigzag layout"),
        (["--local-ranks", "3"], "--heads (8) and --kv-heads (4) must be multiples of 3"),
        (["--hidden", "60"], "--hidden (60) must be a multiple of --heads (8)"),
        (["--kv-heads", "3"], "--heads (8) must be a multiple of --kv-heads (3)"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--packed", "no-such-file.txt"], "--packed no-such-file.txt:"),
        (["--plot", "/no/such/folder/p.png"], "the folder /no/such/folder does not exist"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err, argv
    assert parse_args(["--backends", "lightseq", "--local-ranks", "3", "--seq", "96"]).seq == 96  # CP needs no head split


def test_flags_are_taken_out_of_argv():
    config, rest = mlm.parse_lightseq_args(["--num-layers", "2", "--lightseq-schedule", "ring", "--lightseq-layout=contiguous",
                                            "--lightseq-kv-wire", "int8"])
    assert rest == ["--num-layers", "2"]
    assert config == mlm.LightSeqConfig(schedule="ring", layout="contiguous", kv_wire="int8")
    with pytest.raises(ValueError, match="--lightseq-kernel must be one of"):
        mlm.LightSeqConfig(kernel="nope")
    with pytest.raises(ValueError, match="--lightseq-kv-wire must be one of"):
        mlm.LightSeqConfig(kv_wire=None)


def test_runner_sets_up_and_runs_the_script_as_main():
    script = os.path.join(ROOT, "tests", "data", "show_setup.py")
    run = subprocess.run([sys.executable, "-m", "megatron_lightseq.run", script, "--num-layers", "2",
                          "--lightseq-layout", "contiguous", "--attention-backend", "lightseq", "--attention-dropout", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["argv"] == ["--num-layers", "2", "--attention-backend", "lightseq", "--attention-dropout", "0"]
    assert "lightseq" in report["backends"] and report["main"] == "__main__"
    assert report["batch_split_wired"] and report["thd_split_wired"] and "contiguous" in str(report["config"])


def test_setup_twice_on_one_argv_keeps_the_commands_settings(monkeypatch):
    """The runner sets up sys.argv, then a patched pretrain_gpt.py calls setup() on the same list,
    whose --lightseq-* flags are gone: the command's settings stand (they used to fall back to the
    defaults, the batch split keeping the first call's layout: wrong attention, no error). A new
    command's settings replace them, batch split included."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_lightseq.megatron import prepare

    monkeypatch.setattr(prepare, "_wired", [])
    monkeypatch.setattr(prepare, "_set_up", [])
    mlm.register()
    monkeypatch.setattr(GPTModel.__init__, "lightseq_defaults", GPTModel.__init__.lightseq_defaults)
    command = ["--attention-backend", "lightseq", "--attention-dropout", "0"]
    argv = ["pretrain_gpt.py", "--lightseq-layout", "contiguous", *command]
    prepare.setup(argv)
    prepare.setup(argv)
    assert argv[1:] == command
    assert GPTModel.__init__.lightseq_defaults.layout == "contiguous"
    assert prepare.layout_for(prepare._wired[0], False) == "contiguous"
    prepare.setup(["pretrain_gpt.py", "--lightseq-layout", "zigzag", *command])
    assert GPTModel.__init__.lightseq_defaults.layout == prepare._wired[0].layout == "zigzag"


def test_runner_rejects_a_bad_flag_and_a_missing_script():
    script = os.path.join(ROOT, "tests", "data", "show_setup.py")
    run = subprocess.run([sys.executable, "-m", "megatron_lightseq.run", script, "--lightseq-layout", "spiral",
                          "--attention-backend", "lightseq", "--attention-dropout", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "invalid choice: 'spiral'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "megatron_lightseq.run", "no_such_script.py"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "error: no script 'no_such_script.py'" in run.stderr


def _spec_cases(rank, world_size):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    setup_rank(Case(cp=1))
    init_parallel(Case(cp=1), 1)
    slot = lambda layer: layer.submodules.self_attention.submodules.core_attention
    settings = mlm.LightSeqConfig(layout="contiguous")
    is_ours = lambda spec: spec == ModuleSpec(module=mlm.LightSeqAttention, params={"settings": settings})
    # local spec
    local = get_gpt_layer_local_spec()
    assert is_ours(slot(mlm.with_lightseq_attention(local, settings)))
    assert slot(local) is not mlm.LightSeqAttention  # the given spec is left as it was
    # MoE decoder block spec: every layer
    moe = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_moe_experts=2, moe_router_topk=2,
                            moe_ffn_hidden_size=16, use_cpu_initialization=True)
    block = mlm.with_lightseq_attention(get_gpt_decoder_block_spec(moe, use_transformer_engine=False, pp_rank=0),
                                        settings)
    assert all(is_ours(slot(s)) for s in block.layer_specs) and len(block.layer_specs) == 3
    # TransformerEngine's layout of the spec (TE classes are not importable here: stand-ins)
    class TEDotProductAttention: ...
    te_like = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        self_attention=ModuleSpec(module=SelfAttention, submodules=SelfAttentionSubmodules(
            linear_qkv=object, core_attention=TEDotProductAttention, linear_proj=object))))
    assert is_ours(slot(mlm.with_lightseq_attention(te_like, settings)))
    # a GPTModel with another backend keeps Megatron's attention; with lightseq it gets ours
    other = build_model(Case(cp=1), cp=1, backend=AttnBackend.local)
    ours = build_model(Case(cp=1), cp=1, backend=AttnBackend["lightseq"])
    kinds = lambda m: {type(layer.self_attention.core_attention).__name__ for layer in m.decoder.layers}
    assert kinds(other) == {"DotProductAttention"} and kinds(ours) == {"LightSeqAttention"}
    # models with different settings side by side: each core attention has its own model's
    contiguous = build_model(Case(cp=1, layout="contiguous", schedule="ring"), cp=1, backend=AttnBackend["lightseq"])
    used = lambda m: {layer.self_attention.core_attention.settings for layer in m.decoder.layers}
    assert used(ours) == {mlm.LightSeqConfig(layout="zigzag")}
    assert used(contiguous) == {mlm.LightSeqConfig(layout="contiguous", schedule="ring")}
    return True


def test_spec_rewrite_local_moe_and_te_layouts():
    assert run_ranks(1, _spec_cases) == [True]


def _refusals(rank, world_size):
    import dataclasses

    setup_rank(Case(cp=2))
    init_parallel(Case(cp=2), 2)
    model = build_model(Case(cp=2), cp=2, backend=AttnBackend["lightseq"])
    attn = model.decoder.layers[0].self_attention.core_attention
    q = torch.randn(6, 2, 4, 8)
    k = torch.randn(6, 2, 2, 8)
    seen = []
    from megatron.core.packed_seq_params import PackedSeqParams

    for kwargs in (dict(attention_bias=torch.zeros(1)), dict(packed_seq_params=PackedSeqParams(qkv_format="thd")),
                   dict(attn_mask_type=AttnMaskType.padding)):
        with pytest.raises(NotImplementedError) as e:
            attn(q, k, k, None, **kwargs)
        seen.append(str(e.value))
    with pytest.raises(NotImplementedError, match="--attention-dropout 0"):
        mlm.LightSeqAttention(dataclasses.replace(model.config, attention_dropout=0.1), 1, AttnMaskType.causal)
    out = attn(q, k, k, None)  # the good call still works on both ranks
    assert out.shape == (6, 2, 32)
    return seen


def test_unsupported_features_are_refused_by_name():
    seen = run_ranks(2, _refusals)[0]
    assert "attention_bias" in seen[0] and "packed_seq_params" in seen[1] and "padding" in seen[2]


def _failing_layer(rank, world_size):
    import megatron_lightseq as mls
    from gpt_cases import full_batch, total_loss
    from test_reliability import _Faulty

    mlm = setup_rank(Case(cp=2))
    _Faulty.mode, _Faulty.phase, _Faulty.at = "raise", "forward", 3  # the second layer's first block
    mls.kernels.register_kernel("faulty", _Faulty)
    case = Case(cp=2, kernel="faulty")
    init_parallel(case, 2)
    model = build_model(case, cp=2, backend=AttnBackend["lightseq"])
    with pytest.raises(mls.DistAttnError) as e:
        total_loss(model, mlm.get_batch_on_this_cp_rank(full_batch(), layout=case.layout)).backward()
    return str(e.value)


def test_errors_name_the_megatron_layer():
    messages = run_ranks(2, _failing_layer)
    assert all("failed first on rank 1 of 2 (forward step" in m or m.startswith("dist_attn failed on rank 1")
               for m in messages), messages
    assert all(", layer 2): RuntimeError: injected kernel fault" in m for m in messages), messages
