"""The machine being measured: its device, what it computes natively, its datasheet peak and its load."""

from __future__ import annotations

import os
from typing import Any

import torch

from inpaint.config import ConfigError
from inpaint.hardware import describe_cpu, describe_cpu_line, native_bf16
from inpaint.hardware import resolve_device as trainer_resolve_device

# Dense peak TFLOPS (bf16 tensor cores, fp32 without them) from vendor datasheets; first match wins.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0, 60.0), ("H200", 989.0, 67.0), ("H100 NVL", 835.0, 60.0), ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0), ("A100", 312.0, 19.5), ("L40S", 362.0, 91.6), ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
)


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


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages, where the OS has them."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
