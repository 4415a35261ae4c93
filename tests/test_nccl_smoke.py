"""The 2-GPU NCCL smoke script (scripts/nccl_smoke.py), run once as it would be on GPUs, through
torchrun, but over gloo on CPU: this is what proves the script before a machine with two GPUs
runs it (scripts/gpu_check.sh does there)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_smoke_script_passes_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          os.path.join(ROOT, "scripts", "nccl_smoke.py"), "--cpu", "--deadline", "1",
                          "--stall", "3.5", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["world_size"] == 2 and result["backend"] == "gloo"
    checks = set(result["ranks"][0])
    assert {"oracle zigzag ring", "oracle contiguous lightseq", "oracle balanced packed", "a kernel error on rank 1",
            "rank 1 stalls past the deadline"} <= checks, checks
    assert all(r[name]["ok"] for r in result["ranks"] for name in checks)
