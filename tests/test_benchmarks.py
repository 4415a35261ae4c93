"""The kernel benchmark runs end to end on tiny shapes (its numbers mean nothing on CPU)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_benchmark_smoke_writes_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "benchmarks", "kernels.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "blocks", "merge", "emulated", "targets"} <= set(result)
    assert {r["mask"] for r in result["blocks"]} == {"causal", "full"}
    assert {r["world_size"] for r in result["emulated"]["rows"]} == {2, 3}
    assert all(r["kernels"]["torch"]["fwd_s"] > 0 for r in result["blocks"])
