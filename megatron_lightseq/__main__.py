"""python -m megatron_lightseq COMMAND, one of:
  train      the main job: a tiny GPT, lightseq against Megatron TP, on local CPU processes or GPUs
  plan       the planner: bytes, time and memory per layer for each parallelism, and the flags to use
  attn-demo  dist_attn alone: errors against an oracle and traffic, per layout and schedule
  hf-flags   the Megatron-LM flags of a Hugging Face Llama model (docs/huggingface.md)"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": "megatron_lightseq.jobs.train", "plan": "megatron_lightseq.planner.cli",
                "attn-demo": "megatron_lightseq.jobs.attn_demo", "hf-flags": "megatron_lightseq.jobs.hf_llama"}
    usage = f"usage: python -m megatron_lightseq {{{','.join(commands)}}} [options]   (COMMAND --help for its options)"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__}")
        return 0
    if not argv or argv[0] not in commands:
        print(usage if not argv else f"{usage}\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


def _quiet_when_piped(run) -> int:
    """``plan ... | head``: the reader closing the pipe ends the output, not in a traceback. stdout
    is pointed at devnull so that the interpreter's own flush at exit does not raise again."""
    import os

    try:
        return run()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_quiet_when_piped(main))
