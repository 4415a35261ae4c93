"""``python -m megatron_lightseq plan``: the fastest TP x CP x PP x DP and CP communication for a
model, a sequence, a global batch and N GPUs, with the plugin (LightSeq) and with Megatron's own
context parallelism side by side: predictions from planner/model.py's constants, not measurements.

    python -m megatron_lightseq plan --model llama-7b [--kv-heads 8] --seq 128k --gpus 64 \\
        --gpus-per-node 8 [--global-batch 16] [--json] [--plot out.png]
    # one configuration's per-layer table (and its CP group's head x sequence splits):
    python -m megatron_lightseq plan --seq 32k..512k --gpus 16 --tp 1 --cp 16 --pp 1 \\
        [--docs lognormal:median=2k,mean=8k | --docs lengths.txt] [--window 4k]
"""
from __future__ import annotations

import json
import sys

from . import hybrid, layer_table, report
from . import arguments
from .arguments import matplotlib_missing  # noqa: F401  (jobs/train.py asks the planner's command)
from .config import Config, configurations
from .masks import mask_rows, mask_table, masked_choice
from .search import search


def _masked(args, model, cp: int, seq: int):
    """(cu_seqlens, rows) of the --docs/--window table at this CP size, or None without a mask."""
    if not (args.docs or args.window >= 0) or cp == 1:
        return None
    cu = args.cu_seqlens.get(seq)
    return cu, mask_rows(model, seq, cp, cu_seqlens=cu, window=args.window)


def _masks(args) -> dict:
    """The search's docs=/window=: only the CP communications that run them (config.masked_comm_ok)."""
    return {"docs": bool(args.docs), "window": args.window >= 0}


MASKED_NOTE = ("with --docs/--window: only the CP communications that run them (the plugin's flat plans; "
               "TransformerEngine's p2p for documents, a2a for a window); times and memory are the plain causal "
               "sequence's, the layout and schedule the table's below")


def _overrides(masked, window: int) -> dict:
    """training_flags' overrides that the masked table settles (masks.masked_choice): for packed
    documents a balanced layout is given as auto, which is balanced for them."""
    if masked is None:
        return {"window": window}
    cu, rows = masked
    pick = masked_choice(rows)
    return {"layout": "auto" if cu and pick.layout == "balanced" else pick.layout, "schedule": pick.schedule,
            "window": window}


def _search_one(args, model, machine, seq: int):
    """(result, flags, text or JSON dict) of the search at one length."""
    result = search(model, seq, args.gpus, args.gpus_per_node, machine, global_batch=args.global_batch,
                    recompute=args.recompute, fsdp=args.fsdp, progress=not args.json and not args.no_progress,
                    **_masks(args), **args.fixed)
    best = result.best["lightseq"]
    masked = _masked(args, model, best.config.cp, seq) if best else None
    flags = report.settle_flags(model, result, **_overrides(masked, args.window))
    if args.json:
        return result, report.as_json(model, result, machine, flags, args.top)
    out = report.text(model, result, machine, flags, count=args.top, recompute=args.recompute, fsdp=args.fsdp)
    if masked:
        out += f"\n{MASKED_NOTE}\n" + mask_table(model, seq, best.config.cp, masked[1], masked[0], args.window)
    return result, out


def run_search(args, model, machine) -> int:
    """One answer per --seq length; JSON: that answer, or {"by_seq": {length: answer}} for a range."""
    answers = {seq: _search_one(args, model, machine, seq) for seq in args.seq}
    if args.json:
        found = {seq: data for seq, (_, data) in answers.items()}
        print(json.dumps(found[args.seq[0]] if len(found) == 1 else {"by_seq": found}, indent=1))
    else:
        print("\n\n".join(text for _, text in answers.values()))
    if args.plot:  # one length (parse_args)
        from .plot import save, search_figure

        save(search_figure(answers[args.seq[0]][0], model, machine), args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _layer_config(args, model) -> Config:
    tp, cp, pp = (args.fixed[k] for k in ("tp", "cp", "pp"))
    found = configurations(model, max(args.seq), args.gpus, args.gpus_per_node, args.global_batch,
                           recompute=args.recompute[:1], fsdp=args.fsdp, tp=tp, cp=cp, pp=pp)
    return found[0]


def run_layer_table(args, model, machine) -> int:
    """--tp, --cp and --pp all given: today's per-layer table for that one configuration; the
    recommendation per sequence is the search's over that configuration's CP communications, so
    the table and the split section cannot disagree."""
    cfg = _layer_config(args, model)
    by_seq, recommended, splits, masks = {}, {}, {}, {}
    for seq in args.seq:
        by_seq[seq] = layer_table.rows_for(model, seq, cfg, args.gpus_per_node, machine)
        result = search(model, seq, args.gpus, args.gpus_per_node, machine, global_batch=args.global_batch,
                        recompute=args.recompute[:1], fsdp=args.fsdp, progress=False, **_masks(args), **args.fixed)
        masks[seq] = _masked(args, model, cfg.cp, seq)
        flags = report.settle_flags(model, result, **_overrides(masks[seq], args.window)).get("lightseq")
        best = result.best["lightseq"]
        recommended[seq] = best and (f"lightseq {best.config.comm.name(cfg.cp)}", flags[0], flags[1])
    split_text, splits = hybrid.report(model, args.seq, cfg, args.gpus_per_node, machine) if cfg.cp > 1 else ("", {})
    if args.json:
        print(json.dumps(layer_table.as_json(model, machine, cfg, args.gpus_per_node, by_seq, recommended, splits,
                                             masks), indent=1))
    else:
        what = "documents" if args.docs else "window" if args.window >= 0 else ""
        print(layer_table.table(model, cfg, args.gpus_per_node, machine, by_seq, recommended, what))
        if split_text:
            print(split_text)
        for seq, masked in masks.items():
            if masked:
                print(MASKED_NOTE)
                print(mask_table(model, seq, cfg.cp, masked[1], masked[0], args.window))
    if args.plot:
        from .plot import layer_figure, save

        title = f"{model.name}, {cfg.name}, {args.gpus_per_node} GPUs per node: predictions, not measurements"
        save(layer_figure(by_seq, model, machine, title), args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def build_parser():
    # the docstring's first paragraph, not its first line, which stops mid-sentence
    return arguments.build_parser(" ".join(__doc__.split("\n\n")[0].split()).replace("``", ""))


def parse_args(argv=None):
    return arguments.parse_args(build_parser(), argv)


def main(argv=None) -> int:
    args, model, machine = parse_args(argv)
    if args.layer_table:
        return run_layer_table(args, model, machine)
    return run_search(args, model, machine)


if __name__ == "__main__":
    sys.exit(main())
