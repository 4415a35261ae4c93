"""megatron-lightseq: LightSeq sequence-parallel attention (DistAttn) for Megatron-Core."""
from .api import dist_attn
from .layout import shard, unshard
from .plan import Plan
from .schedules import build_plan, choose_schedule
from .trace import trace

__all__ = ["dist_attn", "shard", "unshard", "trace", "build_plan", "choose_schedule", "Plan"]
__version__ = "0.1.0"
