"""The function every Ray Train worker runs: restore, train, report checkpoints and metrics.

The Ray layer only moves things: it restores ``ray.train.get_checkpoint()`` into the
:class:`inpaint.trainer.Trainer`, wraps the networks in DDP, and hands the directories that
``Trainer.save`` writes to ``ray.train.report``. Rank 0 writes checkpoints and TensorBoard;
every rank calls ``report`` at the same steps (it is a barrier).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointUploadMode

from cluster import console
from cluster.console import ThroughputMeter, progress_line
from cluster.restore import restore_latest
from cluster.sample_keys import SampleKeyLog, attempt_id
from inpaint import storage
from inpaint.config import Config
from inpaint.data import TrainLoader, make_train_loader
from inpaint.distributed import CheckpointCadence, broadcast_object, gather_objects, prepare_for_training
from inpaint.phases import Phase
from inpaint.run_folder import RunPaths, checkpoint_name
from inpaint.tensorboard import RunWriter
from inpaint.trainer import Trainer

log = logging.getLogger("inpaint.train")

PHASE_INDEX = {Phase.GENERATOR: 0, Phase.DISCRIMINATOR: 1, Phase.JOINT: 2, Phase.DONE: 3}


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class UploadGate:
    """At most one checkpoint upload in flight: rank 0 waits for the previous one before saving the next.

    Ray uploads an ASYNC checkpoint in one background thread and deletes its directory when done.
    Unbounded, a store slower than the checkpoint rate builds a backlog on local disk that a restart
    (a resize, a lost node) throws away: measured here, a group that reported 50 checkpoints restarted
    from the 1st. With the gate a restart loses at most the one checkpoint still uploading, and a run
    that checkpoints every 15 minutes never waits.
    """

    def __init__(self, *, poll_s: float = 0.05, warn_after_s: float = 60.0) -> None:
        self.pending: str | None = None
        self.poll_s = poll_s
        self.warn_after_s = warn_after_s

    def wait(self) -> None:
        """Until the previous checkpoint's directory is gone (uploaded). A failed upload ends the worker
        group (Ray raises it in the training thread), so this does not wait forever."""
        start, warned = time.monotonic(), False
        while self.pending is not None and os.path.exists(self.pending):
            if not warned and time.monotonic() - start > self.warn_after_s:
                log.warning("waiting for the upload of the previous checkpoint (%s) before the next", self.pending)
                warned = True
            time.sleep(self.poll_s)
        self.pending = None

    def started(self, directory: str) -> None:
        self.pending = directory


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = Config.from_dict(loop_config["config"])
    run = RunPaths(loop_config["storage"], loop_config["name"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    console.configure_worker(rank, bool(loop_config.get("verbose")))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    # Where each rank runs: after a node loss or a resize, the log shows the new group's placement.
    log.debug("rank %d of %d on node %s", rank, world_size, ray.get_runtime_context().get_node_id())
    trainer = Trainer(config, device=device, world_size=world_size, rank=rank)
    loader = make_train_loader(config.data, config.model, config.mask, rank=rank, world_size=world_size,
                               storage_options=loop_config.get("storage_options") or None,
                               pin_memory=device.type == "cuda")
    restore_latest(trainer, run, ray.train.get_checkpoint(), data=loader, rank=rank)
    if trainer.done:  # before compiling and wrapping: a finished run costs no more than its restore
        if rank == 0:
            log.info("run %s already finished its schedule at step %d; nothing to do", run.name, trainer.step)
        return
    prepare_for_training(trainer, device, world_size)  # DDP (+ comm hook), then compile: see inpaint.distributed

    writer = RunWriter(run) if rank == 0 else None
    keys = (SampleKeyLog(run.url, broadcast_object(attempt_id()), rank, world_size)
            if config.log.sample_keys else None)  # debug/test hook, see cluster/sample_keys.py
    # Checked on logging steps only: the ranks agree on time-based checkpoints at no per-step cost.
    cadence = CheckpointCadence(config.checkpoint.every_steps, config.checkpoint.every_minutes,
                                config.log.every_steps, device=device)
    batch_size = config.data.batch_size
    meter = ThroughputMeter(device, world_size)
    uploads = UploadGate()
    reported_nonfinite = 0
    try:
        data_iter = iter(loader)
        while not trainer.done:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t1 = time.perf_counter()
            before = (trainer.step, trainer.samples_seen)
            phase = trainer.phase
            losses = trainer.train_step(batch)  # no device sync: the next batch's copy overlaps this step
            meter.data(t1 - t0)
            meter.step(time.perf_counter() - t1, batch_size)
            step = trainer.step
            if keys is not None:
                keys.add(step, trainer.samples_seen, phase.value, batch)

            logged = step % config.log.every_steps == 0
            boundary = trainer.schedule.crosses_boundary(before, (trainer.step, trainer.samples_seen))
            checkpointing = cadence.due(step) or boundary or trainer.done  # due(): agreed by all ranks
            if logged or checkpointing:  # the loop syncs here anyway: read the non-finite step counts
                skipped_nonfinite, diverged = trainer.nonfinite_status(batch)
                if skipped_nonfinite > reported_nonfinite and rank == 0:
                    log.warning("step %d: %d step(s) so far skipped for a non-finite loss or gradient",
                                step, skipped_nonfinite)
                reported_nonfinite = skipped_nonfinite
                if diverged:
                    _stop_diverged(trainer, run, diverged, rank)
                    return
            if writer is not None and logged:
                _log_progress(writer, trainer, losses, meter.window(), batch, skipped_nonfinite, phase,
                              batch_size * world_size)
            if writer is not None and (step % config.log.image_every_steps == 0 or trainer.done):
                masked, completed, original = trainer.complete(batch)
                count = config.log.image_count
                writer.image_grid(masked[:count], completed[:count], original[:count], step)

            if checkpointing:
                if keys is not None:
                    keys.flush(step)
                _report(trainer, loader, losses, rank, writer, uploads)
                cadence.taken()
    finally:
        if writer is not None:
            writer.close()


def _log_progress(writer: RunWriter, trainer: Trainer, losses: dict[str, torch.Tensor], window: dict[str, float],
                  batch: dict, skipped_nonfinite: int, phase: Phase, global_batch: int) -> None:
    """Rank 0, on a logging step: the scalars to TensorBoard and one progress line to the console."""
    step = trainer.step
    values = {k: float(v) for k, v in losses.items()}
    scalars = {**values, **window}
    scalars.update({
        "memory/max(GiB)": _memory_gb(trainer.device),
        "schedule/phase": PHASE_INDEX[trainer.phase],
        "schedule/samples_seen": trainer.samples_seen,
        "lr/generator": trainer.g_optimizer.param_groups[0]["lr"],
        "lr/discriminator": trainer.d_optimizer.param_groups[0]["lr"],
        "data/epoch": batch.get("epoch", 0),
        "train/skipped_nonfinite": skipped_nonfinite,
    })
    writer.scalars(scalars, step)
    left = trainer.schedule.steps_left(step, trainer.samples_seen, global_batch)
    log.info(progress_line(step, step + left, phase.value, values, window, left))


def _stop_diverged(trainer: Trainer, run: RunPaths, reason: str, rank: int) -> None:
    """End training without a checkpoint: rank 0 records why in RUN/stopped.json, which the driver
    reads (a report without a checkpoint does not reach Ray's result); every rank returns.

    Every rank gets here at the same step (the gradients checked are all-reduced), and returning
    normally keeps Ray from restarting a run that would only diverge again.
    """
    if rank == 0:
        log.error("%s", reason)
        storage.write_text(run.stopped, json.dumps({"step": trainer.step, "phase": trainer.phase.value,
                                                    "reason": reason}))


def _report(trainer: Trainer, loader: TrainLoader, losses: dict[str, torch.Tensor], rank: int,
            writer: RunWriter | None, uploads: UploadGate) -> None:
    """Every rank reports (a barrier); only rank 0 attaches the checkpoint it wrote.

    The samples lost to damaged data on any rank are merged first, so the checkpoint's data state
    lists them all; rank 0 logs their count to TensorBoard (``data/skipped_samples``) and their
    keys to the run's ``skipped_samples.json``.
    """
    loader.merge_skipped(set().union(*gather_objects(sorted(loader.skipped_keys))))
    metrics = {k: float(v) for k, v in losses.items()}
    metrics.update(step=trainer.step, samples_seen=trainer.samples_seen, phase=trainer.phase.value,
                   skipped_samples=len(loader.skipped_keys))
    if writer is not None:
        writer.skipped_samples(sorted(loader.skipped_keys), trainer.step)
        writer.sync()
    checkpoint = None
    if rank == 0:
        uploads.wait()  # the other ranks wait in report's barrier meanwhile
        # Ray uploads it in a background thread while training goes on (checkpoint_upload_mode=ASYNC) and
        # deletes the directory once uploaded, so it must outlive this call: no TemporaryDirectory here.
        directory = tempfile.mkdtemp(prefix="inpaint-ckpt-")
        trainer.save(directory, data=loader)  # the loader's position rides in the checkpoint
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        uploads.started(directory)
    # A barrier still (every rank reports at the same steps); only the upload leaves the critical path.
    # Ray waits for pending uploads before the worker's training function counts as finished.
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(trainer.step),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)
    if rank == 0:
        log.info("checkpoint %s reported (step %d, phase %s)", checkpoint_name(trainer.step), trainer.step,
                 trainer.phase.value)
