"""The repository's own sbatch scripts, submitted to a real single-node Slurm in CPU mode: the job
completes and its losses equal the same run without Slurm. Skipped where Slurm is not installed
(.ci/run installs it). With MEGATRON_LM (a Megatron-LM checkout), the scripts also run the real
pretrain_gpt.py through the CPU mode, the TP+SP baseline (parallel/tp-sp) included."""
import json
import os
import subprocess
import sys

import pytest

from slurm_cluster import available, sbatch_and_wait, slurm_cluster

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(not available(), reason="slurm-wlm and munge are not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--steps", "3", "--seq", "96", "--layers", "2", "--hidden", "64"]


def test_sbatch_cpu_mode_matches_a_run_without_slurm(tmp_path):
    direct = tmp_path / "direct.json"
    subprocess.run([sys.executable, "-m", "megatron_lightseq", "train", "--backends", "lightseq,tp", "--local-ranks",
                    "2", "--json", str(direct), *TRAIN], check=True, cwd=ROOT, timeout=600, capture_output=True)
    reference = json.loads(direct.read_text())["results"]
    with slurm_cluster(str(tmp_path / "slurm")) as env:
        # Submitted from outside the repository, no REPO: the scripts find their files from their own place.
        env = dict(env, MODE="cpu", PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
        env.pop("MEGATRON_LM", None)  # the plugin's tiny GPT
        env.pop("REPO", None)
        for script, backend in (("lightseq.sbatch", "lightseq"), ("tp_baseline.sbatch", "tp")):
            out, log = tmp_path / f"{backend}.json", tmp_path / f"{backend}.out"
            job = sbatch_and_wait(
                ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={log}",
                 f"--chdir={tmp_path}", os.path.join(ROOT, "scripts", script), "--json", str(out), *TRAIN],
                env=env, timeout=600)
            assert job.returncode == 0, f"{script}: {job.stdout}{job.stderr}\n{log.read_text() if log.exists() else ''}"
            losses = json.loads(out.read_text())["results"][backend]["losses"]
            assert losses == pytest.approx(reference[backend]["losses"], rel=1e-6, abs=1e-6), script


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="MEGATRON_LM is not set (a Megatron-LM checkout)")
def test_sbatch_cpu_mode_runs_megatrons_pretrain_gpt(tmp_path):
    from pretrain_gpt_runs import checkout_copy, loss_lines

    checkout = checkout_copy(os.environ["MEGATRON_LM"], str(tmp_path / "megatron-lm"))  # Megatron builds in it
    losses = {}
    with slurm_cluster(str(tmp_path / "slurm")) as env:
        env = dict(env, MODE="cpu", REPO=ROOT, MEGATRON_LM=checkout,
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
        for script, parallel in (("lightseq.sbatch", "lightseq"), ("tp_baseline.sbatch", "tp"),
                                 ("tp_baseline.sbatch", "tp-sp")):  # the TP+SP baseline: the torch norm under SP
            log = tmp_path / f"{parallel}.out"
            job = sbatch_and_wait(
                ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={log}",
                 f"--chdir={ROOT}", os.path.join(ROOT, "scripts", script)],
                env=dict(env, CONFIGS=f"llama7b heads/gqa seq/32k parallel/{parallel}"), timeout=900)
            output = log.read_text() if log.exists() else ""
            assert job.returncode == 0, f"{script}: {job.stdout}{job.stderr}\n{output[-6000:]}"
            assert "CPU SMOKE RUN" in output
            losses[parallel] = loss_lines(output)
    assert sorted(losses["lightseq"]) == [1, 2, 3]
    # configs/llama7b.sh trains in bf16: CP = 2 and TP = 2 agree to bf16's precision, not to the bit
    assert losses["lightseq"] == pytest.approx(losses["tp"], rel=2e-2)
    assert losses["tp-sp"] == pytest.approx(losses["tp"], rel=2e-2)
