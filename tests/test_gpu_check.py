"""The one-shot GPU check, run on CPU at tiny sizes: every section runs and writes its figures.

Nothing here is about speed; on a GPU the same script measures (benchmarks/RESULTS.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_on_cpu_writes_every_section(tmp_path):
    output = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu",
                             "--output", str(output)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["meta"]["backend"] == "gloo" and data["meta"]["options"]["recipe"] == "celeba"
    assert set(data["phases"]) == {"generator", "discriminator", "joint"}
    for phase in data["phases"].values():
        eager = phase["eager"]
        assert eager["images_per_s"] > 0 and eager["step_s_median"] > 0 and eager["flops_per_image"] > 0
        assert len(eager["step_s"]) == 2
    assert all(f["samples_per_s"] > 0 for f in data["loader"]["workers"].values())
    agreement = data["bf16_vs_fp32"]
    assert {"loss/generator/g_rec", "loss/discriminator/d_bce", "loss/joint/g_adv"} <= set(agreement["metrics"])
    assert isinstance(agreement["agree"], bool)
    assert data["projection"]["hours"]["1"] > 0
    table = output.with_suffix(".txt").read_text()
    assert table.count("## ") == 4 and "MFU" in table and "agree within" in table


def test_projection_uses_the_fastest_variant_of_each_phase():
    phases = {"generator": {"eager": {"step_s_median": 2.0}, "compiled": {"step_s_median": 1.0}},
              "discriminator": {"eager": {"step_s_median": 0.5}, "compiled": {"skipped": "budget"}},
              "joint": {"eager": {"step_s_median": 3.0}, "compiled": {"step_s_median": 4.0}}}
    out = gpu_check.projection(phases, efficiency=0.8)
    assert {p: b["variant"] for p, b in out["best"].items()} == {"generator": "compiled", "discriminator": "eager",
                                                                  "joint": "eager"}
    hours = (90_000 * 1.0 + 10_000 * 0.5 + 400_000 * 3.0) / 3600
    assert out["hours"]["1"] == pytest.approx(hours) and out["hours"]["8"] == pytest.approx(hours / 6.4)


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "error: --steps must be >= 1"),
                                           (["--set", "model.image_size=7"], "error: model.image_size:")])
def test_bad_arguments_are_one_line_errors(capsys, args, message):
    assert gpu_check.main(["--smoke", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and "\n" not in error
