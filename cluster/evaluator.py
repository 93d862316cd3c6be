"""Evaluation jobs: a checkpoint or a classical baseline under the paper's protocol, and ``--watch``.

One evaluation: resolve the checkpoint (a run folder means its latest), copy its generator,
config and meta to a temporary folder and verify the generator against the meta's sha256, draw
the protocol's images from the dataset index, complete and score them
(in this process, or in Ray tasks over disjoint slices of the drawn set when there are many
images and several workers), then publish report.md, grid.png and per_image.csv, then
metrics.json last: its presence marks the evaluation as done. Scalars also go to the run's
TensorBoard under ``tensorboard/eval`` at the checkpoint's step.

``watch`` evaluates every checkpoint of a run that has no metrics.json yet, oldest first (Ray's
retention deletes the oldest), and with an interval keeps polling until the latest checkpoint's
phase is ``done``. Concurrent watchers never evaluate one checkpoint twice: each first creates
``evaluations/<name>/CLAIM`` exclusively (``O_EXCL`` locally, ``If-None-Match: *`` on S3, which
s3fs sends for mode ``"xb"``); on S3 the claim is also re-read after a pause, for stores that
ignore the condition. The holder rewrites its claim every ``claim_timeout_s / 4`` while it
evaluates (:class:`ClaimHeartbeat`), so a claim not written for ``claim_timeout_s`` is a crashed
evaluator's, however long one evaluation takes; it is taken over by whoever first creates the
takeover marker named after that claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from tqdm import tqdm

from cluster import storage
from inpaint import baselines
from inpaint import checkpoint as ckpt
from inpaint import evaluation as ev
from inpaint.baselines import BaselineError
from inpaint.config import Config, ConfigError, ModelConfig
from inpaint.data import DataError, iter_split, load_index
from inpaint.checkpoint import checkpoint_urls, locate_checkpoint
from inpaint.inference import Inpainter, InpaintError, load_generator_model
from inpaint.masks import uncovered_evaluation_holes
from inpaint.models import build_generator

log = logging.getLogger("inpaint.evaluate")

DEFAULT_IMAGES = 128
RAY_MIN_IMAGES = 2000  # below this, starting Ray costs more than it saves
CLAIM_FILE = "CLAIM"
UNLOADABLE_FILE = "UNLOADABLE"  # beside CLAIM: this checkpoint verifies but cannot be loaded; never retried
CLAIM_TIMEOUT_S = 600.0  # renewed every 150 s while held; a crashed pass's claims are free by the next
                         # CronJob tick (30 min): see k8s/base/evaluate-cronjob.yaml
CLAIM_SETTLE_S = 2.0
EVALUATIONS = "evaluations"
COMPARED_BASELINES = ("mean", "telea", "biharmonic")  # the floor, and the two classical methods to beat


class EvaluationError(Exception):
    """A mistake in the request (no data URL, nothing to evaluate); one line."""


# Everything the job turns into "error: ..." and exit code 2.
USER_ERRORS = (EvaluationError, ConfigError, DataError, ckpt.CheckpointError, storage.StorageError, BaselineError,
               InpaintError)


@dataclass
class EvaluationRequest:
    """How to evaluate, whatever is evaluated."""

    data: str | None = None  # default: the data.url the checkpoint (or run) was trained on
    output: str | None = None  # default: RUN/evaluations/<checkpoint name>
    num_images: int | None = DEFAULT_IMAGES  # None: the whole split
    seed: int = 0
    workers: int = 1
    split: str | None = None  # default: the config's data.eval_split
    storage_options: dict[str, Any] = field(default_factory=dict)
    ray_min_images: int = RAY_MIN_IMAGES
    batch_size: int = 16
    device: str = "auto"


@dataclass
class EvaluationResult:
    output: str
    document: dict[str, Any]

    def headline(self) -> str:
        return (f"evaluation written to {self.output} "
                f"({self.document['protocol']['count']} images, {self.document['elapsed_s']:.1f} s)")

    def describe(self) -> str:
        lines = [self.headline()]
        for kind, figures in self.document["metrics"].items():
            lines.append(f"  {kind:<15} PSNR {figures['psnr']['mean']:6.2f} dB  SSIM {figures['ssim']['mean']:.3f}  "
                         f"hole PSNR {figures['hole_psnr']['mean']:6.2f} dB")
        return "\n".join(lines)


@dataclass
class Subject:
    """What is evaluated: a generator (its config and weights) or a named baseline."""

    info: dict[str, Any]  # checkpoint URL, step, phase, ... or the baseline's name
    model: ModelConfig
    config: Config | None = None
    weights: dict[str, torch.Tensor] | None = None

    def completer(self, device: str) -> ev.Completer:
        if self.weights is None:
            return ev.baseline_completer(baselines.get(self.info["baseline"]))
        generator = build_generator(self.model)
        generator.load_state_dict(self.weights)
        return Inpainter(generator, self.config, device=device).complete


# ------------------------------------------------------------------ loading
def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def load_subject(checkpoint_url: str) -> Subject:
    """Copy a checkpoint's generator, config and meta to a temporary folder, verify and load them.

    The weights are loaded into the generator its config describes, so that a checkpoint that
    verifies but does not load fails here (UnloadableCheckpoint), before any data is read.
    """
    try:
        _, contents = load_generator_model(checkpoint_url)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # any client error: unreachable storage, bad credentials
        raise storage.StorageError(f"{checkpoint_url}: cannot be read ({_reason(exc)})") from None
    meta = contents.meta
    info = {"checkpoint": checkpoint_url, "step": meta.get("step"),
            "phase": meta.get("phase"), "samples_seen": meta.get("samples_seen"),
            "config_digest": meta.get("config_digest"), "recipe": contents.config.recipe}
    return Subject(info, contents.config.model, contents.config, contents.generator)


def resolve_checkpoint(url: str) -> str:
    """The checkpoint URL itself, or the latest checkpoint of a run folder."""
    url = storage.normalize(url)
    try:
        return locate_checkpoint(url)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # any client error: unreachable storage, bad credentials
        raise storage.StorageError(f"{url}: cannot be read ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------ data
def _protocol(subject: Subject, request: EvaluationRequest) -> tuple[ev.Protocol, list[tuple[int, str]]]:
    """The protocol and the drawn (index in split, key) pairs, from the dataset index alone."""
    data = request.data or (subject.config.data.url if subject.config else "")
    if not data:
        raise EvaluationError("no --data given and the checkpoint's config names no data.url")
    split = request.split or (subject.config.data.eval_split if subject.config else "test")
    index = load_index(data, request.storage_options or None)
    keys = index.keys(split)
    if not keys:
        raise EvaluationError(f"{data}: split {split!r} is empty")
    positions = ev.draw_positions(len(keys), request.num_images, request.seed)
    if request.num_images is not None and len(keys) < request.num_images:
        log.info("split %r of %s holds only %d images; evaluating all of them", split, data, len(keys))
    protocol = ev.Protocol(data=data, split=split, seed=request.seed, count=len(positions),
                           image_size=subject.model.image_size, local_size=subject.model.local_size)
    return protocol, [(index_in_split, keys[index_in_split]) for index_in_split in positions]


def _read(protocol: ev.Protocol, part: list[tuple[int, tuple[int, str]]],
          storage_options: dict[str, Any]) -> Iterator[ev.Sample]:
    """(position in the drawn set, key, uint8 image) for a slice of the drawn set; only its shards are read."""
    position_of = {key: position for position, (_, key) in part}
    for key, image in iter_split(protocol.data, protocol.split, protocol.image_size,
                                 storage_options=storage_options or None, keys=position_of):
        yield position_of[key], key, image


def _evaluate_part(subject: Subject, protocol: ev.Protocol, part: list, request: EvaluationRequest) -> ev.Scores:
    """Score one slice of the drawn set (run in this process or as a Ray task)."""
    return ev.evaluate_samples(subject.completer(request.device), _read(protocol, part, request.storage_options),
                               protocol, batch_size=request.batch_size)


def _score(subject: Subject, protocol: ev.Protocol, drawn: list[tuple[int, str]],
           request: EvaluationRequest) -> tuple[ev.Scores, int]:
    """Scores of the whole drawn set and the number of workers used."""
    numbered = list(enumerate(drawn))
    if request.workers <= 1 or len(numbered) <= request.ray_min_images:
        with tqdm(total=len(numbered), desc="evaluate", unit="img") as bar:
            scores = ev.evaluate_samples(subject.completer(request.device),
                                         _read(protocol, numbered, request.storage_options),
                                         protocol, batch_size=request.batch_size, progress=bar.update)
        return scores, 1
    return _score_with_ray(subject, protocol, numbered, request), request.workers


def _score_with_ray(subject: Subject, protocol: ev.Protocol, numbered: list, request: EvaluationRequest) -> ev.Scores:
    """One disjoint contiguous slice per worker as a Ray task (contiguous: each reads few shards); gathered once."""
    import ray

    from cluster.launch import ensure_ray

    ensure_ray()
    count = min(len(numbered), request.workers)
    bounds = [round(i * len(numbered) / count) for i in range(count + 1)]
    task = ray.remote(num_cpus=1)(_evaluate_part)
    subject_ref = ray.put(subject)
    pending = {task.remote(subject_ref, protocol, numbered[a:b], request): b - a for a, b in zip(bounds, bounds[1:])}
    order = list(pending)
    log.info("evaluating %d images in %d Ray tasks", len(numbered), count)
    with tqdm(total=len(numbered), desc="evaluate (ray)", unit="img") as bar:
        remaining = list(pending)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            bar.update(pending[done[0]])
    scores = ev.Scores()
    for part in ray.get(order):
        scores = scores.merge(part)
    return scores


# ------------------------------------------------------------------ outputs
def _read_json(url: str) -> dict[str, Any] | None:
    fs, path = storage.fsspec_filesystem(url)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def previous_evaluations(output: str) -> list[dict[str, Any]]:
    """metrics.json of the other evaluations beside ``output`` (e.g. RUN/evaluations/*)."""
    found = []
    for folder in storage.list_subdirs(_parent(output)):
        if folder.rstrip("/") != output.rstrip("/"):
            document = _read_json(storage.join(folder, ev.METRICS_FILE))
            if document is not None and "metrics" in document:
                found.append(document)
    return found


def publish(output: str, document: dict[str, Any], scores: ev.Scores) -> None:
    """Write every file to ``output``; metrics.json last, since it marks the evaluation done."""
    previous = previous_evaluations(output)
    with tempfile.TemporaryDirectory(prefix="inpaint-eval-out-") as tmp:
        ev.write_outputs(tmp, document, scores, previous)
        storage.upload_dir(tmp, output)
    storage.write_text(storage.join(output, ev.METRICS_FILE), ev.metrics_json(document))


def _is_run_folder(url: str) -> bool:
    fs, path = storage.fsspec_filesystem(url)
    return fs.exists(f"{path}/config.json") or fs.isdir(f"{path}/tensorboard")


def log_to_tensorboard(run_url: str, document: dict[str, Any], folder: str = "eval") -> None:
    """Scalars into RUN/tensorboard/<folder> (written locally, then uploaded when the run is remote)."""
    target = storage.join(run_url, "tensorboard", folder)
    if not storage.is_remote(target):
        ev.log_scalars(target, document)
        return
    with tempfile.TemporaryDirectory(prefix="inpaint-eval-tb-") as tmp:
        ev.log_scalars(tmp, document)
        storage.upload_dir(tmp, target)


# ------------------------------------------------------------------ one evaluation
def evaluate_subject(subject: Subject, request: EvaluationRequest, output: str) -> EvaluationResult:
    """Run the protocol on a loaded subject and publish its outputs to ``output``."""
    protocol, drawn = _protocol(subject, request)
    storage.check_writable(output)  # before the work, not after it
    untrained = []
    if subject.config is not None and subject.weights is not None:
        untrained = uncovered_evaluation_holes(subject.config.mask, protocol.image_size, protocol.local_size,
                                               protocol.kinds)
        if untrained:
            log.warning("training drew no hole as large as %s (mask.max_side %.2f): those figures measure "
                        "extrapolation", ", ".join(untrained), subject.config.mask.max_side)
    log.info("evaluating %s on %d images of %s split %r", subject.info.get("checkpoint") or subject.info["baseline"],
             protocol.count, protocol.data, protocol.split)
    start = time.perf_counter()
    scores, workers = _score(subject, protocol, drawn, request)
    if not scores.rows:
        raise EvaluationError(f"{protocol.data}: none of the {protocol.count} drawn images is readable")
    elapsed_s = time.perf_counter() - start
    document = ev.metrics_document(subject.info, protocol, scores, elapsed_s=elapsed_s, workers=workers)
    if untrained:
        document["untrained_holes"] = untrained
    publish(output, document, scores)
    if subject.weights is not None:
        run_url = _parent(subject.info["checkpoint"])
        if _is_run_folder(run_url):
            log_to_tensorboard(run_url, document)
    return EvaluationResult(output, document)


def resolve_subject(url: str) -> tuple[str, Subject]:
    """(checkpoint URL, loaded subject) of a checkpoint, or of a run folder's newest checkpoint that loads."""
    url = storage.normalize(url)
    try:
        return ckpt.first_loadable(url, load_subject)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # any client error: unreachable storage, bad credentials
        raise storage.StorageError(f"{url}: cannot be read ({_reason(exc)})") from None


def evaluate_checkpoint(url: str, request: EvaluationRequest) -> EvaluationResult:
    """Evaluate one checkpoint (or a run folder's newest that loads) under the protocol."""
    checkpoint_url, subject = resolve_subject(url)
    output = storage.normalize(request.output) if request.output else storage.join(
        _parent(checkpoint_url), EVALUATIONS, _name(checkpoint_url))
    return evaluate_subject(subject, request, output)


def evaluate_baseline(name: str, request: EvaluationRequest, checkpoint: str | None = None) -> EvaluationResult:
    """The protocol on a classical method; a checkpoint (or run) URL lends its image size, data and run folder."""
    baselines.get(name)  # fail before any data is read when the method cannot run here
    subject = Subject({"baseline": name}, ModelConfig())
    output = storage.normalize(request.output) if request.output else None
    if checkpoint is not None:
        checkpoint_url, loaded = resolve_subject(checkpoint)
        subject = Subject({"baseline": name}, loaded.model, loaded.config)
        output = output or storage.join(_parent(checkpoint_url), EVALUATIONS, f"baseline-{name}")
    if output is None:
        raise EvaluationError("--baseline without --checkpoint needs --output")
    return evaluate_subject(subject, request, output)


@dataclass
class Comparison:
    """A checkpoint and classical methods evaluated on the same images and holes."""

    model: EvaluationResult
    baselines: list[EvaluationResult]
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why it could not run here

    def describe(self) -> str:
        documents = [self.model.document, *(result.document for result in self.baselines)]
        lines = [self.model.headline(), "",
                 "hole PSNR (dB), held-out images, same holes for every method:",
                 *ev.comparison_table(documents), "", "whole-image PSNR (dB):",
                 *ev.comparison_table(documents, "psnr"), "", "whole-image SSIM:",
                 *ev.comparison_table(documents, "ssim", 3)]
        lines += [f"baseline {name} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _baseline_done(output: str, protocol: dict[str, Any]) -> EvaluationResult | None:
    document = _read_json(storage.join(output, ev.METRICS_FILE))
    if document is not None and "metrics" in document and ev.same_protocol(document.get("protocol", {}), protocol):
        return EvaluationResult(output, document)
    return None


def compare_with_baselines(url: str, request: EvaluationRequest,
                           names: tuple[str, ...] = COMPARED_BASELINES) -> Comparison:
    """Evaluate a checkpoint (or a run's newest) and each classical method under one protocol.

    The baselines go first, into RUN/evaluations/baseline-<name> (kept and reused while the
    protocol is the same), so that the checkpoint's report.md lists them beside its own figures;
    their scalars go to RUN/tensorboard/eval-baseline-<name> at the checkpoint's step, a flat
    line to read the model's eval curves against. A method that cannot run here is skipped.
    """
    checkpoint_url, subject = resolve_subject(url)
    run_url = _parent(checkpoint_url)
    protocol, _ = _protocol(subject, request)
    done, skipped = [], {}
    for name in names:
        output = storage.join(run_url, EVALUATIONS, f"baseline-{name}")
        result = _baseline_done(output, protocol.to_dict())
        if result is None:
            try:
                baselines.get(name)
            except BaselineError as exc:
                skipped[name] = str(exc)
                continue
            result = evaluate_subject(Subject({"baseline": name}, subject.model, subject.config),
                                      replace(request, output=None), output)
        if _is_run_folder(run_url):
            log_to_tensorboard(run_url, {**result.document, "step": subject.info["step"]}, f"eval-baseline-{name}")
        done.append(result)
    output = storage.join(run_url, EVALUATIONS, _name(checkpoint_url))
    return Comparison(evaluate_subject(subject, replace(request, output=None), output), done, skipped)


# ------------------------------------------------------------------ claims
def _claim_record(owner: str) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "claimed_at": time.time()}).encode()


def _create_exclusive(fs, path: str, payload: bytes) -> bool:
    """Create ``path`` only if it does not exist; False when someone else did first."""
    try:
        with fs.open(path, "xb") as f:
            f.write(payload)
    except FileExistsError:
        return False
    return True


def claim(folder: str, owner: str, *, timeout_s: float = CLAIM_TIMEOUT_S, settle_s: float = CLAIM_SETTLE_S) -> bool:
    """Whether ``owner`` now holds the claim on an evaluation folder (see the module doc)."""
    fs, path = storage.fsspec_filesystem(folder)
    storage.makedirs(fs, path)
    claim_path = f"{path}/{CLAIM_FILE}"
    record = _claim_record(owner)
    if not _create_exclusive(fs, claim_path, record):
        try:
            held = fs.cat_file(claim_path)
            age = time.time() - fs.modified(claim_path).timestamp()
        except FileNotFoundError:
            return False  # released just now; the next poll may take it
        if age < timeout_s:
            return False
        # Everyone who saw this stale claim races for one marker named after it; one wins.
        marker = f"{claim_path}.takeover-{hashlib.sha256(held).hexdigest()[:16]}"
        if not _create_exclusive(fs, marker, record):
            return False
        log.warning("taking over %s, stale for %.0f s (%s)", claim_path, age, held.decode(errors="replace"))
        with fs.open(claim_path, "wb") as f:
            f.write(record)
    if storage.is_remote(folder):
        time.sleep(settle_s)  # a store that ignored If-None-Match keeps the last writer: check it is us
        if json.loads(fs.cat_file(claim_path)).get("owner") != owner:
            return False
    return True


def release(folder: str) -> None:
    """Drop a claim so that a later poll can evaluate the folder's checkpoint again."""
    fs, path = storage.fsspec_filesystem(folder)
    fs.rm(f"{path}/{CLAIM_FILE}")


class ClaimHeartbeat:
    """Renews a held claim every ``timeout_s / 4`` seconds from a background thread, until stopped.

    A claim is stale when its CLAIM file has not been written for ``timeout_s``; rewriting it while
    the evaluation runs means only a holder that died (or froze for a whole timeout) loses it, however
    long one evaluation takes. A renewal first re-reads the claim: one that another owner took over
    is left alone (``lost``). ``stop`` waits for a renewal in flight, so a release after it is final.
    Use as a context manager (stops on exit) around the work done under the claim.
    """

    def __init__(self, folder: str, owner: str, timeout_s: float):
        self.folder, self.owner = folder, owner
        self.every_s = max(timeout_s / 4, 0.001)
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"claim-heartbeat-{_name(folder)}", daemon=True)

    def __enter__(self) -> "ClaimHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:  # no renewal is half done once this returns
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    if not self._renew():
                        return
                except Exception as exc:  # a store hiccup: the next beat tries again, well within the timeout
                    log.warning("could not renew the claim on %s (%s)", self.folder, _reason(exc))

    def _renew(self) -> bool:
        fs, path = storage.fsspec_filesystem(self.folder)
        claim_path = f"{path}/{CLAIM_FILE}"
        try:
            holder = json.loads(fs.cat_file(claim_path)).get("owner")
        except FileNotFoundError:
            holder = None
        if holder != self.owner:
            self.lost = True
            log.warning("the claim on %s is no longer ours (held by %s); stopped renewing it", self.folder, holder)
            return False
        with fs.open(claim_path, "wb") as f:
            f.write(_claim_record(self.owner))
        self.renewals += 1
        return True


# ------------------------------------------------------------------ watch
@dataclass
class WatchSummary:
    evaluated: list[str] = field(default_factory=list)  # checkpoint names, in order
    skipped: list[str] = field(default_factory=list)  # deleted before they could be evaluated
    unloadable: list[str] = field(default_factory=list)  # verified but could not be loaded; marked, not retried
    polls: int = 0
    finished: bool = False

    def describe(self) -> str:
        state = "run finished" if self.finished else "run not finished"
        return (f"watch: {state} after {self.polls} poll(s); evaluated {len(self.evaluated)} checkpoint(s)"
                + (f": {', '.join(self.evaluated)}" if self.evaluated else "")
                + (f"; skipped {len(self.skipped)} deleted: {', '.join(self.skipped)}" if self.skipped else "")
                + (f"; skipped {len(self.unloadable)} unloadable: {', '.join(self.unloadable)}"
                   if self.unloadable else ""))


def run_data_url(run_url: str) -> str:
    """data.url of the run's config.json, for a watcher given no --data."""
    try:
        document = _read_json(storage.join(run_url, "config.json"))
    except Exception as exc:  # any client error: no credentials, unreachable endpoint, no such bucket
        raise storage.StorageError(f"{run_url}: cannot be read ({_reason(exc)})") from None
    if document is None:
        raise EvaluationError(f"{run_url}: no config.json to take the data URL from; pass --data")
    url = Config.from_dict(document).data.url
    if not url:
        raise EvaluationError(f"{run_url}/config.json names no data.url; pass --data")
    return url


def _list_checkpoints(run_url: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        checkpoints = checkpoint_urls(run_url)
    except Exception as exc:  # any client error: unreachable storage, bad credentials
        raise storage.StorageError(f"{run_url}: cannot be listed ({_reason(exc)})") from None
    if not checkpoints:
        log.info("no checkpoint under %s yet", run_url)
    return checkpoints


def _evaluate_claimed(checkpoint_url: str, folder: str, request: EvaluationRequest, summary: WatchSummary,
                      heartbeat: ClaimHeartbeat) -> None:
    """Evaluate a claimed checkpoint; a deleted one is skipped, an incomplete one released for later.

    ``heartbeat`` renews the claim meanwhile; it is stopped before any release, so that a renewal
    cannot recreate a released CLAIM.
    """
    name = _name(checkpoint_url)

    def release_claim() -> None:
        heartbeat.stop()
        release(folder)

    try:
        subject = load_subject(checkpoint_url)
    except ckpt.UnloadableCheckpoint as exc:
        log.warning("skipping %s: %s", name, exc)
        storage.write_text(storage.join(folder, UNLOADABLE_FILE), f"{exc}\n")
        release_claim()
        summary.unloadable.append(name)
        return
    except (ckpt.CheckpointError, storage.StorageError) as exc:
        fs, path = storage.fsspec_filesystem(checkpoint_url)
        if fs.exists(f"{path}/{ckpt.META_FILE}"):
            log.warning("%s is not complete yet (%s); will retry on the next poll", name, _reason(exc))
            release_claim()
        else:
            log.warning("%s was deleted (checkpoint retention?) before it could be evaluated; skipped", name)
            summary.skipped.append(name)
        return
    try:
        result = evaluate_subject(subject, replace(request, output=folder), folder)
    except BaseException:
        release_claim()  # let a later poll, or another watcher, try again
        raise
    log.info("%s", result.describe())
    summary.evaluated.append(name)


def watch(run_url: str, request: EvaluationRequest, *, interval: float | None = None, max_polls: int | None = None,
          claim_timeout_s: float = CLAIM_TIMEOUT_S, settle_s: float = CLAIM_SETTLE_S,
          owner: str | None = None) -> WatchSummary:
    """Evaluate each not yet evaluated checkpoint of a run; with ``interval``, poll until the run is done."""
    run_url = storage.normalize(run_url)
    if not request.data:
        request = replace(request, data=run_data_url(run_url))
    owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    summary = WatchSummary()
    while True:
        summary.polls += 1
        checkpoints = _list_checkpoints(run_url)
        for checkpoint_url, _ in checkpoints:
            folder = storage.join(run_url, EVALUATIONS, _name(checkpoint_url))
            fs, path = storage.fsspec_filesystem(folder)
            if fs.exists(f"{path}/{ev.METRICS_FILE}") or fs.exists(f"{path}/{UNLOADABLE_FILE}"):
                continue
            if not claim(folder, owner, timeout_s=claim_timeout_s, settle_s=settle_s):
                log.info("%s is claimed by another evaluator; leaving it", _name(checkpoint_url))
                continue
            with ClaimHeartbeat(folder, owner, claim_timeout_s) as heartbeat:
                _evaluate_claimed(checkpoint_url, folder, request, summary, heartbeat)
        summary.finished = bool(checkpoints) and checkpoints[-1][1].get("phase") == "done"
        if interval is None or summary.finished or (max_polls is not None and summary.polls >= max_polls):
            return summary
        log.info("waiting %.0f s for new checkpoints of %s", interval, run_url)
        time.sleep(interval)
