"""The first multi-GPU run of dist_attn: two ranks (or more), one process per GPU, over NCCL.

    torchrun --standalone --nproc-per-node 2 scripts/nccl_smoke.py [--out results.json]
    torchrun --standalone --nproc-per-node 2 scripts/nccl_smoke.py --cpu      # the same over gloo
Options: --deadline SECONDS (dist_attn's timeout in check 3, default 2), --stall SECONDS (how long
rank 1 sleeps there, default 6: past the deadline, its grace and the watcher's period).

What it checks, each on a fresh process group of every rank:
1. forward + backward against a float64 oracle of the whole sequence, for each layout
   (zigzag, contiguous) and schedule (ring, lightseq), batch 2, causal, GQA (4 query heads on 2
   K/V heads), plus packed documents on the balanced layout over two batches with new documents
   (the second makes no collective and no host read: trace()). On GPUs: bfloat16 inputs, kernel
   "auto", each result at most twice as far from the oracle as the same attention computed
   plainly in bfloat16 (flash-attn's rule); on CPU: float64, exact to 1e-10.
2. a kernel that raises on rank 1 in the forward: every rank raises DistAttnError naming rank 1's
   error within seconds (NCCL: the group's watcher aborts the communicator, docs/reliability.md).
3. rank 1 stalls past the deadline in the forward: every rank raises DistAttnError saying
   it timed out and that rank 1 is missing, the peers before rank 1 wakes.
Each rank prints its verdicts; rank 0 prints the table and writes ``--out`` (JSON); the exit status
is 0 only if every check passed on every rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_lightseq as mls  # noqa: E402
from megatron_lightseq.kernels import get_kernel, register_kernel  # noqa: E402

VICTIM = 1  # the rank that raises or stalls
BATCH, HEADS, HEADS_KV, HEADDIM = 2, 4, 2, 64


def _reference(q, k, v, dout, allowed):
    """(out, dq, dk, dv) of plain attention over the whole sequence in the inputs' dtype, with
    a dense [S, S] mask; written apart from the package (repeated K/V heads, masked softmax)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v.repeat_interleave(rep, 2))
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _allowed(tokens: int, cu_seqlens, device) -> torch.Tensor:
    pos = torch.arange(tokens, device=device)
    ok = pos[None, :] <= pos[:, None]
    if cu_seqlens is not None:
        doc = torch.bucketize(pos, torch.tensor(cu_seqlens[1:-1], device=device), right=True)
        ok &= doc[None, :] == doc[:, None]
    return ok


def check_against_oracle(group, rank, world, device, dtype, layout, schedule, cu_seqlens=None, seed=0):
    """One forward + backward of dist_attn against the oracle; returns what trace() counted."""
    tokens = 256 * world if cu_seqlens is None else cu_seqlens[-1]
    mask = dict(causal=True, cu_seqlens=cu_seqlens)
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(BATCH, tokens, h, HEADDIM, generator=g, dtype=torch.float64)
            for h in (HEADS, HEADS_KV, HEADS_KV, HEADS)]  # q, k, v, dout
    allowed = _allowed(tokens, cu_seqlens, "cpu")
    ref = _reference(*full, allowed)
    part = lambda x: mls.shard(x, layout=layout, rank=rank, world_size=world, **mask).to(device)  # noqa: E731
    q, k, v = (part(x).to(dtype).requires_grad_() for x in full[:3])
    with mls.trace() as t:
        out = mls.dist_attn(q, k, v, group=group, layout=layout, schedule=schedule, kernel="auto", **mask)
        out.backward(part(full[3]).to(dtype))
    got = [x.detach().double().cpu() for x in (out, q.grad, k.grad, v.grad)]
    want = [mls.shard(x, layout=layout, rank=rank, world_size=world, **mask) for x in ref]
    if dtype == torch.float64:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    else:  # flash-attn's rule against the same attention computed plainly in this dtype
        low = _reference(*(x.to(device, dtype) for x in full), allowed.to(device))
        plain = [mls.shard(x.double().cpu(), layout=layout, rank=rank, world_size=world, **mask) for x in low]
        for name, a, p, b in zip(("out", "dq", "dk", "dv"), got, plain, want):
            err, base = (a - b).abs().max().item(), (p - b).abs().max().item()
            assert err <= 2 * base + 1e-4, f"{name}: error {err:.3g}, plain {dtype} {base:.3g}"
    return t


class _Faulty(type(get_kernel("math"))):
    """The math kernel, except on VICTIM in its forward: raise, or sleep past the deadline."""

    name, mode, stall = "smoke-faulty", "raise", 6.0

    def forward(self, *args, **kwargs):
        if dist.get_rank() == VICTIM:
            if self.mode == "raise":
                raise RuntimeError("injected kernel fault")
            time.sleep(self.stall)
        return super().forward(*args, **kwargs)


def check_failure(group, rank, world, device, mode, deadline, stall):
    """The DistAttnError each rank gets, and how long it took, when VICTIM raises or stalls."""
    _Faulty.mode, _Faulty.stall = mode, stall
    register_kernel(_Faulty.name, _Faulty)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(BATCH, 64, h, HEADDIM, generator=g).to(device).requires_grad_()
               for h in (HEADS, HEADS_KV, HEADS_KV))
    options = dict(group=group, layout="zigzag", schedule="ring", kernel=_Faulty.name, timeout=deadline,
                   label="smoke")
    start = time.monotonic()
    message, nccl_errors = None, []
    for _ in range(3):  # NCCL: the call that fails may have been enqueued already; the next one raises
        try:
            mls.dist_attn(q, k, v, **options).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()  # ends when the watcher aborts the communicator
        except mls.DistAttnError as e:
            message = str(e)
            break
        except RuntimeError as e:  # NCCL's own error for work enqueued on the aborted communicator (documented)
            nccl_errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    seconds = time.monotonic() - start
    assert message is not None, f"no DistAttnError although rank {VICTIM} {mode}ed (NCCL errors: {nccl_errors})"
    if mode == "raise":
        assert f"rank {VICTIM} of {world}" in message and "injected kernel fault" in message, message
        assert seconds < 20, f"{seconds:.1f} s for a raised error to travel"
    else:
        assert "timed out waiting for rank(s)" in message and f"missing: rank(s) [{VICTIM}]" in message, message
        if rank != VICTIM:
            assert seconds < stall, f"{seconds:.1f} s: stopped only when rank {VICTIM} woke"
    return {"seconds": round(seconds, 2), "error": message, "nccl_errors": nccl_errors}

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (what proves the script without GPUs)")
    p.add_argument("--out", help="rank 0 writes the verdicts here (JSON)")
    p.add_argument("--deadline", type=float, default=2.0, help="dist_attn's timeout in the stall check (seconds)")
    p.add_argument("--stall", type=float, default=6.0, help="how long rank 1 sleeps in the stall check (seconds)")
    args = p.parse_args(argv)
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu for the gloo run)", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float64
    verdicts = gloo = None
    results = {}
    fresh = lambda: dist.new_group(list(range(world)))  # noqa: E731 - a failure ends a group: one per check

    def run(name, fn, *fargs):
        try:
            results[name] = {"ok": True, **(fn(*fargs) or {})}
        except Exception as e:  # noqa: BLE001 - reported per check, the run goes on
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}

    try:
        gloo = dist.new_group(list(range(world)), backend="gloo")  # verdicts travel here, whatever NCCL did
        group = fresh()
        for layout in ("zigzag", "contiguous"):
            for schedule in ("ring", "lightseq"):
                run(f"oracle {layout} {schedule}", lambda layout=layout, schedule=schedule: (
                    check_against_oracle(group, rank, world, device, dtype, layout, schedule), None)[1])

        def packed():
            tokens = 256 * world
            first = check_against_oracle(group, rank, world, device, dtype, "balanced", "auto",
                                         (0, 100, 130, 400, tokens), seed=1)
            second = check_against_oracle(group, rank, world, device, dtype, "balanced", "auto",
                                          (0, 7, 250, 251, 333, tokens), seed=2)
            steady = (second.collectives, second.host_reads)
            assert steady == (0, 0), f"the second packed batch made {steady} (collectives, host reads)"
            return {"first_batch_collectives": first.collectives}

        run("oracle balanced packed", packed)
        run("a kernel error on rank 1", check_failure, fresh(), rank, world, device, "raise", 60.0, 0.0)
        run("rank 1 stalls past the deadline", check_failure, fresh(), rank, world, device, "stall", args.deadline,
            args.stall)
        verdicts = [None] * world
        dist.all_gather_object(verdicts, results, group=gloo)
    except Exception:  # noqa: BLE001 - the run itself broke: say so and fail
        traceback.print_exc()
        verdicts = None
    ok = verdicts is not None and all(r["ok"] for v in verdicts for r in v.values())
    if rank == 0 and verdicts is not None:
        print(f"dist_attn smoke on {world} ranks, {'NCCL' if cuda else 'gloo'}, {dtype}")
        for name in verdicts[0]:
            cells = ["ok" if v[name]["ok"] else "FAIL" for v in verdicts]
            extra = next((v[name].get("seconds") for v in verdicts if "seconds" in v[name]), None)
            print(f"  {name:36} {' '.join(cells)}" + (f"  ({extra} s on rank 0)" if extra is not None else ""))
            for r, v in enumerate(verdicts):
                if not v[name]["ok"]:
                    print(f"    rank {r}: {v[name]['error']}\n{v[name]['trace']}")
        if args.out:
            info = {"device": torch.cuda.get_device_name(local) if cuda else "cpu", "torch": torch.__version__,
                    "backend": "nccl" if cuda else "gloo", "world_size": world, "ok": ok, "ranks": verdicts}
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    # No teardown: aborted NCCL communicators and gloo's shutdown can hang or crash a clean exit.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
