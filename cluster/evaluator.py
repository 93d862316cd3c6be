"""One evaluation: a checkpoint or a classical baseline under the paper's protocol.

Resolve the checkpoint (a run folder means its newest that loads) and load its generator through
the path inference uses (:func:`inpaint.inference.load_generator_model`: fetch, verify against
meta.json, build), draw the protocol's images from the dataset index, complete and score them
(in this process, or in Ray tasks over disjoint slices of the drawn set when there are many
images and several workers), then publish report.md, grid.png and per_image.csv, then
metrics.json last: its presence marks the evaluation as done. A model is scored raw and
post-processed (GLCIC's Poisson blending, what ``fill`` gives) on the same images and holes, with
its averaged weights unless the request says ``weights="raw"``. Scalars also go to the run's
TensorBoard at the checkpoint's step: ``tensorboard/eval`` (raw) and ``tensorboard/eval-postprocessed``.
Watching a run for new checkpoints is :mod:`cluster.watcher`'s; where each file goes, :mod:`inpaint.run_folder`'s.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from tqdm import tqdm

from cluster.ray_runtime import ensure_ray
from inpaint import baselines
from inpaint import checkpoint as ckpt
from inpaint import evaluation as ev
from inpaint import storage
from inpaint.baselines import BaselineError
from inpaint.config import Config, ConfigError, ModelConfig
from inpaint.data import DataError, iter_split, load_index
from inpaint.inference import WEIGHTS, Inpainter, InpaintError, load_generator_model, postprocess
from inpaint.masks import uncovered_evaluation_holes
from inpaint.models import Generator
from inpaint.run_folder import EVAL_EVENTS, EVALUATIONS, RunPaths, baseline_name, first_loadable, is_run_folder, \
    run_of_checkpoint
from inpaint.tensorboard import eval_scalars, write_scalars

log = logging.getLogger("inpaint.evaluate")

DEFAULT_IMAGES = 128
RAY_MIN_IMAGES = 2000  # below this, starting Ray costs more than it saves
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
    weights: str = "ema"  # the averaged generator where the checkpoint has one, or "raw"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise EvaluationError(f"weights: must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")


@dataclass
class EvaluationResult:
    output: str
    document: dict[str, Any]
    reused: bool = False  # read back from an earlier evaluation under the same protocol, not re-run

    def headline(self) -> str:
        count, seconds = self.document['protocol']['count'], self.document['elapsed_s']
        if self.reused:
            return f"evaluation already in {self.output} ({count} images, evaluated earlier in {seconds:.1f} s)"
        return f"evaluation written to {self.output} ({count} images, {seconds:.1f} s)"

    def describe(self) -> str:
        lines = [self.headline()]
        post = self.document.get("metrics_postprocessed") or {}
        for kind, figures in self.document["metrics"].items():
            lines.append(f"  {kind:<15} PSNR {figures['psnr']['mean']:6.2f} dB  SSIM {figures['ssim']['mean']:.3f}  "
                         f"hole PSNR {figures['hole_psnr']['mean']:6.2f} dB"
                         + (f"  post-processed: hole PSNR {post[kind]['hole_psnr']['mean']:6.2f} dB" if kind in post
                            else ""))
        return "\n".join(lines)


@dataclass
class Subject:
    """What is evaluated: a generator (its config and weights) or a named baseline."""

    info: dict[str, Any]  # checkpoint URL, step, phase, ... or the baseline's name
    model: ModelConfig
    config: Config | None = None
    generator: Generator | None = None  # None for a baseline

    def completer(self, device: str) -> ev.Completer:
        if self.generator is None:
            return ev.baseline_completer(baselines.get(self.info["baseline"]))
        return Inpainter(self.generator, self.config, device=device).complete

    @property
    def postprocessor(self) -> ev.Postprocessor | None:
        """A model's completions are also scored post-processed; a baseline's are final."""
        return postprocess if self.generator is not None else None


# ------------------------------------------------------------------ loading
def load_subject(checkpoint_url: str, weights: str = "ema") -> Subject:
    """Copy a checkpoint's generator, config and meta to a temporary folder, verify and load them.

    The weights are loaded into the generator its config describes, so that a checkpoint that
    verifies but does not load fails here (UnloadableCheckpoint), before any data is read.
    """
    generator, contents = load_generator_model(checkpoint_url, weights)
    meta = contents.meta
    info = {"checkpoint": checkpoint_url, "weights": meta["weights"], "step": meta.get("step"),
            "phase": meta.get("phase"), "samples_seen": meta.get("samples_seen"),
            "config_digest": meta.get("config_digest"), "recipe": contents.config.recipe}
    return Subject(info, contents.config.model, contents.config, generator)


# ------------------------------------------------------------------ data
Planned = tuple[ev.Protocol, list[tuple[int, str]]]  # the protocol and its drawn (index in split, key)


def _protocol(subject: Subject, request: EvaluationRequest) -> Planned:
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
                               protocol, batch_size=request.batch_size, postprocess=subject.postprocessor)


def _score(subject: Subject, protocol: ev.Protocol, drawn: list[tuple[int, str]],
           request: EvaluationRequest) -> tuple[ev.Scores, int]:
    """Scores of the whole drawn set and the number of workers used."""
    numbered = list(enumerate(drawn))
    if request.workers <= 1 or len(numbered) <= request.ray_min_images:
        with tqdm(total=len(numbered), desc="evaluate", unit="img") as bar:
            scores = ev.evaluate_samples(subject.completer(request.device),
                                         _read(protocol, numbered, request.storage_options),
                                         protocol, batch_size=request.batch_size, progress=bar.update,
                                         postprocess=subject.postprocessor)
        return scores, 1
    return _score_with_ray(subject, protocol, numbered, request), request.workers


def _score_with_ray(subject: Subject, protocol: ev.Protocol, numbered: list, request: EvaluationRequest) -> ev.Scores:
    """One disjoint contiguous slice per worker as a Ray task (contiguous: each reads few shards); gathered once."""
    import ray

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
def previous_evaluations(output: str) -> list[dict[str, Any]]:
    """metrics.json of the other evaluations beside ``output`` (e.g. RUN/evaluations/*)."""
    found = []
    for folder in storage.list_subdirs(storage.parent(output)):
        if folder.rstrip("/") != output.rstrip("/"):
            document = storage.read_json(storage.join(folder, ev.METRICS_FILE))
            if isinstance(document, dict) and "metrics" in document:
                found.append(document)
    return found


def publish(output: str, document: dict[str, Any], scores: ev.Scores) -> None:
    """Write every file to ``output``; metrics.json last, since it marks the evaluation done."""
    previous = previous_evaluations(output)
    with tempfile.TemporaryDirectory(prefix="inpaint-eval-out-") as tmp:
        ev.write_outputs(tmp, document, scores, previous)
        storage.upload_dir(tmp, output)
    storage.write_text(storage.join(output, ev.METRICS_FILE), ev.metrics_json(document))


def log_to_tensorboard(run_url: str, document: dict[str, Any], folder: str = EVAL_EVENTS) -> None:
    """Scalars into RUN/tensorboard/<folder>; a model's post-processed figures into
    <folder>-postprocessed, under the same tags (inpaint.tensorboard, the one writer)."""
    parts = [(folder, "metrics")]
    if document.get("metrics_postprocessed"):
        parts.append((f"{folder}-postprocessed", "metrics_postprocessed"))
    for name, key in parts:
        write_scalars(RunPaths.of(run_url).events(name), eval_scalars(document, key), document["step"])


# ------------------------------------------------------------------ one evaluation
def evaluate_subject(subject: Subject, request: EvaluationRequest, output: str,
                     planned: Planned | None = None) -> EvaluationResult:
    """Run the protocol on a loaded subject and publish its outputs to ``output``.

    ``planned``: the protocol and draw already made for this request and image size (one read of
    the dataset index serves every method of a comparison).
    """
    protocol, drawn = planned or _protocol(subject, request)
    if storage.name(storage.parent(output)) == EVALUATIONS:  # RUN/evaluations/<name>: never lead out of the run
        storage.refuse_links(output, levels=2)
    storage.check_writable(output)  # before the work, not after it
    untrained = []
    if subject.config is not None and subject.generator is not None:
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
    if subject.generator is not None:
        run_url = run_of_checkpoint(subject.info["checkpoint"]).url
        if is_run_folder(run_url):
            log_to_tensorboard(run_url, document)
    return EvaluationResult(output, document)


def resolve_subject(url: str, weights: str = "ema") -> tuple[str, Subject]:
    """(checkpoint URL, loaded subject) of a checkpoint, or of a run folder's newest checkpoint that loads."""
    return first_loadable(storage.normalize(url), lambda found: load_subject(found, weights))


def _output_name(checkpoint_url: str, subject: Subject, request: EvaluationRequest) -> str:
    """RUN/evaluations/<checkpoint>, or <checkpoint>-raw when the raw weights were asked for beside an
    average (the default evaluation of the same checkpoint keeps its folder)."""
    asked_raw = request.weights == "raw" and subject.config is not None and subject.config.model.ema_decay > 0
    return storage.name(checkpoint_url) + ("-raw" if asked_raw else "")


def evaluate_checkpoint(url: str, request: EvaluationRequest) -> EvaluationResult:
    """Evaluate one checkpoint (or a run folder's newest that loads) under the protocol."""
    checkpoint_url, subject = resolve_subject(url, request.weights)
    output = storage.normalize(request.output) if request.output else \
        run_of_checkpoint(checkpoint_url).evaluation(_output_name(checkpoint_url, subject, request))
    return evaluate_subject(subject, request, output)


def evaluate_baseline(name: str, request: EvaluationRequest, checkpoint: str | None = None) -> EvaluationResult:
    """The protocol on a classical method; a checkpoint (or run) URL lends its image size, data and run folder."""
    baselines.get(name)  # fail before any data is read when the method cannot run here
    subject = Subject({"baseline": name}, ModelConfig())
    output = storage.normalize(request.output) if request.output else None
    if checkpoint is not None:
        checkpoint_url, loaded = resolve_subject(checkpoint)
        subject = Subject({"baseline": name}, loaded.model, loaded.config)
        output = output or run_of_checkpoint(checkpoint_url).evaluation(baseline_name(name))
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
                 *ev.comparison_table(documents), ev.best_methods(documents), "", "whole-image PSNR (dB):",
                 *ev.comparison_table(documents, "psnr"), "", "whole-image SSIM:",
                 *ev.comparison_table(documents, "ssim", 3)]
        lines += [f"baseline {name} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _baseline_done(output: str, protocol: dict[str, Any]) -> EvaluationResult | None:
    document = storage.read_json(storage.join(output, ev.METRICS_FILE))
    if isinstance(document, dict) and "metrics" in document and ev.same_protocol(document.get("protocol", {}), protocol):
        return EvaluationResult(output, document, reused=True)
    return None


def compare_with_baselines(url: str, request: EvaluationRequest,
                           names: tuple[str, ...] = COMPARED_BASELINES) -> Comparison:
    """Evaluate a checkpoint (or a run's newest) and each classical method under one protocol.

    The baselines go first, into RUN/evaluations/baseline-<name> (kept and reused while the
    protocol is the same), so that the checkpoint's report.md lists them beside its own figures;
    their scalars go to RUN/tensorboard/eval-baseline-<name> at the checkpoint's step, a flat
    line to read the model's eval curves against. A method that cannot run here is skipped.
    """
    checkpoint_url, subject = resolve_subject(url, request.weights)
    run = run_of_checkpoint(checkpoint_url)
    planned = _protocol(subject, request)
    protocol = planned[0]
    model_output = run.evaluation(_output_name(checkpoint_url, subject, request))
    finished = _baseline_done(model_output, protocol.to_dict())
    if finished is not None:
        # Re-running a finished run: its final evaluation (and the baselines beside it) stand as written.
        previous = [found for name in names
                    if (found := _baseline_done(run.evaluation(baseline_name(name)), protocol.to_dict())) is not None]
        log.info("%s was already evaluated under this protocol (%s); nothing re-evaluated", storage.name(checkpoint_url),
                 model_output)
        return Comparison(finished, previous)
    done, skipped = [], {}
    for name in names:
        output = run.evaluation(baseline_name(name))
        result = _baseline_done(output, protocol.to_dict())
        if result is None:
            try:
                baselines.get(name)
            except BaselineError as exc:
                skipped[name] = str(exc)
                continue
            result = evaluate_subject(Subject({"baseline": name}, subject.model, subject.config),
                                      replace(request, output=None), output, planned)
        if is_run_folder(run.url):
            log_to_tensorboard(run.url, {**result.document, "step": subject.info["step"]}, f"eval-{baseline_name(name)}")
        done.append(result)
    return Comparison(evaluate_subject(subject, replace(request, output=None), model_output, planned), done, skipped)
