"""Checkpoints that verify but do not load (issue 13): fill, evaluate and watch fall back.

Each corruption (tests/corruptions.py) leaves a checkpoint whose files match its meta.json, so
that only loading it can tell. Every command a user runs must skip it with one line and use the
newest checkpoint that loads: ``python -m inpaint fill``, ``jobs/evaluate.py --checkpoint RUN``
and ``--watch`` (which marks it and never leaves its CLAIM behind). The training restore's
fallback is in tests/test_restore.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster import evaluator as cev
from cluster import watcher
from inpaint import checkpoint as ckpt
from inpaint import run_folder
from inpaint.inference import Inpainter
from tests.cli_harness import REPO, run_cli
from tests.corruptions import CORRUPTIONS, META_SHAPE, NEW, OLD, skip_warnings, truncated_generator


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ loading reports UnloadableCheckpoint
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_the_checkpoint_itself_is_unloadable_with_one_line(run, corruption):
    CORRUPTIONS[corruption](run / NEW)
    with pytest.raises(ckpt.UnloadableCheckpoint) as caught:
        cev.load_subject(str(run / NEW))
    assert "\n" not in str(caught.value) and NEW in str(caught.value)


# ------------------------------------------------------------------ fill
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_fill_falls_back_to_the_previous_checkpoint(run, picture, tmp_path, corruption, caplog):
    CORRUPTIONS[corruption](run / NEW)
    caplog.set_level(logging.WARNING)
    out = tmp_path / "out.png"
    outcome = run_cli("fill", "--checkpoint", str(run), "--image", str(picture), "--box", "8,8,10,10",
                      "--output", str(out), "--device", "cpu")
    assert outcome.code == 0, outcome.stderr
    assert out.is_file() and "Traceback" not in outcome.stderr
    assert len(skip_warnings(caplog, NEW)) == 1
    assert Inpainter.from_checkpoint(str(run)).meta["step"] == 2


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_fill_with_no_loadable_checkpoint_is_one_error_line(run, picture, tmp_path, corruption):
    for name in (OLD, NEW):
        CORRUPTIONS[corruption](run / name)
    out = tmp_path / "out.png"
    args = ("--image", str(picture), "--box", "8,8,10,10", "--output", str(out), "--device", "cpu")
    run_cli("fill", "--checkpoint", str(run), *args).assert_one_line_error(str(run))
    # Named directly, the checkpoint is not replaced by another: its own reason is the error.
    run_cli("fill", "--checkpoint", str(run / NEW), *args).assert_one_line_error(NEW)
    assert not out.exists()


# ------------------------------------------------------------------ evaluate --checkpoint
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_evaluate_falls_back_to_the_previous_checkpoint(run, corruption, caplog):
    CORRUPTIONS[corruption](run / NEW)
    caplog.set_level(logging.WARNING)
    outcome = run_cli("evaluate", "--checkpoint", str(run), "--num-images", "2", "--device", "cpu")
    assert outcome.code == 0, outcome.stderr
    assert len(skip_warnings(caplog, NEW)) == 1
    document = json.loads((run / "evaluations" / OLD / "metrics.json").read_text())
    assert document["step"] == 2 and document["checkpoint"] == str(run / OLD)
    assert not (run / "evaluations" / NEW).exists()


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_evaluate_with_no_loadable_checkpoint_is_one_error_line(run, corruption):
    for name in (OLD, NEW):
        CORRUPTIONS[corruption](run / name)
    run_cli("evaluate", "--checkpoint", str(run), "--num-images", "2", "--device", "cpu").assert_one_line_error(
        str(run))
    run_cli("evaluate", "--checkpoint", str(run / NEW), "--num-images", "2",
            "--device", "cpu").assert_one_line_error(NEW)
    assert not (run / "evaluations").exists()


# ------------------------------------------------------------------ evaluate --watch
@pytest.mark.parametrize("bad,good", [(NEW, OLD), (OLD, NEW)], ids=["newest-bad", "oldest-bad"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_watch_marks_the_bad_checkpoint_and_evaluates_the_others(run, corruption, bad, good):
    CORRUPTIONS[corruption](run / bad)
    outcome = run_cli("evaluate", "--watch", str(run), "--num-images", "2", "--device", "cpu")
    assert outcome.code == 0, outcome.stderr
    assert f"evaluated 1 checkpoint(s): {good}" in outcome.stdout
    assert (run / "evaluations" / good / "metrics.json").is_file()
    bad_folder = run / "evaluations" / bad
    assert not (bad_folder / run_folder.CLAIM).exists()  # nothing left that blocks another watcher
    assert not (bad_folder / "metrics.json").exists()
    if corruption in META_SHAPE:
        assert not bad_folder.exists()  # never listed as a checkpoint, so never claimed
    else:
        assert f"skipped 1 unloadable: {bad}" in outcome.stdout
        assert bad in (bad_folder / run_folder.UNLOADABLE).read_text()
    # A later pass retries neither: the good one is done, the bad one marked (or not a checkpoint).
    again = watcher.watch(str(run), cev.EvaluationRequest(num_images=2, device="cpu"))
    assert again.evaluated == [] and again.unloadable == []


# ------------------------------------------------------------------ the real CLIs, as a user sees them
@pytest.mark.slow
def test_cli_processes_print_one_warning_line_and_no_traceback(run, picture, tmp_path):
    truncated_generator(run / NEW)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fill = subprocess.run([sys.executable, "-m", "inpaint", "fill", "--checkpoint", str(run), "--image", str(picture),
                           "--box", "8,8,10,10", "--output", str(tmp_path / "out.png"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    evaluate = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(run), "--num-images", "2",
                               "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    for done in (fill, evaluate):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        warnings = [line for line in done.stderr.splitlines() if "skipping" in line]
        assert len(warnings) == 1 and NEW in warnings[0] and "unreadable weights" in warnings[0], done.stderr
