"""Block kernels and emulated ranks on one GPU, against torch's cuDNN SDPA on the same shapes:
the numbers behind issue 5's targets. Prints tables, writes JSON (device, versions, every figure).

    python benchmarks/kernels.py [--out PATH] [--sizes 4096 8192 16384 32768]
    python benchmarks/kernels.py --smoke      # tiny shapes on any device: the script runs, nothing more

Measured (bf16, head dim 128, batch 1, 32 query heads; median of a few runs after a warm-up):
1. blocks: each kernel that returns the LSE (forward; backward from the merged out/LSE) against
   SDPA with the cuDNN backend (forward; forward+backward minus forward), diagonal (causal) and
   off-diagonal (full) blocks, MHA (32 K/V heads) and GQA (8);
2. merge: the fused merge's cost (Triton, merging into the running result vs storing it) and
   the unfused one's (an eager merge after the best vendor kernel's forward), per block;
3. emulated: P virtual ranks on the whole sequence (emulate.py: the plan, kernels, merges and
   device copies standing in for sends) against one monolithic cuDNN call, forward+backward.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_lightseq.distattn.run.emulate import emulate_dist_attn  # noqa: E402
from megatron_lightseq.kernels import get_kernel, kernel_names, resolve_kernel  # noqa: E402
from megatron_lightseq.kernels.auto import device_time  # noqa: E402
from megatron_lightseq.distattn.plan.mask import Mask  # noqa: E402
from megatron_lightseq.kernels.merge import merge_into  # noqa: E402

CAUSAL = Mask(causal=True)

TARGETS = {"best_vs_cudnn": 0.95, "fused_merge_overhead": 0.03, "emulated_p8_vs_monolithic": 1.15,
           "triton_fwd_vs_cudnn": 0.80, "triton_bwd_vs_cudnn": 0.60}


_REF = "cuDNN SDPA" if torch.cuda.is_available() else "SDPA (CPU)"


def _sdpa_backend():
    """cuDNN for the reference on CUDA; on CPU whatever SDPA picks (smoke runs only)."""
    if not torch.cuda.is_available():
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def _reference(q, k, v, causal: bool):
    """torch SDPA on [B, S, H, D] tensors (as the kernels get them); GQA via enable_gqa, or K/V
    repeated beforehand (outside the timing) where the backend refuses it."""
    with _sdpa_backend():
        try:
            F.scaled_dot_product_attention(*(x[:, :16].transpose(1, 2) for x in (q, k, v)), is_causal=causal,
                                           enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                          is_causal=causal, enable_gqa=True)
        except RuntimeError:
            rep = q.shape[2] // k.shape[2]
            k, v = (x.repeat_interleave(rep, 2) for x in (k, v))
            return lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                          is_causal=causal)


def _time_fwd_bwd(forward, leaves, reps):
    """(forward seconds, backward seconds) of an autograd forward and its backward."""
    fwd = device_time(lambda: forward(), leaves[0].device, reps)
    dout = torch.randn_like(forward())

    def both():
        out = forward()
        torch.autograd.grad(out, leaves, dout)

    return fwd, device_time(both, leaves[0].device, reps) - fwd


def _inputs(s_q, s_k, h, g, d, dtype, device, requires_grad=False):
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda s, n: torch.randn(1, s, n, d, device=device, dtype=dtype, generator=gen).requires_grad_(requires_grad)
    return make(s_q, h), make(s_k, g), make(s_k, g)


def _block_spans(size: int, mask: str):
    """A diagonal block (causal: the top-left triangle) or a block wholly in the past (full)."""
    if mask == "causal":
        return ((0, size),), ((0, size),)
    return ((size, 2 * size),), ((0, size),)


def _flops(size, h, d, mask):
    return 4 * size * size * d * h * (0.5 if mask == "causal" else 1.0)


def bench_blocks(args, device, dtype, kernels):
    rows = []
    for size in args.sizes:
        for mask in ("causal", "full"):
            for h, g in args.heads:
                q, k, v = _inputs(size, size, h, g, args.headdim, dtype, device, requires_grad=True)
                ref_fwd, ref_bwd = _time_fwd_bwd(_reference(q, k, v, mask == "causal"), (q, k, v), args.reps)
                q_span, k_span = _block_spans(size, mask)
                block = dict(q_span=q_span, k_span=k_span, mask=CAUSAL, scale=args.headdim ** -0.5)
                qd, kd, vd = (x.detach() for x in (q, k, v))
                dout = torch.randn_like(qd)
                row = dict(size=size, mask=mask, heads=h, heads_kv=g, cudnn_sdpa_fwd_s=ref_fwd,
                           cudnn_sdpa_bwd_s=ref_bwd, kernels={})
                for name in kernels:
                    kern = get_kernel(name)
                    fwd = device_time(lambda: kern.forward(qd, kd, vd, **block), device, args.reps)
                    out, lse = kern.forward(qd, kd, vd, **block)
                    bwd = device_time(lambda: kern.backward(dout, qd, kd, vd, out, lse, **block), device, args.reps)
                    row["kernels"][name] = dict(fwd_s=fwd, bwd_s=bwd, fwd_vs_cudnn=ref_fwd / fwd,
                                                bwd_vs_cudnn=ref_bwd / bwd,
                                                fwd_tflops=_flops(size, h, args.headdim, mask) / fwd / 1e12,
                                                bwd_tflops=2.5 * _flops(size, h, args.headdim, mask) / bwd / 1e12)
                rows.append(row)
                best = max(row["kernels"].items(), key=lambda kv: kv[1]["fwd_vs_cudnn"] + kv[1]["bwd_vs_cudnn"])
                print(f"{size:>6} {mask:<6} {h:>3}/{g:<3} {_REF} fwd {ref_fwd * 1e3:8.3f} ms bwd {ref_bwd * 1e3:8.3f} ms"
                      + "".join(f" | {n} {r['fwd_vs_cudnn']:.2f}/{r['bwd_vs_cudnn']:.2f}" for n, r in row["kernels"].items())
                      + f" | best {best[0]}")
    return rows


def bench_merge(args, device, dtype, kernels):
    """Per block (the P = 8 block of the longest size): fused and unfused merge costs."""
    size = max(args.sizes) // 8 if not args.smoke else max(args.sizes)
    h, g = args.heads[0]
    q, k, v = _inputs(size, size, h, g, args.headdim, dtype, device)
    block = dict(q_span=((size, 2 * size),), k_span=((0, size),), mask=CAUSAL, scale=args.headdim ** -0.5)
    acc_out = torch.randn(q.shape, dtype=torch.float32, device=device)
    acc_lse = torch.randn((1, h, size), dtype=torch.float32, device=device)
    result = dict(size=size, heads=h)
    if "triton" in kernels:
        tri = get_kernel("triton")
        stored = device_time(lambda: tri.forward_into(q, k, v, acc_out, acc_lse, merge=False, **block), device, args.reps)
        merged = device_time(lambda: tri.forward_into(q, k, v, acc_out, acc_lse, **block), device, args.reps)
        result["triton_fused"] = dict(block_s=stored, merged_s=merged, overhead=merged / stored - 1)
    vendor = next((n for n in ("cudnn", "flash-attn", "torch") if n in kernels), None)
    if vendor is not None:
        kern = get_kernel(vendor)
        fwd = device_time(lambda: kern.forward(q, k, v, **block), device, args.reps)
        part = kern.forward(q, k, v, **block)
        merge = device_time(lambda: merge_into(acc_out, acc_lse, *part), device, args.reps)
        result["unfused"] = dict(kernel=vendor, block_s=fwd, merge_s=merge, overhead=merge / fwd)
    for name, r in result.items():
        if isinstance(r, dict):
            print(f"merge, {size}-token block, {name}: overhead {100 * r['overhead']:.1f}% of the block's forward")
    return result


def bench_emulated(args, device, dtype):
    n = max(args.sizes)
    h, g = args.heads[0]
    q, k, v = _inputs(n, n, h, g, args.headdim, dtype, device, requires_grad=True)
    mono_fwd, mono_bwd = _time_fwd_bwd(_reference(q, k, v, True), (q, k, v), args.reps)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    dout = torch.randn_like(qd)
    rows = []
    for world_size in args.world_sizes:
        for layout in ("zigzag", "contiguous"):
            for kernel in args.emulated_kernels:
                kern = resolve_kernel(kernel, qd, kd)
                run = lambda: emulate_dist_attn(qd, kd, vd, dout, world_size=world_size, layout=layout, kernel=kernel)
                fwd = device_time(lambda: emulate_dist_attn(qd, kd, vd, world_size=world_size, layout=layout,
                                                            kernel=kernel), device, args.reps)
                both = device_time(run, device, args.reps)
                chosen = sorted(set(kern.choices().values())) if hasattr(kern, "choices") else [kern.name]
                rows.append(dict(world_size=world_size, layout=layout, kernel=kernel, chosen=chosen, tokens=n,
                                 fwd_s=fwd, fwd_bwd_s=both, vs_monolithic=both / (mono_fwd + mono_bwd),
                                 fwd_vs_monolithic=fwd / mono_fwd))
                r = rows[-1]
                print(f"emulated P={world_size} {layout:<10} {kernel:<6} ({'+'.join(chosen)}): fwd+bwd "
                      f"{r['vs_monolithic']:.3f}x, fwd {r['fwd_vs_monolithic']:.3f}x one monolithic {_REF} call")
    return dict(tokens=n, monolithic_fwd_s=mono_fwd, monolithic_bwd_s=mono_bwd, rows=rows)


def _targets(blocks, merge, emulated):
    """Each target with the value measured against it (worst case over the shapes)."""
    out = []

    def add(name, value, higher_is_better=True):
        if value is not None:
            goal = TARGETS[name]
            out.append(dict(measure=name, target=goal, value=value,
                            met=value >= goal if higher_is_better else value <= goal))

    kernel_rows = [r["kernels"] for r in blocks]
    add("best_vs_cudnn", min(min(max(k["fwd_vs_cudnn"] for k in ks.values()),
                                 max(k["bwd_vs_cudnn"] for k in ks.values())) for ks in kernel_rows))
    add("fused_merge_overhead", merge.get("triton_fused", {}).get("overhead"), higher_is_better=False)
    p8 = [r["vs_monolithic"] for r in emulated["rows"] if r["world_size"] == 8 and r["kernel"] == "auto"]
    add("emulated_p8_vs_monolithic", min(p8) if p8 else None, higher_is_better=False)
    if all("triton" in ks for ks in kernel_rows):
        add("triton_fwd_vs_cudnn", min(ks["triton"]["fwd_vs_cudnn"] for ks in kernel_rows))
        add("triton_bwd_vs_cudnn", min(ks["triton"]["bwd_vs_cudnn"] for ks in kernel_rows))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script runs")
    p.add_argument("--out", help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.headdim, args.heads = 128, [(32, 32), (32, 8)]
    if args.smoke:
        args.sizes, args.world_sizes, args.reps, args.headdim, args.heads = [96], [2, 3], 1, 32, [(4, 4), (4, 2)]
    q, k, _ = _inputs(16, 16, *args.heads[0], args.headdim, dtype, device)
    runnable = [n for n in kernel_names() if n != "auto" and get_kernel(n).supports(q, k)]
    # On CUDA the math kernel is the oracle, not a contender; on CPU Triton is only interpreted.
    kernels = [n for n in runnable if n != ("math" if device.type == "cuda" else "triton")]
    args.emulated_kernels = ["auto"] + [n for n in ("triton",) if n in kernels]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{device_name}, torch {torch.__version__}, {dtype}, head dim {args.headdim}; kernels {kernels}")
    print(f"blocks: each kernel's speed relative to {_REF}, forward/backward (> 1: faster)")
    blocks = bench_blocks(args, device, dtype, kernels)
    merge = bench_merge(args, device, dtype, kernels)
    emulated = bench_emulated(args, device, dtype)
    targets = _targets(blocks, merge, emulated)
    for t in targets:
        print(f"target {t['measure']}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    slug = "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_")
    path = args.out or os.path.join(ROOT, "benchmarks", "results", f"kernels_{slug}{'_smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, triton=triton_version,
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                       dtype=str(dtype), headdim=args.headdim, smoke=args.smoke, blocks=blocks, merge=merge,
                       emulated=emulated, targets=targets), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
