"""python -m megatron_lightseq.run [--cpu] SCRIPT [args]: run a Megatron-LM training script (e.g.
pretrain_gpt.py) with the lightseq backend available and no patch to the script. --cpu: a CPU
smoke run of the same command (gloo, CUDA calls redirected: megatron_lightseq/jobs/megatron_cpu.py)."""
from __future__ import annotations

import ast
import os
import runpy
import sys

from .jobs.launch import is_rank_zero
from .megatron.flags import check_command


def _refuse(message: str) -> int:
    """Exit status 2 on every rank, the message on rank 0 only (once, not once per process)."""
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def _uses_megatron_training(script: str) -> bool:
    """Whether the script imports megatron.training, whose initialize_megatron asserts CUDA
    ("Megatron requires CUDA.") after the script's imports (seconds)."""
    try:
        tree = ast.parse(open(script).read())
    except (SyntaxError, UnicodeDecodeError):
        return False
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "megatron.training" or n.startswith("megatron.training.") for n in names):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cpu = bool(argv) and argv[0] == "--cpu"
    argv = argv[1:] if cpu else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    script = argv[0]
    if not os.path.isfile(script):
        return _refuse(f"no script {script!r} (e.g. $MEGATRON_LM/pretrain_gpt.py from a Megatron-LM checkout)")
    # The command's own mistakes, before any start-up work (Megatron's imports alone take seconds).
    try:
        check_command(argv[1:])
    except ValueError as e:
        return _refuse(str(e))
    if not cpu and _uses_megatron_training(script):
        import torch

        if not torch.cuda.is_available():
            return _refuse(f"no CUDA device here (torch.cuda.is_available() is False), and {os.path.basename(script)} "
                           f"needs one (Megatron-LM's training asserts it); for a CPU smoke run of the same command, "
                           f"add --cpu: python -m megatron_lightseq.run --cpu {script} ...")
    sys.argv = [script, *argv[1:]]
    # The script's own directory first on the path, as when Python runs it directly (pretrain_gpt.py
    # imports gpt_builders and model_provider from beside itself), and before anything imports
    # megatron.core: in a Megatron-LM checkout, megatron.core must come from beside the script
    # too, not from an installed megatron-core of another version.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if cpu:  # a job-side harness, loaded only on request: the plugin never imports it
        from .jobs.megatron_cpu import install

        install(sys.argv)
    from .megatron import setup

    try:
        setup(sys.argv)
    except ValueError as e:
        return _refuse(str(e))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
