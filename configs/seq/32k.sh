# 32K tokens per sequence. Megatron CP needs seq % (2 x CP) == 0: true for any CP up to 64 here.
ARGS+=(--seq-length 32768 --max-position-embeddings 32768)
