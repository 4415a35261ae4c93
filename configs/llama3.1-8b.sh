# Llama 3.1 8B (meta-llama/Llama-3.1-8B on the Hugging Face Hub), for a checkpoint converted from it
# (docs/huggingface.md): `python -m megatron_lightseq hf-flags $HF_MODEL` prints these from its
# config.json, and tests/test_hf_llama.py checks that they match.
ARGS+=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8   # GQA: 8 K/V heads (only they travel with lightseq)
  --swiglu --normalization RMSNorm
  --norm-epsilon 1e-05             # rms_norm_eps; the converter's checkpoint does not carry it
  --disable-bias-linear
  --attention-dropout 0 --hidden-dropout 0   # Llama has none (lightseq: attention dropout must be 0)
  --position-embedding-type rope
  --rotary-base 500000             # rope_theta; not carried by the converter (Megatron's default: 10000)
  --use-rope-scaling --rope-scaling-factor 8.0   # Llama 3.1's RoPE scaling (low/high freq 1/4, 8192
                                   # original positions: Megatron's fixed values); not carried either
  --untie-embeddings-and-output-weights
)
