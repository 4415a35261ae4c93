# Sliding-window attention: each token sees the 4096 before it (Mistral-style), in 3 of every 4
# layers; the 4th attends to the whole sequence. Megatron's own flags, so the TP baseline runs
# the same model; with lightseq, add --lightseq-layout contiguous to talk only to the ranks
# within the window on the windowed layers (docs/masks.md).
ARGS+=(
  --window-size 4096,0             # (left, right) as in flash-attn; causal, so right is 0
  --window-attn-skip-freq 4        # every 4th layer full attention
)
