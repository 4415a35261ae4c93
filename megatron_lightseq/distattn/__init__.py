"""DistAttn, the core: attention over a sequence split across ranks. Three parts, imports one
way (docs/architecture.md): ``plan/`` (what runs where, as data: masks, layouts, plans, the call
description; no process group), ``transport/`` (exchange between ranks, deadlines, agreement,
counters), ``run/`` (the executor, the all-to-all, the pipeline and its autograd Function,
emulation, the memory model), with ``api.py`` on top. These names are the public API (the
planner and the Megatron glue use nothing else)."""
from .api import dist_attn, dist_attn_from_saved
from .plan.call import Call
from .plan.hybrid import HeadSplit, HybridPlan, build_hybrid_plan, replicated_kv_heads, split_problem
from .plan.layout import LAYOUTS, positions, shard, unshard
from .plan.mask import Mask, mask_of
from .plan.plan import Plan, RankPlan, Shape, payload_bytes
from .plan.schedules import SCHEDULES, build_plan, choose_schedule
from .run.emulate import emulate_dist_attn
from .run.memory import attention_bytes, attention_rank_bytes, block_bytes
from .transport.failures import DistAttnError
from .transport.trace import trace

__all__ = ["dist_attn", "dist_attn_from_saved", "shard", "unshard", "positions", "trace", "build_plan", "choose_schedule",
           "Plan", "RankPlan", "Shape", "Mask", "mask_of", "Call", "DistAttnError", "payload_bytes", "LAYOUTS",
           "SCHEDULES", "build_hybrid_plan", "HybridPlan", "HeadSplit", "split_problem", "replicated_kv_heads",
           "emulate_dist_attn", "attention_bytes", "attention_rank_bytes", "block_bytes"]
