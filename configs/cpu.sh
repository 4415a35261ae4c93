# CPU smoke run (MODE=cpu with MEGATRON_LM): the launch command of the configs before it, at sizes
# that train in seconds on CPU processes. scripts/common.sh applies it last.
ARGS+=(
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 8
  --seq-length 256 --max-position-embeddings 256   # seq % (2 x CP) == 0 up to CP = 64
  --global-batch-size 2 --train-iters 3 --vocab-size 511
  --transformer-impl local         # TransformerEngine and its fused kernels need CUDA
  --no-persist-layer-norm --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-dropout-fusion --no-bias-swiglu-fusion --no-rope-fusion   # the same: CUDA-only fusions
)
