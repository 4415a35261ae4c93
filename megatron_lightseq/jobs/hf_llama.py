"""From a Hugging Face Llama checkpoint (Llama 2, Llama 3 / 3.1 with its RoPE scaling, GQA) to
Megatron-LM with the lightseq backend: the Megatron flags its config.json means, and its weights in
Megatron-Core's names. docs/huggingface.md is the whole recipe.

    python -m megatron_lightseq hf-flags /path/to/hf_model      # the flags, for a configs/ file

Megatron-LM's converter (tools/checkpoint/convert.py --loader llama_mistral --saver core, core_v0.16.1;
gone at core_v0.19.0) never reads rope_theta or the RoPE scaling from config.json, and the norm
epsilon has been reported missing from its checkpoint's arguments too: a run that loads the
checkpoint must pass them (the rows marked ``carried=False`` below), or it trains another model from
the converted weights. The weights' layout here is the one Megatron-Core's local layer spec loads.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

# Megatron's RoPE scaling is Llama 3's with these values fixed (RotaryEmbedding._apply_scaling, 0.16 and
# 0.19): only the factor is a flag (--rope-scaling-factor).
MEGATRON_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Setting:
    """One Megatron setting an HF Llama config implies."""

    flags: tuple[str, ...]
    """Megatron-LM's command-line flags (pretrain_gpt.py)."""
    where: str
    """"config": a TransformerConfig field; "model": a GPTModel keyword."""
    values: tuple
    """(name, value) pairs it sets there."""
    carried: bool = True
    """Whether the converter's checkpoint carries it; False: the run must pass the flag."""


def read_config(source) -> dict:
    """An HF config: a dict, a config.json, or a model folder holding one."""
    if isinstance(source, dict):
        return source
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(f"expected a Hugging Face model folder with a config.json (or the file), got {source!r}")
    with open(path) as f:
        return json.load(f)


def rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, the RoPE scaling or None): transformers 4.x writes them as ``rope_theta`` and
    ``rope_scaling`` (the Hub's Llama 3.1 config.json), 5.x as one ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def _check(hf: dict) -> None:
    """ValueError for what Megatron's GPT cannot express, naming it."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"expected a Llama config (model_type 'llama'), got model_type {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Megatron's --swiglu is SiLU-gated; this config has hidden_act {hf['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"this config has {key}: true; the recipe (--disable-bias-linear) is for Llama without "
                             f"biases")
    scaling = rope(hf)[1]
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed = {k: scaling.get(k) for k in MEGATRON_ROPE_SCALING}
        if kind != "llama3" or {k: float(v) for k, v in fixed.items() if v is not None} != MEGATRON_ROPE_SCALING:
            raise ValueError(f"Megatron's --use-rope-scaling is Llama 3's with {MEGATRON_ROPE_SCALING} (only the "
                             f"factor is a flag); this config's rope_scaling is {scaling}")


def settings(source) -> list[Setting]:
    """The Megatron settings of an HF Llama config (``source``: see :func:`read_config`)."""
    hf = read_config(source)
    _check(hf)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    groups = hf.get("num_key_value_heads") or heads
    theta, scaling = rope(hf)
    rows = [
        Setting(("--num-layers", str(hf["num_hidden_layers"])), "config", (("num_layers", hf["num_hidden_layers"]),)),
        Setting(("--hidden-size", str(hidden)), "config", (("hidden_size", hidden),)),
        Setting(("--ffn-hidden-size", str(hf["intermediate_size"])), "config",
                (("ffn_hidden_size", hf["intermediate_size"]),)),
        Setting(("--num-attention-heads", str(heads)), "config", (("num_attention_heads", heads),)),
        Setting(("--swiglu",), "config", (("gated_linear_unit", True), ("activation_func", "silu"))),
        Setting(("--normalization", "RMSNorm"), "config", (("normalization", "RMSNorm"),)),
        Setting(("--norm-epsilon", repr(float(hf["rms_norm_eps"]))), "config",
                (("layernorm_epsilon", float(hf["rms_norm_eps"])),), carried=False),
        Setting(("--disable-bias-linear",), "config", (("add_bias_linear", False),)),
        Setting(("--attention-dropout", "0", "--hidden-dropout", "0"), "config",
                (("attention_dropout", 0.0), ("hidden_dropout", 0.0))),  # Llama has none (lightseq: required)
        Setting(("--position-embedding-type", "rope"), "model", (("position_embedding_type", "rope"),)),
        Setting(("--rotary-base", str(int(theta))), "model", (("rotary_base", int(theta)),), carried=False),
    ]
    if groups != heads:
        rows.insert(4, Setting(("--group-query-attention", "--num-query-groups", str(groups)), "config",
                               (("num_query_groups", groups),)))
    head_dim = hf.get("head_dim")
    if head_dim and head_dim != hidden // heads:
        rows.append(Setting(("--kv-channels", str(head_dim)), "config", (("kv_channels", head_dim),)))
    if scaling:
        factor = float(scaling["factor"])
        rows.append(Setting(("--use-rope-scaling", "--rope-scaling-factor", repr(factor)), "model",
                            (("rope_scaling", True), ("rope_scaling_factor", factor)), carried=False))
    if not hf.get("tie_word_embeddings", False):
        rows.append(Setting(("--untie-embeddings-and-output-weights",), "model",
                            (("share_embeddings_and_output_weights", False),)))
    return rows


def megatron_flags(source, *, not_carried_only: bool = False) -> list[str]:
    return [f for s in settings(source) if not (not_carried_only and s.carried) for f in s.flags]


def transformer_config_kwargs(source) -> dict:
    """TransformerConfig fields (activation_func as torch's SiLU)."""
    found = {k: v for s in settings(source) if s.where == "config" for k, v in s.values}
    found["activation_func"] = torch.nn.functional.silu  # --swiglu
    return found


def gpt_model_kwargs(source) -> dict:
    """GPTModel keywords (vocab_size from the config; Megatron pads it per TP, the converter too)."""
    hf = read_config(source)
    found = {k: v for s in settings(hf) if s.where == "model" for k, v in s.values}
    return dict(found, vocab_size=hf["vocab_size"])


def megatron_state_dict(hf_state_dict: dict, source) -> dict:
    """An HF LlamaForCausalLM state dict in Megatron-Core's names and layouts (the local layer spec,
    TP = 1; what the converter writes for the local spec): q, k, v fused per query group, gate and
    up fused."""
    hf = read_config(source)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    sd = {k.removeprefix("model."): v for k, v in hf_state_dict.items()}
    out = {"embedding.word_embeddings.weight": sd["embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["norm.weight"]}
    if "lm_head.weight" in hf_state_dict and not hf.get("tie_word_embeddings", False):
        out["output_layer.weight"] = hf_state_dict["lm_head.weight"]
    for i in range(hf["num_hidden_layers"]):
        hf_layer, layer = f"layers.{i}.", f"decoder.layers.{i}."
        q = sd[hf_layer + "self_attn.q_proj.weight"].view(groups, heads // groups * head_dim, hidden)
        k = sd[hf_layer + "self_attn.k_proj.weight"].view(groups, head_dim, hidden)
        v = sd[hf_layer + "self_attn.v_proj.weight"].view(groups, head_dim, hidden)
        out[layer + "self_attention.linear_qkv.weight"] = \
            torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * head_dim, hidden)
        out[layer + "self_attention.linear_proj.weight"] = sd[hf_layer + "self_attn.o_proj.weight"]
        out[layer + "input_layernorm.weight"] = sd[hf_layer + "input_layernorm.weight"]
        out[layer + "pre_mlp_layernorm.weight"] = sd[hf_layer + "post_attention_layernorm.weight"]
        out[layer + "mlp.linear_fc1.weight"] = torch.cat([sd[hf_layer + "mlp.gate_proj.weight"],
                                                     sd[hf_layer + "mlp.up_proj.weight"]], dim=0)
        out[layer + "mlp.linear_fc2.weight"] = sd[hf_layer + "mlp.down_proj.weight"]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megatron_lightseq hf-flags",
                                description="The Megatron-LM flags of a Hugging Face Llama model (its config.json), "
                                            "one per line: the model's shape, and the flags Megatron-LM's checkpoint "
                                            "converter does not carry (docs/huggingface.md).")
    p.add_argument("model", help="a Hugging Face model folder (with config.json), or the config.json")
    p.add_argument("--not-carried", action="store_true",
                   help="only the flags the converter's checkpoint does not carry (rotary base, RoPE scaling, "
                        "norm epsilon)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = [s for s in settings(args.model) if not (args.not_carried and s.carried)]
    except (ValueError, KeyError) as e:
        print(f"error: {e if isinstance(e, ValueError) else f'config.json lacks {e}'}", file=sys.stderr)
        return 2
    for s in rows:
        print(" ".join(s.flags) + ("" if s.carried else "   # not carried by Megatron-LM's converter"))
    return 0
