"""``python -m megatron_lightseq COMMAND``: demo (the main job on local ranks), plan (the planner)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "megatron_lightseq.demo", "plan": "megatron_lightseq.planner.cli"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m megatron_lightseq {{{','.join(commands)}}} [options]")
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
