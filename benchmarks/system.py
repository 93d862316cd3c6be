"""The whole-system training benchmark: every section in order, written as JSON and as tables.

Where a step's time goes, what each optimisation buys, what the paper's schedule costs, and how
we compare with GLCIC-PyTorch. Entry point: ``jobs/benchmark.py``. Modules, one story each:
``vocabulary`` (options, names, step records), ``machine`` (the device probe), ``workloads``,
``runners`` (build, time, summarise), ``profiling``, ``comparisons`` (the interleaved groups),
``ablations`` (each change alone), ``components`` (loss and loader benchmarks run here),
``ddp_scaling``, ``projection``, ``report`` (the tables); this one runs them.

Method
- A step is ``Trainer.train_step`` on a real batch: CelebA-sized JPEGs (``benchmarks.loader_throughput``)
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

import dataclasses
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.ablations import code_changes, contextual_precision
from benchmarks.comparisons import comparison, ladder, recipe_steps, speedups
from benchmarks.components import contextual_vs_port, loader_in_workers
from benchmarks.ddp_scaling import ddp_scaling
from benchmarks.machine import describe_device, load_average, resolve_device
from benchmarks.projection import projection
from benchmarks.report import render
from benchmarks.vocabulary import OPTIMIZED, Options
from benchmarks.workloads import make_dataset


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
                 "load_average": load_average()},
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
        results["ddp"] = ddp_scaling(options.ddp_recipe, options.overrides, options.ddp_workers, options.warmup,
                                     options.ddp_steps, options.phases)
    else:
        results["ddp"] = {"skipped": "--ddp-workers none"}
    results["projection"] = projection(records, options, info, results["ddp"])
    results["meta"]["wall_s"] = time.perf_counter() - started
    results["meta"]["load_average_end"] = load_average()
    return results


def write(results: dict[str, Any], output: Path) -> Path:
    """Write the JSON and the table (same name, .txt); returns the table's path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str))
    table = output.with_suffix(".txt")
    table.write_text(render(results))
    return table
