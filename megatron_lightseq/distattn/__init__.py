"""DistAttn, the core: attention over a sequence split across ranks, with its plans, their
executor and the exchange between ranks. Imports only the kernels below it (docs/architecture.md)."""
from .api import dist_attn, dist_attn_from_saved
from .failures import DistAttnError
from .layout import positions, shard, unshard
from .plan import Plan, Shape
from .schedules import build_plan, choose_schedule
from .trace import trace

__all__ = ["dist_attn", "dist_attn_from_saved", "shard", "unshard", "positions", "trace", "build_plan", "choose_schedule",
           "Plan", "Shape", "DistAttnError"]
