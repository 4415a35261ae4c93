"""Megatron-LM's own pretrain_gpt.py on local CPU processes (torchrun, gloo) through the CPU mode,
for tests/test_pretrain_gpt.py: a working copy of the checkout, the tiny GPTs, a real corpus
indexed the way Megatron's users index theirs, one run, its training and validation losses.

The checkout is copied (its Python tree only) because Megatron builds its C++ dataset helpers inside
megatron/core/datasets on first use: the user's checkout is never written to.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TE_STANDIN = os.path.join(ROOT, "tests", "data", "pretrain_gpt_te_standin.py")
ITERATIONS = 4
# Two layers so that PP = 2 has a layer per stage; seq 96 splits into 2 x CP chunks for CP = 2 and 3;
# vocab 511 so that TP = 1 and 2 pad it to the same 512 rows (the same initial weights);
# micro-batch 1 of 4: four microbatches per iteration (in flight together under PP).
COMMON = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "96", "--max-position-embeddings", "96",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERATIONS), "--log-interval", "1",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
    "--attention-dropout", "0", "--hidden-dropout", "0",
    # the same initial weights at any TP (CPU init splits one master weight), no fused CUDA ops
    "--use-cpu-initialization", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-gelu-fusion", "--no-rope-fusion",
    "--no-persist-layer-norm",
]
MOCK = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "511", "--mock-data", "--eval-iters", "0",
        "--eval-interval", "1000"]
CORPUS = os.path.join(ROOT, "tests", "data", "corpus.jsonl")  # tests/data/make_corpus.py says what it is
# 500 pieces: Megatron pads the vocabulary to 512 rows at TP = 1 and 2 alike (the same initial weights).
VOCAB = 500
MODELS = {
    "rope-gqa": ["--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2"],
    "learned-mqa": ["--position-embedding-type", "learned_absolute", "--group-query-attention",
                    "--num-query-groups", "1"],
}
_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+)")
_VALIDATION = re.compile(r"validation loss at iteration (\d+)(?: on (validation|test) set)? \| lm loss value: ([0-9.Ee+-]+)")


def lightseq(cp: int, layout: str = "zigzag", schedule: str = "auto") -> list[str]:
    return ["--context-parallel-size", str(cp), "--attention-backend", "lightseq",
            "--lightseq-layout", layout, "--lightseq-schedule", schedule]


def checkout_copy(source: str, dest: str) -> str:
    """The parts of a Megatron-LM checkout that pretrain_gpt.py and tools/preprocess_data.py run,
    copied to ``dest``, with the dataset helpers built there (once, as Megatron's rank 0 would)."""
    os.makedirs(dest, exist_ok=True)
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy2(os.path.join(source, name), dest)
    shutil.copytree(os.path.join(source, "megatron"), os.path.join(dest, "megatron"))
    os.makedirs(os.path.join(dest, "tools"), exist_ok=True)
    shutil.copy2(os.path.join(source, "tools", "preprocess_data.py"), os.path.join(dest, "tools"))
    built = subprocess.run(["make", "-C", os.path.join(dest, "megatron", "core", "datasets")], env=_env(dest),
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"building Megatron's dataset helpers failed (pip install pybind11?):\n{built.stderr}")
    return dest


def _env(checkout: str, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               # python3 for the helpers' Makefile: this interpreter, which has pybind11
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MEGATRON_LIGHTSEQ_TRACE_DIR", None)
    env.update(extra)
    return env


def indexed_corpus(checkout: str, folder: str) -> list[str]:
    """The flags of a real corpus: tests/data/corpus.jsonl, a SentencePiece tokenizer trained on it
    here (needs the sentencepiece package) and loaded as Megatron's GPTSentencePieceTokenizer, and
    the corpus indexed by the checkout's own tools/preprocess_data.py --append-eod."""
    import json

    import sentencepiece

    text = os.path.join(folder, "corpus.txt")
    with open(CORPUS) as src, open(text, "w") as dst:
        dst.writelines(json.loads(line)["text"] + "\n" for line in src)
    model = os.path.join(folder, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(input=text, model_prefix=model, vocab_size=VOCAB, model_type="bpe",
                                             character_coverage=1.0, num_threads=1, minloglevel=2)
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model + ".model"]
    prefix = os.path.join(folder, "corpus")
    run_tool(checkout, os.path.join("tools", "preprocess_data.py"), ["--input", CORPUS, "--output-prefix", prefix,
                                                                      *tokenizer, "--append-eod", "--workers", "1"])
    # held-out validation and test splits, evaluated every 2 iterations on 2 batches
    return [*tokenizer, "--data-path", prefix + "_text_document", "--split", "90,5,5", "--eval-iters", "2",
            "--eval-interval", "2"]


def run_tool(checkout: str, script: str, args: list[str], timeout: float = 600) -> str:
    """One of the checkout's tools (``script`` relative to it), its output; AssertionError with the
    output's tail when it exits non-zero."""
    # core_v0.19.0's tools import megatron.training, which takes typing.override from Python 3.12:
    # on 3.11 the same decorator from typing_extensions (as the CPU mode does for training).
    shim = ("import runpy, sys, typing, typing_extensions; "
            "typing.override = getattr(typing, 'override', typing_extensions.override); "
            "sys.argv = sys.argv[1:]; sys.path.insert(0, __import__('os').path.dirname(sys.argv[0])); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", shim, os.path.join(checkout, script), *args]
    done = subprocess.run(cmd, env=_env(checkout), capture_output=True, text=True, cwd=checkout, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"{script} failed ({done.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    return output


@dataclass
class Run:
    losses: dict[int, float]
    output: str
    counters: list[dict] = field(default_factory=list)  # per rank, with a trace folder
    # (iteration, split) -> lm loss: "eval" every --eval-interval, "validation" and "test" after training
    validation: dict[tuple[int, str], float] = field(default_factory=dict)


def pretrain(checkout: str, nproc: int, args: list[str], *, model: str = "rope-gqa", plugin: bool = True,
             te_standin: bool = False, trace_dir: str | None = None, data: list[str] | None = None,
             timeout: float = 600) -> Run:
    """pretrain_gpt.py on ``nproc`` local processes: through ``megatron_lightseq.run --cpu`` (the
    plugin) or ``megatron_lightseq.jobs.megatron_cpu`` (plain Megatron); on mock data, or ``data``
    (indexed_corpus's flags)."""
    runner = ["megatron_lightseq.run", "--cpu"] if plugin else ["megatron_lightseq.jobs.megatron_cpu"]
    script = [TE_STANDIN, os.path.join(checkout, "pretrain_gpt.py")] if te_standin else \
        [os.path.join(checkout, "pretrain_gpt.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", *runner, *script, *COMMON, *(data or MOCK), *MODELS[model], *args]
    extra = {"MEGATRON_LIGHTSEQ_TRACE_DIR": trace_dir} if trace_dir else {}
    done = subprocess.run(cmd, env=_env(checkout, **extra), capture_output=True, text=True, timeout=timeout,
                          cwd=checkout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"pretrain_gpt.py failed ({done.returncode}): {' '.join(cmd)}\n{output[-6000:]}")
    counters = []
    if trace_dir:
        counters = [json.load(open(os.path.join(trace_dir, f"rank{r}.json"))) for r in range(nproc)]
    return Run(loss_lines(output), output, counters, validation_lines(output))


def loss_lines(output: str) -> dict[int, float]:
    """iteration -> lm loss, from Megatron's training log lines."""
    return {int(i): float(loss) for i, loss in _LOSS.findall(output)}


def validation_lines(output: str) -> dict[tuple[int, str], float]:
    """(iteration, split) -> lm loss, from Megatron's evaluation log lines."""
    return {(int(i), split or "eval"): float(loss) for i, split, loss in _VALIDATION.findall(output)}
