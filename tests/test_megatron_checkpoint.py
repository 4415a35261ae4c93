"""What a checkpoint holds of the lightseq backend: nothing of its own (the same entries, plain and
sharded, as Megatron's local attention), and strict loads both ways with TransformerEngine's core
attention (a stand-in: tests/te_standin.py), whose state_dict carries core_attention._extra_state.
tests/test_pretrain_gpt.py does the same through pretrain_gpt.py's --save/--load when MEGATRON_LM is set."""
import pytest
import torch

pytest.importorskip("megatron.core")

from gpt_cases import SEQ, VOCAB, Case, _config, init_parallel, setup_rank  # noqa: E402
from harness import run_ranks  # noqa: E402


def _model(backend, te_standin=False, seed=5):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from te_standin import with_te_standin

    spec = get_gpt_layer_local_spec()
    torch.manual_seed(seed)
    return GPTModel(_config(Case(cp=1), cp=1, backend=backend), with_te_standin(spec) if te_standin else spec,
                    vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")


def _checkpoints(rank, world_size):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.module import MegatronModule

    mlm = setup_rank(Case(cp=1))
    init_parallel(Case(cp=1), 1)
    local, ours, te = _model(AttnBackend.local), _model(mlm.lightseq_backend()), _model(AttnBackend.local, True, seed=6)
    # nothing of its own: the same entries as Megatron's local attention, plain and sharded
    assert set(ours.state_dict()) == set(local.state_dict())
    assert set(ours.sharded_state_dict()) == set(local.sharded_state_dict())
    te_state = te.state_dict()
    extra = [k for k in te_state if k.endswith("core_attention._extra_state")]
    assert len(extra) == 2 and set(te_state) - set(extra) == set(ours.state_dict())
    # strict loads, both ways, and the weights arrive
    weights = {k: v for k, v in te_state.items() if isinstance(v, torch.Tensor) and k not in extra}
    assert not all(torch.equal(ours.state_dict()[k], v) for k, v in weights.items())
    ours.load_state_dict(te_state, strict=True)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in weights.items())
    te.load_state_dict(ours.state_dict(), strict=True)
    # the control: a module without the lightseq attention's load hook calls the entry unexpected
    layer = local.decoder.layers[0].self_attention.core_attention
    assert not isinstance(layer, type(ours.decoder.layers[0].self_attention.core_attention))
    assert isinstance(layer, MegatronModule)
    with pytest.raises(RuntimeError, match="Unexpected key.*_extra_state"):
        local.load_state_dict(te_state, strict=True)
    return True


def test_checkpoint_entries_and_strict_loads_with_te_attention():
    assert run_ranks(1, _checkpoints) == [True]
