# Multi-head attention: 32 query heads, 32 K/V heads (Llama-7B as published).
ARGS+=()
