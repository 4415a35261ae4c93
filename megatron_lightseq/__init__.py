"""megatron-lightseq: LightSeq sequence-parallel attention (DistAttn) for Megatron-Core."""
from .distattn import (DistAttnError, Plan, Shape, build_plan, choose_schedule, dist_attn, positions, shard,
                       trace, unshard)

__all__ = ["dist_attn", "shard", "unshard", "positions", "trace", "build_plan", "choose_schedule", "Plan",
           "Shape", "DistAttnError"]
__version__ = "0.1.0"
