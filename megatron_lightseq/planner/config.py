"""A training configuration (TP x CP x PP x DP, the CP communication, recompute, optimizer
sharding) and the configurations Megatron-LM accepts for a model, a sequence and a GPU count.

Megatron's rules (read in megatron/training/arguments.py and transformer_config.py at core_v0.16.1):
- TP divides the attention heads; the K/V heads (query groups) are a multiple or a divisor of TP
  (fewer K/V heads than TP ranks are replicated). The planner keeps TP within a node and a
  divisor of the GPUs per node (across nodes TP's collectives would take the network).
- sequence parallelism needs TP > 1; CP > 1 needs the sequence to divide by 2 x CP (the zigzag split).
- PP: the layers divide by PP (equal stages); DP = GPUs / (TP x CP x PP); the global batch
  divides by DP (micro-batch of one sequence: the global batch / DP micro-batches per step).
- --cp-comm-type a2a and a2a+p2p: TransformerEngine needs the query and K/V heads per TP rank to
  divide by the all-to-all group (attention.comms has what each system allows).
Rank order is Megatron's default tp-cp-ep-dp-pp: a TP group is consecutive GPUs, a CP group every
TP-th GPU after it, so TP x CP GPUs in a row hold one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import Comm, NO_CP, comms, divisors
from .model import ModelSpec

RECOMPUTE = ("full", "none")


@dataclass(frozen=True)
class Config:
    tp: int
    cp: int
    pp: int
    dp: int
    sp: bool  # Megatron's sequence parallelism (norms and dropout split over TP)
    comm: Comm  # how the CP group talks (NO_CP at CP = 1)
    microbatches: int  # per DP replica per step
    recompute: str = "full"  # "full": one checkpoint per layer; "none": every activation kept
    fsdp: bool = False  # Megatron-FSDP (params, grads, optimizer sharded) instead of the distributed optimizer

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def system(self) -> str:
        """Who runs the attention: "lightseq" (the plugin) or "megatron" (its own, no plugin)."""
        return self.comm.system if self.cp > 1 else "megatron"

    @property
    def name(self) -> str:
        sp = "+SP" if self.sp else ""
        kept = ", no recompute" if self.recompute == "none" else ""  # full recompute: the common case, unnamed
        return f"TP{self.tp}{sp} CP{self.cp} PP{self.pp} DP{self.dp} {self.comm.name(self.cp)}{kept}"


def tp_sizes(model: ModelSpec, gpus: int, gpus_per_node: int) -> list[int]:
    return [t for t in divisors(min(gpus, gpus_per_node)) if gpus_per_node % t == 0 and gpus % t == 0
            and model.heads % t == 0 and (model.kv_heads % t == 0 or t % model.kv_heads == 0)]


def masked_comm_ok(comm: Comm, cp: int, docs: bool, window: bool) -> bool:
    """Whether a CP communication runs packed documents or a sliding window: the plugin only on its
    flat plans (it refuses hybrid CP on packed data; windows are planned flat here too);
    TransformerEngine runs packed (THD) sequences on p2p, and a window only on a2a (its p2p and
    a2a+p2p drop windows; TE 2.x attention/dot_product_attention/context_parallel.py)."""
    if comm.system == "lightseq":
        return comm.inner == 1 or not (docs or window)
    if docs and comm.inner != 1:
        return False
    return not window or comm.inner == cp


def configurations(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, global_batch: int, *,
                   recompute: tuple[str, ...] = ("full",), fsdp: bool = False, docs: bool = False,
                   window: bool = False, tp=None, cp=None, pp=None) -> list[Config]:
    """Every configuration Megatron accepts (module docstring); ``tp``, ``cp``, ``pp`` fix a size;
    ``docs``/``window``: only the CP communications that run them (masked_comm_ok)."""
    found = []
    for t in tp_sizes(model, gpus, gpus_per_node) if tp is None else [tp]:
        for p in (divisors(model.layers) if pp is None else [pp]):
            if (gpus // t) % p or p > gpus // t:
                continue
            for c in divisors(gpus // (t * p)) if cp is None else [cp]:
                d, rest = divmod(gpus, t * p * c)
                if rest or global_batch % d or (c > 1 and seq % (2 * c)):
                    continue
                ways = comms(model, t, c) if c > 1 else [NO_CP]
                for comm in ways:
                    if c > 1 and not masked_comm_ok(comm, c, docs, window):
                        continue
                    for sp in ((False, True) if t > 1 else (False,)):
                        for r in recompute:
                            found.append(Config(t, c, p, d, sp, comm, global_batch // d, r, fsdp))
    return found


def default_global_batch(model: ModelSpec, seq: int, gpus: int, gpus_per_node: int, fits, **options) -> int:
    """The smallest global batch that uses every GPU: one sequence per replica of the most
    data-parallel configuration whose memory fits (``fits(config)``), i.e. GPUs / its TP x CP x PP.
    When none fits, GPUs / the largest model-parallel group (the search then says nothing fits)."""
    groups = sorted({c.tp * c.cp * c.pp for c in configurations(model, seq, gpus, gpus_per_node, gpus, **options)})
    for group in groups:
        batch = gpus // group
        if any(fits(c) for c in configurations(model, seq, gpus, gpus_per_node, batch, **options)
               if c.tp * c.cp * c.pp == group):
            return batch
    return gpus // groups[-1] if groups else 1
