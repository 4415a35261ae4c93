"""The README's CPU smoke commands, exactly as printed (read from README.md), on a full copy of the
MEGATRON_LM checkout (its .python-version included: under pyenv it made Megatron's own make build the
dataset helpers for Python 3.12), run from outside the checkout: the lightseq run and the TP+SP
baseline train, say what they changed, and print no third-party warning. Needs MEGATRON_LM."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

MEGATRON_LM = os.environ.get("MEGATRON_LM")
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM, reason="MEGATRON_LM is not set (a Megatron-LM checkout: core_v0.16.1 or core_v0.19.0)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "-m megatron_lightseq.run --cpu $MEGATRON_LM/pretrain_gpt.py"


def readme_smoke_block() -> list[str]:
    """The README's code block holding the smoke command, less its install line."""
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    block = next(b for b in blocks if SMOKE in b)
    return [line for line in block.splitlines() if not line.startswith("pip install")]


def test_readme_smoke_commands_run_as_printed(tmp_path):
    checkout = str(tmp_path / "Megatron-LM")
    # The whole checkout as a user has it, less git's objects and any helpers built before.
    shutil.copytree(MEGATRON_LM, checkout, ignore=shutil.ignore_patterns(".git", "helpers_cpp*", "__pycache__"))
    assert os.path.exists(os.path.join(MEGATRON_LM, ".python-version")) == \
        os.path.exists(os.path.join(checkout, ".python-version"))
    script = tmp_path / "smoke.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(readme_smoke_block()) + "\n")
    env = dict(os.environ, MEGATRON_LM=checkout, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)  # the CPU mode sets it
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    runs = output.split("CPU SMOKE RUN")[1:]
    assert len(runs) == 2, output[-6000:]  # the lightseq run, then the TP+SP baseline
    for run in runs:
        assert sorted(map(int, re.findall(r"iteration\s+(\d+)/", run))) == [1, 2, 3, 4], run[-3000:]
        assert "Warning:" not in run, [line for line in run.splitlines() if "Warning:" in line]
    assert "--sequence-parallel kept" in runs[1]
    helpers = os.path.join(checkout, "megatron", "core", "datasets", "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert os.path.exists(helpers)  # built for this interpreter, whatever python3-config says in the checkout
