"""The layout of a run folder, and finding its checkpoints: the one owner of what lives where.

    RUN/config.json                   the resolved config the run was started with
    RUN/checkpoint_000001000/         one checkpoint per report (:mod:`inpaint.checkpoint`'s format)
    RUN/tensorboard/                  training events (rank 0); eval/ and eval-baseline-<name>/ hold
                                      the evaluations' scalars
    RUN/samples/step_00001000.png     image grids written while training
    RUN/evaluations/<checkpoint>/     one evaluation: metrics.json (written last), report.md, grid.png,
                                      per_image.csv, and a watcher's CLAIM / UNLOADABLE markers
    RUN/evaluations/baseline-<name>/  a classical baseline under the same protocol
    RUN/skipped_samples.json          training samples lost to damaged data (each replaced)
    RUN/stopped.json                  why the last attempt stopped early (training diverged)
    RUN/sample_keys/attempt-<A>/      with log.sample_keys: the samples each rank trained on, per step

Change a name here and every writer and reader follows: the training loop, the TensorBoard
writer, evaluation, the watcher, ``fill`` and ``--resume`` checks. Works at any storage URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from inpaint import storage
from inpaint.checkpoint import CheckpointError, META_FILE, UnloadableCheckpoint, check_meta_shape
from inpaint.errors import one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_PREFIX = "checkpoint_"
CONFIG = "config.json"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
EVALUATIONS = "evaluations"
SKIPPED_SAMPLES = "skipped_samples.json"
STOPPED = "stopped.json"  # why training stopped before its schedule ended (it diverged); the driver reports it
SAMPLE_KEYS = "sample_keys"  # the log.sample_keys debug hook's records (cluster/sample_keys.py)
EVAL_EVENTS = "eval"  # RUN/tensorboard/eval: a checkpoint's evaluation scalars
CLAIM = "CLAIM"  # RUN/evaluations/<checkpoint>/CLAIM: a watcher is evaluating it
UNLOADABLE = "UNLOADABLE"  # beside CLAIM: it verifies but cannot be loaded; never retried
UNLOADABLE_SUFFIX = ".unloadable"  # RUN/checkpoint_X.unloadable/: moved aside by a resume, with REASON
REASON = "REASON"
MOVED = "MOVED"  # left at the old name of a checkpoint moved aside: where it went and why


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step``: sorts by step as text too."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def baseline_name(method: str) -> str:
    return f"baseline-{method}"


@dataclass(frozen=True)
class RunPaths:
    """Where one run's artefacts live under a storage URL (local or ``s3://``)."""

    storage: str
    name: str

    @classmethod
    def of(cls, run_url: str) -> "RunPaths":
        """The paths of the run folder at ``run_url``."""
        return cls(storage.parent(run_url), storage.name(run_url))

    @property
    def url(self) -> str:
        """The run folder itself."""
        return storage.join(self.storage, self.name)

    @property
    def config(self) -> str:
        return storage.join(self.url, CONFIG)

    @property
    def tensorboard(self) -> str:
        return storage.join(self.url, TENSORBOARD)

    def events(self, folder: str) -> str:
        """A TensorBoard run beside training's, e.g. ``eval`` or ``eval-baseline-telea``."""
        return storage.join(self.tensorboard, folder)

    @property
    def samples(self) -> str:
        return storage.join(self.url, SAMPLES)

    def sample(self, step: int) -> str:
        return storage.join(self.samples, f"step_{step:08d}.png")

    @property
    def sample_pattern(self) -> str:
        """What :meth:`sample`'s files look like, for a person to read (``RUN/samples/step_*.png``)."""
        return storage.join(self.samples, "step_*.png")

    @property
    def checkpoint_pattern(self) -> str:
        """What the run's checkpoint folders look like, for a person to read (``RUN/checkpoint_*``)."""
        return storage.join(self.url, f"{CHECKPOINT_PREFIX}*")

    @property
    def evaluations(self) -> str:
        return storage.join(self.url, EVALUATIONS)

    def evaluation(self, name: str) -> str:
        """RUN/evaluations/<name>: a checkpoint's name, or :func:`baseline_name`."""
        return storage.join(self.evaluations, name)

    @property
    def stopped(self) -> str:
        return storage.join(self.url, STOPPED)

    @property
    def skipped_samples(self) -> str:
        return storage.join(self.url, SKIPPED_SAMPLES)

    @property
    def sample_keys(self) -> str:
        return storage.join(self.url, SAMPLE_KEYS)

    def sample_key_file(self, attempt: int, rank: int, world_size: int, step: int) -> str:
        """One rank's sample-key records of one attempt, up to ``step`` (cluster/sample_keys.py)."""
        return storage.join(self.sample_keys, f"attempt-{attempt}/rank-{rank}-of-{world_size}-to-{step:09d}.json")


def parse_sample_key_file(url: str) -> tuple[int, int, int] | None:
    """(attempt, rank, world size) of a :meth:`RunPaths.sample_key_file` URL; None for any other file."""
    folder, name = url.rstrip("/").rsplit("/", 2)[-2:]
    try:
        attempt = int(folder.removeprefix("attempt-"))
        rank, of, world_size, to, _ = name.removeprefix("rank-").removesuffix(".json").split("-")
        if not folder.startswith("attempt-") or (of, to) != ("of", "to"):
            return None
        return attempt, int(rank), int(world_size)
    except ValueError:
        return None


def is_run_folder(url: str) -> bool:
    """Whether ``url`` is a run folder (has a config.json or a tensorboard/ folder)."""
    paths = RunPaths.of(url)
    return storage.exists(paths.config) or storage.isdir(paths.tensorboard)


def run_of_checkpoint(checkpoint_url: str) -> RunPaths:
    """The run folder a checkpoint folder sits in."""
    return RunPaths.of(storage.parent(checkpoint_url))


def incomplete_files(folder_url: str, meta: dict[str, Any]) -> list[str]:
    """The files ``meta`` lists that the folder holds at another size (one listing, no reads).

    The marker ``meta.json`` is written last, but a copy of the folder to storage (Ray's upload,
    an interrupted sync, a full disk) does not keep that order: a marker beside a file cut short
    is not trusted. A listed file that is absent is left to the loader, which verifies (size and
    sha256) exactly the files it reads: inference needs only the generator and config.
    """
    sizes = storage.file_sizes(folder_url)
    return [name for name, entry in meta.get("files", {}).items()
            if name in sizes and sizes[name] != entry.get("bytes")]


def complete_checkpoints(run_url: str, rejected: list[tuple[str, str]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(URL, meta) of each complete checkpoint directly under a run folder, oldest step first.

    Complete: a meta.json of the right shape, and no file it lists present at another size.
    ``rejected``, when given, receives (URL, reason) of each folder whose marker is not trusted.
    """
    found = []
    for folder in storage.list_subdirs(run_url):
        name = storage.name(folder)
        if name.endswith(UNLOADABLE_SUFFIX):
            continue  # a checkpoint a resume moved aside
        try:
            document = storage.read_json(storage.join(folder, META_FILE))
        except storage.StorageError as exc:  # a FIFO or a huge file named meta.json, unreadable
            log.warning("skipping %s: %s", name, exc)
            continue
        if document is None:
            continue  # not a checkpoint (tensorboard/, evaluations/) or one still being written
        try:
            meta = check_meta_shape(document, name)
        except UnloadableCheckpoint as exc:
            log.warning("skipping %s: %s", name, exc)
            if rejected is not None:
                rejected.append((storage.join(run_url, name), str(exc)))
            continue
        missing = incomplete_files(folder, meta)
        if missing:
            reason = f"incomplete, {', '.join(missing)} of the wrong size"
            log.warning("skipping %s: %s", name, reason)
            if rejected is not None:
                rejected.append((storage.join(run_url, name), reason))
            continue
        found.append((meta.get("step", -1), name, storage.join(run_url, name), meta))
    return [(url, meta) for _, _, url, meta in sorted(found, key=lambda item: item[:2])]


def locate_checkpoints(url: str) -> list[str]:
    """``[url]`` when it is a checkpoint, else the run folder's checkpoints, newest first.

    Callers that load try them in order and skip (with a one-line warning) those that raise
    CheckpointError, so one corrupt newest checkpoint does not block a run folder.
    """
    if storage.isfile(storage.join(url, META_FILE)):
        return [url]
    if not storage.isdir(url):
        raise CheckpointError(f"{url}: no such checkpoint or run folder")
    found = complete_checkpoints(url)
    if not found:
        raise CheckpointError(f"{url}: not a checkpoint, and holds no complete {CHECKPOINT_PREFIX}* folder")
    return [candidate for candidate, _ in reversed(found)]


def load_newest(candidates: Iterable[str], load: Callable[[str], T], *,
                skip: tuple[type[BaseException], ...] = (CheckpointError,),
                on_skip: Callable[[str, BaseException], None] | None = None) -> tuple[str, T] | None:
    """(candidate, ``load(candidate)``) of the first of ``candidates`` (newest first) that loads; None if none does.

    The one walk over "the newest checkpoint that loads": ``fill``, evaluation, serving, the
    launcher's resume check and the training restore (its candidates: the run's checkpoints and
    Ray's registered one) all go through it. A candidate whose ``load`` raises one of ``skip`` is
    handed to ``on_skip`` (default: a one-line warning) and the next older one is tried.
    """
    for candidate in candidates:
        try:
            return candidate, load(candidate)
        except skip as exc:
            if on_skip is None:
                log.warning("skipping %s: %s", storage.name(candidate), one_line(exc, 1000))
            else:
                on_skip(candidate, exc)
    return None


def first_loadable(url: str, load: Callable[[str], T]) -> tuple[str, T]:
    """(checkpoint URL, ``load(URL)``) of the newest checkpoint that ``url`` names that loads.

    A checkpoint URL is loaded as is (its error propagates). For a run folder each checkpoint,
    newest first, is tried (:func:`load_newest`); one raising CheckpointError is skipped with a
    one-line warning, and none loading is a CheckpointError naming the newest one's.
    """
    candidates = locate_checkpoints(url)
    if len(candidates) == 1 and candidates[0] == url:
        return url, load(url)
    errors: list[str] = []

    def skipped(candidate: str, exc: BaseException) -> None:
        log.warning("skipping %s: %s", storage.name(candidate), one_line(exc, 1000))
        errors.append(str(exc))

    found = load_newest(candidates, load, on_skip=skipped)
    if found is None:
        raise CheckpointError(f"{url}: none of its {len(candidates)} checkpoint(s) loads (newest: {errors[0]})")
    return found


def move_aside(checkpoint_url: str, reason: str) -> str:
    """Rename an unloadable checkpoint folder to ``NAME.unloadable`` (``NAME.2.unloadable``, ... when
    taken) with its reason in ``REASON``, leaving ``NAME/MOVED`` that says so; returns the new URL.

    Training that resumes from an older checkpoint would otherwise write over it when it reaches
    its step again: moved aside, nothing is silently replaced and a user can inspect it.
    """
    base = checkpoint_url.rstrip("/")
    target = f"{base}{UNLOADABLE_SUFFIX}"
    number = 1
    while storage.exists(target):
        number += 1
        target = f"{base}.{number}{UNLOADABLE_SUFFIX}"
    storage.move(base, target)
    storage.write_text(storage.join(target, REASON), reason.rstrip() + "\n")
    # A note at the old name: Ray Train may still list the folder and, pruning old checkpoints,
    # fails on a path that no longer exists. Without a meta.json it is never taken for a checkpoint.
    storage.write_text(storage.join(base, MOVED), f"moved to {target}: {reason.rstrip()}\n")
    return target
