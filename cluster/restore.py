"""Where every training worker resumes from: rank 0 chooses, every rank loads that one, all agree.

The Ray layer's half of "the newest checkpoint that loads" (the walk itself is
:func:`inpaint.run_folder.load_newest`): its candidates are the run's own checkpoint folders and
the one Ray registered, and a checkpoint that will never load is moved aside so that training
past its step replaces nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import ray.train

from inpaint import storage
from inpaint.checkpoint import CheckpointError
from inpaint.distributed import broadcast_object, gather_objects
from inpaint.errors import one_line
from inpaint.run_folder import RunPaths, complete_checkpoints, load_newest, move_aside
from inpaint.trainer import Stateful, Trainer

log = logging.getLogger("inpaint.train")

RESTORE_ATTEMPTS = 3  # per rank, for the checkpoint rank 0 chose: transient read errors are retried
REGISTERED = "<registered>"  # rank 0's choice when only Ray's own record of the checkpoint loads


def _load_url(trainer: Trainer, url: str, data: Stateful | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inpaint-restore-") as scratch:
        return trainer.load(storage.download_dir(url, scratch), data=data)


def _load_registered(trainer: Trainer, registered: ray.train.Checkpoint, data: Stateful | None) -> dict[str, Any]:
    with registered.as_directory() as directory:
        return trainer.load(directory, data=data)


def _set_aside(url: str, reason: str, *, skip_logged: bool = False) -> None:
    """Move a checkpoint that will never load aside (see :func:`inpaint.run_folder.move_aside`), so that
    training past its step replaces nothing; a failure to move it is logged, not fatal.

    One warning per checkpoint: ``skip_logged`` when the listing already said it skipped it.
    """
    try:
        aside = move_aside(url, reason)
        if skip_logged:
            log.warning("moved %s aside to %s", url, aside)
        else:
            log.warning("skipping %s: %s; moved it aside to %s", url, reason, aside)
    except storage.StorageError as move_error:
        log.warning("%s (%s) could not be moved aside: %s", url, reason, move_error)


def load_newest_checkpoint(trainer: Trainer, run: RunPaths, registered: ray.train.Checkpoint | None,
                      data: Stateful | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """Load the newest checkpoint of the run that loads; return (its URL or REGISTERED or None, its meta).

    Ray registers a reported checkpoint a moment after its upload, so a worker killed in that
    window leaves a complete folder in storage that Ray does not list. Our checkpoints are
    self-verifying (meta.json last, with sha256 of every file), so such a folder is safe to
    resume from and saves a checkpoint interval of work. One that fails verification, or
    verifies but does not load (UnloadableCheckpoint), is skipped with a warning and the next
    older one is tried -- Ray's registered checkpoint included, so a corrupt checkpoint that Ray
    registered does not end training. None of them loading means a fresh start.
    """
    registered_name = storage.name(registered.path) if registered is not None else None
    rejected: list[tuple[str, str]] = []  # folders with a marker that is not trusted (a copy cut short)
    try:
        listed = [url for url, _ in reversed(complete_checkpoints(run.url, rejected))]  # newest step first
    except Exception as exc:  # storage unreachable right now: Ray's own record is still worth a try
        log.warning("cannot list the checkpoints of %s (%s); trying Ray's registered checkpoint", run.url, exc)
        listed = []
    for url, reason in rejected:  # no writer is left at a restore: these will never complete
        _set_aside(url, reason, skip_logged=True)
    candidates = listed + ([REGISTERED] if registered is not None and registered_name not in
                           {storage.name(url) for url in listed} else [])

    def load(candidate: str) -> dict[str, Any]:
        return (_load_registered(trainer, registered, data) if candidate == REGISTERED
                else _load_url(trainer, candidate, data))

    def skipped(candidate: str, exc: BaseException) -> None:
        if candidate == REGISTERED:
            log.warning("skipping Ray's registered checkpoint %s: %s", registered.path, one_line(exc, 1000))
        elif isinstance(exc, CheckpointError):  # it will not load on a retry either: keep it from being overwritten
            _set_aside(candidate, one_line(exc, 1000))
        else:  # a transient read error: the checkpoint stays, an older one is used this time
            log.warning("skipping %s: %s", candidate, one_line(exc, 1000))

    found = load_newest(candidates, load, skip=(CheckpointError, storage.StorageError, OSError), on_skip=skipped)
    if found is not None:
        return found
    if listed or registered is not None:
        log.warning("no checkpoint of %s loads; starting from scratch", run.url)
    return None, None


def restore_latest(trainer: Trainer, run: RunPaths, registered: ray.train.Checkpoint | None, *,
                   data: Stateful | None = None, rank: int = 0) -> str | None:
    """Every rank resumes from the checkpoint rank 0 chose (see :func:`load_newest_checkpoint`); returns it.

    ``data`` (the rank's training loader) gets the data position saved with that checkpoint.

    Rank 0 picks and loads; the others load exactly that one (retrying transient read errors) or
    fail, so that Ray restarts the group, rather than resume from another step. Ranks then check
    that they agree on the step and samples seen before any training.
    """
    choice = meta = None
    if rank == 0:
        choice, meta = load_newest_checkpoint(trainer, run, registered, data)
    choice = broadcast_object(choice)
    if rank != 0 and choice is not None:
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            try:
                meta = (_load_registered(trainer, registered, data) if choice == REGISTERED
                        else _load_url(trainer, choice, data))
                break
            except (CheckpointError, storage.StorageError, OSError) as exc:
                if attempt == RESTORE_ATTEMPTS:
                    raise RuntimeError(f"rank {rank} cannot load {choice}, which rank 0 resumed from: {exc}") from None
                log.warning("rank %d: reading %s failed (%s); retrying", rank, choice, exc)
                time.sleep(attempt)
    positions = gather_objects((trainer.step, trainer.samples_seen))
    if len(set(positions)) != 1:
        raise RuntimeError(f"ranks resumed at different (step, samples seen): {positions}")
    if rank == 0 and meta is not None:
        where = registered.path if choice == REGISTERED else choice
        log.info("resumed from %s: step %d, phase %s, %d samples seen", where, meta["step"], meta["phase"],
                 meta["samples_seen"])
    return choice
