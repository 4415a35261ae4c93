"""Megatron's own flags that the lightseq backend depends on, read from the command line and checked
before Megatron parses it. Megatron checks some of the same things with bare asserts, or only after
seconds of start-up (once per layer on every rank), or not at all (``--lightseq-*`` flags without
the backend die later on "Context parallelism is only supported by TEDotProductAttention!").
Each error here says what was expected, what was given and what to do.

Nothing here imports megatron: the runner calls :func:`check_command` before any start-up work.
"""
from __future__ import annotations

import difflib
import math

BACKEND = "--attention-backend"


def flag_spans(argv: list[str], flag: str) -> list[tuple[int, int]]:
    """(start, end) of each occurrence of ``flag`` with its values (``--flag v ...`` or ``--flag=v``)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == flag:
            end = i + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            found.append((i, end))
        elif arg.startswith(flag + "="):
            found.append((i, i + 1))
    return found


def last_values(argv: list[str], flag: str) -> list[str] | None:
    """The values of the last occurrence of ``flag`` (argparse keeps the last), None if absent."""
    spans = flag_spans(argv, flag)
    if not spans:
        return None
    start, end = spans[-1]
    return [argv[start].split("=", 1)[1]] if "=" in argv[start] else argv[start + 1:end]


def _backend(argv: list[str]) -> str | None:
    values = last_values(argv, BACKEND)
    return " ".join(values) if values is not None else None


def _ints(argv: list[str], flag: str) -> list[int] | None:
    values = last_values(argv, flag)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag} takes whole numbers, got {' '.join(values)!r}") from None


def check_command(argv: list[str]) -> None:
    """ValueError for a command line (the script's arguments, ``--lightseq-*`` flags included) that
    Megatron or the plugin would refuse later, or run other than asked."""
    backend = _backend(argv)
    lightseq_flags = sorted({a.split("=", 1)[0] for a in argv if a.startswith("--lightseq-")})
    if lightseq_flags and backend != "lightseq":
        given = f"{BACKEND} {backend}" if backend is not None else f"no {BACKEND} (Megatron's default: auto)"
        raise ValueError(f"{', '.join(lightseq_flags)} set options of the lightseq attention backend, but the command "
                         f"has {given}: add {BACKEND} lightseq (or drop the --lightseq-* flags)")
    # Flags read from a YAML file (--yaml-cfg) are not on the command line: only what is there is checked.
    from_yaml = "--yaml-cfg" in argv
    if backend == "lightseq":
        dropout = last_values(argv, "--attention-dropout")
        if (dropout is None and not from_yaml) or (dropout is not None and _float(dropout) != 0.0):
            given = " ".join(dropout) if dropout is not None else "not given (Megatron's default: 0.1)"
            raise ValueError(f"{BACKEND} lightseq has no attention dropout; --attention-dropout is {given}: add "
                             f"--attention-dropout 0")
    cp = _ints(argv, "--context-parallel-size")
    cp = cp[-1] if cp else 1
    sizes = _ints(argv, "--hierarchical-context-parallel-sizes")
    if sizes is not None and math.prod(sizes) != cp:
        example = f" (at CP = {cp}, e.g. 2 {cp // 2}: an all-to-all over 2 ranks, the plan over {cp // 2})" \
            if cp % 2 == 0 and cp >= 4 else ""
        raise ValueError(f"--hierarchical-context-parallel-sizes {' '.join(map(str, sizes))} multiplies to "
                         f"{math.prod(sizes)}, but --context-parallel-size is {cp}: give sizes whose product is the "
                         f"context-parallel size{example}")
    comm = last_values(argv, "--cp-comm-type") or []
    if "a2a+p2p" in comm and sizes is None and cp > 1:
        raise ValueError(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A P (the all-to-all "
                         f"size, then the p2p size, A x P = --context-parallel-size {cp}); none was given")


def _float(values: list[str]) -> float | None:
    try:
        return float(values[-1]) if values else None
    except ValueError:
        return None


def check_backend_name(argv: list[str], backends: list[str]) -> None:
    """ValueError unless ``--attention-backend`` (if given) names one of ``backends`` (Megatron's
    parser would end on a bare KeyError)."""
    backend = _backend(argv)
    if backend is not None and backend not in backends:
        close = difflib.get_close_matches(backend, backends, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use one of them"
        raise ValueError(f"{BACKEND} must be one of {', '.join(backends)}; got {backend!r}: {hint}")
