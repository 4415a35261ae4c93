# Sourced by the sbatch scripts: checks the paths they need, loads configs, sets the rendezvous.
# Variables (set them in the environment or with sbatch --export):
#   MEGATRON_LM   Megatron-LM checkout (tag core_v0.16.1 or core_v0.19.0)   GPU mode; CPU mode: optional
#   DATA_PATH     Megatron data prefix, or "mock" for synthetic data          (default mock)
#   CONTAINER     optional container image for srun --container-image (pyxis)
#   CONFIGS       config files under configs/, without .sh, applied in order (each sbatch has a default)
#   MODE          gpu (default): pretrain_gpt.py on the GPUs (NCCL).
#                 cpu: a smoke run on CPU processes (gloo). With MEGATRON_LM: the same pretrain_gpt.py
#                 launch through the CPU mode (megatron_lightseq/jobs/megatron_cpu.py), configs/cpu.sh's
#                 tiny sizes applied last; without: the plugin's tiny GPT (what CI submits).
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}  # the sbatch scripts set it
MODE=${MODE:-gpu}
fail() { echo "error: $*" >&2; exit 2; }

if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ] || [ -z "${SLURM_NTASKS:-}" ]; then
  fail "$(basename "$0") runs inside a Slurm job (SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_NTASKS are not all set): submit it with sbatch (README, On a cluster); without Slurm, start the same launch with torchrun (README, With Megatron-LM)"
fi

# Whether the job runs Megatron-LM's pretrain_gpt.py (else the plugin's tiny GPT, CPU mode only).
PRETRAIN_GPT=0
if [ "$MODE" = gpu ] || [ -n "${MEGATRON_LM:-}" ]; then PRETRAIN_GPT=1; fi
if [ "$MODE" != gpu ] && [ "$MODE" != cpu ]; then fail "MODE must be gpu or cpu, got $MODE"; fi

if [ "$PRETRAIN_GPT" = 1 ]; then
  [ -n "${MEGATRON_LM:-}" ] || fail "MEGATRON_LM is not set: point it at a Megatron-LM checkout"
  [ -f "$MEGATRON_LM/pretrain_gpt.py" ] || fail "MEGATRON_LM=$MEGATRON_LM has no pretrain_gpt.py"
  DATA_PATH=${DATA_PATH:-mock}
  if [ "$DATA_PATH" != mock ] && [ ! -e "$DATA_PATH.bin" ]; then fail "DATA_PATH=$DATA_PATH: no $DATA_PATH.bin"; fi
fi
if [ "$MODE" = cpu ] && [ "$PRETRAIN_GPT" = 1 ]; then CONFIGS="${CONFIGS:-} cpu"; fi

ARGS=()
read -r -a CONFIG_NAMES <<< "${CONFIGS:-}"  # split on spaces, never glob-expanded (CONFIGS="*" is a name)
for c in "${CONFIG_NAMES[@]}"; do
  [ -f "$REPO/configs/$c.sh" ] || fail "no config configs/$c.sh (CONFIGS=\"$CONFIGS\"): CONFIGS names files under $REPO/configs without .sh, e.g. \"llama7b heads/gqa seq/128k parallel/lightseq\""
  # shellcheck source=/dev/null
  source "$REPO/configs/$c.sh"  # each appends to ARGS
done

# Rendezvous: the first node of the job, a port from the job id (two jobs on a node don't collide).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# NCCL settings that matter (GPU mode):
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP overlap needs ordered kernels
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}         # long steps at 512K: avoid spurious IB timeouts
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank ends the job, no hang
# export NCCL_SOCKET_IFNAME=...  NCCL_IB_HCA=...     # set for your fabric when auto-detection picks wrong

if [ "${DATA_PATH:-mock}" = mock ]; then DATA_ARGS=(--mock-data); else DATA_ARGS=(--data-path "$DATA_PATH"); fi

# How the sbatch scripts start pretrain_gpt.py: with the plugin (its runner), or plain Megatron-LM.
if [ "$MODE" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: the tasks share the node's cores
  WITH_PLUGIN=(python -m megatron_lightseq.run --cpu)
  PLAIN=(python -m megatron_lightseq.jobs.megatron_cpu)
else
  WITH_PLUGIN=(python -m megatron_lightseq.run)
  PLAIN=(python)
fi

SRUN=(srun --kill-on-bad-exit=1)
if [ -n "${CONTAINER:-}" ]; then
  SRUN+=(--container-image="$CONTAINER" --container-mounts="$REPO,${MEGATRON_LM:-$REPO}")
fi
