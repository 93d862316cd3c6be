"""Whole-system training benchmark: where a step's time goes, what each optimisation buys, what the
paper's schedule costs, and how we compare with GLCIC-PyTorch. Entry point: ``jobs/benchmark.py``.

Method
- A step is ``Trainer.train_step`` on a real batch: CelebA-sized JPEGs (``benchmarks.loader``)
  packed into shards and read by the training loader in this process, so "data" is the loader's
  full cost (read, decode, crop, mask) on the critical path; DataLoader workers would hide it.
- Each phase is timed alone (a trainer whose schedule holds only that phase). Workloads that are
  compared run interleaved, round by round, so load from other processes hits them alike: our
  recipe in its optimized and straightforward forms; GLCIC-PyTorch next to our ``glcic`` and
  ``celeba`` recipes. Figures are medians of the timed rounds after the warm-up rounds; wall time
  with the device synchronised after each step.
- optimized: what the trainer does on this device (bf16 autocast and channels_last where the
  device computes bf16 natively: CUDA, or a CPU with AMX / AVX512-BF16; fused contextual loss;
  fused Adam; denormals flushed to zero on CPU). straightforward: fp32, NCHW,
  ``contextual_loss_reference``, foreach Adam, denormals kept; GLCIC-PyTorch also keeps them.
- Shares: one extra profiled step (torch.profiler) per workload. Its top-level events are
  attributed to the trainer's ``record_function`` ranges (``inpaint.trainer.SECTIONS``); backward
  ops go to the range of the forward op that created them (same autograd sequence number); the
  rest of the step's wall time is "other". CPU time on CPU, kernel time on CUDA.
- Peak memory: the persistent state (parameters, gradients, optimizer state, buffers, VGG16;
  counted from the tensors) plus the highest live total of the profiled step's allocations
  (the profiler's memory records, in order), so neither malloc caching nor other workloads in
  the process inflate it.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step at a batch of 2, per image.
- Allreduce volume: bytes of the gradients a phase produces per step (what DDP reduces); the
  DDP section (``benchmarks.ddp_scaling``) counts them again inside DDP's communication hook.
- Code changes: each change this benchmark motivated, timed alone before vs after, interleaved.
- bf16 safety of the contextual loss: L_CX from bf16-autocast VGG16 features vs fp32 ones.
- The load average is recorded at the start and the end: on a machine shared with other jobs,
  multi-threaded CPU kernels stall whenever one of their threads is descheduled, and bf16
  (many short oneDNN kernels) suffers most; compare only figures taken at a low load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.glcic_pytorch import GlcicPytorchStep
from inpaint import recipes
from inpaint.config import Config, ConfigError, DataConfig, apply_overrides
from inpaint.data import load_index, make_train_loader, pack_dataset
from inpaint.hardware import describe_cpu, describe_cpu_line, native_bf16
from inpaint.losses import contextual_loss, contextual_loss_reference
from inpaint.models import build_discriminator
from inpaint.models import discriminator as discriminator_module
from inpaint.trainer import SECTIONS, Trainer
from inpaint.trainer import resolve_device as trainer_resolve_device

PHASES = ("generator", "discriminator", "joint")
SHARES = ("data", *SECTIONS, "other")
OPTIMIZED, STRAIGHTFORWARD, GLCIC_PYTORCH = "optimized", "straightforward", "glcic-pytorch"
COMPARED_RECIPES = ("glcic", "celeba")
TARGET_GLCIC_SPEEDUP = 1.5  # our glcic recipe vs GLCIC-PyTorch, images/s, every phase
TARGET_CELEBA_JOINT_TIME = 1.3  # our celeba joint step vs GLCIC-PyTorch's joint step, seconds

# Dense peak TFLOPS (bf16 tensor cores, fp32 without them) from vendor datasheets; first match wins.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0, 60.0), ("H200", 989.0, 67.0), ("H100 NVL", 835.0, 60.0), ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0), ("A100", 312.0, 19.5), ("L40S", 362.0, 91.6), ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
)


@dataclasses.dataclass
class Options:
    """What to measure and how long; the CLI's flags."""

    recipes: tuple[str, ...] = ("celeba", "glcic", "debug")
    phases: tuple[str, ...] = PHASES
    warmup: int = 1
    steps: int = 3
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    overrides: tuple[str, ...] = ()  # --set, applied to every recipe
    compare: bool = True
    compare_size: tuple[int, int, int] = (160, 96, 12)  # image, local patch, batch
    ddp_workers: tuple[int, ...] = (1, 2, 4)
    ddp_recipe: str = "debug"
    ddp_steps: int = 5
    ladder_recipes: tuple[str, ...] = ()  # the per-optimisation ladder; on CUDA default celeba
    gpu_hour_price: float = 2.5
    scaling_efficiency: float = 0.9
    images: int = 96  # JPEGs in the benchmark's dataset
    contextual: tuple[int, int, int, int] = (12, 256, 40, 40)  # features of the contextual-loss comparison
    loader_workers: int = 2  # DataLoader processes of the loader comparison; 0 skips it
    loader_images: int = 3000

    def check(self) -> None:
        """Raise ConfigError on values that cannot be measured."""
        for name in self.recipes + ((self.ddp_recipe,) if self.ddp_workers else ()) + self.ladder_recipes:
            apply_overrides(recipes.get(name), list(self.overrides))
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ConfigError(f"--phases: choose from {', '.join(PHASES)}, got {', '.join(self.phases) or 'none'}")
        if self.loader_workers < 0 or (self.loader_workers and self.loader_images < 64 * self.loader_workers):
            raise ConfigError(f"--loader-workers / --loader-images: need workers >= 0 and >= 64 images per worker, "
                              f"got {self.loader_workers} and {self.loader_images}")
        if len(self.contextual) != 4 or min(self.contextual) < 1 or self.contextual[2] != self.contextual[3]:
            raise ConfigError(f"--contextual-size: expected BATCH,CHANNELS,SIDE,SIDE, got {list(self.contextual)}")
        for flag, value, low in (("--warmup", self.warmup, 0), ("--steps", self.steps, 1),
                                 ("--ddp-steps", self.ddp_steps, 1), ("--images", self.images, 16)):
            if value < low:
                raise ConfigError(f"{flag}: must be >= {low}, got {value}")
        if any(n < 1 for n in self.ddp_workers):
            raise ConfigError(f"--ddp-workers: worker counts must be >= 1, got {list(self.ddp_workers)}")
        image, local, batch = self.compare_size
        if image % 32 or local % 32 or local > image or batch < 1:
            raise ConfigError(f"--compare-size: GLCIC-PyTorch needs image and patch sides that are multiples "
                              f"of 32 with patch <= image, and batch >= 1; got {image},{local},{batch}")
        if not 0 < self.scaling_efficiency <= 1:
            raise ConfigError(f"--scaling-efficiency: must be in (0, 1], got {self.scaling_efficiency}")
        if self.gpu_hour_price < 0:
            raise ConfigError(f"--gpu-hour-price: must be >= 0, got {self.gpu_hour_price}")


# ----------------------------------------------------------------------------- the machine
def resolve_device(name: str) -> torch.device:
    """auto -> cuda if present; cuda without a GPU is a user mistake."""
    try:
        return trainer_resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, cores, what the CPU computes natively (and the defaults it sets), peak TFLOPS (None
    where unknown) of the measured device."""
    cpu = describe_cpu()
    info = {"type": device.type, "cpu_model": cpu["model"], "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16(device), "cpu": cpu,
            "cpu_line": describe_cpu_line()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu["model"]
    peak = next(((bf16, fp32) for key, bf16, fp32 in PEAK_TFLOPS if device.type == "cuda" and key in name), None)
    info.update(name=name, peak_tflops_bf16=peak[0] if peak else None, peak_tflops_fp32=peak[1] if peak else None)
    return info


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages, where the OS has them."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True)
class Workload:
    """One kind of training step: our recipe in a variant (with settings), or GLCIC-PyTorch."""

    name: str
    recipe: str | None
    variant: str
    settings: tuple[str, ...] = ()  # --set overrides that define the variant and its size
    compile: bool = False

    def config(self, phase: str, base_overrides: tuple[str, ...] = (), batch: int | None = None) -> Config:
        """The recipe's config with this variant's settings and a schedule of only ``phase``."""
        lengths = {p: (10**9 if p == phase else 0) for p in PHASES}
        overrides = ["loss.vgg_weights=random", *base_overrides, *self.settings,
                     f"schedule.generator_steps={lengths['generator']}",
                     f"schedule.discriminator_steps={lengths['discriminator']}",
                     f"schedule.joint_steps={lengths['joint']}", "schedule.unit=iterations"]
        if batch is not None:
            overrides.append(f"data.batch_size={batch}")
        return apply_overrides(recipes.get(self.recipe or "glcic"), overrides)


def optimized_settings(device: torch.device) -> tuple[str, ...]:
    """The trainer's defaults on this device (inpaint.hardware): bf16 + channels_last where bf16 is
    native, else fp32 + NCHW; spelled out so that the record says what ran."""
    native = str(native_bf16(device)).lower()
    return (f"runtime.bf16={native}", f"runtime.channels_last={native}")


STRAIGHTFORWARD_SETTINGS = ("runtime.bf16=false", "runtime.channels_last=false")


def size_settings(image: int, local: int, batch: int) -> tuple[str, ...]:
    return (f"model.image_size={image}", f"model.local_size={local}", f"data.batch_size={batch}")


def reference_contextual_loss(x_feat, y_feat, band_width: float, eps: float, chunk: int) -> torch.Tensor:
    """The trainer's contextual-loss call in its plain-autograd reference form (no chunking)."""
    return contextual_loss_reference(x_feat, y_feat, band_width=band_width, eps=eps)


def unfused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with PyTorch's default (foreach) implementation instead of the fused one."""
    settings = {**optimizer.defaults, "foreach": None}
    if "fused" in settings:  # Adam has a fused form; Adadelta has none (its default is already this)
        settings["fused"] = None
    return type(optimizer)(optimizer.param_groups[0]["params"], **settings)


def make_straightforward(trainer: Trainer) -> None:
    """Undo the trainer's code-level optimisations (reference contextual loss, foreach Adam)."""
    trainer.contextual_loss = reference_contextual_loss
    trainer.g_optimizer = unfused(trainer.g_optimizer)
    trainer.d_optimizer = unfused(trainer.d_optimizer)


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> Iterator[torch.Tensor]:
    """Every tensor a training run keeps between steps."""
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()
        yield from (p.grad for p in module.parameters() if p.grad is not None)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class Runner:
    """A workload built for one phase: ``step(batch)``, its batches, and what it keeps in memory."""

    def __init__(self, workload: Workload, phase: str, device: torch.device, options: Options,
                 batch: int | None = None):
        self.workload, self.phase, self.device = workload, phase, device
        self.config = workload.config(phase, options.overrides if workload.recipe else (), batch)
        if workload.variant == GLCIC_PYTORCH:
            self.glcic = GlcicPytorchStep(device, self.config.model.image_size, self.config.model.local_size)
            self.trainer = None
        else:
            self.trainer = Trainer(self.config, device=device)
            if workload.variant == STRAIGHTFORWARD:
                make_straightforward(self.trainer)
            if workload.compile:
                self.trainer.wrap_models(torch.compile)
        # The Trainer flushes denormals to zero (a process-wide CPU setting); the other forms run as written.
        self.flush_denormal = workload.variant == OPTIMIZED
        self.batches: Iterator[dict] | None = None
        self.data_s: list[float] = []
        self.step_s: list[float] = []
        self.cpu_s: list[float] = []

    def step(self, batch: dict) -> None:
        torch.set_flush_denormal(self.flush_denormal)
        if self.trainer is not None:
            self.trainer.train_step(batch)
        else:
            self.glcic.train_step(batch, self.phase)

    def _parts(self) -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer]]:
        owner = self.trainer or self.glcic
        modules = [owner.generator, owner.discriminator]
        if self.trainer is not None and self.trainer.vgg is not None:
            modules.append(self.trainer.vgg)
        return modules, [owner.g_optimizer, owner.d_optimizer]

    def state_bytes(self) -> int:
        """Bytes of parameters, gradients, buffers and optimizer state held between steps."""
        return _tensor_bytes(_state_tensors(*self._parts()))

    def gradient_bytes(self) -> int:
        """Bytes of the gradients the last step produced: what DDP allreduces in this phase."""
        modules, _ = self._parts()
        return _tensor_bytes(p.grad for m in modules[:2] for p in m.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- data
def make_dataset(folder: Path, images: int) -> str:
    """CelebA-sized JPEGs packed into local shards; returns the dataset URL."""
    from benchmarks.loader import make_jpegs  # scikit-image photos cut to CelebA's 178x218

    source = folder / "jpegs"
    source.mkdir()
    make_jpegs(source, images)
    url = str(folder / "shards")
    pack_dataset("folder", source, url, shard_size=max(8, images // 4), test_fraction=0.05, progress=False)
    return url


def attach_loader(runner: Runner, url: str) -> None:
    """An in-process training loader (num_workers=0) at the runner's size, batch and mask settings."""
    config = runner.config
    data = DataConfig(url=url, batch_size=config.data.batch_size, num_workers=0, seed=config.data.seed)
    runner.batches = iter(make_train_loader(data, config.model, config.mask))


# ----------------------------------------------------------------------------- measuring
def time_interleaved(runners: list[Runner], warmup: int, steps: int, label: str) -> None:
    """Round-robin steps over the runners; record data and step seconds of the timed rounds."""
    device = runners[0].device
    for round_index in tqdm(range(warmup + steps), desc=label, unit="round", leave=False):
        for runner in runners:
            start = time.perf_counter()
            batch = next(runner.batches)
            loaded = time.perf_counter()
            cpu_start = time.process_time()
            runner.step(batch)
            synchronize(device)
            if round_index >= warmup:
                runner.data_s.append(loaded - start)
                runner.step_s.append(time.perf_counter() - loaded)
                runner.cpu_s.append(time.process_time() - cpu_start)


def _section_of(event) -> str | None:
    """The trainer range (SECTIONS) enclosing a profiler event, if any."""
    while event is not None:
        if event.name in SECTIONS:
            return event.name
        event = event.cpu_parent
    return None


def attribute(events, device: torch.device) -> dict[str, float]:
    """Seconds per trainer section from a profile: forward ranges plus the backward they caused."""
    created_in: dict[tuple[int, int], str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            section = _section_of(event)
            if section is not None:
                created_in.setdefault((event.thread, event.sequence_nr), section)
    seconds = dict.fromkeys(SECTIONS, 0.0)
    for event in events:
        if event.cpu_parent is not None:
            continue
        if event.name in SECTIONS:
            section = event.name
        elif event.name.startswith("autograd::engine::evaluate_function"):
            section = created_in.get((event.fwd_thread, event.sequence_nr))
        else:
            section = None
        if section is not None:
            micros = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            seconds[section] += micros / 1e6
    return seconds


def peak_allocated(prof, device: torch.device) -> int:
    """Highest live total of the allocations recorded in a profile, over what was live before it."""
    kind = "CUDA" if device.type == "cuda" else "CPU"
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith(kind))
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def profile_step(runner: Runner) -> dict[str, Any]:
    """One profiled step: seconds per section (rest: other) and peak memory."""
    device = runner.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batch = next(runner.batches)
    state = runner.state_bytes()
    with profile(activities=activities, profile_memory=True) as prof:
        start = time.perf_counter()
        runner.step(batch)
        synchronize(device)
        wall = time.perf_counter() - start
    sections = attribute(prof.events(), device) if runner.trainer is not None else dict.fromkeys(SECTIONS, 0.0)
    total = wall if device.type == "cpu" else max(wall, sum(sections.values()))
    sections["other"] = max(0.0, total - sum(sections.values()))
    fractions = {k: v / total for k, v in sections.items()}
    return {"fractions": fractions, "peak_bytes": state + peak_allocated(prof, device), "state_bytes": state}


def count_flops(workload: Workload, phase: str, device: torch.device, options: Options, url: str) -> float:
    """FLOPs per image of one step, counted by FlopCounterMode at a batch of 2 after a warm-up step."""
    runner = Runner(workload, phase, device, options, batch=2)
    attach_loader(runner, url)
    runner.step(next(runner.batches))
    with FlopCounterMode(display=False) as counter:
        runner.step(next(runner.batches))
    return counter.get_total_flops() / 2


def summarize(runner: Runner, profiled: dict[str, Any] | None, flops: float | None, info: dict) -> dict[str, Any]:
    """The JSON record of one workload in one phase; shares and memory need a profiled step."""
    batch = runner.config.data.batch_size
    step, data = statistics.median(runner.step_s), statistics.median(runner.data_s)
    record = {
        "workload": runner.workload.name, "recipe": runner.workload.recipe, "variant": runner.workload.variant,
        "phase": runner.phase, "batch": batch, "image_size": runner.config.model.image_size,
        "settings": list(runner.workload.settings), "compile": runner.workload.compile,
        "images_per_s": batch / step, "step_s_median": step, "step_s": runner.step_s,
        "cpu_s_median": statistics.median(runner.cpu_s), "data_s_median": data,
        "gradient_mib": runner.gradient_bytes() / 2**20,
    }
    if profiled is not None:
        step_share = step / (step + data)
        record["shares"] = {"data": data / (step + data),
                            **{k: v * step_share for k, v in profiled["fractions"].items()}}
        record["peak_memory_mib"] = profiled["peak_bytes"] / 2**20
        record["state_memory_mib"] = profiled["state_bytes"] / 2**20
    if flops is not None:
        record["flops_per_image"] = flops
        achieved = flops * record["images_per_s"] / 1e12
        bf16 = "runtime.bf16=true" in runner.workload.settings
        peak = info["peak_tflops_bf16" if bf16 else "peak_tflops_fp32"]
        record["achieved_tflops"] = achieved
        record["peak_fraction"] = achieved / peak if peak else None
    return record


def measure_group(workloads: list[Workload], phase: str, device: torch.device, options: Options, url: str,
                  info: dict, flops: dict, label: str, profiled: bool = True) -> list[dict[str, Any]]:
    """Build, interleave, profile and summarise a group of workloads in one phase; free them after."""
    runners = [Runner(w, phase, device, options) for w in workloads]
    for runner in runners:
        attach_loader(runner, url)
    time_interleaved(runners, options.warmup, options.steps, label)
    records = []
    for runner in runners:
        details = profile_step(runner) if profiled else None
        records.append(summarize(runner, details, flops.get((runner.workload, phase)), info))
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- sections
def recipe_steps(options: Options, device: torch.device, url: str, info: dict) -> list[dict[str, Any]]:
    """Optimized vs straightforward, interleaved, per recipe and phase."""
    records = []
    for recipe in options.recipes:
        group = [Workload(f"{recipe}/{OPTIMIZED}", recipe, OPTIMIZED, optimized_settings(device)),
                 Workload(f"{recipe}/{STRAIGHTFORWARD}", recipe, STRAIGHTFORWARD, STRAIGHTFORWARD_SETTINGS)]
        for phase in options.phases:
            flops = {(w, phase): count_flops(w, phase, device, options, url) for w in group[:1]}
            flops[(group[1], phase)] = flops[(group[0], phase)]
            records += measure_group(group, phase, device, options, url, info, flops, f"{recipe} {phase}")
    return records


def speedups(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """optimized / straightforward images/s, per recipe and phase."""
    rate = {(r["recipe"], r["variant"], r["phase"]): r["images_per_s"] for r in records}
    out: dict[str, dict[str, float]] = {}
    for (recipe, variant, phase), value in rate.items():
        if variant == OPTIMIZED and (recipe, STRAIGHTFORWARD, phase) in rate:
            out.setdefault(recipe, {})[phase] = value / rate[(recipe, STRAIGHTFORWARD, phase)]
    return out


FP32_SETTINGS = ("runtime.bf16=false", "runtime.channels_last=false")


def comparison(options: Options, device: torch.device, url: str, info: dict) -> dict[str, Any]:
    """GLCIC-PyTorch next to our glcic and celeba recipes, same size, batch and batches, interleaved.

    Ours run with this device's defaults (``optimized_settings``). Where those use bf16, ``glcic_fp32``
    and ``celeba_fp32`` run too: what a device without native bf16 gets (GLCIC-PyTorch is fp32).
    """
    image, local, batch = options.compare_size
    size = size_settings(image, local, batch)
    ours = {r: Workload(f"{r}/{OPTIMIZED}@{image}", r, OPTIMIZED, optimized_settings(device) + size)
            for r in COMPARED_RECIPES}
    if optimized_settings(device) != FP32_SETTINGS:
        for r in COMPARED_RECIPES:
            ours[f"{r}_fp32"] = Workload(f"{r}/fp32@{image}", r, OPTIMIZED, FP32_SETTINGS + size)
    theirs = Workload(f"{GLCIC_PYTORCH}@{image}", None, GLCIC_PYTORCH, size)
    parameters = GlcicPytorchStep("meta", image, local).parameter_counts()
    glcic_model = ours["glcic"].config("joint").model
    with torch.device("meta"):
        from inpaint.models import build_generator, count_parameters

        ours_parameters = {"generator": count_parameters(build_generator(glcic_model)),
                           "discriminator": count_parameters(build_discriminator(glcic_model))}
    phases: dict[str, Any] = {}
    for phase in options.phases:
        flops = {(w, phase): count_flops(w, phase, device, options, url) for w in (theirs, *ours.values())}
        records = measure_group([theirs, *ours.values()], phase, device, options, url, info, flops,
                                f"vs GLCIC-PyTorch {phase}", profiled=False)
        by_name = {r["workload"]: r for r in records}
        baseline = by_name[theirs.name]
        entry = {"glcic_pytorch": _brief(baseline)}
        for key, workload in ours.items():
            mine = by_name[workload.name]
            entry[key] = {**_brief(mine), "speedup": mine["images_per_s"] / baseline["images_per_s"],
                          "time_ratio": mine["step_s_median"] / baseline["step_s_median"]}
        phases[phase] = entry
    targets = {"glcic_speedup_min": TARGET_GLCIC_SPEEDUP, "celeba_joint_time_ratio_max": TARGET_CELEBA_JOINT_TIME}
    for suffix in ("", "_fp32"):
        if f"glcic{suffix}" not in ours:
            continue
        targets[f"glcic_speedup{suffix}_met"] = all(p[f"glcic{suffix}"]["speedup"] >= TARGET_GLCIC_SPEEDUP
                                                    for p in phases.values())
        targets[f"celeba_joint_time_ratio{suffix}_met"] = (
            phases["joint"][f"celeba{suffix}"]["time_ratio"] <= TARGET_CELEBA_JOINT_TIME if "joint" in phases else None)
    return {"image_size": image, "local_size": local, "batch": batch, "glcic_pytorch_parameters": parameters,
            "glcic_pytorch_published_parameters": {"generator": 6.1e6, "discriminator": 39.6e6},
            "glcic_recipe_parameters": ours_parameters, "settings": list(optimized_settings(device)),
            "phases": phases, "targets": targets}


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("images_per_s", "step_s_median", "step_s", "flops_per_image") if k in record}


def ladder(options: Options, device: torch.device, url: str, info: dict) -> dict[str, Any]:
    """Each optimisation added in turn, interleaved: what each one buys on this device."""
    if device.type != "cuda" and not options.ladder_recipes:
        return {"skipped": "CUDA is not available: the bf16 / channels_last / torch.compile ladder runs on GPUs "
                           "(on CPU ask for it with --ladder RECIPE; compile is left out there)"}
    rungs = [("straightforward", STRAIGHTFORWARD, STRAIGHTFORWARD_SETTINGS, False),
             ("+fused CX and Adam, no denormals", OPTIMIZED, STRAIGHTFORWARD_SETTINGS, False),
             ("+channels_last", OPTIMIZED, ("runtime.bf16=false", "runtime.channels_last=true"), False),
             ("+bf16 autocast", OPTIMIZED, ("runtime.bf16=true", "runtime.channels_last=true"), False)]
    if device.type == "cuda":
        rungs.append(("+torch.compile", OPTIMIZED, ("runtime.bf16=true", "runtime.channels_last=true"), True))
    out: dict[str, Any] = {}
    for recipe in options.ladder_recipes or ("celeba",):
        group = [Workload(f"{recipe}/{label}", recipe, variant, settings, compiled)
                 for label, variant, settings, compiled in rungs]
        for phase in options.phases:
            records = measure_group(group, phase, device, options, url, info, {}, f"ladder {recipe} {phase}",
                                    profiled=False)
            out.setdefault(recipe, {})[phase] = {r["workload"].split("/", 1)[1]: _brief(r) for r in records}
    return out


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """Median seconds of each variant's call, the variants alternating, after one warm-up round."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def code_changes(options: Options, device: torch.device, url: str) -> dict[str, Any]:
    """This issue's code changes, each before vs after in isolation, at the largest recipe measured."""
    recipe = "celeba" if "celeba" in options.recipes else options.recipes[0]
    config = Workload(recipe, recipe, OPTIMIZED).config("joint", options.overrides)
    torch.set_flush_denormal(device.type == "cpu")  # as the Trainer runs
    changes = {"recipe": recipe, "fused_adam": fused_adam_gain(config, options, device),
               "fp32_discriminator_fc": fp32_fc_gain(config, options, device)}
    if device.type == "cpu":
        changes["flush_denormal"] = flush_denormal_gain(recipe, options, device, url)
    return changes


def fused_adam_gain(config: Config, options: Options, device: torch.device) -> dict[str, Any]:
    """The discriminator's Adam step, PyTorch's default foreach implementation vs the fused one."""
    parameters = list(build_discriminator(config.model).to(device).parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    adam = {name: torch.optim.Adam(parameters, lr=1e-4, **kwargs)
            for name, kwargs in (("foreach Adam (before)", {"foreach": True}), ("fused Adam (after)", {"fused": True}))}
    seconds = interleaved_medians({name: optimizer.step for name, optimizer in adam.items()}, options.steps, device)
    size = sum(p.numel() for p in parameters) / 1e6
    return {"what": f"discriminator optimizer step, {len(parameters)} tensors, {size:.1f} M parameters",
            "seconds": seconds}


def fp32_fc_gain(config: Config, options: Options, device: torch.device) -> dict[str, Any]:
    """Discriminator forward + backward under bf16 autocast with its FC layers in bf16 vs in fp32."""
    torch.manual_seed(0)
    discriminator = build_discriminator(config.model).to(device, memory_format=torch.channels_last)
    batch, size, local = 2 * config.data.batch_size, config.model.image_size, config.model.local_size
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    patches = torch.rand(batch, 3, local, local, device=device).contiguous(memory_format=torch.channels_last)

    def forward_backward() -> None:
        discriminator.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = discriminator(images, patches)
        logits.float().mean().backward()

    def with_bf16_fc() -> None:
        with mock.patch.object(discriminator_module, "_without_autocast", lambda _: contextlib.nullcontext()):
            forward_backward()

    seconds = interleaved_medians({"FC under bf16 autocast (before)": with_bf16_fc,
                                   "FC in fp32 (after)": forward_backward}, options.steps, device)
    return {"what": f"discriminator forward + backward, batch {batch} (real + completed), bf16 autocast, "
                    "channels_last", "seconds": seconds}


def flush_denormal_gain(recipe: str, options: Options, device: torch.device, url: str) -> dict[str, Any]:
    """A generator-phase step in fp32 with denormals kept vs flushed to zero (the Trainer flushes them).

    On photographs: their exact matches outside the hole are what drive the contextual loss's
    softmax tails, and with them the gradients, into the denormal range; random pixels do not.
    """
    runner = Runner(Workload(recipe, recipe, OPTIMIZED, STRAIGHTFORWARD_SETTINGS), "generator", device, options)
    attach_loader(runner, url)
    batch_tensors = next(runner.batches)

    def step(flush: bool) -> Callable[[], None]:
        def call() -> None:
            runner.flush_denormal = flush
            runner.step(batch_tensors)
        return call

    seconds = interleaved_medians({"denormals kept (before)": step(False), "flushed to zero (after)": step(True)},
                                  options.steps, device)
    torch.set_flush_denormal(True)  # as the Trainer leaves it
    return {"what": f"generator-phase step, batch {runner.config.data.batch_size} of photographs, fp32, NCHW, "
                    "fused contextual loss",
            "seconds": seconds}


def contextual_precision(device: torch.device, batch: int = 4, size: int = 160) -> dict[str, Any]:
    """L_CX from bf16-autocast VGG16 features vs fp32 ones, on photographs and their completions."""
    import skimage.data

    from inpaint.vgg import VGG16Features

    photos = [torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
              for name in ("astronaut", "chelsea", "coffee", "rocket")[:batch]]
    originals = torch.stack([torch.nn.functional.interpolate(p[None], size=(size, size), mode="area")[0]
                             for p in photos]).to(device)
    # A plausible completion: the centre quarter replaced by a blurred copy of itself.
    completed = originals.clone()
    hole = slice(size // 4, 3 * size // 4)
    blurred = torch.nn.functional.avg_pool2d(originals, 9, stride=1, padding=4)
    completed[:, :, hole, hole] = blurred[:, :, hole, hole]
    torch.manual_seed(0)
    vgg = VGG16Features(("relu3_3",), weights="random").to(device)
    losses = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                x, y = vgg(completed)["relu3_3"], vgg(originals)["relu3_3"]
            losses[str(dtype).split(".")[1]] = contextual_loss(x.float(), y.float()).cpu()
    diff = (losses["bfloat16"] - losses["float32"]).abs()
    return {"layer": "relu3_3", "images": batch, "vgg_weights": "random (no download here; ImageNet weights "
            "give other feature statistics)", "loss_fp32": losses["float32"].tolist(),
            "loss_bf16": losses["bfloat16"].tolist(), "max_abs_diff": diff.max().item(),
            "max_rel_diff": (diff / losses["float32"].abs()).max().item()}


def contextual_vs_port(options: Options, device: torch.device) -> dict[str, Any]:
    """Our contextual loss, fwd + bwd, against S-aiueo32's port (and our reference): time and peak
    memory, interleaved, memory in fresh subprocesses (``benchmarks.contextual_loss``)."""
    from benchmarks import contextual_loss as cx

    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return {"skipped": "CPU peak memory is read from Linux's /proc/self/clear_refs, absent here"}
    batch, channels, size, _ = options.contextual
    args = cx.parse_args(["--device", device.type, "--batch", str(batch), "--channels", str(channels),
                          "--size", str(size), "--repeats", str(max(3, options.steps)),
                          "--threads", str(torch.get_num_threads())])
    return cx.measure(args)


def loader_in_workers(options: Options) -> dict[str, Any]:
    """The training loader with ``loader_workers`` processes against in-process, per worker core."""
    if not options.loader_workers:
        return {"skipped": "--loader-workers 0"}
    from benchmarks.loader import make_jpegs, worker_ratios
    from inpaint.config import MaskConfig
    from inpaint.masks import MaskSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DataLoader worker runs
    try:
        with tempfile.TemporaryDirectory(prefix="inpaint-loader-") as tmp:
            source, url = Path(tmp) / "jpegs", str(Path(tmp) / "shards")
            source.mkdir()
            make_jpegs(source, options.loader_images)
            pack_dataset("folder", source, url, shard_size=max(8, options.loader_images // 12), test_fraction=0.01,
                         progress=False)
            batch = 32
            train = sum(1 for _ in load_index(url).keys("train"))
            batches = train // (batch * options.loader_workers) * options.loader_workers
            sampler = MaskSampler(MaskConfig(), 160, 96)
            out = worker_ratios(url, batches, batch, 160, sampler, options.loader_workers, max(2, options.steps))
    finally:
        torch.set_num_threads(threads)
    out.update(batch=batch, image_size=160, target_ratio=0.8)
    return out


def projection(records: list[dict[str, Any]], options: Options, info: dict,
               ddp: dict[str, Any] | None) -> dict[str, Any]:
    """Wall time and cost of the paper's schedule with the optimized step of celeba (else another recipe)."""
    schedule = recipes.get("celeba").schedule
    steps = {"generator": schedule.generator_steps, "discriminator": schedule.discriminator_steps,
             "joint": schedule.joint_steps}
    measured_phases: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["variant"] == OPTIMIZED:
            measured_phases.setdefault(r["recipe"], {})[r["phase"]] = r
    complete = [name for name in ("celeba", *options.recipes) if set(measured_phases.get(name, {})) == set(PHASES)]
    if not complete:
        return {"skipped": "needs a recipe measured in all three phases"}
    recipe = complete[0]
    rate = measured_phases[recipe]
    seconds_one = sum(steps[p] * rate[p]["step_s_median"] for p in PHASES)
    measured = (ddp or {}).get("efficiency", {})
    out = {"device": info["name"], "recipe": recipe, "schedule_iterations": steps,
           "batch_per_device": rate["joint"]["batch"],
           "price_per_device_hour": options.gpu_hour_price, "scaling_efficiency_8": options.scaling_efficiency,
           "scaling_note": ("8 devices keep the per-device batch and see the paper's images in 1/8 of the "
                            f"iterations: time = 1-device time / (8 x {options.scaling_efficiency:g}). The efficiency "
                            "is assumed (--scaling-efficiency): the DDP section's measured figures "
                            f"({', '.join(f'{n}: {e:.2f}' for n, e in measured.items()) or 'none'}) share this "
                            "machine's cores between workers and say nothing about separate GPUs."),
           "devices": {}}
    for count in (1, 8):
        efficiency = 1.0 if count == 1 else options.scaling_efficiency
        hours = seconds_one / (count * efficiency) / 3600
        out["devices"][str(count)] = {"hours": hours, "days": hours / 24, "device_hours": hours * count,
                                      "cost": hours * count * options.gpu_hour_price}
    return out


# ----------------------------------------------------------------------------- the run
def run(options: Options, command: str = "") -> dict[str, Any]:
    """Every section, in order; returns the JSON-able results."""
    options.check()
    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    info = describe_device(device)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": command, "device": info, "torch": torch.__version__,
                 "python": platform.python_version(), "options": dataclasses.asdict(options),
                 "load_average": _load_average()},
    }
    with tempfile.TemporaryDirectory(prefix="inpaint-benchmark-") as tmp:
        url = make_dataset(Path(tmp), options.images)
        records = recipe_steps(options, device, url, info)
        results["steps"] = records
        results["speedups"] = speedups(records)
        results["allreduce_bytes"] = {f"{r['recipe']}/{r['phase']}": round(r["gradient_mib"] * 2**20)
                                      for r in records if r["variant"] == OPTIMIZED}
        results["comparison"] = (comparison(options, device, url, info) if options.compare
                                 else {"skipped": "--no-compare"})
        results["ladder"] = ladder(options, device, url, info)
        results["code_changes"] = code_changes(options, device, url)
    results["contextual_precision"] = contextual_precision(device)
    results["contextual_loss"] = contextual_vs_port(options, device)
    results["loader_workers"] = loader_in_workers(options)
    if options.ddp_workers:
        from benchmarks.ddp_scaling import ddp_scaling

        results["ddp"] = ddp_scaling(options.ddp_recipe, options.overrides, options.ddp_workers, options.warmup,
                                     options.ddp_steps, options.phases)
    else:
        results["ddp"] = {"skipped": "--ddp-workers none"}
    results["projection"] = projection(records, options, info, results["ddp"])
    results["meta"]["wall_s"] = time.perf_counter() - started
    results["meta"]["load_average_end"] = _load_average()
    return results


def write(results: dict[str, Any], output: Path) -> Path:
    """Write the JSON and the table (same name, .txt); returns the table's path."""
    from benchmarks.report import render

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str))
    table = output.with_suffix(".txt")
    table.write_text(render(results))
    return table
