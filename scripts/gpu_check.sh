#!/usr/bin/env bash
# The GPU check. With two or more GPUs: the NCCL smoke (scripts/nccl_smoke.py through torchrun on
# 2 GPUs: every layout and schedule against the oracle, packed documents in steady state, a raised
# kernel error and a stalled rank stopping every rank). With one GPU (one H100 or H200, in under
# 6 minutes): the GPU tests (every CUDA kernel and emulated P = 2, 3, 8 ranks against a float32
# reference with flash-attn's error rule), then the kernel benchmark (benchmarks/kernels.py:
# tables printed, JSON under benchmarks/results/).
#   bash scripts/gpu_check.sh        from anywhere; needs python3 with CUDA torch, triton, pytest
# Variables: OUT (also copy the JSON there), CHECK_TIMEOUT (seconds per stage, default 170).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
limit=${CHECK_TIMEOUT:-170}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

status=0
if [ "$gpus" -ge 2 ]; then
    echo "== $gpus GPUs: the NCCL smoke on 2 of them"
    mkdir -p benchmarks/results
    OMP_NUM_THREADS=1 timeout "$limit" python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        scripts/nccl_smoke.py --out benchmarks/results/nccl_smoke.json || status=$?
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/nccl_smoke.json "$OUT"/ 2>/dev/null || true; fi
else
    echo "== one GPU: the GPU tests and the kernel benchmark"
    timeout "$limit" python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -p no:cacheprovider || status=$?
    timeout "$limit" python3 benchmarks/kernels.py || status=$?
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/kernels_*.json "$OUT"/ 2>/dev/null || true; fi
fi
exit $status
