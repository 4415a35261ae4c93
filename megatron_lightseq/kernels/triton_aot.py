"""Compile the Triton kernels for a GPU without one: what each autotuning config costs.

    python -m megatron_lightseq.kernels.triton_aot [--arch 90] [--headdim 64 128] [--mask causal interval]
                                                   [--json PATH]

Triton ships ptxas and cuobjdump, so a CPU machine can build every (kernel, config) for sm_90
(H100/H200) and read off shared memory, registers, spilled bytes and whether the tensor cores'
Hopper instruction (wgmma) is used, for each mask variant the kernels compile to (which ends of
the rows' key intervals hide keys: ``MASKS``). A config that spills or does not fit in any
variant is one the autotuner should not be offered; CI checks every offered config this way.
Run it without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton_kernels import CONFIGS, KERNELS, head_dim_bound

# Shared memory one block may use on Hopper (227 KiB), per CUDA's programming guide.
HOPPER_SHARED_BYTES = 232448
_POINTERS = ({n: "*{dtype}" for n in ("Q", "K", "V", "DO", "Part", "DQ", "DK", "DV")}
             | {n: "*i32" for n in ("QLO", "QHI", "KP", "KV_TILES", "Q_TILES")}
             | {n: "*fp32" for n in ("Out", "Lse", "Delta", "PartLse")})


# The kernels' mask variants (triton_kernels.py): no mask, keys hidden past a row's hi only
# (causal), at either end (documents, windows).
MASKS = {"none": dict(CUT_HI=False, CUT_LO=False), "causal": dict(CUT_HI=True, CUT_LO=False),
         "interval": dict(CUT_HI=True, CUT_LO=True)}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def narrow_stride_uses(ttir: str, arg_names) -> list[str]:
    """Lines of a kernel's Triton IR that use a stride argument (the kernels name them ``s`` and
    lower-case letters: ``sqb``, ``sks``, ...) other than by widening it to int64: every offset a
    stride enters must be computed in int64 (triton_kernels' docstring), so this is empty."""
    strides = [n for n in arg_names if re.fullmatch(r"s[a-z]+", n) and n != "sm_scale"]
    uses = [line.strip() for line in ttir.splitlines() if not line.lstrip().startswith("tt.func")
            and any(re.search(rf"%{n}\b", line) for n in strides)]
    return [u for u in uses if not re.match(r"%\S+ = arith\.extsi %s[a-z]+ : i32 to i64", u)]


def build(fn, const: dict, *, warps: int = 4, stages: int = 2, dtype: str = "bf16", arch: int = 90) -> dict:
    """Build jitted ``fn`` with constexprs ``const`` for sm_<arch>: shared bytes, registers,
    spilled bytes, whether it uses wgmma, whether it fits Hopper's shared memory, and how many
    uses of a stride argument its IR has outside int64 arithmetic (``narrow_stride_uses``)."""
    signature = {n: "constexpr" if n in const else _POINTERS.get(n, "fp32" if n == "sm_scale" else "i32")
                 for n in fn.arg_names}
    signature = {n: t.format(dtype=dtype) for n, t in signature.items()}
    # At launch Triton marks pointers and integers divisible by 16 as such (aligned, vectorisable
    # accesses); with token counts and strides multiples of 16, as here, every argument is.
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n not in const and n != "sm_scale"}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    usage = _resource_usage(compiled.asm["cubin"])
    return dict(shared_bytes=compiled.metadata.shared, registers=usage["REG"],
                spilled_bytes=usage["STACK"] + usage["LOCAL"], wgmma="wgmma" in compiled.asm["ptx"],
                fits=compiled.metadata.shared <= HOPPER_SHARED_BYTES,
                narrow_stride_uses=len(narrow_stride_uses(compiled.asm["ttir"], fn.arg_names)))


def compile_report(name: str, config: triton.Config, *, headdim: int = 128, dtype: str = "bf16",
                   mask: str = "causal", merge: bool = True, arch: int = 90) -> dict:
    """Build kernel ``name`` ("fwd", "dkdv", "dq") with ``config`` for sm_<arch>; its costs.
    ``mask``: a key of ``MASKS``; ``merge``: the forward's variant (merged into the running
    result: the executor's path)."""
    fn = KERNELS[name]
    const = dict(**MASKS[mask], D=headdim, BLOCK_D=max(16, triton.next_power_of_2(headdim)), **config.kwargs)
    if "MERGE" in fn.arg_names:
        const["MERGE"] = merge
    return dict(kernel=name, mask=mask, block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"],
                warps=config.num_warps, stages=config.num_stages, headdim=headdim, dtype=dtype, arch=arch,
                **build(fn, const, warps=config.num_warps, stages=config.num_stages, dtype=dtype, arch=arch))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--headdim", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--mask", nargs="+", default=list(MASKS), choices=list(MASKS), help="kernel variants")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    line = lambda cells: " ".join(f"{c!s:>8}" for c in cells)
    print(line(("kernel", "mask", "d", "BM", "BN", "warps", "stages", "shared", "regs", "spilled", "wgmma")))
    for headdim in args.headdim:
        for name, configs in CONFIGS.items():
            for config in configs[head_dim_bound(headdim)]:
                for mask in args.mask:
                    r = compile_report(name, config, headdim=headdim, mask=mask, arch=args.arch)
                    rows.append(r)
                    print(line((name, mask, headdim, r["block_m"], r["block_n"], r["warps"], r["stages"],
                                r["shared_bytes"], r["registers"], r["spilled_bytes"], r["wgmma"]))
                          + ("" if r["fits"] else "  does not fit"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
