"""What this machine computes natively, and the numeric defaults that follow from it.

bf16 autocast and channels_last pay off only where bf16 matrix products run in hardware: CUDA
GPUs from Ampere on, and x86 CPUs with AMX or AVX512-BF16 (oneDNN's bf16 convolutions use those
units). On a CPU without them (e.g. an AVX2-only AMD EPYC) bf16 is emulated and slower than fp32,
so ``runtime.bf16`` / ``runtime.channels_last`` left at None (auto) resolve to fp32 / NCHW there.

The CPU answer reads /proc/cpuinfo's flags and honours the switches that cap which instructions
the libraries use, so a run capped to AVX2 on a newer CPU (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``: how this repo's benchmarks emulate an AVX2-only CPU) is treated as
the AVX2 machine it then is.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import torch

# Flags that matter for the training step's speed, in the order they are reported.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which its bf16 kernels are emulated.
_ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown", {}) where it is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model != "unknown" and flags:
            break
    return model, flags


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped to by the environment, upper-cased (None: uncapped)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def cpu_native_bf16() -> bool:
    """Whether this CPU, as the libraries are allowed to use it, multiplies bf16 in hardware."""
    _, flags = _cpuinfo()
    if not any(flag in flags for flag in BF16_FLAGS) or not torch.backends.mkldnn.is_available():
        return False
    if onednn_isa_cap() in _ONEDNN_WITHOUT_BF16:
        return False
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    return capability not in ("DEFAULT", "NO AVX", "AVX2")


def cuda_native_bf16(device: torch.device | str) -> bool:
    """Whether the CUDA device that will run (``cuda`` alone: the current one) has bf16 tensor cores.

    ``including_emulation=False``: torch's default also answers yes on pre-Ampere GPUs, where bf16
    is emulated and slower than fp32. Asked of ``device`` itself, not of whichever device is current.
    """
    device = torch.device(device)
    with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA Ampere+, or a CPU with AMX / AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and cuda_native_bf16(device)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def default_bf16(device: torch.device | str) -> bool:
    """``runtime.bf16=None`` (auto): on where the device computes bf16 natively."""
    return native_bf16(device)


def default_channels_last(device: torch.device | str) -> bool:
    """``runtime.channels_last=None`` (auto): with bf16 (oneDNN's and cuDNN's fast bf16 kernels are
    NHWC); in fp32 on an AVX2 CPU its gain was within noise (benchmarks/RESULTS.md)."""
    return native_bf16(device)


def describe_cpu() -> dict[str, Any]:
    """What was detected and what it decides, for benchmark headers and logs."""
    model, flags = _cpuinfo()
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "flags": [flag for flag in REPORTED_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa_cap": onednn_isa_cap(),
        "native_bf16": cpu_native_bf16(),
        "default_bf16": default_bf16("cpu"),
        "default_channels_last": default_channels_last("cpu"),
    }


def describe_cpu_line() -> str:
    """``describe_cpu`` in one line."""
    info = describe_cpu()
    cap = f", oneDNN capped to {info['onednn_isa_cap']}" if info["onednn_isa_cap"] else ""
    return (f"{info['model']}, {info['logical_cpus']} logical CPUs, flags {' '.join(info['flags']) or 'none'}, "
            f"torch kernels {info['torch_cpu_capability']}{cap}: native bf16 {'yes' if info['native_bf16'] else 'no'}"
            f" -> CPU defaults bf16={str(info['default_bf16']).lower()}, "
            f"channels_last={str(info['default_channels_last']).lower()}")


def resolve_device(name: str) -> torch.device:
    """``runtime.device`` (auto, cpu, cuda, cuda:N) as a device; RuntimeError when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={name} but no CUDA device is available")
    return torch.device(name)
