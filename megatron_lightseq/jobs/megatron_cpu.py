"""CPU smoke runs of real Megatron-LM scripts: the launch command meant for GPUs, run unchanged on
CPU processes (gloo) to check it before booking them; the flags that need CUDA (TransformerEngine,
fused kernels, NCCL) are replaced by their local equivalents here, each change printed.

    torchrun --nproc-per-node 2 -m megatron_lightseq.run --cpu $MEGATRON_LM/pretrain_gpt.py ...     # with the plugin
    torchrun --nproc-per-node 2 -m megatron_lightseq.jobs.megatron_cpu $MEGATRON_LM/pretrain_gpt.py ...  # plain Megatron

(srun works the same: one task per process, scripts/srun_task.sh sets RANK/WORLD_SIZE.)
:func:`install` redirects, in this process only, the CUDA-only calls on Megatron-LM's training
path at the tags core_v0.16.1 and core_v0.19.0 (Python 3.11 and 3.12). Megatron functions are
patched by name wherever a name reaches the call, each with the call it serves; three things are
process-wide, each saying why: the placement of tensors asked for on "cuda" (literals everywhere,
custom autograd backwards included), torch.cuda's own functions (called through the torch.cuda module from everywhere), and torch.compile
(off). The plugin never imports this module.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import runpy
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

from ..megatron.flags import flag_spans
from . import dataset_helpers
from .cpu_shims import sequence_parallel_torch_norm
from .launch import is_rank_zero
from .quiet import LOGGED, WARNINGS, quiet_third_party

BANNER = ("CPU SMOKE RUN (megatron_lightseq.jobs.megatron_cpu): gloo on CPU processes, CUDA calls redirected; "
          "checks the launch command, not GPU speed or kernels")
# A folder: each process counts what dist_attn does (megatron_lightseq.trace()) for its whole run and
# writes the counters to rank<RANK>.json there when it exits (tests count attention forwards).
ENV_TRACE_DIR = "MEGATRON_LIGHTSEQ_TRACE_DIR"


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare index is a CUDA device to torch (Megatron passes torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuPlacement(TorchFunctionMode):
    """Serves every request for a CUDA tensor with a CPU one: ``device="cuda"`` (or an index) in any
    torch call, ``Tensor.cuda()``, ``Tensor.to("cuda")``, ``pin_memory``.

    Process-wide because Megatron spells these as literals inside long functions (train_step,
    training_log, clip_grads, schedules, timers, the param/grad buffers, the optimizers, the
    rerun state machine, RoPE's CP split with its pinned index, ...): no name reaches them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _placement_in_backward() -> None:
    """Custom autograd Functions' backward runs without the caller's torch-function modes (the autograd
    engine does not carry them), and Megatron allocates there with ``device=torch.cuda.current_device()``
    (the sequence-parallel all-gather in the backward of a recomputed layer): each such backward runs
    under its own placement mode too. Process-wide, as the mode is."""
    from torch.autograd.function import BackwardCFunction

    for name in ("apply", "apply_boxed"):
        original = getattr(BackwardCFunction, name, None)
        if original is None:  # apply_boxed: newer torch only
            continue

        def under_placement(self, *args, _original=original):
            with _CpuPlacement():
                return _original(self, *args)

        setattr(BackwardCFunction, name, under_placement)


class _CudaGenerator:
    """The CUDA default generator's stand-in: a CPU generator that Megatron's RNG tracker seeds,
    forks and checkpoints like the real one. Ops on CPU draw from torch's CPU generator."""

    def __init__(self) -> None:
        self.generator = torch.Generator()

    def get_rng_state(self, device="cuda"):
        return self.generator.get_state()

    def set_rng_state(self, new_state, device="cuda"):
        self.generator.set_state(new_state)

    def manual_seed(self, seed):
        self.generator.manual_seed(int(seed))


class _Stream:
    """A CUDA stream's stand-in: CPU ops run in order and finish before the call returns, so
    every wait is already satisfied."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass


class _DeviceProperties(types.SimpleNamespace):
    """What Megatron reads from torch.cuda.get_device_properties (TP/CP > 1: the SM count for
    communication overlap heuristics, the name for logging)."""


@contextlib.contextmanager
def _patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _during(fn, owner, name: str, value):
    """``fn`` with ``owner.name`` replaced by ``value`` while it runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _patched(owner, name, value):
            return fn(*args, **kwargs)

    return wrapper


def _cuda_type_name(tensor, dtype=None, *args, **kwargs):
    """Tensor.type() as it reads on a GPU ("torch.cuda.FloatTensor"); conversions unchanged."""
    if dtype is not None:
        return _TENSOR_TYPE(tensor, dtype, *args, **kwargs)
    name = _TENSOR_TYPE(tensor)
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


_TENSOR_TYPE = torch.Tensor.type


def _patch_torch_cuda() -> None:
    """The torch.cuda functions Megatron calls, answered for one CPU 'device' per process. Patched on
    torch.cuda itself: Megatron reaches them as torch.cuda.X from dozens of modules."""
    cuda = torch.cuda
    generator = _CudaGenerator()
    # current_device: passed as device= (param buffers, rotary inv_freq, MoE scale); the
    # placement mode maps the index to the CPU.
    cuda.current_device = lambda: 0
    # set_device: _initialize_distributed(), once it counts a device (below).
    cuda.set_device = lambda device: None
    # synchronize: timers, train_step's memory report, checkpoint saving.
    cuda.synchronize = lambda device=None: None
    # get_rng_state / set_rng_state / manual_seed: the RNG tracker (model_parallel_cuda_manual_seed,
    # fork()), checkpointing's rng state (every save) and the rerun state machine (every step).
    for module in (cuda, cuda.random):
        module.get_rng_state = generator.get_rng_state
        module.set_rng_state = generator.set_rng_state
        module.manual_seed = generator.manual_seed
        module.manual_seed_all = generator.manual_seed
    # Stream / current_stream / stream: get_model() builds the DDP wrappers on a side stream, and
    # DistributedDataParallel keeps a communication stream (0.16, 0.19).
    default_stream = _Stream()
    cuda.Stream = _Stream
    cuda.current_stream = lambda device=None: default_stream
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # get_device_properties: read at TP/CP > 1 (overlap heuristics) and in memory reports.
    cuda.get_device_properties = lambda device=None: _DeviceProperties(
        name="cpu", major=0, minor=0, multi_processor_count=1, total_memory=0)


def _patch_megatron(typing_shim: bool) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    generator_calls = torch.cuda
    # _get_cuda_rng_state / _set_cuda_rng_state (core 0.16, 0.19): the tracker's fork() swaps the
    # CUDA generator's state through these, by index into torch.cuda.default_generators.
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: \
        generator_calls.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: \
        generator_calls.set_rng_state(new_state)

    initialize = importlib.import_module("megatron.training.initialize")
    training = importlib.import_module("megatron.training.training")
    # initialize_megatron (0.16, 0.19) asserts torch.cuda.is_available() unless allow_no_cuda.
    original_init = initialize.initialize_megatron

    @functools.wraps(original_init)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    for module in (initialize, training, importlib.import_module("megatron.training")):
        if getattr(module, "initialize_megatron", None) is original_init:
            module.initialize_megatron = initialize_megatron
    # _initialize_distributed (0.16, 0.19) builds Megatron's process groups only when it counts a
    # CUDA device, and _set_random_seed seeds the RNG tracker (which Megatron's attention forks)
    # only then: both count one device per process.
    for name in ("_initialize_distributed", "_set_random_seed"):
        setattr(initialize, name, _during(getattr(initialize, name), torch.cuda, "device_count", lambda: 1))
    # compile_helpers (0.16, 0.19, rank 0 while initializing) builds the dataset helpers with whatever
    # python3-config is on the PATH: built here for this interpreter instead (dataset_helpers.py says why).
    importlib.import_module("megatron.core.datasets.utils").compile_helpers = dataset_helpers.compile_helpers
    # WrappedTorchNorm (0.16, 0.19) refuses --sequence-parallel, which only Apex's and TE's norms take.
    sequence_parallel_torch_norm()
    # _warmup_jit_function (0.16, 0.19) warms fused kernels on CUDA; compilation is off here.
    initialize._warmup_jit_function = lambda *args, **kwargs: None
    # fused_kernels.load (0.16; gone at 0.19) builds the fused softmax with nvcc.
    with contextlib.suppress(ImportError):
        importlib.import_module("megatron.legacy.fused_kernels").load = lambda args: None
    # Tensor.type() compared with "torch.cuda.FloatTensor" and friends: the fp16/bf16 and the
    # distributed optimizers sort parameters by it when built, and clip_grad_by_total_norm_fp32
    # asserts it of every gradient (0.16, 0.19). Only while those run does it read as on a GPU.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    original_clip = clip_grads.clip_grad_by_total_norm_fp32
    clip = _during(original_clip, torch.Tensor, "type", _cuda_type_name)  # asserts each grad's type
    for module in (clip_grads, optimizer, distrib_optimizer):
        if getattr(module, "clip_grad_by_total_norm_fp32", None) is original_clip:
            module.clip_grad_by_total_norm_fp32 = clip
    for owner in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        owner.__init__ = _during(owner.__init__, torch.Tensor, "type", _cuda_type_name)
    if typing_shim:
        # get_write_results_queue (0.19's torch_dist save) starts a multiprocessing Manager by spawn,
        # whose child re-imports the script (pretrain_gpt.py) without the Python 3.11 shim below
        # and dies; a forked child keeps it.
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        results_queue = getattr(filesystem_async, "get_write_results_queue", None)
        if results_queue is not None:
            filesystem_async.get_write_results_queue = lambda mp_mode="spawn": results_queue(mp_mode="fork")


def megatron_version(path: list[str] | None = None) -> tuple[int, int] | None:
    """(major, minor) of the megatron.core that ``import megatron`` will find on ``path`` (sys.path:
    the script's checkout first), read from its package_info.py without importing it; None if unknown."""
    import re

    for folder in sys.path if path is None else path:
        info = os.path.join(folder or ".", "megatron", "core", "package_info.py")
        if os.path.isfile(info):
            text = open(info).read()
            found = [re.search(rf"^{name}\s*=\s*(\d+)", text, flags=re.M) for name in ("MAJOR", "MINOR")]
            return (int(found[0].group(1)), int(found[1].group(1))) if all(found) else None
    return None


def _python_311_typing() -> str | None:
    """core_v0.19.0 declares Python >= 3.12; the one 3.12 feature its training path uses is
    ``typing.override`` (PEP 698, megatron/training/models/{gpt,hybrid}.py, imported by
    megatron.training.argument_utils), a marker decorator with no effect on what runs. On 3.11 the
    CPU mode takes it from typing_extensions, and says so where the checkout needs it (0.17 and
    later; core_v0.16.1 runs on 3.11 as it is, so its smoke runs print no note): the GPU job itself
    needs Python 3.12 there."""
    import typing

    if hasattr(typing, "override"):
        return None
    import typing_extensions

    typing.override = typing_extensions.override
    version = megatron_version()
    if version is not None and version < (0, 17):
        return None
    return ("note: Python 3.11: typing.override taken from typing_extensions for this CPU run "
            "(Megatron-LM core_v0.17+ needs Python >= 3.12 on the GPUs)")


def _trace_to_file(folder: str) -> None:
    """Count for the rest of the process; write the counters when it exits (also by sys.exit, as
    Megatron's --exit-interval does)."""
    import atexit
    import json

    from ..distattn import trace

    counting = trace()
    counters = counting.__enter__()
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))

    def write() -> None:  # holds `counting`: collected, it would close the trace
        counting.__exit__(None, None, None)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(counters.as_dict(), f)

    atexit.register(write)


# What a cluster's command asks for that has no CPU counterpart, and what the smoke run gives instead:
# (flag, its values that need a change or None for any, the replacement, why).
_REPLACED = (
    ("--distributed-backend", None, ["--distributed-backend", "gloo"], "NCCL needs GPUs; gloo runs on CPU processes"),
    ("--transformer-impl", ("transformer_engine", "inference_optimized"), ["--transformer-impl", "local"],
     "TransformerEngine needs CUDA; Megatron's local layers do the same math"),
    ("--use-flash-attn", None, [], "the flash-attn package needs CUDA"),
    ("--attention-backend", ("flash", "fused"), ["--attention-backend", "auto"],
     "TransformerEngine's flash/fused attention needs CUDA (auto: Megatron's local attention here)"),
    ("--tp-comm-overlap", None, [], "TransformerEngine's userbuffers overlap needs CUDA"),
)
# Fused CUDA kernels Megatron uses unless told not to, each turned off where the command leaves it on.
_UNFUSED = (
    ("--no-rope-fusion", "the fused RoPE kernel needs TransformerEngine (\"apply_rope_fusion is not available\")"),
    ("--no-persist-layer-norm", "the persistent layer norm needs Apex"),
    ("--no-gradient-accumulation-fusion", "fused weight-gradient accumulation needs a CUDA extension"),
    ("--no-masked-softmax-fusion", "the fused masked softmax needs a CUDA extension"),
    ("--no-bias-dropout-fusion", "a fused CUDA kernel (torch.compile is off in the CPU mode)"),
    ("--no-bias-gelu-fusion", "a fused CUDA kernel (torch.compile is off in the CPU mode)"),
)


def cpu_command(argv: list[str], env: dict) -> list[str]:
    """Turn the cluster's command (``argv``: the script and its flags, changed in place; ``env``:
    the environment, changed in place) into the CPU smoke run's: each flag that needs CUDA replaced by
    its local equivalent. Returns one line per change, saying what changed and why."""
    notes = []
    if env.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron asserts it at TP or CP > 1, before any CUDA call
        notes.append("CUDA_DEVICE_MAX_CONNECTIONS=1 set: Megatron asserts it for TP/CP > 1 (a CUDA stream setting)")
    for flag, values, replacement, why in _REPLACED:
        spans = flag_spans(argv, flag)
        given = [argv[a:b] for a, b in spans]
        needs = [g for g in given if values is None or any(v.split("=")[-1] in values for v in g)]
        absent_default = not spans and flag in ("--distributed-backend", "--transformer-impl")  # defaults need CUDA
        if not needs and not absent_default:
            continue
        for a, b in reversed(spans):
            del argv[a:b]
        argv += replacement
        was = " ".join(" ".join(g) for g in needs) or f"{flag} (default)"
        notes.append(f"{was} -> {' '.join(replacement) or 'dropped'}: {why}")
    for flag, why in _UNFUSED:
        if flag not in argv:
            argv.append(flag)
            notes.append(f"{flag} added: {why}")
    if "--sequence-parallel" in argv:
        notes.append("--sequence-parallel kept: Megatron's torch norm takes it here (only Apex's and TransformerEngine's "
                     "did), its weight gradients summed over the TP group as theirs are")
    return notes


def install(argv: list[str] | None = None) -> None:
    """Make this process run a Megatron-LM script on CPU. ``argv`` (the script's, changed in place):
    the cluster's command, whose flags that need CUDA become their local equivalents
    (:func:`cpu_command`, each change printed on rank 0). Call before anything imports megatron."""
    quiet_third_party()  # before Megatron's modules warn on import
    changes = cpu_command(argv, os.environ) if argv is not None else []
    import typing

    shimmed = not hasattr(typing, "override")  # Python 3.11: typing_extensions' override put in place
    note = _python_311_typing()
    # torch.compile (Megatron's jit_fuser) would compile C++ for every fused op on CPU: minutes on a
    # small machine, for kernels a smoke run does not test.
    import torch._dynamo

    torch._dynamo.config.disable = True
    _patch_torch_cuda()
    _patch_megatron(typing_shim=shimmed)
    _CpuPlacement().__enter__()  # for the rest of the process
    _placement_in_backward()
    if os.environ.get(ENV_TRACE_DIR):
        _trace_to_file(os.environ[ENV_TRACE_DIR])
    if is_rank_zero():
        print(BANNER, flush=True)
        for change in changes:
            print(f"  changed for CPU: {change}", flush=True)
        print(f"  quiet: {len(WARNINGS) + len(LOGGED)} kinds of third-party warning that say nothing on CPU processes (Apex, "
              f"TransformerEngine, absl, fused kernels; megatron_lightseq/jobs/quiet.py lists them and why)", flush=True)
        if note:
            print(note, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Plain Megatron-LM (no plugin): ``python -m megatron_lightseq.jobs.megatron_cpu SCRIPT [args]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    sys.argv = list(argv)
    # As megatron_lightseq.run does: the script's folder first, before anything imports megatron.
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    install(sys.argv)
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
