"""Registering the lightseq attention backend with Megatron-Core.

- ``AttnBackend`` gains a ``lightseq`` member in place, so ``--attention-backend lightseq`` parses
  (Megatron builds the flag's choices from the enum) and checkpoints that pickled it load.
- ``GPTModel.__init__`` is wrapped: when ``config.attention_backend`` is lightseq, every
  self-attention's ``core_attention`` slot in the given spec (local or TransformerEngine, dense or
  MoE block spec, MTP block spec) is set to :class:`LightSeqAttention`, with the model's settings
  as its ModuleSpec params, before the model is built, and the rotary positions follow the
  layout. Models with other backends are untouched.

The model's settings: ``config.lightseq`` (a LightSeqConfig on its TransformerConfig) if set, else
the ones given to :func:`register` (the command line's ``--lightseq-*`` flags, via ``setup()``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec

from .config import LightSeqConfig, layout_for, settings_of
from .core_attention import LightSeqAttention
from .packed import for_megatron, packing_of, packing_of_mask, sbhd_params
from .positions import LayoutRotaryEmbedding, follow_layout

NAME = "lightseq"
# A string, not the next integer: it can never collide with a backend Megatron adds later.
VALUE = "lightseq"


def _extend_enum(enum_cls, name: str, value) -> None:
    if name in enum_cls.__members__:
        return
    member = object.__new__(enum_cls)
    member._name_, member._value_ = name, value
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)


def lightseq_backend():
    """The ``AttnBackend.lightseq`` member (after :func:`register`)."""
    return AttnBackend[NAME]


def with_lightseq_attention(spec, settings: LightSeqConfig):
    """A copy of ``spec`` with LightSeqAttention, built with ``settings``, in every self-attention's
    core_attention slot."""
    spec = copy.deepcopy(spec)
    found = []

    def visit(node) -> None:
        if isinstance(node, ModuleSpec):
            visit(node.submodules)
        elif isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            if hasattr(node, "core_attention"):
                if type(node) is not SelfAttentionSubmodules:
                    raise NotImplementedError(
                        f"the lightseq backend replaces plain self-attention only, found {type(node).__name__}")
                node.core_attention = ModuleSpec(module=LightSeqAttention, params={"settings": settings})
                found.append(node)
            for f in dataclasses.fields(node):
                visit(getattr(node, f.name))

    visit(spec)
    if not found:
        raise NotImplementedError(f"no self-attention core_attention slot found in the layer spec {type(spec).__name__}")
    return spec


def _wrap_gpt_init(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments["config"]
        active = getattr(config, "attention_backend", None) == AttnBackend[NAME]
        if active:
            settings = settings_of(config) or __init__.lightseq_defaults
            for name in ("transformer_layer_spec", "mtp_block_spec"):
                if bound.arguments.get(name) is not None:
                    bound.arguments[name] = with_lightseq_attention(bound.arguments[name], settings)
        init(*bound.args, **bound.kwargs)
        if active:
            self.lightseq_packs = follow_layout(self, layout_for(settings, packed=False), layout_for(settings, packed=True))

    __init__.lightseq_defaults = LightSeqConfig()
    return __init__


def _wrap_gpt_forward(forward):
    """For packed documents (in packed_seq_params, or read from the batch in place of the dense
    attention_mask: packed.in_place_of_mask): the rotary positions of this rank's tokens for the
    batch, and the packed_seq_params Megatron's own layers should see (packed.for_megatron)."""
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def forward_(self, *args, **kwargs):
        if not hasattr(self, "lightseq_packs"):  # not a lightseq model
            return forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        packing = packing_of(bound.arguments.get("packed_seq_params"))
        from_mask = packing_of_mask(bound.arguments.get("attention_mask"))  # --reset-attention-mask's documents
        if packing is None and from_mask is None:
            return forward(*bound.args, **bound.kwargs)
        if not self.lightseq_packs:
            raise NotImplementedError(f"the lightseq backend takes packed documents with plain RoPE, this model has "
                                      f"{type(self.rotary_pos_emb).__name__}")
        if packing is None:
            packing = from_mask
            bound.arguments["attention_mask"] = None
            bound.arguments["packed_seq_params"] = sbhd_params(packing)
        else:
            bound.arguments["packed_seq_params"] = for_megatron(bound.arguments["packed_seq_params"], packing)
        rope = getattr(self, "rotary_pos_emb", None)
        if isinstance(rope, LayoutRotaryEmbedding):
            rope.lightseq_packing = packing
        try:
            return forward(*bound.args, **bound.kwargs)
        finally:
            if isinstance(rope, LayoutRotaryEmbedding):
                rope.lightseq_packing = None

    return forward_


def register(defaults: LightSeqConfig | None = None) -> None:
    """Make ``lightseq`` a Megatron attention backend. Idempotent; call before arguments are parsed
    (and before a checkpoint that names the backend is loaded). ``defaults``: the settings of models
    whose TransformerConfig carries none (kept as they were when not given)."""
    _extend_enum(AttnBackend, NAME, VALUE)
    if not hasattr(GPTModel.__init__, "lightseq_defaults"):
        GPTModel.__init__ = _wrap_gpt_init(GPTModel.__init__)
        GPTModel.forward = _wrap_gpt_forward(GPTModel.forward)
    if defaults is not None:
        if not isinstance(defaults, LightSeqConfig):
            raise ValueError(f"register: defaults must be a LightSeqConfig, got {type(defaults).__name__}")
        GPTModel.__init__.lightseq_defaults = defaults
