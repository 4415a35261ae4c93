"""``pretrain_gpt_te_standin.py PRETRAIN_GPT [args]``: Megatron-LM's pretrain_gpt.py with the TE
core-attention stand-in (tests/te_standin.py) in its local layer spec, for checkpoint tests."""
import os
import runpy
import sys

script = os.path.abspath(sys.argv[1])
sys.argv = [script, *sys.argv[2:]]
sys.path[:0] = [os.path.dirname(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import gpt_builders  # noqa: E402  (beside pretrain_gpt.py; it picks the layer spec by this name)
from te_standin import with_te_standin  # noqa: E402

local_spec = gpt_builders.get_gpt_layer_local_spec
gpt_builders.get_gpt_layer_local_spec = lambda *args, **kwargs: with_te_standin(local_spec(*args, **kwargs))
runpy.run_path(script, run_name="__main__")
