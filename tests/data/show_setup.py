"""A stand-in for pretrain_gpt.py: reports what the runner set up, as JSON on stdout."""
import json
import sys

import megatron.core.utils as core_utils
from megatron.core.transformer.enums import AttnBackend

import megatron_lightseq.megatron as mlm

print(json.dumps({
    "argv": sys.argv[1:],
    "backends": [b.name for b in AttnBackend],
    "config": vars(mlm.active_config()) if hasattr(mlm.active_config(), "__dict__") else str(mlm.active_config()),
    "batch_split_wired": hasattr(core_utils.get_batch_on_this_cp_rank, "lightseq_original"),
    "main": __name__,
}))
