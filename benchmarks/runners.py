"""A workload built for one phase: stepped on real batches, timed interleaved, summarised as a record."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.glcic_pytorch import GlcicPytorchStep
from benchmarks.machine import synchronize
from benchmarks.profiling import profile_step
from benchmarks.vocabulary import GLCIC_PYTORCH, OPTIMIZED, STRAIGHTFORWARD, Options, StepRecord
from benchmarks.workloads import Workload, make_straightforward
from inpaint.config import DataConfig
from inpaint.data import make_train_loader
from inpaint.trainer import Trainer


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
                self.trainer.compile()
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

    def profile(self) -> dict[str, Any]:
        """One profiled step on the next batch (``benchmarks.profiling.profile_step``)."""
        batch = next(self.batches)
        return profile_step(lambda: self.step(batch), self.device, self.state_bytes(),
                            sections=self.trainer is not None)


def attach_loader(runner: Runner, url: str) -> None:
    """An in-process training loader (num_workers=0) at the runner's size, batch and mask settings."""
    config = runner.config
    data = DataConfig(url=url, batch_size=config.data.batch_size, num_workers=0, seed=config.data.seed)
    runner.batches = iter(make_train_loader(data, config.model, config.mask))


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


def count_flops(workload: Workload, phase: str, device: torch.device, options: Options, url: str | None = None, *,
                batches: Callable[[Runner], Iterator[dict]] | None = None) -> float:
    """FLOPs per image of one step, counted by FlopCounterMode at a batch of 2 after a warm-up step.

    The batches come from the dataset at ``url`` through the training loader, or from ``batches(runner)``."""
    runner = Runner(workload, phase, device, options, batch=2)
    if batches is not None:
        runner.batches = batches(runner)
    else:
        attach_loader(runner, url)
    runner.step(next(runner.batches))
    with FlopCounterMode(display=False) as counter:
        runner.step(next(runner.batches))
    return counter.get_total_flops() / 2


def summarize(runner: Runner, profiled: dict[str, Any] | None, flops: float | None, info: dict) -> StepRecord:
    """The JSON record of one workload in one phase; shares and memory need a profiled step."""
    batch = runner.config.data.batch_size
    step, data = statistics.median(runner.step_s), statistics.median(runner.data_s)
    record: StepRecord = {
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
                  info: dict, flops: dict, label: str, profiled: bool = True) -> list[StepRecord]:
    """Build, interleave, profile and summarise a group of workloads in one phase; free them after."""
    runners = [Runner(w, phase, device, options) for w in workloads]
    for runner in runners:
        attach_loader(runner, url)
    time_interleaved(runners, options.warmup, options.steps, label)
    records = []
    for runner in runners:
        details = runner.profile() if profiled else None
        records.append(summarize(runner, details, flops.get((runner.workload, phase)), info))
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records
