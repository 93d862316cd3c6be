"""One profiled step: seconds per trainer section (backward charged to its forward op) and peak memory."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.machine import synchronize
from inpaint.trainer import SECTIONS


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


def profile_step(step: Callable[[], None], device: torch.device, state_bytes: int,
                 sections: bool = True) -> dict[str, Any]:
    """Profile one call of ``step``: fractions of its time per section (rest: other; all "other"
    when ``sections`` is False, for steps without the trainer's ranges) and its peak memory, the
    persistent ``state_bytes`` included."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - start
    seconds = attribute(prof.events(), device) if sections else dict.fromkeys(SECTIONS, 0.0)
    total = wall if device.type == "cpu" else max(wall, sum(seconds.values()))
    seconds["other"] = max(0.0, total - sum(seconds.values()))
    fractions = {k: v / total for k, v in seconds.items()}
    return {"fractions": fractions, "peak_bytes": state_bytes + peak_allocated(prof, device),
            "state_bytes": state_bytes}


def device_intervals(prof) -> list[tuple[int, int, str]]:
    """(start ns, end ns, name) of every kernel, copy and memset the GPU ran during a profile."""
    return [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in prof.profiler.kineto_results.events()
            if str(e.device_type()).endswith("CUDA") and e.name() != "[memory]" and e.duration_ns() > 0]


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint spans covering the same time as ``spans``."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Time covered by both of two sorted, disjoint span lists."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def busy_time(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
    """Seconds the GPU was busy (kernels on several streams counted once), of it in NCCL kernels (the
    gradient allreduce), and of those the seconds that overlapped other GPU work."""
    nccl = _union([(s, e) for s, e, name in intervals if "nccl" in name.lower()])
    other = _union([(s, e) for s, e, name in intervals if "nccl" not in name.lower()])
    busy = _union([(s, e) for s, e, _ in intervals])
    length = lambda spans: sum(e - s for s, e in spans) / 1e9  # noqa: E731
    return {"busy_s": length(busy), "allreduce_s": length(nccl), "allreduce_overlapped_s": _overlap(nccl, other) / 1e9}
