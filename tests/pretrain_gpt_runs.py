"""Megatron-LM's own pretrain_gpt.py on local CPU processes (torchrun, gloo) through the CPU mode,
for tests/test_pretrain_gpt.py: a working copy of the checkout, the tiny GPTs, one run, its losses.

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
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERATIONS),
    "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "511", "--mock-data",
    "--attention-dropout", "0", "--hidden-dropout", "0",
    # the same initial weights at any TP (CPU init splits one master weight), no fused CUDA ops
    "--use-cpu-initialization", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-gelu-fusion", "--no-rope-fusion",
    "--no-persist-layer-norm",
]
MODELS = {
    "rope-gqa": ["--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2"],
    "learned-mqa": ["--position-embedding-type", "learned_absolute", "--group-query-attention",
                    "--num-query-groups", "1"],
}
_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+)")


def lightseq(cp: int, layout: str = "zigzag", schedule: str = "auto") -> list[str]:
    return ["--context-parallel-size", str(cp), "--attention-backend", "lightseq",
            "--lightseq-layout", layout, "--lightseq-schedule", schedule]


def checkout_copy(source: str, dest: str) -> str:
    """The parts of a Megatron-LM checkout that pretrain_gpt.py runs, copied to ``dest``, with the
    dataset helpers built there (once, as Megatron's rank 0 would)."""
    os.makedirs(dest, exist_ok=True)
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy2(os.path.join(source, name), dest)
    shutil.copytree(os.path.join(source, "megatron"), os.path.join(dest, "megatron"))
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


@dataclass
class Run:
    losses: dict[int, float]
    output: str
    counters: list[dict] = field(default_factory=list)  # per rank, with a trace folder


def pretrain(checkout: str, nproc: int, args: list[str], *, model: str = "rope-gqa", plugin: bool = True,
             te_standin: bool = False, trace_dir: str | None = None, timeout: float = 600) -> Run:
    """pretrain_gpt.py on ``nproc`` local processes: through ``megatron_lightseq.run --cpu`` (the
    plugin) or ``megatron_lightseq.jobs.megatron_cpu`` (plain Megatron)."""
    runner = ["megatron_lightseq.run", "--cpu"] if plugin else ["megatron_lightseq.jobs.megatron_cpu"]
    script = [TE_STANDIN, os.path.join(checkout, "pretrain_gpt.py")] if te_standin else \
        [os.path.join(checkout, "pretrain_gpt.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", *runner, *script, *COMMON, *MODELS[model], *args]
    extra = {"MEGATRON_LIGHTSEQ_TRACE_DIR": trace_dir} if trace_dir else {}
    done = subprocess.run(cmd, env=_env(checkout, **extra), capture_output=True, text=True, timeout=timeout,
                          cwd=checkout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"pretrain_gpt.py failed ({done.returncode}): {' '.join(cmd)}\n{output[-6000:]}")
    counters = []
    if trace_dir:
        counters = [json.load(open(os.path.join(trace_dir, f"rank{r}.json"))) for r in range(nproc)]
    return Run(loss_lines(output), output, counters)


def loss_lines(output: str) -> dict[int, float]:
    """iteration -> lm loss, from Megatron's training log lines."""
    return {int(i): float(loss) for i, loss in _LOSS.findall(output)}
