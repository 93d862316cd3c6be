"""benchmarks/quality.py on a tiny budget: its output is well formed (never how fast or how good)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality  # noqa: E402


@pytest.mark.slow
def test_tiny_budget_writes_curves_baselines_table_and_png(sample_dataset, tmp_path, capsys):
    out = tmp_path / "quality"
    assert quality.main(["--budget-s", "3", "--networks", "glcic", "--eval-points", "2", "--data", sample_dataset,
                         "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["kinds"][:2] == ["center_1/4", "center_1/3"] and result["images"] > 0
    assert set(result["baselines"]) == {"mean", "telea", "biharmonic"}
    (curve,) = result["curves"]
    assert curve["network"] == "glcic" and curve["config"]["model"]["block"] == "conv"
    steps = [point["step"] for point in curve["points"]]
    assert steps == sorted(steps) and steps[-1] >= 1 and len(steps) <= 2
    for point in curve["points"]:
        for kind in result["kinds"]:
            assert set(point["figures"][kind]) >= {"hole_psnr", "psnr", "ssim"}
            assert 0 < point["figures"][kind]["ssim"] <= 1
        assert set(point["variants"]) == {"raw", "raw+post", "ema", "ema+post"}
        assert point["variants"]["raw"] == point["figures"]
        assert point["variants"]["ema+post"] != point["variants"]["ema"]  # post-processing changes the hole
    assert set(curve["smoothness"]) == {"raw", "raw+post", "ema", "ema+post"}
    assert all(value >= 0 for swings in curve["smoothness"].values() for value in swings.values())
    assert "| mean |" in printed and "| glcic raw |" in printed and "| glcic | ema+post |" in printed
    assert result["cpu"]


def test_smoothness_is_the_spread_of_successive_changes_from_the_joint_phase_on():
    def point(phase, value):
        figures = {"k": {"hole_psnr": value}}
        return {"phase": phase, "variants": {"raw": figures, "ema": {"k": {"hole_psnr": value / 2}}}}

    curve = {"points": [point("generator", 0.0), point("generator", 10.0), point("joint", 11.0),
                        point("joint", 13.0), point("joint", 14.0)]}
    swings = quality.smoothness(curve, ["k"])
    # from the last generator point: changes 1, 2, 1 -> std sqrt(2/9); the early 0 -> 10 jump does not count
    assert swings["raw"]["k"] == pytest.approx((2 / 9) ** 0.5)
    assert swings["ema"]["k"] == pytest.approx((2 / 9) ** 0.5 / 2)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        quality.parse_args(["--networks", "unet"])
    with pytest.raises(SystemExit):
        quality.parse_args(["--budget-s", "0"])
