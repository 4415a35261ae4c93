"""The search: every configuration Megatron accepts (config.configurations), its memory first
(those that do not fit are not timed), then its step time (step.estimate); the fastest per
system by tokens per second per GPU. Closed forms throughout (no plan over more than 16 ranks is
built), so 4096 GPUs plan in seconds; a progress bar (tqdm, on stderr) shows past 2 s.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from .config import Config, configurations, default_global_batch
from .memory import memory
from .model import Machine, ModelSpec
from .step import Estimate, estimate

SYSTEMS = ("lightseq", "megatron")
TIE = 1e-3  # predictions closer than this fraction are a tie: the fewer cross-node bytes win


@dataclass
class Result:
    seq: int
    gpus: int
    gpus_per_node: int
    global_batch: int
    searched: int  # configurations
    fitting: list[Estimate]  # those whose memory fits, timed
    seconds: float  # planning time
    best: dict[str, Estimate | None] = field(default_factory=dict)

    def ranked(self, system: str) -> list[Estimate]:
        """The system's fitting configurations, fastest first, the chosen one (``best``) at the top."""
        mine = sorted((e for e in self.fitting if e.config.system == system), key=lambda e: -e.tokens_per_s_per_gpu)
        chosen = self.best.get(system)
        return ([chosen] + [e for e in mine if e is not chosen]) if chosen else mine

    @property
    def speedup(self) -> float | None:
        """LightSeq's tokens per second per GPU over Megatron's, each at its best."""
        ls, mg = self.best.get("lightseq"), self.best.get("megatron")
        return ls.tokens_per_s_per_gpu / mg.tokens_per_s_per_gpu if ls and mg else None


def choose(found: list[Estimate]) -> Estimate | None:
    """The most tokens per second per GPU; among those within TIE of it, K/V in their own dtype
    (int8 on the wire is recommended only where it makes the step faster: where the exchange is
    exposed), the fewest bytes across nodes, then the fewest GPUs per sequence (TP x CP x PP),
    then the faster, then the shorter layer (steps bound by an exposed gradient reduction tie
    exactly), then the least memory."""
    if not found:
        return None
    fastest = max(e.tokens_per_s_per_gpu for e in found)
    tied = [e for e in found if e.tokens_per_s_per_gpu >= fastest * (1 - TIE)]
    return min(tied, key=lambda e: (e.config.comm.kv_wire is not None, e.inter_bytes,
                                    e.config.tp * e.config.cp * e.config.pp,
                                    -e.tokens_per_s_per_gpu, e.layer_seconds, e.memory.total))


def search(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, *, global_batch: int | None = None,
           recompute: tuple[str, ...] = ("full",), fsdp: bool = False, progress: bool = True, **fixed) -> Result:
    """``fixed``: tp=, cp=, pp= to hold a size, docs=, window= (config.configurations);
    ``global_batch`` None: config.default_global_batch."""
    start = time.perf_counter()
    fits = lambda c: memory(model, seq, c).total <= m.budget_bytes
    if global_batch is None:
        global_batch = default_global_batch(model, seq, gpus, gpus_per_node, fits, recompute=recompute, fsdp=fsdp,
                                            **fixed)
    found = configurations(model, seq, gpus, gpus_per_node, global_batch, recompute=recompute, fsdp=fsdp, **fixed)
    fitting = []
    bar = tqdm(found, desc="planning", unit=" configurations", file=sys.stderr, delay=2, disable=not progress,
               leave=False)
    for cfg in bar:
        if fits(cfg):
            fitting.append(estimate(model, seq, cfg, gpus_per_node, m))
    result = Result(seq, gpus, gpus_per_node, global_batch, len(found), fitting, time.perf_counter() - start)
    result.best = {s: choose([e for e in fitting if e.config.system == s]) for s in SYSTEMS}
    return result


def brute_force(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, m: Machine, global_batch: int,
                system: str) -> Config | None:
    """Every (TP, SP, CP, PP, DP, CP communication) the rules allow, written out without the
    search's enumeration or pruning, each estimated; the fastest that fits (for the tests)."""
    from .attention import comms

    best = None
    for tp in range(1, gpus_per_node + 1):
        if gpus_per_node % tp or model.heads % tp or (model.kv_heads % tp and tp % model.kv_heads):
            continue
        for cp in range(1, gpus + 1):
            for pp in range(1, model.layers + 1):
                dp = gpus // (tp * cp * pp)
                if model.layers % pp or dp * tp * cp * pp != gpus or global_batch % dp or (cp > 1 and seq % (2 * cp)):
                    continue
                for comm in comms(model, tp, cp):
                    for sp in {False, tp > 1}:
                        cfg = Config(tp, cp, pp, dp, sp, comm, global_batch // dp)
                        e = estimate(model, seq, cfg, gpus_per_node, m)
                        if cfg.system == system and e.fits:
                            best = choose([best, e]) if best else e
    return best and best.config
