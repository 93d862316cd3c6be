"""The training console's pieces: which lines pass, the throughput window, the progress line."""

from __future__ import annotations

import pytest
import torch

from cluster.console import ThroughputMeter, duration, keep_line, progress_line

CORE = ("[2026-12-04 22:03:53,282 E 9446 9475] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'abc' has constructor arguments in the object store and max_restarts > 0.")


def test_core_log_lines_are_dropped_unless_verbose_and_warnings_pass():
    assert not keep_line(CORE, verbose=False)
    assert keep_line(CORE, verbose=True)
    assert keep_line("WARNING: worker group failed, restarting from checkpoint_000000010", verbose=False)
    assert keep_line("Traceback (most recent call last):", verbose=False)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (9.4, "9s"), (250, "4m10s"), (3720, "1h02m")])
def test_durations_read_like_a_person_would_write_them(seconds, text):
    assert duration(seconds) == text


def test_the_meter_reports_its_window_then_starts_a_new_one():
    now = [100.0]
    meter = ThroughputMeter(torch.device("cpu"), world_size=2, clock=lambda: now[0])
    for _ in range(4):
        meter.data(0.1)
        meter.step(0.4, images=8)
    now[0] += 2.0
    window = meter.window()
    assert window["perf/images_per_s"] == pytest.approx(4 * 8 * 2 / 2.0)
    assert window["perf/images_per_s_per_worker"] == pytest.approx(16.0)
    assert window["perf/steps_per_s"] == pytest.approx(2.0)
    assert window["time/data(s)"] == pytest.approx(0.1) and window["time/step(s)"] == pytest.approx(0.4)
    now[0] += 1.0
    meter.step(0.5, images=8)
    assert meter.window()["perf/steps_per_s"] == pytest.approx(1.0)  # only the new window counts


def test_the_progress_line_has_phase_step_total_speed_and_an_eta():
    line = progress_line(40, 2500, "generator", {"loss/generator/g_rec": 0.1234},
                         {"perf/images_per_s": 180.0, "perf/steps_per_s": 10.0}, steps_left=2460)
    assert line == "step 40/2500 (2%) generator | g_rec=0.1234 | 180.0 img/s | ETA 4m06s"
    assert progress_line(1, 2, "joint", {}, {}, steps_left=1).endswith("ETA ?")
