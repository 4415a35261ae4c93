"""The benchmarks run end to end on tiny sizes (their numbers are for the JSON, not for tests):
the kernel benchmark writes every section; the host-overhead one's steady state makes no
collective or host read, plain and packed; the plan-build one times views and whole plans."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_kernel_benchmark_smoke_writes_every_section(tmp_path):
    bench = _benchmark("kernels")
    out = tmp_path / "kernels.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "blocks", "merge", "emulated", "targets"} <= set(result)
    assert {r["mask"] for r in result["blocks"]} == {"causal", "full"}
    assert {r["world_size"] for r in result["emulated"]["rows"]} == {2, 3}
    assert all(r["kernels"]["torch"]["fwd_s"] > 0 for r in result["blocks"])


def test_overhead_benchmark_smoke(tmp_path):
    bench = _benchmark("overhead")
    out = tmp_path / "overhead.json"
    assert bench.main(["--world-sizes", "2", "3", "--calls", "2", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]["latest"]["rows"]
    assert {(r["world_size"], r["workload"]) for r in rows} == {(p, w) for p in (2, 3) for w in bench.WORKLOADS}
    assert all(r["call_s"] > 0 and r["collectives_per_call"] == 0 == r["host_reads_per_call"] for r in rows)


def test_plan_build_benchmark_smoke(tmp_path):
    bench = _benchmark("plan_build")
    out = tmp_path / "plan_build.json"
    assert bench.main(["--max-p", "16", "--balanced-max-p", "8", "--docs-max-p", "8", "--whole-max-p", "8",
                       "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    plain = {(r["layout"], r["schedule"], r["world_size"]) for r in result["plain_causal"]}
    assert plain == {(lay, s, p) for lay in ("contiguous", "zigzag") for s in ("ring", "lightseq") for p in (8, 16)} | {
        ("balanced", s, 8) for s in ("ring", "lightseq")}
    assert {(r["schedule"], r["world_size"]) for r in result["documents_rows"]} == {("ring", 8), ("lightseq", 8)}
    assert all(r["rank_s"] > 0 and (r["world_size"] > 8 or r["whole_s"] > 0)
               for r in result["plain_causal"] + result["documents_rows"])
