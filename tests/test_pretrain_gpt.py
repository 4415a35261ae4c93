"""Megatron-LM's own pretrain_gpt.py end to end on CPU processes (torchrun, gloo, the CPU mode):
the lightseq backend gives Megatron's tensor-parallel losses at every iteration (CP = 2 and 3, both
layouts, every schedule, RoPE and learned positions, GQA and MQA, CP x TP, PP x CP with microbatches
in flight; with --sequence-parallel too, as does plain TP + SP), remat runs one attention forward per
layer, and torch_dist checkpoints move between parallelisms; on a real corpus (a tokenizer trained
here, indexed by Megatron's own tool), the training and validation losses of TP = 2, and with
Megatron's document masking those of CP = 1.
Needs MEGATRON_LM: a Megatron-LM checkout of core_v0.16.1 or core_v0.19.0 (never written to: the
runs use a copy); the real-corpus runs also need the sentencepiece package.
"""
import os
import zipfile

import pytest

MEGATRON_LM = os.environ.get("MEGATRON_LM")
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM, reason="MEGATRON_LM is not set (a Megatron-LM checkout: core_v0.16.1 or core_v0.19.0)")

from pretrain_gpt_runs import ITERATIONS, checkout_copy, indexed_corpus, lightseq, pretrain  # noqa: E402

REL = 1e-5
FIRST, RESUMED = [1, 2], [3, 4]  # iterations before and after the checkpoint
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
MICROBATCHES = 4  # global batch 4 of micro-batches of 1 (pretrain_gpt_runs.COMMON)


def losses_at(run, iterations):
    return {i: run.losses[i] for i in iterations if i in run.losses}


def assert_same_losses(got, want, iterations):
    assert sorted(got.losses) == sorted(iterations), got.output[-3000:]
    assert got.losses == pytest.approx(losses_at(want, iterations), rel=REL)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return checkout_copy(MEGATRON_LM, str(tmp_path_factory.mktemp("megatron-lm")))


# Plain Megatron (no plugin): TP = 2 for the GQA model; CP = TP = 1 for MQA (one K/V head does not
# split over TP); PP = 2 for pipelined runs (Megatron seeds each stage's weights apart).
REFERENCES = {
    "rope-gqa": (2, ["--tensor-model-parallel-size", "2"], "rope-gqa"),
    "learned-mqa": (1, [], "learned-mqa"),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"], "rope-gqa"),
}


class References(dict):
    def __init__(self, checkout):
        super().__init__()
        self.checkout = checkout

    def __missing__(self, name):
        nproc, args, model = REFERENCES[name]
        self[name] = pretrain(self.checkout, nproc, args, model=model, plugin=False)
        return self[name]


@pytest.fixture(scope="module")
def reference(checkout):
    """The reference runs, each run when first asked for."""
    return References(checkout)


@pytest.mark.parametrize("nproc,args,model", [
    (2, lightseq(2, "zigzag", "ring"), "rope-gqa"),
    (2, lightseq(2, "contiguous", "lightseq"), "rope-gqa"),
    (3, lightseq(3, "zigzag", "lightseq"), "learned-mqa"),
    (3, lightseq(3, "contiguous", "ring"), "learned-mqa"),
    (4, lightseq(2) + ["--tensor-model-parallel-size", "2"], "rope-gqa"),
], ids=["cp2-zigzag-ring", "cp2-contiguous-lightseq", "cp3-zigzag-lightseq-learned-mqa",
        "cp3-contiguous-ring-learned-mqa", "cp2xtp2"])
def test_lightseq_gives_megatrons_losses(checkout, reference, nproc, args, model):
    assert_same_losses(pretrain(checkout, nproc, args, model=model), reference[model], range(1, ITERATIONS + 1))


# The TP+SP baseline on CPU: Megatron's torch norm under --sequence-parallel (the CPU mode marks its
# weights for the TP gradient sum, as Apex's and TE's norms are marked), plain and with lightseq.
@pytest.mark.parametrize("nproc,args,plugin", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], False),
    # with full recompute: the SP all-gather then runs inside a custom backward (the CPU mode's placement)
    (4, lightseq(2) + ["--tensor-model-parallel-size", "2", "--sequence-parallel"] + RECOMPUTE, True),
], ids=["tp2-sp", "cp2xtp2-sp-recompute"])
def test_sequence_parallel_gives_tp_losses(checkout, reference, nproc, args, plugin):
    run = pretrain(checkout, nproc, args, plugin=plugin)
    assert "--sequence-parallel kept" in run.output
    assert_same_losses(run, reference["rope-gqa"], range(1, ITERATIONS + 1))


@pytest.mark.parametrize("nproc,args,layers_per_rank,ref", [
    (2, lightseq(2), 2, "rope-gqa"),
    (4, lightseq(2) + ["--pipeline-model-parallel-size", "2"], 1, "pp2"),  # 1F1B: microbatches in flight
], ids=["cp2", "pp2xcp2"])
def test_remat_runs_one_attention_forward_per_layer(checkout, reference, tmp_path, nproc, args, layers_per_rank,
                                                    ref):
    run = pretrain(checkout, nproc, args + RECOMPUTE, trace_dir=str(tmp_path))
    assert_same_losses(run, reference[ref], range(1, ITERATIONS + 1))
    # Megatron's full recompute runs each layer twice; remat answers the second from the first.
    once = layers_per_rank * MICROBATCHES * ITERATIONS
    assert [(c["forward_calls"], c["backward_calls"]) for c in run.counters] == [(once, once)] * nproc


# Checkpoints: saved at lightseq CP = 2 after 2 of 4 iterations (--exit-interval keeps the LR
# schedule of 4), resumed at other parallelisms. Megatron's own resume at unchanged parallelism
# does not reproduce the uninterrupted run past its first iteration (without the plugin too), so
# resumes are compared with the resume at CP = 2, and their first iteration with the uninterrupted run.
TORCH_DIST = ["--ckpt-format", "torch_dist"]


@pytest.fixture(scope="module")
def saved(checkout, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lightseq-cp2"))
    run = pretrain(checkout, 2, lightseq(2) + TORCH_DIST + ["--save", folder, "--save-interval", "2",
                                                            "--exit-interval", "2"])
    return folder, run


@pytest.fixture(scope="module")
def resumed_cp2(checkout, saved):
    return pretrain(checkout, 2, lightseq(2) + TORCH_DIST + ["--load", saved[0]])


def test_checkpoint_saved_mid_schedule_and_resumed_at_cp2(saved, resumed_cp2, reference):
    folder, run = saved
    assert_same_losses(run, reference["rope-gqa"], FIRST)
    assert open(os.path.join(folder, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    assert sorted(resumed_cp2.losses) == RESUMED
    assert resumed_cp2.losses[3] == pytest.approx(reference["rope-gqa"].losses[3], rel=REL)


def test_use_checkpoint_args_overrides_the_rotary_base_flag(checkout, saved):
    """docs/huggingface.md: with --use-checkpoint-args Megatron takes rotary_base (and the position
    embedding type, the dropouts) from the checkpoint over the command line's flags; a checkpoint
    whose arguments hold the default 10000 (as the HF converter's do) then runs with it."""
    run = pretrain(checkout, 2, lightseq(2) + TORCH_DIST + ["--load", saved[0], "--use-checkpoint-args",
                                                            "--rotary-base", "500000"])
    assert "Setting rotary_base to 10000 from checkpoint" in run.output


# A lightseq checkpoint names the backend in its pickled args: every resume loads with the plugin
# registered (the runner), whatever attention it then uses.
@pytest.mark.parametrize("nproc,args", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (1, []),
    (3, lightseq(3)),
], ids=["tp2", "cp1", "cp3-lightseq"])
def test_resume_at_another_parallelism(checkout, saved, resumed_cp2, reference, nproc, args, tmp_path):
    extra = TORCH_DIST + (["--save", str(tmp_path), "--save-interval", "2"] if nproc == 1 else [])
    run = pretrain(checkout, nproc, args + extra + ["--load", saved[0]])
    assert_same_losses(run, resumed_cp2, RESUMED)
    assert run.losses[3] == pytest.approx(reference["rope-gqa"].losses[3], rel=REL)
    if nproc == 1:  # plain Megatron at CP = 1 writes the same entries as the lightseq run at CP = 2
        assert _checkpoint_keys(str(tmp_path), 4) == _checkpoint_keys(saved[0], 2)


def _checkpoint_keys(folder, iteration):
    """The checkpoint's entries, less the per-process objects (RNG and rerun state, named
    <key>/shard_<rank>_<ranks>), which follow the number of processes, not the model."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(os.path.join(folder, f"iter_{iteration:07d}")).read_metadata()
    keys = {k for k in metadata.state_dict_metadata if "/shard_" not in k}
    assert any(k.startswith("decoder.layers.") for k in keys), sorted(keys)
    return keys


# TransformerEngine's core attention writes <layer>.self_attention.core_attention._extra_state in the
# torch checkpoint format (torch_dist leaves it out); LightSeqAttention has none. A stand-in for
# TE's attention (tests/te_standin.py) checks that strict loads go both ways: Megatron falls back
# to a non-strict load, printing "load_return:", when a strict one fails.
TORCH_FORMAT = ["--ckpt-format", "torch"]


def _holds_te_extra_state(folder, iteration):
    path = os.path.join(folder, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")
    with zipfile.ZipFile(path) as z:
        pickle = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    return b"core_attention._extra_state" in pickle


def test_strict_loads_between_te_attention_and_lightseq_checkpoints(checkout, reference, tmp_path):
    te_dir, ls_dir = str(tmp_path / "te"), str(tmp_path / "lightseq")
    te = pretrain(checkout, 1, TORCH_FORMAT + ["--save", te_dir, "--save-interval", "2", "--exit-interval", "2"],
                  plugin=False, te_standin=True)
    assert_same_losses(te, reference["rope-gqa"], FIRST)
    assert _holds_te_extra_state(te_dir, 2)
    ls = pretrain(checkout, 2, lightseq(2) + TORCH_FORMAT + ["--load", te_dir, "--save", ls_dir, "--save-interval", "2"])
    assert "successfully loaded checkpoint" in ls.output and "load_return" not in ls.output
    assert ls.losses[3] == pytest.approx(reference["rope-gqa"].losses[3], rel=REL)
    assert not _holds_te_extra_state(ls_dir, ITERATIONS)
    back = pretrain(checkout, 1, TORCH_FORMAT + ["--load", ls_dir], te_standin=True)  # nothing left to train
    assert "successfully loaded checkpoint" in back.output and "load_return" not in back.output


# A real corpus (tests/data/corpus.jsonl), a tokenizer trained on it, indexed with the checkout's
# own tools/preprocess_data.py --append-eod, evaluated every 2 iterations on held-out splits.
@pytest.fixture(scope="module")
def corpus(checkout, tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="the real-corpus runs train a SentencePiece tokenizer")
    return indexed_corpus(checkout, str(tmp_path_factory.mktemp("corpus")))


def assert_same_validation(got, want):
    assert sorted(got.validation) == [(2, "eval"), (4, "eval"), (4, "test"), (4, "validation")], got.output[-3000:]
    assert got.validation == pytest.approx(want.validation, rel=REL)


def test_real_corpus_lightseq_cp2_gives_tp2_losses_and_validation(checkout, corpus):
    tp2 = pretrain(checkout, 2, ["--tensor-model-parallel-size", "2"], plugin=False, data=corpus)
    ours = pretrain(checkout, 2, lightseq(2), data=corpus)
    assert_same_losses(ours, tp2, range(1, ITERATIONS + 1))
    assert_same_validation(ours, tp2)


# Documents from Megatron's own dataloader, two samples a micro-batch (laid end to end), EOD left
# out of the loss; per-token loss, since the balanced layout leaves CP ranks uneven token counts.
# The reference: Megatron's local attention at CP = 1 reading the dataset's dense document mask
# (TransformerEngine would not read it). Its RoPE model does not use position ids, so one
# reference serves the runs that reset them too.
DOCUMENTS = ["--eod-mask-loss", "--calculate-per-token-loss", "--micro-batch-size", "2"]
RESET = ["--reset-attention-mask"]


@pytest.fixture(scope="module")
def masked_reference(checkout, corpus):
    return pretrain(checkout, 1, DOCUMENTS + RESET, plugin=False, data=corpus)


def _has_flag(checkout, flag):
    return flag.encode() in open(os.path.join(checkout, "megatron", "training", "arguments.py"), "rb").read()


@pytest.mark.parametrize("nproc,args", [
    (3, lightseq(3, "auto") + RESET),  # documents after each EOD token
    (2, lightseq(2, "auto") + RESET + ["--reset-position-ids"]),  # documents where positions restart
    (2, lightseq(2, "auto") + ["--dataloader-inter-document-masking"]),  # core_v0.19.0: cu_seqlens per sample
], ids=["cp3-reset-attention-mask-eod", "cp2-reset-attention-mask-positions", "cp2-inter-document-masking"])
def test_real_corpus_documents_masked_as_megatrons_cp1(checkout, corpus, masked_reference, nproc, args):
    if "--dataloader-inter-document-masking" in args and not _has_flag(checkout, "--dataloader-inter-document-masking"):
        pytest.skip("this Megatron-LM tag has no --dataloader-inter-document-masking (core_v0.19.0 has)")
    ours = pretrain(checkout, nproc, DOCUMENTS + args, data=corpus)
    assert_same_losses(ours, masked_reference, range(1, ITERATIONS + 1))
    assert_same_validation(ours, masked_reference)
