"""The Triton kernels build for Hopper (sm_90) on this CPU machine, with the ptxas Triton ships:
every config offered to the autotuner fits shared memory and spills no registers at its head-dim
bound (64, 128, 256), and up to head dim 128 uses the Hopper tensor-core instruction (wgmma); the
forward's store-only variant and the one-pass merge and delta kernels build too. In a subprocess:
under TRITON_INTERPRET=1 (which conftest sets without CUDA) there is no compiler to ask."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from megatron_lightseq.kernels.triton_kernels import CONFIGS  # noqa: E402
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

BUILD_ALL = """
import json
from megatron_lightseq.kernels import triton_aot
from megatron_lightseq.kernels.triton_kernels import CONFIGS, _delta, _merge
rows = triton_aot.main(["--headdim", "64", "128", "256"])
rows.append(triton_aot.compile_report("fwd", CONFIGS["fwd"][128][0], headdim=128, merge=False))
rows += [dict(kernel=name, headdim=128, **triton_aot.build(fn, dict(D=128, BLOCK_D=128, BLOCK_S=32)))
         for name, fn in (("merge", _merge), ("delta", _delta))]
print(json.dumps(rows))
"""


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this triton build ships no NVIDIA tools")
def test_every_offered_config_builds_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    offered = sum(len(configs) for lists in CONFIGS.values() for configs in lists.values())
    assert len(rows) == offered + 3 and [r["kernel"] for r in rows[-3:]] == ["fwd", "merge", "delta"]
    for r in rows:
        assert r["fits"] and r["spilled_bytes"] == 0, r
        assert r["wgmma"] or r["kernel"] in ("merge", "delta") or r["headdim"] > 128, r
