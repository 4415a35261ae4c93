"""Megatron's C++ dataset helpers (``megatron/core/datasets/helpers_cpp<suffix>.so``) built for the
Python that runs the job, in place of Megatron's own ``compile_helpers`` (CPU mode).

Megatron's Makefile asks ``python3-config`` for the file's suffix and ``python3 -m pybind11`` for the
headers, whichever ``python3`` is first on the PATH. Under pyenv, a Megatron-LM checkout's own
``.python-version`` (3.12 at core_v0.16.1 and core_v0.19.0) makes ``python3-config`` the 3.12 one
inside the checkout: a 3.11 run builds ``helpers_cpp.cpython-312-*.so``, cannot import it, and its
datasets fail with "No module named 'megatron.core.datasets.helpers_cpp'". Here the suffix and the
headers come from this interpreter, passed to the same Makefile, which builds only what is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

LIBNAME = "helpers_cpp"  # the Makefile's LIBNAME


def helpers_file(folder: str) -> str:
    """The helpers' file this interpreter imports from ``folder`` (megatron/core/datasets)."""
    return os.path.join(folder, LIBNAME + sysconfig.get_config_var("EXT_SUFFIX"))


def make_command(folder: str) -> list[str]:
    """Megatron's own ``make`` in ``folder``, with the suffix and the headers of this interpreter.
    SystemExit with the one install command when pybind11 (the headers) is missing."""
    found = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"error: Megatron's dataset helpers ({helpers_file(folder)}) are not built for this "
                         f"Python ({sys.executable}) and building them needs pybind11, which it lacks: "
                         f"{sys.executable} -m pip install pybind11")
    return ["make", "-C", folder, f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"CPPFLAGS={found.stdout.strip()}"]


def compile_helpers() -> None:
    """Megatron's ``megatron.core.datasets.utils.compile_helpers`` (called on rank 0 while Megatron
    initializes, before the other ranks may read the datasets), for this interpreter."""
    from megatron.core.datasets import utils

    folder = os.path.dirname(os.path.abspath(utils.__file__))
    command = make_command(folder)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: building Megatron's dataset helpers failed: {' '.join(command)} (a C++ compiler "
                         f"and write access to {folder} are needed)")
