#!/usr/bin/env python3
"""The Quick start's two commands, on a machine with only Python 3.11 and pip:

    python3 dev.py demo     # the main job (python -m megatron_lightseq demo, extra args passed on)
    python3 dev.py test     # the test suite (pytest, extra args passed on)

On first use it creates .venv and installs the pinned dependencies and this package into it.
"""
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
# torch pinned to the CPU build that installs from a local file here; a cluster brings its own.
PINS = ["torch==2.13.0"]
EXTRAS = ".[test]"


def ensure_venv() -> None:
    recipe = hashlib.sha256(("\n".join(PINS) + EXTRAS + (ROOT / "setup.py").read_text()).encode()).hexdigest()[:12]
    stamp = VENV / f".installed-{recipe}"
    if stamp.exists():
        return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + PINS, check=True)
    subprocess.run(pip + ["-e", EXTRAS], check=True, cwd=ROOT)
    stamp.touch()


def main(argv: list[str]) -> int:
    commands = {"demo": ["-m", "megatron_lightseq", "demo"], "test": ["-m", "pytest", "-q"]}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    ensure_venv()
    os.chdir(ROOT)
    return subprocess.run([str(PYTHON), *commands[argv[0]], *argv[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
