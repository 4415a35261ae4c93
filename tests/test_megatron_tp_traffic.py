"""The planner's Megatron TP collectives, counted on real megatron-core TP=2 and TP=4 models (CPU gloo).

gloo has no reduce-scatter and its tensor all-gather differs across versions, so the counting
wrappers carry out both with all_reduce / all_gather (what is counted is the collective Megatron
asked for, by kind and full size). The per-layer collectives are those of a 2-layer model minus
those of a 1-layer model (embedding and loss cancel). Megatron's torch LayerNorm refuses sequence
parallelism (apex or TransformerEngine norms are expected); for counting collectives it is built
as if SP were off, which changes no collective (SP norms only mark their weights for the grad sync).
"""
import collections

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from gpt_cases import Case, build_model, full_batch, init_parallel, setup_rank, total_loss  # noqa: E402
from harness import run_ranks  # noqa: E402
from megatron_lightseq.planner.model import ModelSpec  # noqa: E402
from megatron_lightseq.planner.traffic import tp_collectives  # noqa: E402

# gpt_cases' model, fp32; batch 2 x 24 tokens
CASE_MODEL = ModelSpec("gpt_cases", layers=1, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=96, dtype_bytes=4)


class _Done:
    def wait(self):
        pass


def _install_counters(log):
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings

    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def counted_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if group is not None and group.size() > 1:
            log.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    def counted_all_gather(output, input_, group=None, async_op=False):
        log.append(("all_gather", output.numel() * output.element_size()))
        parts = [torch.empty_like(input_) for _ in range(group.size())]
        all_gather(parts, input_.contiguous(), group=group)
        output.copy_(torch.cat(parts).view_as(output))
        return _Done() if async_op else None

    def counted_reduce_scatter(output, input_, group=None, async_op=False):
        log.append(("reduce_scatter", input_.numel() * input_.element_size()))
        summed = input_.clone()
        all_reduce(summed, group=group)
        output.copy_(summed.chunk(group.size())[group.rank()].view_as(output))
        return _Done() if async_op else None

    dist.all_reduce = counted_all_reduce
    for module in (layers, mappings):
        module.dist_all_gather_func = counted_all_gather
        module.dist_reduce_scatter_func = counted_reduce_scatter


VARIANTS = [(sp, rc) for sp in (False, True) for rc in (False, True)]


def _per_layer(rank, world_size):
    """For each (sequence_parallel, recompute): one layer's collectives, forward and backward."""
    from megatron.core.transformer.enums import AttnBackend

    setup_rank(Case(tp=world_size, cp=1))
    log = []
    _install_counters(log)  # setup_rank's CPU stand-ins let the torch norm take sequence parallelism
    results = []
    for sequence_parallel, recompute in VARIANTS:
        counts = {}
        for layers in (1, 2):
            case = Case(tp=world_size, cp=1, layers=layers, recompute="uniform" if recompute else None,
                        sequence_parallel=sequence_parallel)
            init_parallel(case, 1)
            model = build_model(case, cp=1, backend=AttnBackend.local)
            start = len(log)
            loss = total_loss(model, full_batch())
            middle = len(log)
            loss.backward()
            counts[layers] = (collections.Counter(log[start:middle]), collections.Counter(log[middle:]))
        results.append([counts[2][i] - counts[1][i] for i in range(2)])
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_collectives_match_the_planner(tp):
    for (sequence_parallel, recompute), (forward, backward) in zip(VARIANTS, run_ranks(tp, _per_layer)[0]):
        expected = tp_collectives(CASE_MODEL, 24, tp, sequence_parallel=sequence_parallel, recompute=recompute,
                                  batch=2)
        label = f"TP={tp} SP={sequence_parallel} recompute={recompute}"
        # Megatron runs the recompute's forward inside the backward: compare the step's totals, and
        # without recompute also each phase. (TP = 4 has more ranks than KV heads: the QKV gather.)
        assert forward + backward == collections.Counter(op for ph in expected.values() for op in ph), label
        if not recompute:
            assert forward == collections.Counter(expected["forward"]), label
