# Multi-query attention: one K/V head for all 32 query heads. TP > 1 replicates that head.
ARGS+=(--group-query-attention --num-query-groups 1)
