# Llama-7B (Touvron et al. 2023) for Megatron-LM's pretrain_gpt.py; the other configs override.
ARGS+=(
  --num-layers 32 --hidden-size 4096 --num-attention-heads 32
  --ffn-hidden-size 11008          # SwiGLU: 2/3 of 4h, rounded to a multiple of 256
  --swiglu --normalization RMSNorm --disable-bias-linear
  --norm-epsilon 1e-05             # Llama 2's rms_norm_eps (Llama 1: 1e-06); Megatron's default too
  --position-embedding-type rope --rotary-base 10000
  --untie-embeddings-and-output-weights
  --attention-dropout 0            # the lightseq backend has no attention dropout (Llama uses none)
  --hidden-dropout 0
  --bf16
  --micro-batch-size 1             # one long sequence per GPU group per microbatch
  --global-batch-size 8
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.1 --clip-grad 1.0
  --train-iters 20 --eval-iters 0 --eval-interval 1000 --log-interval 1  # (Megatron needs an interval even with no eval)
  --tokenizer-type NullTokenizer --vocab-size 32000  # mock data needs no tokenizer files
  --use-distributed-optimizer      # shard Adam states over the DP x CP ranks
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
                                   # long sequences: keep one checkpoint per layer (lightseq adds remat)
)
