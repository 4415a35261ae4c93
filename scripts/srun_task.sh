#!/usr/bin/env bash
# One Slurm task = one GPU (or one CPU process in CPU mode). srun starts this on every task; it
# turns SLURM_* into what torch.distributed and Megatron-LM read, then runs the command given.
set -euo pipefail
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
exec "$@"
