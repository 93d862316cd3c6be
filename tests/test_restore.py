"""Training resumes from the newest checkpoint that loads, and every rank from the same one.

In process, without Ray workers: ``load_newest_checkpoint`` / ``restore_latest`` skip a newest
checkpoint that verifies but does not load (tests/corruptions.py), try Ray's registered one, and
leave the trainer untouched by a failed load. Then in two plain processes joined by
``torch.distributed`` (no Ray): rank 0 lists the run and picks the newest checkpoint that loads,
rank 1 only loads that one (retrying a transient read error), and both check that they agree on
(step, samples seen) before training.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from cluster import restore
from inpaint import checkpoint as ckpt
from inpaint import run_folder
from inpaint.config import Config
from inpaint.trainer import Trainer
from tests.corruptions import (NEW, OLD, RESTORE_CORRUPTIONS, other_width, skip_warnings, truncated_generator,
                               truncated_trainer_state)


def _trainer(run: Path) -> Trainer:
    return Trainer(Config.from_dict(json.loads((run / "config.json").read_text())), device="cpu")


def _run_paths(run: Path) -> run_folder.RunPaths:
    return run_folder.RunPaths(str(run.parent), run.name)


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

    monkeypatch.setattr(restore, "complete_checkpoints", unreachable)
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


# ------------------------------------------------------------------ two ranks, one choice
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore(run: Path, rank: int, world_size: int) -> dict:
    from cluster import restore
    from inpaint.run_folder import RunPaths
    from inpaint.config import Config
    from inpaint.trainer import Trainer

    trainer = Trainer(Config.from_dict(json.loads((run / "config.json").read_text())), device="cpu",
                      world_size=world_size, rank=rank)
    try:
        choice = restore.restore_latest(trainer, RunPaths(str(run.parent), run.name), None, rank=rank)
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"choice": choice, "step": trainer.step, "samples_seen": trainer.samples_seen}


def _rank_main(rank: int, world_size: int, port: int, agree_run: str, disagree_run: str, out: str) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world_size)
        from cluster import restore

        results = {}
        real_load = restore._load_url
        if rank == 1:
            # Rank 1 never chooses: were it to list the run itself it could pick another step.
            def no_listing(run_url):
                raise AssertionError("only rank 0 lists the run's checkpoints")

            restore.complete_checkpoints = no_listing
            failures = []

            def flaky_load(trainer, url, data):  # one transient read error, then the real read
                if not failures:
                    failures.append(url)
                    raise OSError("connection reset by peer")
                return real_load(trainer, url, data)

            restore._load_url = flaky_load
        results["agree"] = _restore(Path(agree_run), rank, world_size)
        if rank == 1:
            results["retried"] = failures

            def wrong_load(trainer, url, data):  # a rank that somehow loads another step
                return real_load(trainer, url.replace(OLD, NEW) if OLD in url else url.replace(NEW, OLD), data)

            restore._load_url = wrong_load
        results["disagree"] = _restore(Path(disagree_run), rank, world_size)
        torch.distributed.destroy_process_group()
    except BaseException:
        results = {"crash": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_ranks_resume_from_rank_zeros_choice_and_check_they_agree(template_run, tmp_path):
    agree = Path(shutil.copytree(template_run, tmp_path / "a" / "run"))
    truncated_generator(agree / NEW)  # the newest verifies but does not load: rank 0 falls back to OLD
    disagree = Path(shutil.copytree(template_run, tmp_path / "b" / "run"))
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(agree), str(disagree), str(tmp_path)),
                                nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        assert "crash" not in result, result["crash"]
    expected = {"choice": str(agree / OLD), "step": 2}
    for result in ranks:
        assert {key: result["agree"][key] for key in expected} == expected
    assert ranks[0]["agree"]["samples_seen"] == ranks[1]["agree"]["samples_seen"]
    assert ranks[1]["retried"] == [str(agree / OLD)]  # the chosen one, retried after its transient error
    for result in ranks:  # both ranks stop before training instead of running from different steps
        assert "ranks resumed at different (step, samples seen)" in result["disagree"]["error"]
