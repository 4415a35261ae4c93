# 1M tokens per sequence (the planner's 1M target). Megatron CP needs seq % (2 x CP) == 0: true for any CP up to 512 here.
ARGS+=(--seq-length 1048576 --max-position-embeddings 1048576)
