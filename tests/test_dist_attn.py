"""dist_attn on local gloo ranks against the float64 oracle: out, lse, dq, dk, dv, bytes, counters.

One process group per world size runs the whole matrix (forking a group per case would cost
more than the cases); a failing case names itself in the message.
"""
import itertools
import subprocess
import sys

import pytest
import torch

import megatron_lightseq as mls
from harness import run_ranks
from megatron_lightseq.distattn.plan.plan import Shape
from mask_cases import dense_allowed, documents, masked_reference
from oracle import reference_attention, reference_with_grads

WORLD_SIZES = [1, 2, 3, 4, 8]
HEADS = [(4, 4), (6, 2), (4, 1)]
F64 = dict(rtol=1e-10, atol=1e-10)


def _full_inputs(world_size, nheads, nheads_kv, headdim, dtype, tokens_per_chunk, seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * world_size * tokens_per_chunk  # splits under both layouts
    q = torch.randn(2, n, nheads, headdim, generator=g, dtype=torch.float64)
    k = torch.randn(2, n, nheads_kv, headdim, generator=g, dtype=torch.float64)
    v = torch.randn(2, n, nheads_kv, headdim, generator=g, dtype=torch.float64)
    dout = torch.randn(2, n, nheads, headdim, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, dout)]


def _run_local(rank, world_size, full, layout, mask=None, **options):
    """This rank's (out, lse, dq, dk, dv) and its trace; ``mask``: causal, cu_seqlens, window_size."""
    mask = mask or {}
    q, k, v, dout = (mls.shard(x, layout=layout, rank=rank, world_size=world_size, **mask) for x in full)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with mls.trace() as t:
        out, lse = mls.dist_attn(q, k, v, layout=layout, return_lse=True, **mask, **options)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), lse, *grads), t


def _check_trace(t, rank, world_size, plan, got, heads, headdim, label):
    """The counters: bytes as the plan says, one forward and backward, the plan's blocks, at most
    one agreement (none when an earlier case had the same signature, auto resolving alike)."""
    sizes = dict(batch=2, seqlen_local=got[0].shape[1], nheads=heads[0], nheads_kv=heads[1], headdim=headdim,
                 dtype=torch.float64)
    blocks = sum(len(step[rank].blocks) for step in plan.forward + plan.backward)
    assert t.as_dict() == dict(
        bytes_sent=plan.bytes_sent(rank, **sizes), bytes_received=plan.bytes_received(rank, **sizes),
        forward_calls=1, backward_calls=1, blocks=blocks, collectives=t.collectives, host_reads=t.collectives,
        a2a_bytes_sent=0, a2a_bytes_received=0), label
    assert t.collectives <= (world_size > 1), label


def _exact_matrix(rank, world_size):
    cases = [(lay, sch, c, h, d, ker) for lay, sch, c, h, d, ker in itertools.product(
        ("contiguous", "zigzag"), ("ring", "lightseq"), (True, False), HEADS, (64, 80), ("math", "torch"))]
    cases += [(lay, "auto", c, h, 64, "auto") for lay, c, h in itertools.product(("contiguous", "zigzag"), (True, False), HEADS)]
    if world_size >= 8:  # every third case, each value still met: here the point is many peers at once;
        cases = cases[::3]  # test_emulate.py and test_masks.py sweep P = 8 case by case, in one process
    for i, (layout, schedule, causal, (h, hkv), d, kernel) in enumerate(cases):
        label = f"{layout} {schedule} causal={causal} heads=({h},{hkv}) d={d} kernel={kernel}"
        full = _full_inputs(world_size, h, hkv, d, torch.float64, tokens_per_chunk=3, seed=i)
        expected = reference_with_grads(*full, causal=causal)
        got, t = _run_local(rank, world_size, full, layout, schedule=schedule, causal=causal, kernel=kernel)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            dim = 2 if name == "lse" else 1
            torch.testing.assert_close(a, mls.shard(b, layout=layout, rank=rank, world_size=world_size, dim=dim),
                                       **F64, msg=lambda m: f"{label}: {name}: {m}")
        if schedule == "auto":
            schedule = mls.choose_schedule(layout, world_size, causal, Shape.of(got[0], got[3]))
        plan = mls.build_plan(schedule, layout=layout, world_size=world_size, causal=causal)
        _check_trace(t, rank, world_size, plan, got, (h, hkv), d, label)
    return len(cases) + _mask_matrix(rank, world_size)


def _mask_matrix(rank, world_size):
    """Documents and windows on real ranks (tests/test_masks.py sweeps them wider, emulated)."""
    from megatron_lightseq.distattn.plan import layout as layouts

    layouts.MIN_CHUNK_TOKENS = 2  # 8 chunks a rank in short sequences too (this process only)
    p = world_size
    cases = [("contiguous", True, "long-tailed", (-1, -1), 16 * p + 5), ("zigzag", False, "odd", (-1, -1), 16 * p + 3),
             ("balanced", True, "short", (-1, -1), 6 * p + 1), ("contiguous", True, None, (5, 0), 16 * p),
             ("balanced", False, "one", (7, 3), 16 * p + 2), ("zigzag", True, "long-tailed", (9, 0), 16 * p + 7)]
    for i, (layout, causal, docs, window, tokens) in enumerate(cases):
        h, hkv = HEADS[i % 3]
        kernel, schedule = ("math", "torch")[i % 2], ("ring", "lightseq", "auto")[i % 3]
        cu = documents(docs, tokens, seed=i) if docs else None
        mask = dict(causal=causal, cu_seqlens=cu, window_size=window)
        label = f"{layout} {schedule} causal={causal} docs={docs} window={window} heads=({h},{hkv}) {kernel}"
        g = torch.Generator().manual_seed(i)
        full = [torch.randn(2, tokens, n, 16, generator=g, dtype=torch.float64) for n in (h, hkv, hkv, h)]
        expected = masked_reference(*full, dense_allowed(tokens, **mask))
        got, t = _run_local(rank, world_size, full, layout, mask, schedule=schedule, kernel=kernel)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            dim = 2 if name == "lse" else 1
            part = mls.shard(b, layout=layout, rank=rank, world_size=world_size, dim=dim, **mask)
            real = mls.positions(layout=layout, rank=rank, world_size=world_size, tokens=tokens,
                                 **mask) < tokens  # padding rows: whatever they hold is never read
            pick = (lambda x: x[:, :, real]) if dim == 2 else (lambda x: x[:, real])
            torch.testing.assert_close(pick(a), pick(part), **F64, msg=lambda m: f"{label}: {name}: {m}")
        if schedule == "auto":
            schedule = mls.choose_schedule(layout, world_size, shape=Shape.of(got[0], got[3]), **mask)
        plan = mls.build_plan(schedule, layout=layout, world_size=world_size, tokens=tokens, **mask)
        _check_trace(t, rank, world_size, plan, got, (h, hkv), 16, label)
    return len(cases)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_exact_against_float64_oracle(world_size):
    assert run_ranks(world_size, _exact_matrix) == [(108 if world_size < 8 else 36) + 6] * world_size


def _max_errors(got, expected):
    return [(a.double() - b).abs().max().item() for a, b in zip(got, expected)]


BF16_CASES = [(lay, sch, ker) for lay, sch in (("contiguous", "lightseq"), ("zigzag", "ring"), ("zigzag", "lightseq"))
              for ker in ("math", "torch")]


def _bf16_errors(rank, world_size):
    """Per case: this rank's max errors against float64, ours and a plain bf16 computation's."""
    full64 = _full_inputs(world_size, 4, 2, 64, torch.float64, tokens_per_chunk=32, seed=7)
    full16 = [x.to(torch.bfloat16) for x in full64]
    dims = (1, 2, 1, 1, 1)  # out, lse, dq, dk, dv
    exact_full, plain_full = (reference_with_grads(*full, causal=True) for full in (full64, full16))
    results = []
    for layout, schedule, kernel in BF16_CASES:
        local = lambda xs: [mls.shard(x, layout=layout, rank=rank, world_size=world_size, dim=d)
                            for x, d in zip(xs, dims)]
        exact, plain = local(exact_full), local(plain_full)
        got, _ = _run_local(rank, world_size, full16, layout, schedule=schedule, causal=True, kernel=kernel)
        results.append((_max_errors(got, exact), _max_errors(plain, exact)))
    return results


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_bf16_error_at_most_twice_plain_bf16(world_size):
    """flash-attn's rule: the error against float64 is at most about twice a plain bf16 one's."""
    for rank, cases in enumerate(run_ranks(world_size, _bf16_errors)):
        for case, (ours, plain) in zip(BF16_CASES, cases):
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, plain):
                assert a <= 2 * b + 1e-6, f"rank {rank} {case} {name}: error {a:.3g} vs plain bf16 {b:.3g}"


def _errors_raised(rank, world_size, case):
    """Run one bad call; return the ValueError message this rank got."""
    torch.manual_seed(0)
    n = 4
    q, k, v = torch.randn(1, n, 4, 16), torch.randn(1, n, 2, 16), torch.randn(1, n, 2, 16)
    kwargs = {}
    if case == "seqlen_mismatch" and rank == 1:
        q, k, v = (x[:, :2] for x in (q, k, v))
    if case == "dtype_on_rank0" and rank == 0:
        k = k.double()
    if case == "odd_zigzag":
        q, k, v = (x[:, :3] for x in (q, k, v))
        kwargs["layout"] = "zigzag"
    if case.startswith("cu_"):  # 3 ranks x 4 tokens: documents over 12 tokens
        kwargs["cu_seqlens"] = {"cu_not_increasing": [0, 5, 5, 12], "cu_wrong_total": [0, 5, 40],
                                "cu_differs": [0, 5 + rank, 12]}[case]
    if case == "window_right_causal":
        kwargs["window_size"] = (4, 2)
    try:
        mls.dist_attn(q, k, v, **kwargs)
    except ValueError as e:
        # The group is still usable afterwards: a good call goes through.
        q, k, v = torch.randn(1, n, 4, 16), torch.randn(1, n, 2, 16), torch.randn(1, n, 2, 16)
        mls.dist_attn(q, k, v)
        return str(e)
    return None


@pytest.mark.parametrize("case,rank0,rank1", [
    ("seqlen_mismatch", "every rank must pass the same sizes", "seqlen_local: rank 0=4, rank 1=2"),
    ("dtype_on_rank0", "share one dtype, got torch.float32, torch.float64", "rank(s) [0] of the group rejected"),
    ("odd_zigzag", "positive multiple of 2, got 3", "positive multiple of 2, got 3"),
    ("cu_not_increasing", "strictly increasing (documents are not empty), got 5 then 5 at index 2",
     "strictly increasing"),
    ("cu_wrong_total", "so seqlen_local must be 14, got 4", "so seqlen_local must be 14, got 4"),
    ("cu_differs", "cu_seqlens: rank 0=(0, 5, 12), rank 1=<another>, rank 2=<another>",
     "cu_seqlens: rank 0=<another>, rank 1="),  # each rank shows its own, the others' as another
    ("window_right_causal", "window_size right must be 0 or -1, got 2", "window_size right must be 0 or -1, got 2"),
])
def test_bad_input_raises_on_every_rank(case, rank0, rank1):
    messages = run_ranks(3, _errors_raised, case, timeout=120)
    assert all(m is not None for m in messages), messages
    assert rank0 in messages[0], messages[0]
    assert rank1 in messages[1] and rank1 in messages[2], messages


def _in_subgroups(rank, world_size):
    """Two groups at once, {0, 2} and {1, 3}: group ranks differ from global ranks."""
    import torch.distributed as dist

    members = [[0, 2], [1, 3]]
    groups = [dist.new_group(m) for m in members]
    mine = rank % 2
    group = groups[mine]
    group_rank = dist.get_rank(group)
    full = _full_inputs(2, 6, 2, 64, torch.float64, tokens_per_chunk=3, seed=mine)
    expected = reference_with_grads(*full, causal=True)
    q, k, v, dout = (mls.shard(x, layout="contiguous", rank=group_rank, world_size=2) for x in full)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = mls.dist_attn(q, k, v, group=group, schedule="lightseq")
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(got, expected[:1] + expected[2:]):
        torch.testing.assert_close(a, mls.shard(b, layout="contiguous", rank=group_rank, world_size=2), **F64)
    return group_rank


def test_process_subgroups_translate_ranks():
    assert run_ranks(4, _in_subgroups) == [0, 0, 1, 1]


def test_attn_demo_job_runs_every_layout_and_schedule():
    """README's check of dist_attn alone: every row within float32's error, bytes as predicted."""
    done = subprocess.run([sys.executable, "-m", "megatron_lightseq", "attn-demo", "--world-size", "3", "--tokens",
                           "96"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("contiguous", "zigzag"))]
    assert len(rows) == 6, done.stdout
    for row in rows:
        assert float(row[3]) < 1e-5 and float(row[4]) < 1e-5 and row[-2] == "yes", row
    header = next(line.split() for line in done.stdout.splitlines() if line.startswith("layout"))
    assert header[-7:] == ["r0", "r1", "r2", "=", "plan", "fwd+bwd", "s"] and len(rows[0]) == 5 + 3 + 2, header
