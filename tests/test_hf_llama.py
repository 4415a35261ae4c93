"""From Hugging Face to the lightseq backend (docs/huggingface.md): a tiny LlamaForCausalLM built here
from a config (Llama 3.1's rope_theta and RoPE scaling, GQA, untied output; no download), converted
in-process the way Megatron-LM's converter converts it (megatron_lightseq.jobs.hf_llama: the weights
in Megatron-Core's names, the model's settings as the recipe's flags give them), gives Hugging Face's
logits, loss and gradients through the lightseq backend at CP = 4 and 2, plain and with packed
documents (HF run per document); each setting the converter does not carry changes the logits.
Megatron-LM's converter itself is not run here: it needs a GPU, TransformerEngine and nvcc
(docs/huggingface.md, step 1, says what was found running it on CPU)."""
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from harness import run_ranks  # noqa: E402
from hf_cases import TINY, tiny_llama  # noqa: E402

from megatron_lightseq.jobs import hf_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 2, 32
DOCS = (0, 5, 19, 32)  # packed documents of one sequence (cu_seqlens)
TOL = dict(rtol=1e-6, atol=1e-6)  # float64, but HF's RMSNorm and RoPE compute in float32
# The Hub's meta-llama/Llama-3.1-8B config.json (the fields the flags come from).
LLAMA_31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                   rms_norm_eps=1e-05, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, head_dim=128,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192, rope_type="llama3"))


def _hf_reference():
    """The HF model's Megatron state dict; for the plain batch and the packed one: tokens, labels,
    logits, the mean loss and its gradients (in Megatron's names)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    found = {"state": hf_llama.megatron_state_dict(model.state_dict(), TINY)}
    for kind, batch in (("plain", BATCH), ("packed", 1)):
        tokens = torch.randint(0, TINY["vocab_size"], (batch, SEQ), generator=g)
        labels = torch.randint(0, TINY["vocab_size"], (batch, SEQ), generator=g)
        model.zero_grad()
        if kind == "plain":
            logits = model(input_ids=tokens).logits
        else:  # each document alone, its positions from 0: what packing with documents means
            logits = torch.cat([model(input_ids=tokens[:, a:b]).logits for a, b in zip(DOCS, DOCS[1:])], dim=1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        grads = hf_llama.megatron_state_dict({n: p.grad for n, p in model.named_parameters()}, TINY)
        found[kind] = dict(tokens=tokens, labels=labels, logits=logits.detach(), loss=loss.item(), grads=grads)
    return found


def _model(cp, backend, layout, **changed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_lightseq.megatron.config import LightSeqConfig

    kwargs = {**hf_llama.transformer_config_kwargs(TINY), **hf_llama.gpt_model_kwargs(TINY), **changed}
    config_fields = {k: v for k, v in kwargs.items() if k in TransformerConfig.__dataclass_fields__}
    config = TransformerConfig(**config_fields, use_cpu_initialization=True, context_parallel_size=cp,
                               attention_backend=backend, params_dtype=torch.float64)
    config.lightseq = LightSeqConfig(layout=layout)
    model = GPTModel(config, get_gpt_layer_local_spec(), max_sequence_length=SEQ,
                     **{k: v for k, v in kwargs.items() if k not in config_fields}).to(torch.float64)
    return model


def _run(model, batch, params, group):
    """(logits, mean loss over the whole batch, gradients summed over the CP group)."""
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=params)
    total = per_token.sum() / (per_token.numel() * group.size())
    total.backward()
    loss = total.detach().clone()
    dist.all_reduce(loss, group=group)
    for p in model.parameters():  # Megatron's DP x CP gradient reduction
        dist.all_reduce(p.grad, group=group)
    return logits, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _equal_to_hf(rank, world_size, ref):
    import megatron_lightseq as mls
    import megatron_lightseq.megatron as mlm
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from gpt_cases import setup_rank
    from megatron_lightseq.distattn.plan import layout as layouts

    layouts.MIN_CHUNK_TOKENS = 2  # several chunks a rank in this short sequence (this process only)
    setup_rank(None)
    seen = []
    for cp in (4, 2):  # CP = 2: two data-parallel copies of the CP group, the same batch
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, 1, context_parallel_size=cp, create_gloo_process_groups=False)
        group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
        for kind, layout, cu in (("plain", "zigzag", None), ("packed", "balanced", DOCS)):
            want = ref[kind]
            model = _model(cp, mlm.lightseq_backend(), layout)
            model.load_state_dict(ref["state"], strict=False)  # (the state dict holds no RoPE buffers)
            missing = set(n for n, _ in model.named_parameters()) - set(ref["state"])
            assert not missing, missing
            full = dict(tokens=want["tokens"], labels=want["labels"],
                        position_ids=torch.arange(SEQ).expand_as(want["tokens"]).contiguous())
            local = mlm.get_batch_on_this_cp_rank(full, layout=layout, cu_seqlens=cu)
            params = None if cu is None else PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32))
            logits, loss, grads = _run(model, local, params, group)
            shard = mls.shard(want["logits"], layout=layout, rank=cp_rank, world_size=cp, dim=1, cu_seqlens=cu)
            label = f"CP={cp} {kind}"
            torch.testing.assert_close(logits, shard, **TOL, msg=lambda m: f"{label} logits: {m}")
            assert loss == pytest.approx(want["loss"], rel=TOL["rtol"]), (label, loss, want["loss"])
            for name, g in grads.items():
                torch.testing.assert_close(g, want["grads"][name], **TOL, msg=lambda m: f"{label} grad {name}: {m}")
            seen.append(label)
    # Each setting the converter's checkpoint does not carry, left at Megatron's default: how far the logits move.
    dropped = {"rotary_base": 10000, "rope_scaling": False, "layernorm_epsilon": 1e-5}
    want = ref["plain"]
    full = dict(tokens=want["tokens"], labels=want["labels"],
                position_ids=torch.arange(SEQ).expand_as(want["tokens"]).contiguous())
    local = mlm.get_batch_on_this_cp_rank(full, layout="zigzag")
    shard = mls.shard(want["logits"], layout="zigzag", rank=cp_rank, world_size=2, dim=1)
    for name, default in dropped.items():
        model = _model(2, mlm.lightseq_backend(), "zigzag", **{name: default})
        model.load_state_dict(ref["state"], strict=False)
        with torch.no_grad():
            off = (model(local["tokens"], local["position_ids"], None) - shard).abs().max().item()
        seen.append((name, off))
    return seen


def test_converted_llama_through_lightseq_equals_hugging_face():
    results = run_ranks(4, _equal_to_hf, _hf_reference())
    # every rank compared every case; each dropped setting moves the logits well past the tolerance
    assert all(r[:4] == ["CP=4 plain", "CP=4 packed", "CP=2 plain", "CP=2 packed"] for r in results)
    for i, name in enumerate(("rotary_base", "rope_scaling", "layernorm_epsilon")):
        moved = max(r[4 + i][1] for r in results)  # the largest logit change over the ranks' tokens
        assert moved > 10 * TOL["atol"], (name, moved, [r[4:] for r in results])  # (measured: 4e-3, 5e-5, 7e-3)


def _config_file_flags(name):
    """ARGS of configs/<name>.sh, as the sbatch scripts source it."""
    done = subprocess.run(["bash", "-c", f'ARGS=(); source "{ROOT}/configs/{name}.sh"; printf "%s\\n" "${{ARGS[@]}}"'],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_llama31_config_file_is_the_hub_models_flags():
    flags = hf_llama.megatron_flags(LLAMA_31_8B)
    assert _config_file_flags("llama3.1-8b") == flags
    assert hf_llama.megatron_flags(LLAMA_31_8B, not_carried_only=True) == [
        "--norm-epsilon", "1e-05", "--rotary-base", "500000", "--use-rope-scaling", "--rope-scaling-factor", "8.0"]
    # transformers 5.x writes the same model's RoPE as one rope_parameters entry
    v5 = {k: v for k, v in LLAMA_31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(LLAMA_31_8B["rope_scaling"], rope_theta=500000.0)
    assert hf_llama.megatron_flags(v5) == flags


def test_the_llama7b_config_file_holds_llama2_7bs_flags():
    """configs/llama7b.sh (Llama-7B trained from scratch) is also the Hub's Llama-2-7b-hf: every flag
    its config.json implies is there, in one run each."""
    llama2 = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                  rms_norm_eps=1e-05, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False)
    flags = _config_file_flags("llama7b")
    runs = [flags[i:] for i in range(len(flags))]
    for setting in hf_llama.settings(llama2):
        assert any(tuple(run[:len(setting.flags)]) == setting.flags for run in runs), setting.flags


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "Megatron's --use-rope-scaling is Llama 3's"),
    (dict(rope_scaling=dict(LLAMA_31_8B["rope_scaling"], original_max_position_embeddings=4096)),
     "this config's rope_scaling is"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="mistral"), "expected a Llama config (model_type 'llama'), got model_type 'mistral'"),
])
def test_what_megatron_cannot_express_is_refused(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_llama.megatron_flags(dict(LLAMA_31_8B, **change))


def test_hf_flags_command(tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    assert hf_llama.main([str(tmp_path), "--not-carried"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "--norm-epsilon 1e-05   # not carried by Megatron-LM's converter",
        "--rotary-base 500000   # not carried by Megatron-LM's converter",
        "--use-rope-scaling --rope-scaling-factor 8.0   # not carried by Megatron-LM's converter"]
    assert hf_llama.main([str(tmp_path / "nowhere")]) == 2
    assert "expected a Hugging Face model folder with a config.json" in capsys.readouterr().err
