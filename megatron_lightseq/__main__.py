"""``python -m megatron_lightseq COMMAND``: train (the main job: tiny GPT, lightseq vs TP), plan (the
planner), attn-demo (dist_attn alone: errors and traffic per layout and schedule)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": "megatron_lightseq.jobs.train", "plan": "megatron_lightseq.planner.cli",
                "attn-demo": "megatron_lightseq.jobs.attn_demo"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m megatron_lightseq {{{','.join(commands)}}} [options]")
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
