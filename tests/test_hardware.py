"""Native-bf16 detection: CPU flags, and the switches that cap the instructions libraries use."""

import pytest
import torch

from inpaint import hardware


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags and torch kernel level."""
    def pretend(flags, capability="AVX512", isa_cap=None):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: ("Test CPU", frozenset(flags)))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if isa_cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    return pretend


@pytest.mark.parametrize("flags, capability, isa_cap, native", [
    ({"avx2", "fma"}, "AVX2", None, False),  # AMD EPYC (Zen 2/3): AVX2 only
    ({"avx2", "avx512f"}, "AVX512", None, False),  # AVX-512 without its bf16 extension
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", None, True),  # Cooper Lake, Zen 4
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512", None, True),  # Sapphire Rapids
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "AVX2", False),  # oneDNN capped: emulating an AVX2 CPU
    ({"avx512_bf16", "amx_bf16"}, "AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "avx512_core_amx", True),
])
def test_native_bf16_needs_the_flag_and_no_cap_below_it(cpu, flags, capability, isa_cap, native):
    cpu(flags, capability, isa_cap)
    assert hardware.cpu_native_bf16() is native
    assert hardware.default_bf16("cpu") is native and hardware.default_channels_last("cpu") is native
    described = hardware.describe_cpu()
    assert described["native_bf16"] is native and described["model"] == "Test CPU"
    assert set(described["flags"]) == set(flags) & set(hardware.REPORTED_FLAGS)
    line = hardware.describe_cpu_line()
    assert f"native bf16 {'yes' if native else 'no'}" in line and f"bf16={str(native).lower()}" in line


def test_this_machine_is_described():
    described = hardware.describe_cpu()
    assert described["logical_cpus"] >= 1 and isinstance(described["native_bf16"], bool)
    assert not hardware.native_bf16("meta")
