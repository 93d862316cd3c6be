"""Checkpoints that verify but do not load (issue 13): fill, evaluate, watch and resume fall back.

Each corruption below leaves a checkpoint whose files match its meta.json (sizes and sha256
updated, or a meta.json that is valid JSON of the wrong shape), so that only loading it can
tell. Every consumer must skip it with one line and use the newest checkpoint that loads:
``python -m inpaint fill``, ``jobs/evaluate.py --checkpoint RUN``, ``--watch`` (which marks it
and never leaves its CLAIM behind) and the training restore (``load_newest_checkpoint`` /
``restore_latest``, called here in-process without Ray workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster import evaluator as cev
from cluster import watcher
from inpaint import run_folder
from cluster import restore
from inpaint import checkpoint as ckpt
from inpaint.config import Config
from inpaint.inference import Inpainter
from inpaint.trainer import Trainer
from tests.cli_harness import REPO, run_cli, train_debug_run

OLD, NEW = "checkpoint_000000002", "checkpoint_000000004"


# ------------------------------------------------------------------ corruptions
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rehash(folder: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in meta.json, as a careful attacker would."""
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))


def _truncate(folder: Path, name: str) -> None:
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rehash(folder, name)


def truncated_generator(folder: Path) -> None:
    _truncate(folder, ckpt.GENERATOR_FILE)


def other_width(folder: Path) -> None:
    config = json.loads((folder / ckpt.CONFIG_FILE).read_text())
    config["model"]["gen_width"] = 2 * config["model"]["gen_width"]
    (folder / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    _rehash(folder, ckpt.CONFIG_FILE)


def meta_is_a_list(folder: Path) -> None:
    (folder / ckpt.META_FILE).write_text("[]")


def files_is_a_list(folder: Path) -> None:
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta["files"] = sorted(meta["files"])
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))


CORRUPTIONS = {"truncated-generator": truncated_generator, "other-width": other_width,
               "meta-list": meta_is_a_list, "files-list": files_is_a_list}
META_SHAPE = {"meta-list", "files-list"}  # not even listed as checkpoints: skipped while listing


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, sample_dataset) -> Path:
    return train_debug_run(tmp_path_factory.mktemp("unloadable") / "run", sample_dataset)


@pytest.fixture
def run(template_run, tmp_path) -> Path:
    return Path(shutil.copytree(template_run, tmp_path / "run"))


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def skip_warnings(caplog, name: str) -> list[str]:
    lines = [record.getMessage() for record in caplog.records
             if record.levelno == logging.WARNING and name in record.getMessage() and "skipping" in record.getMessage()]
    assert all("\n" not in line for line in lines), lines
    return lines


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


# ------------------------------------------------------------------ training restore
def _trainer(run: Path) -> Trainer:
    return Trainer(Config.from_dict(json.loads((run / "config.json").read_text())), device="cpu")


def _run_paths(run: Path) -> run_folder.RunPaths:
    return run_folder.RunPaths(str(run.parent), run.name)


def truncated_trainer_state(folder: Path) -> None:
    _truncate(folder, ckpt.TRAINER_FILE)


def truncated_discriminator(folder: Path) -> None:
    _truncate(folder, ckpt.DISCRIMINATOR_FILE)


RESTORE_CORRUPTIONS = {**CORRUPTIONS, "truncated-trainer": truncated_trainer_state,
                       "truncated-discriminator": truncated_discriminator}
del RESTORE_CORRUPTIONS["other-width"]  # see test_restore_resumes_from_weights_that_fit_this_run


@pytest.mark.parametrize("corruption", sorted(RESTORE_CORRUPTIONS))
def test_restore_skips_the_unloadable_newest_and_resumes_from_the_previous(run, corruption, caplog):
    RESTORE_CORRUPTIONS[corruption](run / NEW)
    caplog.set_level(logging.WARNING)
    trainer = _trainer(run)
    choice = restore.restore_latest(trainer, _run_paths(run), None)
    assert choice == str(run / OLD) and trainer.step == 2
    assert len(skip_warnings(caplog, NEW)) == 1


@pytest.mark.parametrize("corruption", sorted(RESTORE_CORRUPTIONS))
def test_a_corrupt_checkpoint_that_ray_registered_does_not_end_training(run, corruption):
    import ray.train

    RESTORE_CORRUPTIONS[corruption](run / NEW)
    registered = ray.train.Checkpoint.from_directory(str(run / NEW))
    trainer = _trainer(run)
    choice, meta = restore.load_newest_checkpoint(trainer, _run_paths(run), registered)
    assert choice == str(run / OLD) and meta["step"] == 2 and trainer.step == 2
    # Every checkpoint corrupt, Ray's included: a fresh start, not a crash.
    RESTORE_CORRUPTIONS[corruption](run / OLD)
    fresh = _trainer(run)
    assert restore.load_newest_checkpoint(fresh, _run_paths(run), registered) == (None, None)
    assert fresh.step == 0


def test_ray_registered_checkpoint_is_tried_when_storage_cannot_be_listed(run, monkeypatch):
    import ray.train

    def unreachable(run_url):
        raise OSError("connection reset")

    monkeypatch.setattr(restore, "checkpoint_urls", unreachable)
    trainer = _trainer(run)
    choice, meta = restore.load_newest_checkpoint(trainer, _run_paths(run), ray.train.Checkpoint.from_directory(
        str(run / NEW)))
    assert choice == restore.REGISTERED and meta["step"] == 4 and trainer.step == 4
    truncated_generator(run / NEW)
    fresh = _trainer(run)
    assert restore.load_newest_checkpoint(fresh, _run_paths(run), ray.train.Checkpoint.from_directory(
        str(run / NEW))) == (None, None)


def test_restore_resumes_from_weights_that_fit_this_run(run, caplog):
    """A config.json edited to another width does not change the weights, and training builds its
    networks from the run's own config: they fit, so the checkpoint is resumed from (with a warning
    that its config differs) rather than thrown away. Inference, which builds the network from the
    checkpoint's config, cannot load it and falls back (tests above)."""
    other_width(run / NEW)
    caplog.set_level(logging.WARNING)
    trainer = _trainer(run)
    assert restore.restore_latest(trainer, _run_paths(run), None) == str(run / NEW) and trainer.step == 4
    assert any("config differs" in record.getMessage() for record in caplog.records)


def test_a_failed_load_leaves_the_trainer_as_it_was(run):
    truncated_trainer_state(run / NEW)
    trainer = _trainer(run)
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError):
        trainer.load(run / NEW)
    assert trainer.step == 0
    assert all((v == before[k]).all() for k, v in trainer.generator.state_dict().items())


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
