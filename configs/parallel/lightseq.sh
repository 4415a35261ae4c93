# LightSeq: the sequence over all tasks (the sbatch sets --context-parallel-size), no TP.
ARGS+=(
  --attention-backend lightseq
  --lightseq-schedule auto         # the cheapest plan for the layout (docs/schedules.md)
  --lightseq-layout auto           # plain sequences: zigzag, Megatron's own CP split (its batch split and RoPE
                                   # are used as they are); packed documents: balanced (docs/masks.md)
)
