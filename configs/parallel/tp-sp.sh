# Megatron tensor parallelism with sequence parallelism (norms and dropout split by sequence).
ARGS+=(--attention-backend auto --sequence-parallel)
