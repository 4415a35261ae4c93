"""The Triton kernels build for Hopper (sm_90) on this CPU machine, with the ptxas Triton ships:
every config offered to the autotuner fits shared memory and spills no registers at its head-dim
bound (64, 128, 256) in every mask variant (none, causal, both ends of the rows' intervals), and
up to head dim 128 uses the Hopper tensor-core instruction (wgmma); the forward's store-only
variant and the one-pass merge and delta kernels build too; and in every kernel's IR each stride
argument is only ever widened to int64 (so no offset a stride enters is computed in int32, which
wraps past 2^31 elements; the old kernels multiplied a batch index by its stride in int32). In a subprocess:
under TRITON_INTERPRET=1 (which conftest sets without CUDA) there is no compiler to ask."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from megatron_lightseq.kernels.triton_aot import MASKS  # noqa: E402
from megatron_lightseq.kernels.triton_kernels import CONFIGS  # noqa: E402
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# Builds the configs of the head dims given as arguments in every mask variant; with 128, the
# forward's store-only variant and the one-pass kernels too.
BUILD = """
import json, sys
from megatron_lightseq.kernels import triton_aot
from megatron_lightseq.kernels.triton_kernels import CONFIGS, _delta, _merge
rows = triton_aot.main(["--headdim", *sys.argv[1:]])
if "128" in sys.argv[1:]:
    rows += [triton_aot.compile_report("fwd", CONFIGS["fwd"][128][0], headdim=128, mask=mask, merge=False)
             for mask in triton_aot.MASKS]
    rows += [dict(kernel=name, headdim=128, **triton_aot.build(fn, dict(D=128, BLOCK_D=128, BLOCK_S=32)))
             for name, fn in (("merge", _merge), ("delta", _delta))]
print(json.dumps(rows))
"""


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this triton build ships no NVIDIA tools")
def test_every_offered_config_builds_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Two builders at once (CI has two cores), each about half of the compiles.
    builders = [subprocess.Popen([sys.executable, "-c", BUILD, *dims], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for dims in (["64", "256"], ["128"])]
    rows = []
    for builder in builders:
        out, err = builder.communicate(timeout=600)
        assert builder.returncode == 0, err[-3000:]
        rows += json.loads(out.strip().splitlines()[-1])
    offered = sum(len(configs) for lists in CONFIGS.values() for configs in lists.values())
    assert len(rows) == offered * len(MASKS) + len(MASKS) + 2
    assert [r["kernel"] for r in rows[-len(MASKS) - 2:]] == ["fwd"] * len(MASKS) + ["merge", "delta"]
    for r in rows:
        assert r["fits"] and r["spilled_bytes"] == 0 and r["narrow_stride_uses"] == 0, r
        assert r["wgmma"] or r["kernel"] in ("merge", "delta") or r["headdim"] > 128, r
