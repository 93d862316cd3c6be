"""All ranks resume from the checkpoint rank 0 chose (issue 13), with a real 2-process gloo group.

``restore_latest`` is called as each Ray worker calls it, but in two plain processes joined by
``torch.distributed`` (no Ray): rank 0 lists the run and picks the newest checkpoint that loads,
rank 1 only loads that one (retrying a transient read error), and both check that they agree on
(step, samples seen) before training.
"""

from __future__ import annotations

import json
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from tests.cli_harness import train_debug_run
from tests.test_unloadable_checkpoints import NEW, OLD, truncated_generator


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

            restore.checkpoint_urls = no_listing
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


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, sample_dataset) -> Path:
    return train_debug_run(tmp_path_factory.mktemp("restore") / "run", sample_dataset)


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
