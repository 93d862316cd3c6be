"""One-shot GPU check of the celeba recipe, built not to lose a figure it measured.

    PYTHONUNBUFFERED=1 timeout -k 10 300 python benchmarks/gpu_check.py --budget-s 270 \\
        --output benchmarks/results/gpu-h200.json          # on a lent GPU: the full check
    python benchmarks/gpu_check.py --smoke --device cpu     # tiny sizes on CPU (CI): the plumbing only

Every section (and every phase and batch inside one) runs in its own guard: an error (a first-run
inductor or Triton failure, an NCCL init failure, an out-of-memory) is recorded as that section's
one-line reason and the rest goes on. The JSON (``--output``) and the same as a table (``.txt`` beside
it) are rewritten after each section, so a run stopped early keeps what it measured: at ``--budget-s``
(a hard deadline for the whole run, torch.compile included), by SIGTERM (``timeout``) or Ctrl-C.

Sections, in order of value (what each figure means: benchmarks/RESULTS.md):

1. device: the GPU, its dense bf16 / fp32 peak (datasheet, ``benchmarks.machine.PEAK_TFLOPS``),
   torch, CUDA, cuDNN, NCCL; then a process group of world size 1 over NCCL (gloo on CPU), so that
   DDP's gradient allreduce goes through the real backend; a failed NCCL init is recorded and the
   steps run without DDP.
2. steps/PHASE/bBATCH, eager, at the recipe's batch (12) and at ``--large-batch`` (48): images/s,
   median step time, MFU against the bf16 peak (model FLOPs from ``runners.count_flops``), peak
   allocated and reserved memory from a clean baseline, the gradient bytes DDP allreduces, and from
   a profile of ``--profile-steps`` steps the GPU's busy time against the step's wall time
   (launch-bound or GPU-bound), GPU seconds per trainer section and how much of the allreduce
   overlapped other GPU work.
3. bf16_vs_fp32/PHASE: the same initial weights and batches in bf16 autocast and in fp32 (TF32 off):
   cosine of the step-0 gradients of each network the phase trains, and the losses of the first steps.
4. loader: the real training loader (its worker processes, pinned memory) feeding real train steps
   for ``--loader-seconds``; the share of that time spent waiting for data (worker start-up apart).
5. checkpoint: one timed ``Trainer.save`` of the celeba state (weights and Adam moments) and its size.
6. compile/PHASE (joint first: 400k of the 500k iterations): ``torch.compile`` in a child process killed
   at the deadline: compile time, images/s against eager, and the same numerics as 3 (compiled
   against eager).
7. allreduce and projection, recomputed at every write from what was measured: the gradient bytes a
   ring allreduce moves per GPU and step with 8 GPUs, the bandwidth that would hide it, and the paper's
   schedule (90k + 10k + 400k iterations) on 1 and 8 GPUs with communication and checkpoints.

VGG16 has random weights (the GPU machine has no network; weights do not change speed). Nothing here
imports Ray, s3fs or boto3: the GPU machine has none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import gc
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import vocabulary  # noqa: E402
from benchmarks.machine import describe_device, synchronize  # noqa: E402
from benchmarks.profiling import attribute, busy_time, device_intervals  # noqa: E402
from benchmarks.projection import paper_iterations, ring_allreduce_bytes, schedule_hours  # noqa: E402
from benchmarks.report import table  # noqa: E402
from benchmarks.runners import Runner, count_flops, summarize, time_interleaved  # noqa: E402
from benchmarks.vocabulary import OPTIMIZED, PHASES  # noqa: E402
from benchmarks.workloads import Workload, make_dataset  # noqa: E402
from inpaint.config import ConfigError, DataConfig  # noqa: E402
from inpaint.data import make_train_loader  # noqa: E402
from inpaint.distributed import prepare_for_training  # noqa: E402
from inpaint.errors import one_line  # noqa: E402
from inpaint.trainer import Trainer  # noqa: E402

MIB = 2**20
SMOKE_OVERRIDES = ("model.image_size=32", "model.local_size=16", "model.gen_width=8", "model.disc_width=8",
                   "model.fc_features=32", "model.se_reduction=4", "model.dilations=2,4", "mask.max_side=0.45",
                   "loss.cx_layers=relu2_2", "data.batch_size=2", "data.num_workers=1")
GPU_BOUND = 0.9  # a step whose GPU is busy at least this share of its wall time is GPU-bound
EIGHT = 8
COMPILE_ORDER = ("joint", "generator", "discriminator")  # by value: joint is 400k of the 500k iterations


@dataclasses.dataclass
class Options:
    recipe: str = "celeba"
    device: str = "auto"
    overrides: tuple[str, ...] = ()
    large_batch: int = 48  # beside the recipe's batch: the headroom
    warmup: int = 3
    steps: int = 20
    profile_steps: int = 3
    agreement_steps: int = 3  # per phase: bf16 vs fp32, compiled vs eager
    loader_seconds: float = 6.0
    loader_workers: int | None = None  # None: the recipe's data.num_workers
    images: int = 3600  # JPEGs in the local dataset: the loader section stays inside one epoch
    compile: bool = True
    compile_backend: str = "inductor"
    budget_s: float = 270.0
    allreduce_gbps: float = 300.0  # bus bandwidth assumed for 8 GPUs (NVLink, NCCL ring) in the projection
    fail_sections: tuple[str, ...] = ()  # test hook: sections (fnmatch patterns) that raise at their start
    smoke: bool = False

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> "Options":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


SMOKE = {"large_batch": 4, "warmup": 1, "steps": 2, "profile_steps": 1, "agreement_steps": 2, "loader_seconds": 1.0,
         "images": 48, "compile_backend": "eager", "budget_s": 600.0}


class Stop(BaseException):
    """The run must end now (a signal or the budget's deadline); not an Exception, so no guard swallows it."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


class InjectedFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


# ----------------------------------------------------------------------------- the guarded run
class Guard:
    """Signals and the deadline as :class:`Stop`, sections that cannot lose each other's figures, and the
    results written after every section."""

    def __init__(self, options: Options, write: Callable[[], None], deadline: float):
        self.options, self._write, self.deadline = options, write, deadline
        self.stopped: str | None = None
        self.exit_code = 0
        self._writing = False
        self._pending: Stop | None = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGTERM, SIGINT and the deadline's SIGALRM (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))

    def uninstall(self) -> None:
        """No deadline any more, and the handlers as they were before :meth:`install`."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: die as the signal says, write nothing
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGALRM:
            stop = Stop(f"stopped at the --budget-s deadline ({self.options.budget_s:g} s)", 0)
        else:
            stop = Stop(f"stopped by {signal.Signals(signum).name}", 128 + signum)
        if self._writing:
            self._pending = stop  # raised once the file is whole
        else:
            raise stop

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        self._writing = True
        try:
            self._write()
        finally:
            self._writing = False
        if self._pending is not None:
            stop, self._pending = self._pending, None
            raise stop

    def run(self, store: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]], need_s: float = 1.0) -> None:
        """``store[name]`` = the figures of ``measure()``, or ``{"failed": reason}`` / ``{"skipped": reason}``;
        then write. A :class:`Stop` is recorded, then raised on."""
        started = time.perf_counter()
        caught: Stop | None = None
        if self.stopped:
            entry: dict[str, Any] = {"skipped": f"not run: {self.stopped}"}
        elif self.left() < need_s:
            entry = {"skipped": f"budget: {max(0.0, self.left()):.0f} s left of {self.options.budget_s:g}, "
                                f"this needs about {need_s:.0f}"}
        else:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                if any(fnmatch.fnmatchcase(name, p) for p in self.options.fail_sections):
                    raise InjectedFailure(f"injected by --fail-section ({name})")
                entry = measure()
            except Stop as stop:
                entry = {"failed": str(stop)}
                self.stopped, self.exit_code, caught = str(stop), stop.exit_code, stop
            except Exception as exc:  # noqa: BLE001 -- any failure of one section is that section's figure
                traceback.print_exc()
                entry = {"failed": one_line(exc, typed=True)}
                traceback.clear_frames(exc.__traceback__)  # the failed section's tensors can be freed
                del exc
            finally:
                release_memory()
            entry["seconds"] = time.perf_counter() - started
        store[name] = entry
        self.write()
        if caught is not None:
            raise caught


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def clean_baseline(device: torch.device) -> int:
    """Free what earlier sections left and restart the peak counters; returns the bytes still allocated."""
    release_memory()
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_figures(device: torch.device, baseline: int) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"baseline_mib": None, "peak_allocated_mib": None, "peak_reserved_mib": None}
    return {"baseline_mib": baseline / MIB, "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions on or off (CUDA), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- building steps
def prepare(trainer: Trainer, device: torch.device, *, compiled: bool, ddp: bool) -> None:
    """DDP-wrap (with ``runtime.ddp_comm``'s hook), then compile, as training does (inpaint.distributed)."""
    prepare_for_training(trainer, device, 1, ddp=ddp, compile=compiled)


def fixed_batches(url: str, config, count: int, device: torch.device) -> list[dict]:
    """A few batches from the training loader (in-process), pinned on CUDA, reused by the timed steps."""
    data = DataConfig(url=url, batch_size=config.data.batch_size, num_workers=0, seed=config.data.seed)
    loader = iter(make_train_loader(data, config.model, config.mask))
    batches = []
    for _ in range(count):
        batch = next(loader)
        if device.type == "cuda":
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batches.append(batch)
    return batches


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    norm_a = sum(float(x.double().square().sum()) for x in a) ** 0.5
    norm_b = sum(float(y.double().square().sum()) for y in b) ** 0.5
    return max(-1.0, min(1.0, dot / (norm_a * norm_b))) if norm_a and norm_b else float("nan")


def gradients(trainer: Trainer, network: str) -> list[torch.Tensor]:
    return [p.grad for p in getattr(trainer, network).parameters() if p.grad is not None]


def agreement(reference: Runner, test: Runner, batches: list[dict], steps: int,
              reference_context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """Two runners from the same weights on the same batches: the cosine of their step-0 gradients per
    network trained, every logged loss of the first ``steps`` steps, and each one's seconds per step."""
    phase = reference.trainer.phase
    trained = [n for n, on in (("generator", phase.trains_generator),
                               ("discriminator", phase.trains_discriminator)) if on]
    history: dict[str, dict[str, list[float]]] = {"reference": {}, "test": {}}
    seconds: dict[str, list[float]] = {"reference": [], "test": []}
    cosines: dict[str, float] = {}
    for i in range(steps):
        for label, runner in (("reference", reference), ("test", test)):
            torch.manual_seed(1000 + i)  # the same randomness (if any) in both
            start = time.perf_counter()
            with reference_context() if label == "reference" else contextlib.nullcontext():
                metrics = runner.trainer.train_step(batches[i % len(batches)])
            synchronize(runner.device)
            seconds[label].append(time.perf_counter() - start)
            for name, value in metrics.items():
                history[label].setdefault(name, []).append(float(value))
        if i == 0:
            cosines = {n: cosine(gradients(reference.trainer, n), gradients(test.trainer, n)) for n in trained}
    losses = {}
    for name, ref in history["reference"].items():
        other = history["test"][name]
        losses[name] = {"reference": ref, "test": other,
                        "max_rel_diff": max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(ref, other))}
    return {"steps": steps, "gradient_cosine_step0": cosines, "losses": losses, "seconds": seconds,
            "max_rel_diff": max(v["max_rel_diff"] for v in losses.values())}


def make_workload(options: Options, bf16: bool = True) -> Workload:
    """The recipe with the run's overrides, in bf16 autocast + channels_last (the GPU default) or fp32."""
    precision = str(bf16).lower()
    settings = (*(SMOKE_OVERRIDES if options.smoke else ()), *options.overrides,
                f"runtime.bf16={precision}", f"runtime.channels_last={precision}")
    return Workload(f"{options.recipe}/{'bf16' if bf16 else 'fp32'}", options.recipe, OPTIMIZED, settings)


class Check:
    """What every section needs: options, device, dataset, batches, FLOP counts and the results."""

    def __init__(self, options: Options, device: torch.device):
        self.options, self.device = options, device
        self.info = describe_device(device)
        self.ddp = False
        self.url: str | None = None
        self._batches: dict[int, list[dict]] = {}
        self._flops: dict[str, float | None] = {}
        self.vocabulary_options = vocabulary.Options()

    def workload(self, bf16: bool = True) -> Workload:
        return make_workload(self.options, bf16)

    @property
    def batch(self) -> int:
        return self.workload().config("joint").data.batch_size

    def runner(self, phase: str, batch: int | None = None, bf16: bool = True) -> Runner:
        return Runner(self.workload(bf16), phase, self.device, self.vocabulary_options, batch=batch)

    def batches(self, batch: int) -> list[dict]:
        if batch not in self._batches:
            config = self.workload().config("joint", batch=batch)
            self._batches[batch] = fixed_batches(self.url, config, 4, self.device)
        return self._batches[batch]

    def flops(self, phase: str) -> float | None:
        """Model FLOPs per image of one eager step (``runners.count_flops`` at a batch of 2)."""
        if phase not in self._flops:
            small = [{k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                     for b in self.batches(self.batch)]
            self._flops[phase] = count_flops(self.workload(), phase, self.device, self.vocabulary_options,
                                             batches=lambda _: itertools.cycle(small))
        return self._flops[phase]


# ----------------------------------------------------------------------------- sections
def device_facts(check: Check) -> dict[str, Any]:
    device, info = check.device, check.info
    facts = {"name": info["name"], "type": device.type, "peak_tflops_bf16": info["peak_tflops_bf16"],
             "peak_tflops_fp32": info["peak_tflops_fp32"], "native_bf16": info["native_bf16"],
             "cpu": info["cpu_line"], "logical_cpus": info["logical_cpus"], "torch": torch.__version__,
             "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                     multiprocessors=props.multi_processor_count, cudnn_benchmark=torch.backends.cudnn.benchmark,
                     cudnn=fact(torch.backends.cudnn.version), nccl=fact(lambda: ".".join(
                         map(str, torch.cuda.nccl.version()))),
                     bf16_native=fact(lambda: torch.cuda.is_bf16_supported(including_emulation=False)))
    return facts


def fact(read: Callable[[], Any]) -> Any:
    """One device fact, or why it could not be read: a missing fact does not cost the others."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({one_line(exc, typed=True)})"


def start_process_group(check: Check) -> dict[str, Any]:
    """World size 1 over NCCL (gloo off CUDA), one allreduce to surface an init failure here."""
    backend = "nccl" if check.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        probe = torch.ones(1, device=check.device)
        dist.all_reduce(probe)
        synchronize(check.device)
    except Exception:
        dist.destroy_process_group()
        raise
    check.ddp = True
    return {"backend": backend, "world_size": 1, "ddp": True}


def profile_busy(runner: Runner, steps: int, step_s: float) -> dict[str, Any]:
    """GPU-busy time per step against the (unprofiled) step time, GPU seconds per trainer section, and
    how much of the NCCL allreduce time overlapped other GPU work, from ``steps`` profiled steps."""
    device = runner.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step(next(runner.batches))
        synchronize(device)
    sections = {k: v / steps for k, v in attribute(prof.events(), device).items()}
    if device.type != "cuda":
        return {"section_s": sections, "section_clock": "CPU", "gpu_busy_s": None, "busy_fraction": None,
                "bound": "n/a (no GPU)", "allreduce_kernel_s": None, "allreduce_overlapped_fraction": None}
    busy = busy_time(device_intervals(prof))
    fraction = busy["busy_s"] / steps / step_s
    bound = ("GPU-bound" if fraction >= GPU_BOUND else
             f"launch/host-bound: the GPU idles {1 - fraction:.0%} of the step")
    overlapped = busy["allreduce_overlapped_s"] / busy["allreduce_s"] if busy["allreduce_s"] else None
    return {"section_s": sections, "section_clock": "GPU", "gpu_busy_s": busy["busy_s"] / steps,
            "busy_fraction": fraction, "bound": bound, "allreduce_kernel_s": busy["allreduce_s"] / steps,
            "allreduce_overlapped_fraction": overlapped}


def timed_steps(check: Check, runner: Runner, batch: int, label: str, flops: float | None) -> dict[str, Any]:
    """Warm-up and timed steps, then a profile: the step record with memory and GPU-busy figures."""
    options = check.options
    runner.batches = itertools.cycle(check.batches(batch))
    start = time.perf_counter()
    time_interleaved([runner], options.warmup, options.steps, label)
    warmup_s = time.perf_counter() - start - sum(runner.step_s) - sum(runner.data_s)
    record = dict(summarize(runner, None, flops, check.info))
    record.update(warmup_s=warmup_s, mfu=record.pop("peak_fraction", None), ddp=check.ddp,
                  state_mib=runner.state_bytes() / MIB)
    record.update(profile_busy(runner, options.profile_steps, record["step_s_median"]))
    return record


def eager_steps(check: Check, phase: str, batch: int) -> dict[str, Any]:
    try:
        flops, flops_failed = check.flops(phase), None
    except Exception as exc:  # noqa: BLE001 -- the timing is still worth having without its FLOPs
        flops, flops_failed = None, one_line(exc, typed=True)
    baseline = clean_baseline(check.device)
    runner = check.runner(phase, batch)
    prepare(runner.trainer, check.device, compiled=False, ddp=check.ddp)
    record = timed_steps(check, runner, batch, f"{phase} b{batch}", flops)
    record.update(memory_figures(check.device, baseline))
    if flops_failed:
        record["flops_failed"] = flops_failed
    return record


def precision_agreement(check: Check, phase: str) -> dict[str, Any]:
    """bf16 autocast + channels_last against fp32 (TF32 off) from the same weights on the same batches."""
    bf16 = check.runner(phase, check.batch, bf16=True)
    fp32 = check.runner(phase, check.batch, bf16=False)
    figures = agreement(fp32, bf16, check.batches(check.batch), check.options.agreement_steps,
                        reference_context=lambda: tf32(False))
    return {"reference": "fp32, TF32 off", "test": "bf16 autocast + channels_last", **figures}


def loader_feeding_steps(check: Check) -> dict[str, Any]:
    """The training loader with its workers feeding eager joint steps for ``--loader-seconds``."""
    options, device = check.options, check.device
    config = check.workload().config("joint")
    workers = config.data.num_workers if options.loader_workers is None else options.loader_workers
    data = DataConfig(url=check.url, batch_size=config.data.batch_size, num_workers=workers, seed=config.data.seed)
    runner = check.runner("joint")
    prepare(runner.trainer, device, compiled=False, ddp=check.ddp)
    start = time.perf_counter()
    train_loader = make_train_loader(data, config.model, config.mask, pin_memory=device.type == "cuda")
    per_epoch = train_loader.batches_per_epoch
    loader = iter(train_loader)
    first = next(loader)
    startup_s = time.perf_counter() - start
    for batch in (first, next(loader)):  # warm-up steps: allocator, cuDNN's choices
        runner.step(batch)
    synchronize(device)
    waits: list[float] = []
    begin = time.perf_counter()
    while time.perf_counter() - begin < options.loader_seconds:
        fetch = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - fetch)
        runner.step(batch)
    synchronize(device)
    wall = time.perf_counter() - begin
    del loader, train_loader
    images = len(waits) * config.data.batch_size
    return {"workers": workers, "batch": config.data.batch_size, "pinned": device.type == "cuda",
            "startup_s": startup_s, "steps": len(waits), "wall_s": wall, "images_per_s": images / wall,
            "data_wait_s": sum(waits), "data_wait_share": sum(waits) / wall,
            "data_wait_s_max": max(waits), "batches_per_epoch": per_epoch,
            "epoch_ends_inside": (len(waits) + 2) // per_epoch}


def checkpoint_save(check: Check, folder: Path) -> dict[str, Any]:
    """One ``Trainer.save`` of the joint-phase state (after a step: Adam's moments exist), timed, and its size."""
    runner = check.runner("joint")
    runner.step(check.batches(check.batch)[0])
    synchronize(check.device)
    target = Path(tempfile.mkdtemp(dir=folder)) / "checkpoint_000001"
    start = time.perf_counter()
    runner.trainer.save(target)
    seconds = time.perf_counter() - start
    files = [f for f in target.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return {"save_s": seconds, "bytes": size, "mib": size / MIB, "mib_per_s": size / MIB / seconds,
            "files": len(files), "where": "local disk (a cluster adds the upload)",
            "every_steps": runner.config.checkpoint.every_steps,
            "every_minutes": runner.config.checkpoint.every_minutes}


# ----------------------------------------------------------------------------- compile, in a child process
def compile_child(request_path: Path) -> int:
    """The compile variants (``--compile-child``): each phase's entry written to the request's output as
    soon as it is measured; stopped at the deadline the parent gave."""
    request = json.loads(request_path.read_text())
    options = Options.from_json(request["options"])
    device = torch.device(request["device"])
    configure(device)
    if options.compile_backend != "inductor":  # the smoke test: Dynamo's tracing without code generation
        import functools

        torch.compile = functools.partial(torch.compile, backend=options.compile_backend)
    output = Path(request["output"])
    entries: dict[str, Any] = {}
    guard = Guard(options, lambda: write_atomic(output, json.dumps(entries, default=str)), request["deadline"])
    guard.install()
    check = Check(options, device)
    check.url = request["url"]
    try:
        if request["ddp"]:
            guard.run(entries, "process_group", lambda: start_process_group(check))
        for phase in COMPILE_ORDER:
            guard.run(entries, f"compile/{phase}", lambda: compiled_steps(check, phase, request["flops"].get(phase)),
                      need_s=5.0)
    except Stop as stop:
        return stop.exit_code
    finally:
        guard.uninstall()
        if dist.is_initialized():
            gc.collect()  # DDP modules torn down after their group can abort the exit (tests/test_gpu_training.py)
            dist.destroy_process_group()
    return 0


def compiled_steps(check: Check, phase: str, flops: float | None) -> dict[str, Any]:
    """Compiled against eager from the same weights (numerics; the compiled first step is the compile
    time), then the compiled step timed and profiled as the eager one is."""
    batch = check.batch
    eager = check.runner(phase, batch)
    prepare(eager.trainer, check.device, compiled=False, ddp=check.ddp)
    compiled = check.runner(phase, batch)
    prepare(compiled.trainer, check.device, compiled=True, ddp=check.ddp)
    numerics = agreement(eager, compiled, check.batches(batch), check.options.agreement_steps)
    del eager
    baseline = clean_baseline(check.device)
    record = timed_steps(check, compiled, batch, f"compiled {phase}", flops)
    record.update(memory_figures(check.device, baseline), compile_s=numerics["seconds"]["test"][0],
                  backend=check.options.compile_backend,
                  numerics={"reference": "eager", "test": "compiled", **numerics})
    return record


def compile_variants(check: Check, guard: Guard, store: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run :func:`compile_child` in its own process group, killed at the deadline; merge its entries."""
    output = folder / "compile-out.json"
    request = folder / "compile-in.json"
    flops = {p: store.get(f"steps/{p}/b{check.batch}", {}).get("flops_per_image") for p in PHASES}
    request.write_text(json.dumps({"options": dataclasses.asdict(check.options), "device": str(check.device),
                                   "url": check.url, "ddp": check.ddp, "flops": flops, "output": str(output),
                                   "deadline": guard.deadline - 4.0}))
    child = subprocess.Popen(child_command(request), start_new_session=True)
    stopped: Stop | None = None
    try:
        child.wait(timeout=max(1.0, guard.left() - 3.0))  # the child stops itself 4 s before the deadline
        ended = f"exit status {child.returncode}"
    except subprocess.TimeoutExpired:
        ended = "killed at the --budget-s deadline"
    except Stop as stop:
        ended, stopped = f"killed: {stop}", stop
    finally:
        stop_group(child)
    entries = json.loads(output.read_text()) if output.exists() else {}
    merge_compiled(check, store, entries, ended)
    if stopped is not None:
        raise stopped
    return {"child": ended, "process_group": entries.get("process_group"), "backend": check.options.compile_backend}


def child_command(request: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--compile-child", str(request)]


def merge_compiled(check: Check, store: dict[str, Any], entries: dict[str, Any], ended: str) -> None:
    """The child's entries into the results, each compiled phase with its speed against eager's."""
    for phase in PHASES:
        name = f"compile/{phase}"
        entry = entries.get(name) or {"failed": f"compile child: no figures ({ended})"}
        eager = store.get(f"steps/{phase}/b{check.batch}", {})
        if "images_per_s" in entry and "images_per_s" in eager:
            entry["speedup_vs_eager"] = entry["images_per_s"] / eager["images_per_s"]
        store[name] = entry


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (it and its compile workers), SIGKILL a second later."""
    for signum, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        if child.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)  # compile workers left behind by a child that exited


# ----------------------------------------------------------------------------- derived figures
def allreduce_figures(sections: dict[str, Any], batch: int, gbps: float) -> dict[str, Any]:
    """Per phase: gradient bytes per step, what a ring allreduce over 8 GPUs moves per GPU, the bandwidth
    that moves it within one step (what hides it, if it overlapped the whole step), and the seconds it
    takes at the assumed bus bandwidth."""
    phases = {}
    for phase in PHASES:
        step = sections.get(f"steps/{phase}/b{batch}", {})
        if "gradient_mib" not in step:
            continue
        nbytes = step["gradient_mib"] * MIB
        ring = ring_allreduce_bytes(nbytes, EIGHT)
        phases[phase] = {"gradient_bytes": nbytes, "ring_bytes_per_gpu_8": ring, "step_s": step["step_s_median"],
                         "gbps_to_hide_8": ring / step["step_s_median"] / 1e9,
                         "gbps_to_hide_8_bf16_hook": ring / 2 / step["step_s_median"] / 1e9,
                         "seconds_at_assumed_8": ring / (gbps * 1e9)}
    if not phases:
        return {"skipped": "needs the eager steps at the recipe's batch"}
    return {"world": EIGHT, "assumed_bus_gbps": gbps, "phases": phases,
            "note": "ring allreduce: each GPU sends and receives 2(n-1)/n x the gradient bytes per step; "
                    "'to hide' assumes it overlaps the whole step (DDP overlaps only the backward)"}


def projection_figures(sections: dict[str, Any], batch: int, gbps: float) -> dict[str, Any]:
    """The paper's schedule on 1 and 8 GPUs from the fastest measured variant of each phase, with
    allreduce time (not overlapped: an upper bound) and checkpoint saves included."""
    best: dict[str, tuple[str, float]] = {}
    for phase in PHASES:
        for variant, name in (("eager", f"steps/{phase}/b{batch}"), ("compiled", f"compile/{phase}")):
            step = sections.get(name, {}).get("step_s_median")
            if step and (phase not in best or step < best[phase][1]):
                best[phase] = (variant, step)
    if set(best) != set(PHASES):
        return {"skipped": "needs every phase timed at the recipe's batch"}
    step_s = {p: s for p, (_, s) in best.items()}
    reduce = sections.get("allreduce", {}).get("phases", {})
    comm = {p: reduce[p]["seconds_at_assumed_8"] for p in reduce}
    checkpoint = sections.get("checkpoint", {})
    save_s, every = checkpoint.get("save_s", 0.0), checkpoint.get("every_steps")
    iterations = paper_iterations()
    common = {"save_s": save_s, "save_every_steps": every,
              "save_every_minutes": checkpoint.get("every_minutes") or 0.0}
    devices = {"1": schedule_hours(step_s, iterations, devices=1, **common),
               "8, unit=iterations": schedule_hours(step_s, iterations, devices=EIGHT, unit="iterations",
                                                    comm_s=comm, **common),
               "8, unit=samples": schedule_hours(step_s, iterations, devices=EIGHT, unit="samples",
                                                 comm_s=comm, **common)}
    return {"iterations": iterations, "variant": {p: v for p, (v, _) in best.items()}, "step_s": step_s,
            "batch_per_gpu": batch, "assumed_bus_gbps": gbps, "save_s": save_s if checkpoint.get("save_s") else None,
            "devices": devices,
            "unit_note": ("the paper's 90k + 10k + 400k are iterations, and schedule.unit=iterations (the "
                          "default) counts them per step: 8 GPUs run all of them at 8x the global batch (8x the "
                          "images, the same hours plus communication). schedule.unit=samples counts images: 8 GPUs "
                          "see the paper's images in 1/8 of the steps. Communication is not overlapped (an upper "
                          "bound); checkpoints at the recipe's cadence (checkpoint.every_steps / every_minutes) at the measured "
                          "save time, upload apart")}


# ----------------------------------------------------------------------------- the run
def resolve(options: Options) -> torch.device:
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if options.device == "auto" else options.device))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
    configure(device)
    return device


def configure(device: torch.device) -> None:
    """Process-wide settings as training uses them: cuDNN picks its fastest kernels (every shape is
    static), and torch.compile keeps static shapes (the discriminator sees 2B and B: one graph each)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(32, torch._dynamo.config.cache_size_limit)


def run(options: Options, output: Path) -> int:
    """Every section under its guard, the results written after each; returns the exit status."""
    started = time.time()
    device = resolve(options)
    sections: dict[str, Any] = {}
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "options": dataclasses.asdict(options)},
        "sections": sections, "status": {"complete": False, "stopped": None}}
    check = Check(options, device)

    def write() -> None:
        for name, derive in (("allreduce", allreduce_figures), ("projection", projection_figures)):
            try:
                sections[name] = derive(sections, check.batch, options.allreduce_gbps)
            except Exception as exc:  # noqa: BLE001 -- a derived figure never stops the writing
                sections[name] = {"failed": one_line(exc, typed=True)}
        results["meta"]["wall_s"] = time.time() - started
        write_atomic(output, json.dumps(results, indent=1, default=str))
        write_atomic(output.with_suffix(".txt"), render(results))

    guard = Guard(options, write, started + options.budget_s)
    guard.install()
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            folder = Path(tmp)
            guard.run(sections, "device", lambda: device_facts(check), need_s=0)
            guard.run(sections, "dataset", lambda: dataset(check, folder))
            guard.run(sections, "process_group", lambda: start_process_group(check))
            for batch in dict.fromkeys((check.batch, options.large_batch)):
                for phase in PHASES:
                    guard.run(sections, f"steps/{phase}/b{batch}", lambda: eager_steps(check, phase, batch))
            for phase in PHASES:
                guard.run(sections, f"bf16_vs_fp32/{phase}", lambda: precision_agreement(check, phase))
            guard.run(sections, "loader", lambda: loader_feeding_steps(check), need_s=options.loader_seconds + 2)
            guard.run(sections, "checkpoint", lambda: checkpoint_save(check, folder))
            if options.compile:
                guard.run(sections, "compile", lambda: compile_variants(check, guard, sections, folder), need_s=10)
            else:
                sections["compile"] = {"skipped": "--no-compile"}
    except Stop as stop:
        results["status"]["stopped"] = str(stop)
        guard.exit_code = stop.exit_code
    finally:
        guard.uninstall()  # a late signal acts as it would have; the files are replaced whole, never torn
        if dist.is_initialized():
            gc.collect()  # DDP modules torn down after their group can abort the exit (tests/test_gpu_training.py)
            dist.destroy_process_group()
    failed = [n for n, e in sections.items() if isinstance(e, dict) and "failed" in e]
    # Sections the budget left out make the run incomplete too: it stopped at the deadline, just
    # between sections rather than inside one.
    out_of_time = [n for n, e in sections.items() if isinstance(e, dict) and str(e.get("skipped", "")).startswith("budget:")]
    if out_of_time and not results["status"]["stopped"]:
        results["status"]["stopped"] = f"stopped at the --budget-s deadline ({options.budget_s:g} s)"
    results["status"].update(complete=not failed and not results["status"]["stopped"], failed=failed,
                             out_of_time=out_of_time)
    guard.write()
    return guard.exit_code or (1 if failed or results["status"]["stopped"] else 0)


def dataset(check: Check, folder: Path) -> dict[str, Any]:
    """CelebA-sized JPEGs (178x218, cut from scikit-image's photographs) packed into local shards."""
    (folder / "data").mkdir()
    check.url = make_dataset(folder / "data", check.options.images)
    return {"images": check.options.images, "url": check.url, "source": "folder of 178x218 JPEGs"}


# ----------------------------------------------------------------------------- output
def _failed_or_skipped(entry: dict[str, Any]) -> str | None:
    if "failed" in entry:
        return f"FAILED: {entry['failed']}"
    return f"skipped: {entry['skipped']}" if "skipped" in entry else None


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.0%}"


def _steps(sections: dict[str, Any]) -> str:
    rows, notes = [], []
    for name, e in sections.items():
        if not name.startswith(("steps/", "compile/")):
            continue
        kind, phase, *rest = name.split("/")
        label = f"{phase} b{rest[0][1:]}" if rest else f"{phase} compiled"
        if (why := _failed_or_skipped(e)) is not None:
            notes.append(f"{label}: {why}")
            continue
        rows.append([label, e["images_per_s"], e["step_s_median"] * 1e3, _percent(e.get("mfu")),
                     _percent(e.get("busy_fraction")), e.get("peak_allocated_mib"), e.get("peak_reserved_mib"),
                     e.get("gradient_mib"), e.get("speedup_vs_eager"), e.get("compile_s")])
    header = ["phase / batch", "img/s", "step ms", "MFU", "GPU busy", "peak alloc MiB", "peak reserved MiB",
              "grad MiB", "vs eager", "compile s"]
    bound = [f"{n.split('/', 1)[1]}: {e['bound']}" for n, e in sections.items()
             if (n.startswith("steps/") or n.startswith("compile/")) and "bound" in e]
    return "\n".join([table(header, rows, text_columns=1), *notes, *(["bound: " + "; ".join(bound)] if bound else [])])


def _agreement(sections: dict[str, Any]) -> str:
    lines = []
    for prefix in ("bf16_vs_fp32", "compile"):
        for phase in PHASES:
            e = sections.get(f"{prefix}/{phase}")
            if e is None:
                continue
            if (why := _failed_or_skipped(e)) is not None:
                lines.append(f"{prefix}/{phase}: {why}")
                continue
            a = e if prefix == "bf16_vs_fp32" else e["numerics"]
            cos = ", ".join(f"{n} {c:.6f}" for n, c in a["gradient_cosine_step0"].items())
            lines.append(f"{prefix}/{phase}: {a['test']} vs {a['reference']}: step-0 gradient cosine {cos}; "
                         f"losses over {a['steps']} steps within {a['max_rel_diff']:.2g} (max relative difference)")
    return "\n".join(lines) or "not run"


def _loader(e: dict[str, Any] | None) -> str:
    if e is None or (why := _failed_or_skipped(e)) is not None:
        return why if e else "not run"
    restarts = (f"; {e['epoch_ends_inside']} epoch end(s) inside, each restarting the workers"
                if e.get("epoch_ends_inside") else "")
    return (f"{e['workers']} workers, batch {e['batch']}: {e['steps']} steps in {e['wall_s']:.1f} s, "
            f"{e['images_per_s']:.0f} images/s; waiting for data {e['data_wait_share']:.1%} of the time "
            f"(worker start-up {e['startup_s']:.1f} s apart{restarts})")


def _checkpoint(e: dict[str, Any] | None) -> str:
    if e is None or (why := _failed_or_skipped(e)) is not None:
        return why if e else "not run"
    return (f"Trainer.save of the joint state: {e['save_s']:.2f} s, {e['mib']:.0f} MiB in {e['files']} files "
            f"({e['mib_per_s']:.0f} MiB/s, {e['where']}); every {e['every_steps'] or '-'} steps / "
            f"{e.get('every_minutes') or '-'} min in the recipe")


def _allreduce(e: dict[str, Any]) -> str:
    if (why := _failed_or_skipped(e)) is not None:
        return why
    rows = [[p, f["gradient_bytes"] / MIB, f["ring_bytes_per_gpu_8"] / MIB, f["gbps_to_hide_8"],
             f["gbps_to_hide_8_bf16_hook"], f["seconds_at_assumed_8"] * 1e3] for p, f in e["phases"].items()]
    return (table(["phase", "grad MiB/step", "ring MiB/GPU (8)", "GB/s to hide", "GB/s, bf16 hook",
                   f"ms at {e['assumed_bus_gbps']:g} GB/s"], rows, text_columns=1) + "\n" + e["note"])


def _projection(e: dict[str, Any]) -> str:
    if (why := _failed_or_skipped(e)) is not None:
        return why
    rows = [[k, f["hours"], f["compute_hours"], f["communication_hours"], f["checkpoint_hours"], f["checkpoints"]]
            for k, f in e["devices"].items()]
    variants = ", ".join(f"{p} {v}" for p, v in e["variant"].items())
    return (f"batch {e['batch_per_gpu']} per GPU, fastest variant per phase ({variants}), allreduce at "
            f"{e['assumed_bus_gbps']:g} GB/s\n"
            + table(["GPUs", "hours", "compute h", "allreduce h", "checkpoint h", "saves"], rows, text_columns=1)
            + "\n" + e["unit_note"])


def render(results: dict[str, Any]) -> str:
    """The results as text: what was measured, what failed and why."""
    sections, status = results["sections"], results["status"]
    d = sections.get("device", {})
    head = (f"{results['meta']['date']}  {d.get('name', '?')}  torch {d.get('torch')}, CUDA {d.get('cuda')}, "
            f"NCCL {d.get('nccl')}, bf16 peak {d.get('peak_tflops_bf16')} TFLOPS; "
            f"{results['meta'].get('wall_s', 0):.0f} s\ncommand: {results['meta']['command']}")
    if status.get("stopped"):
        head += f"\n{status['stopped']}: the figures below are those measured before"
    pg = sections.get("process_group", {})
    parts = [("Training steps (bf16 autocast, channels_last"
              f"{', DDP over ' + pg['backend'] if 'backend' in pg else ', no DDP: ' + str(_failed_or_skipped(pg))})",
              _steps(sections)),
             ("bf16 against fp32 (TF32 off); compiled against eager", _agreement(sections)),
             ("Training loader feeding train steps", _loader(sections.get("loader"))),
             ("Checkpoint save", _checkpoint(sections.get("checkpoint"))),
             ("Gradient allreduce with 8 GPUs", _allreduce(sections.get("allreduce", {"skipped": "not yet"}))),
             ("Projection: the paper's schedule", _projection(sections.get("projection", {"skipped": "not yet"})))]
    failed = [f"{n}: {_failed_or_skipped(e)}" for n, e in sections.items()
              if n in ("device", "dataset", "process_group", "compile") and _failed_or_skipped(e)]
    text = head + "\n\n" + "\n\n".join(f"## {title}\n{body}" for title, body in parts) + "\n"
    return text + ("\n## Not measured\n" + "\n".join(failed) + "\n" if failed else "")


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="celeba")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--large-batch", type=int, help="the second batch size of the step sections (default 48)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--loader-seconds", type=float)
    parser.add_argument("--loader-workers", type=int, help="default: the recipe's data.num_workers")
    parser.add_argument("--images", type=int, help="JPEGs in the local dataset")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    parser.add_argument("--budget-s", type=float, help="hard deadline for the whole run (default 270 s)")
    parser.add_argument("--allreduce-gbps", type=float, help="bus bandwidth assumed for 8 GPUs (default 300 GB/s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and few steps (CPU CI): checks the sections run, not the speed")
    parser.add_argument("--fail-section", dest="fail_sections", action="append", metavar="PATTERN",
                        help="test hook: make the sections matching PATTERN (fnmatch) fail at their start")
    parser.add_argument("--output", type=Path, default=Path("out/gpu_check/gpu_check.json"))
    parser.add_argument("--compile-child", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compile_child:
        return compile_child(args.compile_child)
    fields = {**(SMOKE if args.smoke else {}),
              **{k: v for k, v in vars(args).items() if v is not None and k in Options.__dataclass_fields__}}
    fields["overrides"] = tuple(args.overrides)
    fields["fail_sections"] = tuple(args.fail_sections or ())
    options = Options(**fields)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if options.steps < 1 or options.warmup < 0 or options.large_batch < 1 or options.budget_s <= 0:
        print("error: --steps and --large-batch must be >= 1, --warmup >= 0 and --budget-s > 0", file=sys.stderr)
        return 2
    try:
        make_workload(options).config("joint", batch=options.large_batch)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        write_atomic(args.output, "{}")
    except OSError as exc:
        print(f"error: --output {args.output}: cannot write there ({exc.strerror})", file=sys.stderr)
        return 2
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    status = run(options, args.output)
    print(args.output.with_suffix(".txt").read_text())
    print(f"wrote {args.output} and {args.output.with_suffix('.txt')} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
