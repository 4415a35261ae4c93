"""``python -m megatron_lightseq.run [--cpu] SCRIPT [args]``: run a Megatron-LM training script (e.g.
pretrain_gpt.py) with the lightseq backend available and no patch to the script. ``--cpu``: a CPU
smoke run of the same command (gloo, CUDA calls redirected: megatron_lightseq/jobs/megatron_cpu.py)."""
from __future__ import annotations

import os
import runpy
import sys


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
        print(f"error: no script {script!r} (e.g. $MEGATRON_LM/pretrain_gpt.py from a Megatron-LM checkout)",
              file=sys.stderr)
        return 2
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
