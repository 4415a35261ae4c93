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
import dataclasses
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import Place, from_environment, run_everywhere
from .quiet import quiet_third_party
from .tp_bytes import CollectiveBytes

DEFAULT_PLOT = "lightseq_vs_tp.png"


def build_parser() -> argparse.ArgumentParser:
    from ..megatron.config import add_lightseq_args

    p = argparse.ArgumentParser(prog="python -m megatron_lightseq train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # as Megatron's own --lightseq-* parser: names in full
    p.add_argument("--local-ranks", type=int, default=4, metavar="N",
                   help="CPU processes (gloo) to start when no launcher (srun, torchrun) did; the world size "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per backend (default: %(default)s)")
    p.add_argument("--seq", type=int, default=512, metavar="TOKENS", help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=4,
                   help="K/V heads: fewer than --heads is GQA, 1 is MQA (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size; the tokens are uniform random "
                                                          "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)g)")
    p.add_argument("--backends", default="lightseq,tp", metavar="LIST",
                   help="comma list of lightseq (CP = world size) and tp (Megatron TP = world size), run in this "
                        "order (default: %(default)s)")
    p.add_argument("--packed", metavar="SPEC", help="pack each sequence with documents, lengths from a file or a "
                   "distribution (e.g. lognormal:median=48,mean=96; planner/masks.py), a new draw every step "
                   "(default: none, one sequence)")
    p.add_argument("--json", metavar="PATH", help="write the results here (rank 0) (default: none)")
    p.add_argument("--plot", metavar="PNG", help=f"the PNG of losses, traffic and tokens/s (rank 0; '' for none; "
                   f"needs matplotlib: pip install -e .[plot]) (default: {DEFAULT_PLOT}, or none with a note where "
                   "matplotlib does not import)")
    add_lightseq_args(p)  # the lightseq backend's settings, as Megatron-LM scripts take them
    return p


def parse_args(argv=None):
    from ..megatron.config import LightSeqConfig, config_from_namespace

    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.lightseq = config_from_namespace(args)
    except ValueError as e:
        p.error(str(e))
    for field in dataclasses.fields(LightSeqConfig):  # now in args.lightseq, and only there
        delattr(args, f"lightseq_{field.name}")
    args.backends = [b for b in args.backends.split(",") if b]
    if not set(args.backends) <= {"lightseq", "tp"}:
        p.error(f"--backends takes lightseq and/or tp, got {args.backends}")
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args) -> None:
    """The mistakes that would otherwise surface inside every rank, each as its own traceback, as
    one flag error before any process starts."""
    from ..megatron.config import layout_for

    for name in ("local_ranks", "steps", "seq", "batch", "layers", "hidden", "heads", "kv_heads", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    place = from_environment()
    world = place.world_size if place else args.local_ranks  # a launcher's, else the processes started here
    if "tp" in args.backends and (args.heads % world or args.kv_heads % world):
        p.error(f"Megatron TP over {world} ranks splits the heads: --heads ({args.heads}) and --kv-heads "
                f"({args.kv_heads}) must be multiples of {world}")
    if args.packed:
        from ..planner.masks import documents

        try:
            documents(args.packed, args.seq, seed=0)
        except (ValueError, OSError) as e:
            p.error(f"--packed {args.packed}: {e}")
    elif "lightseq" in args.backends:
        layout = layout_for(args.lightseq, packed=False)
        chunks = 2 * world if layout == "zigzag" else world
        if args.seq % chunks:
            p.error(f"--seq ({args.seq}) must be a multiple of {chunks}: the {layout} layout cuts it into {chunks} "
                    f"equal chunks over {world} ranks")
    if place is None or place.rank == 0:  # rank 0 writes the files
        _check_plot(p, args)
        for flag, path in ("--json", args.json), ("--plot", args.plot):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                p.error(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")


def _check_plot(p: argparse.ArgumentParser, args) -> None:
    """matplotlib is an optional extra: a plot asked for without it is an error before the run; the
    default plot is left out, with a note, so that the job runs as it is where matplotlib is not
    installed (a cluster's Megatron environment, pip install -e .[megatron])."""
    from ..planner.cli import matplotlib_missing

    missing = matplotlib_missing() if args.plot != "" else None
    if missing and args.plot:
        p.error(f"--plot {args.plot} needs {missing}; --plot '' runs without it")
    if args.plot is None:
        args.plot = "" if missing else DEFAULT_PLOT
        if missing:
            print(f"note: no {DEFAULT_PLOT}: the plot needs {missing}", file=sys.stderr)


def _data(args, device):
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    return tokens.to(device)


def _documents(args, step: int):
    """This step's cu_seqlens (shared by the batch's sequences), or None without --packed."""
    from ..planner.masks import documents

    return documents(args.packed, args.seq, seed=step) if args.packed else None


def _packed_inputs(backend: str, cu, args, device):
    """How each backend is told about the documents: lightseq through packed_seq_params (qkv_format
    "sbhd": RoPE over the whole sequence, as Megatron's local attention applies it), Megatron's
    local attention through a dense attention_mask (True: hidden)."""
    if cu is None:
        return None, None
    if backend == "tp":
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        allowed = (doc[:, None] == doc[None, :]) & torch.ones(args.seq, args.seq, dtype=torch.bool).tril()
        return None, ~allowed[None, None].to(device)
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = torch.tensor(cu, dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds), None


def _model(args, backend: str, world: int, device):
    """Megatron's parallel state for ``backend`` (lightseq: CP over the world; tp: TP over it), the
    GPT model with the same weights for both, and its optimizer."""
    import megatron_lightseq.megatron as mlm
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

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
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def _progress(steps, place: Place, backend: str):
    """The steps, with a progress bar on rank 0 where tqdm is installed and stderr is a terminal."""
    if place.rank != 0:
        return steps
    try:
        from threading import RLock

        from tqdm import tqdm
    except ImportError:
        return steps
    tqdm.set_lock(RLock())  # not tqdm's default multiprocessing lock, which os._exit would leak
    # disable=None: no bar where stderr is not a terminal (a Slurm log, CI), whose lines it would garble
    return tqdm(steps, desc=f"{backend} x{place.world_size}", leave=False, disable=None)


def _run(place: Place, args, backend: str, device) -> dict:
    import megatron_lightseq as mls
    import megatron_lightseq.megatron as mlm
    from megatron.core import parallel_state as ps

    from ..megatron.config import layout_for

    world = place.world_size
    model, opt = _model(args, backend, world, device)
    group = ps.get_context_parallel_group()
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    losses, seconds = [], 0.0
    counter = CollectiveBytes(model.decoder.layers) if backend == "tp" else None
    data = _data(args, device)
    with mls.trace() as t, (counter or contextlib.nullcontext()):
        for step in _progress(range(args.steps), place, backend):
            batch = {"tokens": data[step, :, :-1], "labels": data[step, :, 1:], "position_ids": positions,
                     "loss_mask": torch.ones(args.batch, args.seq, device=device)}
            cu = _documents(args, step)
            packed, attention_mask = _packed_inputs(backend, cu, args, device)
            if backend == "lightseq":  # the sequence's padding, if the layout pads, gets loss mask 0
                batch = mlm.get_batch_on_this_cp_rank(dict(batch), layout=layout_for(args.lightseq, cu is not None),
                                                      cu_seqlens=cu)
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            per_token = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                              packed_seq_params=packed)
            loss = (per_token * batch["loss_mask"]).sum() / (args.batch * args.seq)
            loss.backward()
            if backend == "lightseq" and world > 1:  # what Megatron's data/context-parallel grad reduction does
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
    quiet_third_party()  # they would break the progress bars
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
    """Bytes per GPU per layer per step: lightseq's from each step's plan (the busiest rank over the
    run, as measured), TP's from the planner's count of one layer's collectives."""
    from ..distattn import Shape, mask_of
    from ..distattn.plan.call import resolve_plan
    from ..megatron.config import layout_for
    from ..planner.model import ModelSpec
    from ..planner.traffic import tp_traffic

    model = ModelSpec("train", layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=4 * args.hidden, vocab=args.vocab, dtype_bytes=4)
    per_rank = [0] * world
    for step in range(args.steps):
        cu = _documents(args, step)
        mask = mask_of(True, cu)
        padded = layout_of_run(args, world, mask)
        shape = Shape(args.batch, padded // world, args.heads, args.kv_heads, args.hidden // args.heads,
                      torch.float32)
        plan = resolve_plan(shape, world_size=world, layout=layout_for(args.lightseq, cu is not None),
                            schedule=args.lightseq.schedule, mask=mask)
        for r in range(world):
            per_rank[r] += plan.traffic(r, shape)
    return {"lightseq": max(per_rank) / args.steps, "tp": tp_traffic(model, args.seq, world, sequence_parallel=False,
                                                                     recompute=False).total * args.batch}


def layout_of_run(args, world: int, mask) -> int:
    """The sequence's length as the lightseq ranks hold it (padded to whole chunks with documents)."""
    from ..distattn.plan.layout import layout_of
    from ..megatron.config import layout_for

    lay = layout_of(layout_for(args.lightseq, mask.cu_seqlens is not None), world, mask, args.seq)
    return lay.padded_tokens or args.seq


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_everywhere(_rank_main, args, args.local_ranks)
    if results is None:
        return 0  # not rank 0
    world = next(iter(results.values()))["world"]
    predicted = _predicted(args, world)
    print(f"tiny GPT: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"{args.batch} x {args.seq} tokens per step, {world} ranks; lightseq = CP {world} "
          f"({args.lightseq.layout}/{args.lightseq.schedule}), tp = Megatron TP {world}"
          + (f"; packed documents ({args.packed}), a new packing every step" if args.packed else ""))
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

        plot(args.plot, results, predicted, on_cpu=not torch.cuda.is_available())  # as _rank_main chose
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "lightseq"},
                       "lightseq": vars(args.lightseq) if hasattr(args.lightseq, "__dict__") else str(args.lightseq),
                       "results": results, "predicted_bytes_per_layer": predicted}, f, indent=1, default=str)
    return 0
