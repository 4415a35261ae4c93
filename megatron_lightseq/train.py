"""The main job: train a tiny megatron-core GPT with the lightseq backend (sequence split over all
ranks, CP = world size), then the same model, data and seed with Megatron's tensor parallelism
(TP = world size), and compare per-step loss, tokens per second and traffic per layer.

    python -m megatron_lightseq train                 # 4 local CPU processes (gloo)
    srun ... python -m megatron_lightseq train        # one task per GPU (NCCL), scripts/*.sbatch

Traffic per layer, busiest GPU: LightSeq's measured by trace() (attention transfers), Megatron TP's
by counting its collectives (ring bytes per GPU; the embedding's and the loss's included), both
per step divided by the layer count, next to the planner's prediction for one layer.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import Place, run_everywhere


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_lightseq train", description=__doc__.splitlines()[0])
    p.add_argument("--local-ranks", type=int, default=4, help="processes to start when no launcher did")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backends", default="lightseq,tp", help="comma list of lightseq, tp")
    p.add_argument("--json", help="write the results here (rank 0)")
    args, rest = p.parse_known_args(argv)
    from .megatron.config import parse_lightseq_args

    args.lightseq, rest = parse_lightseq_args(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.backends = [b for b in args.backends.split(",") if b]
    if not set(args.backends) <= {"lightseq", "tp"}:
        p.error(f"--backends takes lightseq and/or tp, got {args.backends}")
    return args


class _CollectiveBytes:
    """Counts what Megatron's TP collectives send per GPU (ring algorithms), while active."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self):
        import megatron.core.tensor_parallel.layers as layers
        import megatron.core.tensor_parallel.mappings as mappings

        self._saved = [(dist, "all_reduce", dist.all_reduce)] + [
            (m, name, getattr(m, name)) for m in (layers, mappings)
            for name in ("dist_all_gather_func", "dist_reduce_scatter_func")]
        for owner, name, fn in self._saved:
            setattr(owner, name, self._counting(fn, 2 if name == "all_reduce" else 1, name))
        return self

    def _counting(self, fn, passes: int, name: str):
        def counted(*args, group=None, **kwargs):
            # the whole tensor: all-reduce's, all-gather's output (args[0]), reduce-scatter's input
            tensor = args[1] if name == "dist_reduce_scatter_func" else args[0]
            size = group.size() if group is not None else dist.get_world_size()
            if size > 1:
                self.bytes += passes * tensor.numel() * tensor.element_size() * (size - 1) // size
            return fn(*args, group=group, **kwargs)

        return counted

    def __exit__(self, *exc):
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)


def _data(args, device):
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    return tokens.to(device)


def _run(place: Place, args, backend: str, device) -> dict:
    import megatron_lightseq as mls
    import megatron_lightseq.megatron as mlm
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    world = place.world_size
    tp, cp = (1, world) if backend == "lightseq" else (world, 1)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, 1, context_parallel_size=cp, create_gloo_process_groups=False)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, context_parallel_size=cp,
        attention_backend=mlm.lightseq_backend() if backend == "lightseq" else AttnBackend.local)
    torch.manual_seed(0)  # the same weights for both runs (split by TP where it splits them)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=args.vocab, max_sequence_length=args.seq,
                     position_embedding_type="rope").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    group = ps.get_context_parallel_group()
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    losses, seconds = [], 0.0
    counter = _CollectiveBytes() if backend == "tp" else None
    steps = range(args.steps)
    if place.rank == 0:
        try:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"{backend} x{world}", leave=False)
        except ImportError:
            pass
    data = _data(args, device)
    with mls.trace() as t, (counter or contextlib.nullcontext()):
        for step in steps:
            batch = {"tokens": data[step, :, :-1], "labels": data[step, :, 1:], "position_ids": positions}
            if backend == "lightseq":
                batch = mlm.get_batch_on_this_cp_rank(dict(batch))
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            local = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
            loss = local / (args.batch * args.seq)
            loss.backward()
            if cp > 1:  # what Megatron's data/context-parallel grad reduction does
                for p in model.parameters():
                    dist.all_reduce(p.grad, group=group)
                dist.all_reduce(loss.detach(), group=group)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            losses.append(loss.item())
    busiest = torch.tensor([t.bytes_sent if backend == "lightseq" else counter.bytes], dtype=torch.float64,
                           device=device)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    traffic = busiest.item() / args.steps / args.layers
    return {"losses": losses, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "bytes_per_layer": traffic, "world": world}


def _rank_main(place: Place, args):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(place.local_rank)
    else:
        from .cpu_shims import install

        install()
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=place.init_method, rank=place.rank,
                            world_size=place.world_size, timeout=timedelta(minutes=5))
    import megatron_lightseq.megatron as mlm

    mlm.register()
    mlm.configure(args.lightseq)
    device = torch.device("cuda", place.local_rank) if cuda else torch.device("cpu")
    results = {b: _run(place, args, b, device) for b in args.backends}
    dist.barrier()
    dist.destroy_process_group()
    return results if place.rank == 0 else None


def _predicted(args, world: int) -> dict:
    from .planner.model import ModelSpec
    from .planner.traffic import lightseq_traffic, tp_traffic

    model = ModelSpec("train", layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=4 * args.hidden, vocab=args.vocab, dtype_bytes=4)
    schedule = args.lightseq.schedule
    if schedule == "auto":
        from .plan import Shape
        from .schedules import choose_schedule

        schedule = choose_schedule(args.lightseq.layout, world, True, Shape(
            args.batch, args.seq // world, args.heads, args.kv_heads, args.hidden // args.heads, torch.float32))
    ls = lightseq_traffic(model, args.seq, world, args.lightseq.layout, schedule, recompute=False).total
    return {"lightseq": ls * args.batch, "tp": tp_traffic(model, args.seq, world, sequence_parallel=False,
                                                          recompute=False).total * args.batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_everywhere(_rank_main, args, args.local_ranks)
    if results is None:
        return 0  # not rank 0
    world = next(iter(results.values()))["world"]
    predicted = _predicted(args, world)
    print(f"tiny GPT: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"{args.batch} x {args.seq} tokens per step, {world} ranks; lightseq = CP {world} "
          f"({args.lightseq.layout}/{args.lightseq.schedule}), tp = Megatron TP {world}")
    names = list(results)
    print(f"{'step':>4} " + " ".join(f"{n + ' loss':>14}" for n in names))
    for step in range(args.steps):
        print(f"{step:>4} " + " ".join(f"{results[n]['losses'][step]:>14.6f}" for n in names))
    for n in names:
        r = results[n]
        print(f"{n:>8}: {r['tokens_per_s']:>10.0f} tokens/s, {r['bytes_per_layer'] / 1024:>9.1f} KiB sent per GPU "
              f"per layer per step (measured; one layer predicted {predicted[n] / 1024:.1f} KiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "lightseq"},
                       "lightseq": vars(args.lightseq) if hasattr(args.lightseq, "__dict__") else str(args.lightseq),
                       "results": results, "predicted_bytes_per_layer": predicted}, f, indent=1, default=str)
    return 0
