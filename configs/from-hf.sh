# Continued training from a checkpoint converted from Hugging Face (docs/huggingface.md): after the
# model's config (llama3.1-8b or llama7b) and a seq/ config. Variables: CHECKPOINT (the converter's
# --save-dir), HF_MODEL (the Hugging Face model folder, for its tokenizer).
ARGS+=(
  --load "${CHECKPOINT:?set CHECKPOINT to the converted checkpoint (the converter's --save-dir)}"
  --finetune                       # the weights only: iteration 0, no optimizer or RNG state from it
  --no-load-optim --no-load-rng
  --tokenizer-type HuggingFaceTokenizer
  --tokenizer-model "${HF_MODEL:?set HF_MODEL to the Hugging Face model folder (its tokenizer)}"
  --bf16
  --micro-batch-size 1             # one long sequence per CP group per microbatch
  --global-batch-size 8
  --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 10 --weight-decay 0.1 --clip-grad 1.0
  --train-iters 100 --eval-iters 0 --eval-interval 1000 --log-interval 1
  --use-distributed-optimizer      # shard Adam states over the DP x CP ranks
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
                                   # long sequences: one checkpoint per layer (lightseq adds remat)
)
