"""The host-overhead benchmark runs end to end on tiny sizes (its numbers are for the JSON, not
for tests) and its steady state makes no collective or host read, plain and packed."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overhead_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_overhead", os.path.join(ROOT, "benchmarks", "overhead.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "overhead.json"
    assert bench.main(["--world-sizes", "2", "3", "--calls", "2", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]["latest"]["rows"]
    assert {(r["world_size"], r["workload"]) for r in rows} == {(p, w) for p in (2, 3) for w in bench.WORKLOADS}
    assert all(r["call_s"] > 0 and r["collectives_per_call"] == 0 == r["host_reads_per_call"] for r in rows)
