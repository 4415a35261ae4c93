"""The Triton kernels build for Hopper (sm_90) on this CPU machine, with the ptxas Triton ships:
each kernel's default autotuning config fits shared memory, spills no registers and uses the
Hopper tensor-core instruction (wgmma), at head dim 128; the forward's store-only variant and the
one-pass merge and delta kernels build too. In a subprocess: under TRITON_INTERPRET=1 (which
conftest sets without CUDA) there is no compiler to ask."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

BUILD_DEFAULTS = """
import json
from megatron_lightseq.kernels.triton_aot import build, compile_report
from megatron_lightseq.kernels.triton_kernels import CONFIGS, _delta, _merge
rows = [compile_report(name, configs["narrow"][0], headdim=128) for name, configs in CONFIGS.items()]
rows.append(compile_report("fwd", CONFIGS["fwd"]["narrow"][0], headdim=128, merge=False))
rows += [dict(kernel=name, **build(fn, dict(D=128, BLOCK_D=128, BLOCK_S=32))) for name, fn in (("merge", _merge),
                                                                                               ("delta", _delta))]
print(json.dumps(rows))
"""


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this triton build ships no NVIDIA tools")
def test_default_configs_build_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD_DEFAULTS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == ["fwd", "dkdv", "dq", "fwd", "merge", "delta"]
    for r in rows:
        assert r["fits"] and r["spilled_bytes"] == 0 and (r["wgmma"] or r["kernel"] in ("merge", "delta")), r
