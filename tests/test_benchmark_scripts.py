"""Every module under benchmarks/ imports, and every script there prints its --help: a moved helper
(``crop_local``, the local Ray cluster) breaks this test, not a user's first benchmark run."""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py"))
SCRIPTS = [name for name in MODULES
           if 'if __name__ == "__main__":' in (ROOT / "benchmarks" / f"{name}.py").read_text()]


def test_the_lists_hold_the_benchmarks():
    assert {"gpu_check", "bench_masks", "node_loss", "system", "runners"} <= set(MODULES)
    assert {"gpu_check", "bench_masks", "node_loss", "loader_throughput"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_prints_its_help(name, monkeypatch, capsys):
    path = ROOT / "benchmarks" / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put the checkout first on their path
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
