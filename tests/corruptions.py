"""Checkpoints that verify but do not load: each corruption keeps the files matching meta.json.

Sizes and sha256 are recorded again after the change (or meta.json becomes valid JSON of the
wrong shape), so only loading the checkpoint can tell. Used on copies of the ``run`` fixture
(tests/conftest.py), whose checkpoints are OLD (step 2) and NEW (step 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from inpaint import checkpoint as ckpt

OLD, NEW = "checkpoint_000000002", "checkpoint_000000004"


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


def truncated_trainer_state(folder: Path) -> None:
    _truncate(folder, ckpt.TRAINER_FILE)


def truncated_discriminator(folder: Path) -> None:
    _truncate(folder, ckpt.DISCRIMINATOR_FILE)


RESTORE_CORRUPTIONS = {**CORRUPTIONS, "truncated-trainer": truncated_trainer_state,
                       "truncated-discriminator": truncated_discriminator}
del RESTORE_CORRUPTIONS["other-width"]  # see test_restore_resumes_from_weights_that_fit_this_run


def skip_warnings(caplog, name: str) -> list[str]:
    lines = [record.getMessage() for record in caplog.records
             if record.levelno == logging.WARNING and name in record.getMessage() and "skipping" in record.getMessage()]
    assert all("\n" not in line for line in lines), lines
    return lines
