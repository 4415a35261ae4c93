"""``pretrain_gpt_te_standin.py PRETRAIN_GPT [args]``: Megatron-LM's pretrain_gpt.py with the TE
core-attention stand-in (tests/te_standin.py) in its local layer spec, for checkpoint tests."""
import importlib
import os
import runpy
import sys

script = os.path.abspath(sys.argv[1])
sys.argv = [script, *sys.argv[2:]]
sys.path[:0] = [os.path.dirname(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from te_standin import with_te_standin  # noqa: E402

# Where pretrain_gpt.py picks the local layer spec by name: gpt_builders (core_v0.16.1) and
# megatron.training.models.gpt (core_v0.19.0's model builder).
for name in ("gpt_builders", "megatron.training.models.gpt"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    local_spec = module.get_gpt_layer_local_spec
    module.get_gpt_layer_local_spec = \
        lambda *args, _local_spec=local_spec, **kwargs: with_te_standin(_local_spec(*args, **kwargs))
runpy.run_path(script, run_name="__main__")
