"""Training with K/V in int8 on the wire, measured: the small GPT of the real-corpus tests
(tests/pretrain_gpt_runs.py: Megatron-LM's own pretrain_gpt.py, a SentencePiece tokenizer trained
on tests/data/corpus.jsonl) at CP = 2 on local CPU processes, with --lightseq-kv-wire none and
int8 from the same seed: both loss curves, the attention's bytes per step and the final
validation and test losses.

    python benchmarks/kv_wire.py --megatron-lm /path/to/Megatron-LM [--steps 300]
        [--out benchmarks/results/kv_wire_cpu.json] [--png benchmarks/results/kv_wire_cpu.png]

Needs a Megatron-LM checkout (core_v0.16.1 or later) and the sentencepiece package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
WIRES = ("none", "int8")


def _run(checkout: str, corpus: list[str], wire: str, steps: int, folder: str) -> dict:
    from pretrain_gpt_runs import lightseq, pretrain

    trace = os.path.join(folder, f"trace-{wire}")
    os.makedirs(trace, exist_ok=True)
    interval = max(steps // 10, 1)
    args = lightseq(2) + ["--lightseq-kv-wire", wire, "--train-iters", str(steps), "--log-interval", "1",
                          "--eval-interval", str(interval), "--eval-iters", "4", "--lr-warmup-iters", str(steps // 20)]
    run = pretrain(checkout, 2, args, data=corpus, trace_dir=trace, timeout=6 * 3600)
    sent = sum(c["bytes_sent"] for c in run.counters)  # both ranks, every layer, forward and backward
    return {"losses": {str(i): x for i, x in sorted(run.losses.items())},
            "validation": {f"{i} {split}": x for (i, split), x in sorted(run.validation.items())},
            "attention_bytes_per_step": sent / steps}


def _final(result: dict, split: str) -> float:
    return next(x for key, x in result["validation"].items() if key.endswith(split))


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for wire, result in results.items():
        steps = [int(i) for i in result["losses"]]
        ax.plot(steps, list(result["losses"].values()), label=f"--lightseq-kv-wire {wire}", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training lm loss")
    ax.set_title("small GPT, real corpus, CP = 2 on CPU: K/V on the wire in the model's dtype vs int8")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"), help="a Megatron-LM checkout")
    parser.add_argument("--steps", type=int, default=300, help="training iterations per run (default 300)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kv_wire_cpu.json"))
    parser.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "kv_wire_cpu.png"))
    args = parser.parse_args(argv)
    if not args.megatron_lm or not os.path.isdir(args.megatron_lm):
        parser.error(f"--megatron-lm must be a Megatron-LM checkout, got {args.megatron_lm!r}")
    if args.steps < 20:
        parser.error(f"--steps must be >= 20, got {args.steps}")
    from pretrain_gpt_runs import checkout_copy, indexed_corpus

    with tempfile.TemporaryDirectory() as folder:
        checkout = checkout_copy(args.megatron_lm, os.path.join(folder, "megatron"))
        corpus = indexed_corpus(checkout, folder)
        results = {wire: _run(checkout, corpus, wire, args.steps, folder) for wire in WIRES}
    gap = {split: _final(results["int8"], split) / _final(results["none"], split) - 1 for split in ("validation", "test")}
    report = {"steps": args.steps, "cp": 2, "device": "cpu (gloo)", "runs": results,
              "bytes_ratio": results["int8"]["attention_bytes_per_step"] / results["none"]["attention_bytes_per_step"],
              "final_loss_relative_gap": gap}
    for wire, result in results.items():
        losses = list(result["losses"].values())
        print(f"{wire}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, attention bytes/step "
              f"{result['attention_bytes_per_step']:.0f}, validation {_final(result, 'validation'):.4f}, "
              f"test {_final(result, 'test'):.4f}")
        print("  curve:", " ".join(f"{x:.3f}" for x in losses[:: max(len(losses) // 20, 1)]))
    print(f"int8 / none bytes: {report['bytes_ratio']:.3f}; final loss gap: "
          + ", ".join(f"{k} {v:+.3%}" for k, v in gap.items()))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    _plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
