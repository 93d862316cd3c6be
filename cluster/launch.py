"""Driver side of a training job: check the request, then run Ray Train's TorchTrainer.

Everything a user can get wrong (recipe, overrides, data URL, storage, worker count) is
checked here, before any worker starts, and reported as a :class:`UserError` with one line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.console import ray_train_log_level
from cluster.ray_runtime import REPO_ROOT, ensure_ray
from cluster.ray_storage import pyarrow_filesystem
from inpaint import recipes, storage
from inpaint.cli import check_run_name
from inpaint.config import RESUMABLE, Config, ConfigError, apply_overrides
from inpaint.errors import one_line
from inpaint.run_folder import RunPaths, complete_checkpoints, load_newest
from inpaint.storage import normalize

log = logging.getLogger("inpaint.launch")


class UserError(Exception):
    """A mistake in the request; the job prints it as one line and exits with code 2."""


MAX_FAILURES = 10_000
# Storage every Ray worker and the driver reach alike: local paths (one machine, or a shared
# mount) and object stores. memory:// lives in one process, and ftp:// and the like are not
# storage Ray Train can write checkpoints to.
SHARED_SCHEMES = ("s3", "gs", "gcs")


def check_shared_url(flag: str, url: str) -> None:
    """UserError unless ``url`` is a non-empty local path or an object-store URL."""
    if not url.strip():
        raise UserError(f"{flag}: expected a path or URL, got {url!r}")
    if storage.is_remote(url):
        scheme = url.split("://", 1)[0]
        if scheme not in SHARED_SCHEMES:
            raise UserError(f"{flag} {url}: {scheme}:// is not supported; use a local path or "
                            f"{', '.join(f'{s}://' for s in SHARED_SCHEMES)}")


def parse_workers(text: str) -> int | tuple[int, int]:
    """``N`` or ``MIN-MAX`` (elastic)."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-", 1))
            if not 1 <= low <= high:
                raise ValueError
            return (low, high) if low != high else low
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise UserError(f"--workers: expected N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}") from None


@dataclass
class TrainRequest:
    config: Config
    storage: str
    name: str
    workers: int | tuple[int, int]
    gpu: bool = False
    max_failures: int = 3
    storage_options: dict = field(default_factory=dict)
    cpus_per_worker: float = 1.0
    resource_timeout_s: float = 0.0
    resize_interval_s: float = 60.0  # elastic runs: how often Ray Train looks for room to grow the group
    evaluate: bool = True  # after training: the final checkpoint beside classical methods on held-out images
    verbose: bool = False  # Ray's own INFO lines and core log lines on the console (cluster/console.py)

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def run(self) -> RunPaths:
        return RunPaths(self.storage, self.name)

    @classmethod
    def create(cls, *, recipe: str, overrides: list[str], data: str | None, storage: str, name: str | None,
               workers: str, gpu: bool = False, max_failures: int = 3, storage_options: dict | None = None,
               cpus_per_worker: float = 1.0, resource_timeout_s: float | None = None,
               resize_interval_s: float = 60.0, evaluate: bool = True, verbose: bool = False,
               default_data: str = "data/sample") -> "TrainRequest":
        """The request a job's flags describe (each argument is the flag of the same name), checked.

        ``data`` None is the built-in sample, packed under ``default_data`` on first use;
        ``resource_timeout_s`` None waits 600 s on a cluster (RAY_ADDRESS set) and not at all locally.
        """
        for flag, url in (("--storage", storage), ("--data", data)):
            if url is not None:
                check_shared_url(flag, url)
        try:
            config = apply_overrides(recipes.get(recipe), overrides)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        if data is None:
            data = ensure_sample_data(str(REPO_ROOT / default_data))
        data = normalize(data)
        # The workers' device follows --gpu (Ray places one GPU per worker); an explicit --set
        # runtime.device that says otherwise is a contradiction, not something to override quietly.
        if any(item.partition("=")[0].strip() == "data.url" for item in overrides):
            raise UserError("--set data.url: the dataset is given with --data (data.url is set from it)")
        asked = [item.partition("=")[2].strip() for item in overrides
                 if item.partition("=")[0].strip() == "runtime.device"]
        if asked and asked[-1] != "auto" and asked[-1].startswith("cuda") != gpu:
            raise UserError(f"--set runtime.device={asked[-1]} contradicts {'--gpu' if gpu else 'no --gpu'}: "
                            "training runs on GPUs exactly when --gpu is given; drop the --set")
        config = config.replace(data=dataclasses.replace(config.data, url=data),
                                runtime=dataclasses.replace(config.runtime, device="cuda" if gpu else "cpu"))
        if name is None:
            name = f"{config.recipe}-{Path(data.rstrip('/')).name}"
        try:
            check_run_name(name)
        except ValueError as exc:
            raise UserError(f"--name: {exc}") from None
        if not -1 <= max_failures <= MAX_FAILURES:
            raise UserError(f"--max-failures: expected -1 (unlimited) or a count from 0 to {MAX_FAILURES}")
        if cpus_per_worker <= 0:
            raise UserError("--cpus-per-worker: must be > 0")
        if resource_timeout_s is None:
            resource_timeout_s = 600.0 if os.environ.get("RAY_ADDRESS") else 0.0
        return cls(config=config, storage=normalize(storage), name=name,
                   workers=parse_workers(str(workers)), gpu=gpu, max_failures=max_failures,
                   storage_options=dict(storage_options or {}), cpus_per_worker=cpus_per_worker,
                   resource_timeout_s=resource_timeout_s, resize_interval_s=resize_interval_s, evaluate=evaluate,
                   verbose=verbose)


def ensure_sample_data(path: str) -> str:
    """Pack the built-in sample dataset to ``path`` on first use."""
    from inpaint.data import pack_dataset

    if not (Path(path) / "index.json").is_file():
        print(f"packing the built-in sample dataset into {path} (first run only)")
        pack_dataset("sample", None, path, progress=True)
    return path


@dataclass
class TrainSummary:
    ok: bool
    run: RunPaths
    step: int | None
    phase: str | None
    checkpoint: str | None
    error: str | None = None
    evaluation: str | None = None  # the final checkpoint beside classical methods, as printed
    report: str | None = None  # its report.md

    def describe(self) -> str:
        lines = [f"run {self.run.name}: " + (f"step {self.step}, phase {self.phase}" if self.ok
                                              else f"FAILED: {self.error}")]
        if self.checkpoint:
            lines.append(f"  latest checkpoint: {self.checkpoint}")
        lines += [f"  checkpoints:       {self.run.checkpoint_pattern}",
                  f"  tensorboard:       tensorboard --logdir {self.run.tensorboard}",
                  f"  sample grids:      {self.run.sample_pattern}",
                  f"  resolved config:   {self.run.config}"]
        if self.report:
            lines.append(f"  evaluation report: {self.report}")
        if self.evaluation:
            lines += ["", self.evaluation]
        return "\n".join(lines)


def evaluate_final(checkpoint: str, request: TrainRequest) -> tuple[str, str | None]:
    """(the comparison table, its report.md) of the final checkpoint beside mean fill, Telea and biharmonic.

    Training has succeeded by now, so a failure here is reported, not raised.
    """
    from cluster import evaluator

    try:
        comparison = evaluator.compare_with_baselines(checkpoint, evaluator.EvaluationRequest(
            storage_options=request.storage_options, device="cuda" if request.gpu else "cpu"))
    except evaluator.USER_ERRORS as exc:
        log.warning("final evaluation failed: %s", exc)
        return f"final evaluation failed: {exc}", None
    from inpaint.evaluation import REPORT_FILE

    return comparison.describe(), storage.join(comparison.model.output, REPORT_FILE)


def _check_data(request: TrainRequest) -> None:
    from inpaint.data import DataError, load_index

    data = request.config.data
    try:
        index = load_index(data.url, request.storage_options or None)
    except DataError as exc:
        raise UserError(str(exc)) from None
    for field_name in ("train_split", "eval_split"):  # the final evaluation reads eval_split
        split = getattr(data, field_name)
        if split not in index.splits:
            raise UserError(f"data.{field_name}: {data.url} has no split {split!r} "
                            f"(splits: {', '.join(sorted(index.splits))})")
    _check_a_shard_reads(index, data.train_split, request.storage_options or None)
    available = index.split_size(data.train_split)
    needed = data.batch_size * (request.workers if isinstance(request.workers, int) else request.workers[1])
    if available < needed:
        raise UserError(f"data {data.url}: split {data.train_split!r} has {available} images, fewer than one "
                        f"batch per worker ({needed}); lower data.batch_size or --workers")


def _check_a_shard_reads(index, split: str, storage_options: dict | None) -> None:
    """UserError unless some shard of ``split`` matches its recorded sha256 and parses.

    Shards are read in order until one is good: one read for a sound dataset. Damaged shards are
    otherwise skipped sample by sample while training, but a dataset with none readable would
    only fail inside every worker, after Ray started, and be restarted --max-failures times.
    """
    import hashlib

    from inpaint.data.shards import parse_shard

    problems = []
    for shard in index.split(split).shards:
        url = index.shard_url(shard)
        try:
            payload = storage.read_bytes(url, storage_options)
        except storage.StorageError as exc:
            problems.append(f"{shard.name}: {exc}")
            continue
        parsed = parse_shard(payload)
        if hashlib.sha256(payload).hexdigest() == shard.sha256 and parsed.error is None and parsed.samples:
            return
        problems.append(f"{shard.name}: damaged ({parsed.error or 'does not match its sha256 in index.json'})")
    raise UserError(f"data {index.url}: none of the {len(problems)} shards of split {split!r} is readable "
                    f"(first: {problems[0] if problems else 'no shards'}); repack the dataset with jobs/make_shards.py")


def _check_vgg_weights(request: TrainRequest) -> None:
    """Fail before training when the contextual loss's VGG16 weights cannot be had."""
    loss = request.config.loss
    if loss.cx_weight == 0 or loss.vgg_weights == "random":
        return
    if loss.vgg_weights == "imagenet" and os.environ.get("RAY_ADDRESS"):
        return  # cluster nodes fetch into their own cache; the driver may not reach the internet
    from inpaint.vgg import VGGWeightsError, load_vgg16_state_dict

    try:
        # Locally this also fills the torch hub cache that the workers then read.
        load_vgg16_state_dict(loss.vgg_weights)
    except VGGWeightsError as exc:
        raise UserError(f"loss.vgg_weights: {exc}") from None


def _existing_config(request: TrainRequest) -> tuple[Config | None, str]:
    """The config this run was started with, and where it is: its config.json, else its newest checkpoint's.

    An unreadable run config.json is an error (the user must decide); an unreadable checkpoint
    config only means that checkpoint will not be resumed from, so the next older one is asked.
    """
    import json

    from inpaint.checkpoint import CONFIG_FILE

    def read(url: str) -> Config:
        return Config.from_dict(json.loads(storage.read_bytes(url)))

    run = request.run
    try:
        try:
            return read(run.config), run.config
        except storage.MissingObject:
            pass
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and ConfigError are ValueErrors
            raise UserError(f"run {request.name}: {run.config} is unreadable ({one_line(exc, 200)}); "
                            "fix or remove it, or use a new --name") from None
        newest_first = [storage.join(url, CONFIG_FILE) for url, _ in reversed(complete_checkpoints(run.url))]
        found = load_newest(newest_first, read, skip=(storage.MissingObject, ValueError, UnicodeDecodeError),
                            on_skip=lambda url, exc: None)  # that checkpoint will not be resumed from either
        if found is not None:
            return found[1], found[0]
    except storage.StorageError as exc:  # unreachable storage, bad credentials, a file where a folder should be
        raise UserError(f"storage {run.url} is not readable or not reachable: {exc}") from None
    return None, ""


def check_resume(request: TrainRequest) -> None:
    """Refuse, before anything is written, to resume a run with a config that changes what it trains."""
    old, where = _existing_config(request)
    if old is None:
        return
    changes = old.resume_changes(request.config)
    if changes:
        raise UserError(f"run {request.name} exists with a different config ({where}): {'; '.join(changes)}. "
                        f"Only {', '.join(RESUMABLE)} may change when resuming; "
                        "use a new --name for a new run")


def _check_placeable(request: TrainRequest) -> None:
    """Fail fast (or wait for the autoscaler) when the minimum worker group cannot be placed."""
    import ray

    need_cpu = request.min_workers * request.cpus_per_worker
    need_gpu = request.min_workers if request.gpu else 0
    deadline = time.monotonic() + request.resource_timeout_s
    asked = False
    while True:
        total = ray.cluster_resources()
        have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
        if have_cpu >= need_cpu and have_gpu >= need_gpu:
            return
        if time.monotonic() >= deadline:
            raise UserError(
                f"cannot place {request.min_workers} worker(s) x {request.cpus_per_worker:g} CPU"
                + (" + 1 GPU" if request.gpu else "")
                + f": the cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs; use fewer --workers, "
                  "a smaller --cpus-per-worker, or a larger cluster")
        if not asked:
            from ray.autoscaler.sdk import request_resources

            bundle = {"CPU": request.cpus_per_worker, **({"GPU": 1} if request.gpu else {})}
            request_resources(bundles=[bundle] * request.min_workers)
            log.info("waiting up to %.0f s for the autoscaler to provide %d worker(s)",
                     request.resource_timeout_s, request.min_workers)
            asked = True
        time.sleep(5)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of reported checkpoints, in the run folder


def _check_ray_snapshot(request: TrainRequest) -> None:
    """Move aside a Ray checkpoint-manager snapshot that Ray could not load (it would raise in fit()).

    The snapshot only repeats what the run folder holds: our checkpoints are found and verified
    from the folder itself (:func:`cluster.restore.load_newest_checkpoint`), so training goes on
    without it. It is renamed, not deleted, and the log says so.
    """
    import json

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    url = storage.join(request.run.url, RAY_SNAPSHOT)
    try:
        raw = storage.read_bytes(url, limit=storage.JSON_LIMIT)
    except storage.MissingObject:
        return
    except storage.StorageError as exc:
        problem = str(exc)
    else:
        try:
            _CheckpointManagerState.parse_obj(json.loads(raw))
            return
        except Exception as exc:  # JSON, pydantic or Ray-version errors: all mean Ray cannot use it
            problem = one_line(exc, 200)
    aside = f"{url}.unloadable"
    try:
        storage.remove(aside)
        storage.move(url, aside)
    except storage.StorageError as exc:
        raise UserError(f"{url}: Ray cannot load this snapshot ({problem}) and it cannot be moved aside "
                        f"({exc}); remove it") from None
    log.warning("%s: Ray cannot load it (%s); moved it to %s, resuming from the run folder's checkpoints",
                url, problem, aside)


def build_trainer(request: TrainRequest):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.train_loop import train_loop_per_worker

    filesystem, storage_path = pyarrow_filesystem(request.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": request.config.to_dict(), "storage": request.storage, "name": request.name,
                           "storage_options": request.storage_options,
                           "threads_per_worker": max(1, int(request.cpus_per_worker)), "verbose": request.verbose},
        torch_config=TorchConfig(backend="nccl" if request.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=request.workers, use_gpu=request.gpu,
                                     resources_per_worker={"CPU": request.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=request.resize_interval_s),
        run_config=RunConfig(
            name=request.name,  # fixed: the same name resumes from the run's latest checkpoint
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=request.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=request.config.checkpoint.keep_last),
            logging_config=LoggingConfig(log_level=ray_train_log_level(request.verbose)),
        ),
    )


def worker_failure(exc: BaseException) -> str:
    """One line for a failed worker group: the lowest rank's root cause (e.g. a full disk while
    saving a checkpoint), not the multi-line traceback Ray's message carries."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures and getattr(exc, "controller_failure", None) is not None:
        failures = {"controller": exc.controller_failure}
    if not failures:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    rank = min(failures) if all(isinstance(r, int) for r in failures) else next(iter(failures))
    root = failures[rank]
    for _ in range(10):  # Ray wraps the worker's exception (RayTaskError -> its cause)
        inner = getattr(root, "cause", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    where = "Ray Train's controller" if rank == "controller" else f"rank {rank}"
    return f"{where}: {type(root).__name__}: {text}"[:500]


def run_training(request: TrainRequest) -> TrainSummary:
    _check_data(request)
    _check_vgg_weights(request)
    check_resume(request)
    try:
        storage.check_writable(request.run.url)
    except storage.StorageError as exc:
        raise UserError(str(exc)) from None
    _check_ray_snapshot(request)
    storage.write_text(request.run.config, request.config.to_json())
    ensure_ray(request.verbose)
    _check_placeable(request)
    import ray.train

    trainer = build_trainer(request)
    schedule = request.config.schedule
    print(f"training {request.name}: recipe {request.config.recipe}, {request.workers} worker(s) on "
          f"{'GPU' if request.gpu else 'CPU'}, {schedule.total_steps} iterations"
          f"{f' of {schedule.reference_batch} samples' if schedule.unit == 'samples' else ''} "
          f"({schedule.generator_steps} generator, {schedule.discriminator_steps} discriminator, "
          f"{schedule.joint_steps} joint); tensorboard --logdir {request.run.tensorboard}", flush=True)
    storage.remove(request.run.stopped)  # a previous attempt's reason; this attempt writes its own
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:  # the workers' errors, or the controller's (a full disk)
        return TrainSummary(ok=False, run=request.run, step=None, phase=None, checkpoint=None,
                            error=f"training failed after {request.max_failures} restart(s): {worker_failure(exc)}")
    stopped = storage.read_json(request.run.stopped)
    diverged = stopped.get("reason") if isinstance(stopped, dict) else None
    # The run folder, not Ray's result, says where the run stands: Ray's record can lag it (a job
    # killed between upload and registration), and a run found finished reports no new checkpoint.
    step = phase = location = None
    found = complete_checkpoints(request.run.url)
    if found:  # the newest complete checkpoint: the one the next resume starts from
        location, meta = found[-1]
        step, phase = meta.get("step"), meta.get("phase")
    if diverged:  # stopped by the training loop: no checkpoint after the divergence, nothing to evaluate
        return TrainSummary(ok=False, run=request.run, step=step, phase=phase, checkpoint=location, error=diverged)
    summary = TrainSummary(ok=True, run=request.run, step=step, phase=phase, checkpoint=location)
    if request.evaluate and location is not None:
        summary.evaluation, summary.report = evaluate_final(location, request)
    return summary
