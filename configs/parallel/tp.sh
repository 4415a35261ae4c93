# Megatron tensor parallelism over all tasks (the sbatch sets --tensor-model-parallel-size).
ARGS+=(--attention-backend auto)   # TransformerEngine's fastest attention where TE is installed
