# Grouped-query attention: 8 K/V heads shared by 4 query heads each (Llama-2-70B style).
ARGS+=(--group-query-attention --num-query-groups 8)
