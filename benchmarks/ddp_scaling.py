"""DDP scaling on this machine: images/s with N CPU workers (gloo) and the allreduce volume per step.

Each worker is a process (``torch.multiprocessing.spawn``) with its share of the cores as torch
threads (at least one, so more workers than cores oversubscribe them; the result says so), a
Trainer whose networks are wrapped in DistributedDataParallel through ``Trainer.wrap_models`` as
the cluster layer does, and a fixed synthetic batch per rank (data loading is measured elsewhere).
A communication hook counts the bytes of every gradient bucket that DDP allreduces; the buckets
are reduced while backward still runs, which is DDP's overlap of communication with compute.
"""

import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from benchmarks.vocabulary import OPTIMIZED
from benchmarks.workloads import Workload, optimized_settings
from inpaint.config import Config
from inpaint.masks import MaskSampler
from inpaint.trainer import Trainer


class _BucketBytes:
    """DDP communication-hook state: bytes of gradient buckets allreduced so far."""

    def __init__(self) -> None:
        self.total = 0


def _counting_allreduce(counter: _BucketBytes, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default averaging allreduce, counting the bucket's bytes first."""
    # No ``from __future__ import annotations`` here: DDP checks these annotations as real types.
    buffer = bucket.buffer()
    counter.total += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def synthetic_batch(config: Config, seed: int) -> dict[str, torch.Tensor]:
    """Random images and recipe-sized holes in the loader's batch format."""
    generator = torch.Generator().manual_seed(seed)
    size, batch = config.model.image_size, config.data.batch_size
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    mask, box = MaskSampler(config.mask, size, config.model.local_size).batch(batch, generator)
    return {"image": image, "mask": mask, "box": box}


def _phase(recipe: str, overrides: tuple[str, ...], phase: str, rank: int, world: int, warmup: int,
           steps: int) -> dict[str, Any]:
    """Time ``steps`` DDP steps of one phase on this rank; allreduce bytes per step."""
    device = torch.device("cpu")
    config = Workload(recipe, recipe, OPTIMIZED, optimized_settings(device)).config(phase, overrides)
    trainer = Trainer(config, device=device, world_size=world, rank=rank)
    counter = _BucketBytes()

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        ddp = DistributedDataParallel(module)
        ddp.register_comm_hook(counter, _counting_allreduce)
        return ddp

    trainer.wrap_models(wrap)
    batch = synthetic_batch(config, seed=rank)
    for _ in range(warmup):
        trainer.train_step(batch)
    counter.total = 0
    seconds = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batch)
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    return {"images_per_s": world * config.data.batch_size / step, "step_s_median": step,
            "allreduce_bytes_per_step": counter.total / steps}


def _worker(rank: int, world: int, recipe: str, overrides: tuple[str, ...], phases: tuple[str, ...],
            warmup: int, steps: int, folder: str) -> None:
    """One spawned rank: every phase in turn; rank 0 writes the figures to ``folder``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        figures = {phase: _phase(recipe, overrides, phase, rank, world, warmup, steps) for phase in phases}
    finally:
        gc.collect()  # DDP modules torn down after the group can abort the process at exit (tests/test_gpu_training.py)
        dist.destroy_process_group()
    if rank == 0:
        Path(folder, "figures.json").write_text(json.dumps(figures))


def ddp_scaling(recipe: str, overrides: tuple[str, ...], workers: tuple[int, ...], warmup: int, steps: int,
                phases: tuple[str, ...]) -> dict[str, Any]:
    """images/s and allreduce bytes per step for each worker count; efficiency vs 1 worker."""
    cores = os.cpu_count() or 1
    by_workers: dict[str, Any] = {}
    for world in workers:
        with tempfile.TemporaryDirectory(prefix="inpaint-ddp-") as folder:
            torch.multiprocessing.spawn(_worker, args=(world, recipe, tuple(overrides), tuple(phases), warmup, steps,
                                                       folder), nprocs=world, join=True)
            by_workers[str(world)] = {"threads_per_worker": max(1, cores // world),
                                      "oversubscribed": world > cores,
                                      "phases": json.loads(Path(folder, "figures.json").read_text())}
    efficiency: dict[str, dict[str, float]] = {}
    if "1" in by_workers:
        for world, result in by_workers.items():
            for phase, figures in result["phases"].items():
                single = by_workers["1"]["phases"][phase]["images_per_s"]
                efficiency.setdefault(phase, {})[world] = figures["images_per_s"] / (int(world) * single)
    summary_phase = "joint" if "joint" in efficiency else next(iter(efficiency), None)
    return {"recipe": recipe, "backend": "gloo", "logical_cpus": cores, "workers": by_workers,
            "efficiency_by_phase": efficiency,
            "efficiency": efficiency.get(summary_phase, {}), "efficiency_phase": summary_phase}
