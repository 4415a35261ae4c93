"""The tiny Hugging Face Llama the HF tests build (no download): Llama 3.1's rope_theta and RoPE
scaling, GQA, an untied output layer; norm weights moved away from 1 so that their mapping shows."""
import torch

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", tie_word_embeddings=False,
            rms_norm_eps=1e-6,  # not Megatron's default (1e-5): a missing --norm-epsilon shows
            rope_theta=500000.0, max_position_embeddings=131072,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192))


def tiny_llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager")).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model
