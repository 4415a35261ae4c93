# Megatron's own attention (no plugin), every parallel size from the flags after the script (the planner's:
# --tensor-model-parallel-size, --context-parallel-size, --cp-comm-type ...; the last value of a flag wins).
ARGS+=(--attention-backend auto)   # TransformerEngine's attention, and its CP, where TE is installed
