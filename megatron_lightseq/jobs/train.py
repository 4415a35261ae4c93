"""The main job: train a tiny megatron-core GPT with the lightseq backend (sequence split over all
ranks, CP = world size), then the same model, data and seed with Megatron's tensor parallelism
(TP = world size), and compare per-step loss, tokens per second and traffic per layer.

    python -m megatron_lightseq train                 # 4 local CPU processes (gloo)
    srun ... python -m megatron_lightseq train        # one task per GPU (NCCL), scripts/*.sbatch

Traffic per layer, busiest GPU: LightSeq's measured by trace() (attention transfers), Megatron TP's
by counting its collectives inside the transformer layers (ring bytes per GPU; tp_bytes.py), both
per step divided by the layer count, next to the planner's prediction for one layer; TP's
collectives outside the layers (embedding, output layer, loss) are reported apart. Ends with a
PNG of the losses and the traffic.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import Place, run_everywhere
from .tp_bytes import CollectiveBytes

# Harmless third-party warnings that would break the progress bars, silenced by message: without
# apex and TransformerEngine megatron-core falls back to torch's norms, optimizers and fused ops;
# TransformerConfig warns about its own default cuda_graph_scope; Megatron's
# CUDA_DEVICE_MAX_CONNECTIONS hint is for GPUs.
QUIET = ("Apex is not installed", "Transformer Engine and Apex are not installed", "full scope is deprecated",
         "set the environment variable CUDA_DEVICE_MAX_CONNECTIONS")


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
    p.add_argument("--plot", default="lightseq_vs_tp.png", help="the PNG of losses and traffic (rank 0; '' for none)")
    args, rest = p.parse_known_args(argv)
    from ..megatron.config import parse_lightseq_args

    args.lightseq, rest = parse_lightseq_args(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.backends = [b for b in args.backends.split(",") if b]
    if not set(args.backends) <= {"lightseq", "tp"}:
        p.error(f"--backends takes lightseq and/or tp, got {args.backends}")
    return args


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
    config.lightseq = args.lightseq  # the model's settings (megatron/config.py)
    torch.manual_seed(0)  # the same weights for both runs (split by TP where it splits them)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=args.vocab, max_sequence_length=args.seq,
                     position_embedding_type="rope").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    group = ps.get_context_parallel_group()
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    losses, seconds = [], 0.0
    counter = CollectiveBytes(model.decoder.layers) if backend == "tp" else None
    steps = range(args.steps)
    if place.rank == 0:
        try:
            from threading import RLock

            from tqdm import tqdm

            tqdm.set_lock(RLock())  # not tqdm's default multiprocessing lock, which os._exit would leak
            steps = tqdm(steps, desc=f"{backend} x{world}", leave=False)
        except ImportError:
            pass
    data = _data(args, device)
    with mls.trace() as t, (counter or contextlib.nullcontext()):
        for step in steps:
            batch = {"tokens": data[step, :, :-1], "labels": data[step, :, 1:], "position_ids": positions}
            if backend == "lightseq":
                batch = mlm.get_batch_on_this_cp_rank(dict(batch), layout=args.lightseq.layout)
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
    sent = (t.bytes_sent, 0) if backend == "lightseq" else (counter.layers_bytes, counter.outside_bytes)
    busiest = torch.tensor(sent, dtype=torch.float64, device=device)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    in_layers, outside = busiest.tolist()
    return {"losses": losses, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "bytes_per_layer": in_layers / args.steps / args.layers, "bytes_outside_layers": outside / args.steps,
            "world": world}


def _rank_main(place: Place, args):
    for message in QUIET:
        warnings.filterwarnings("ignore", message=".*" + re.escape(message))
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
    device = torch.device("cuda", place.local_rank) if cuda else torch.device("cpu")
    results = {b: _run(place, args, b, device) for b in args.backends}
    dist.barrier()
    dist.destroy_process_group()
    return results if place.rank == 0 else None


def _predicted(args, world: int) -> dict:
    from ..distattn.call import resolve_plan
    from ..distattn.plan import Shape
    from ..planner.model import ModelSpec
    from ..planner.traffic import lightseq_traffic, tp_traffic

    model = ModelSpec("train", layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=4 * args.hidden, vocab=args.vocab, dtype_bytes=4)
    shape = Shape(args.batch, args.seq // world, args.heads, args.kv_heads, args.hidden // args.heads, torch.float32)
    schedule = resolve_plan(shape, world_size=world, layout=args.lightseq.layout, schedule=args.lightseq.schedule,
                            causal=True).schedule
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
        outside = f"; plus {r['bytes_outside_layers'] / 1024:.1f} KiB per step outside the layers " \
                  "(embedding, output layer, loss)" if r["bytes_outside_layers"] else ""
        print(f"{n:>8}: {r['tokens_per_s']:>10.0f} tokens/s, {r['bytes_per_layer'] / 1024:>9.1f} KiB sent per GPU "
              f"per layer per step (measured; predicted {predicted[n] / 1024:.1f} KiB){outside}")
    if args.plot:
        from .train_plot import plot

        plot(args.plot, results, predicted)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "lightseq"},
                       "lightseq": vars(args.lightseq) if hasattr(args.lightseq, "__dict__") else str(args.lightseq),
                       "results": results, "predicted_bytes_per_layer": predicted}, f, indent=1, default=str)
    return 0
