"""A stand-in for pretrain_gpt.py: reports what the runner set up, as JSON on stdout."""
import json
import sys

import megatron.core.utils as core_utils
from megatron.core.transformer.enums import AttnBackend

from megatron.core.models.gpt.gpt_model import GPTModel

print(json.dumps({
    "argv": sys.argv[1:],
    "backends": [b.name for b in AttnBackend],
    "config": str(GPTModel.__init__.lightseq_defaults),  # the settings of models built from now on
    "batch_split_wired": hasattr(core_utils.get_batch_on_this_cp_rank, "lightseq_original"),
    "main": __name__,
}))
