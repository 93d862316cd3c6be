"""Getting a :class:`~inpaint.trainer.Trainer` ready for data-parallel training, in plain PyTorch.

One home for the order that makes a step overlap its communication: DDP wrap, then its comm
hook, then ``torch.compile`` of the wrapped networks (:func:`prepare_for_training`). The Ray
training loop calls it and so can a benchmark with nothing but torch. Also here: the ranks'
agreement on when to checkpoint by the clock (:class:`CheckpointCadence`), which costs one tiny
broadcast per logging step and none on the others.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from inpaint.trainer import Trainer


def grouped() -> bool:
    """Whether a process group of more than one rank is running (in one process: no collectives)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the identity without a group)."""
    if not grouped():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without a group)."""
    if not grouped():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _ddp(module: nn.Module, device: torch.device, comm: str) -> DistributedDataParallel:
    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if comm == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        # Each rank's gradient bucket is rounded to bf16, summed in bf16 by the allreduce, divided
        # by the world size and written back in the gradients' dtype: half the bytes on the wire.
        ddp.register_comm_hook(None, bf16_compress_hook)  # None: the default (whole-group) process group
    return ddp


def prepare_for_training(trainer: Trainer, device: torch.device | str, world_size: int, *,
                         backend: str | Callable | None = None, ddp: bool | None = None,
                         compile: bool | None = None) -> None:
    """Wrap the trainer's networks in DDP (world size > 1) with ``runtime.ddp_comm``'s hook, then
    compile them when ``runtime.compile`` is set.

    In this order, compiling the DDP-wrapped network lets Dynamo's DDP optimizer cut its graph at
    DDP's bucket boundaries, so each bucket's allreduce runs while the backward of the earlier
    layers is still computing; compiled first and wrapped after, DDP would see every gradient only
    at the end of one compiled backward and communicate after it. The generator's frozen
    adversarial pass bypasses DDP and gets the bare discriminator, compiled on its own
    (:meth:`Trainer.compile`). Call once, after restoring a checkpoint (DDP broadcasts rank 0's
    weights when it wraps). ``backend``: ``torch.compile``'s (its default, inductor, when None; CPU tests use ``aot_eager``).
    ``ddp`` and ``compile`` default to world size > 1 and ``runtime.compile``; the GPU check sets
    them to measure DDP's allreduce in one process, and each variant.
    """
    device = torch.device(device)
    runtime = trainer.config.runtime
    if world_size > 1 if ddp is None else ddp:
        trainer.wrap_models(lambda module: _ddp(module, device, runtime.ddp_comm))
    if runtime.compile if compile is None else compile:
        trainer.compile(backend=backend)


class CheckpointCadence:
    """When to checkpoint: every ``every_steps`` steps and/or every ``every_minutes`` of wall time.

    ``ray.train.report`` is a barrier, so every rank must checkpoint at the same steps. Steps agree
    by themselves; clocks do not. So the clock is read only on steps that are multiples of
    ``check_every`` (the logging steps), where rank 0's answer is broadcast (one 1-element tensor);
    other steps cost nothing. A checkpoint taken for any reason (steps, a phase boundary, the end)
    restarts the interval: call :meth:`taken`.
    """

    def __init__(self, every_steps: int, every_minutes: float, check_every: int, *,
                 device: torch.device | str = "cpu", clock: Callable[[], float] = time.monotonic,
                 broadcast: Callable[[bool], bool] | None = None) -> None:
        self.every_steps = every_steps
        self.every_s = every_minutes * 60.0
        self.check_every = max(1, check_every)
        self.device = torch.device(device)
        self.clock = clock
        self.broadcast = broadcast or self._broadcast
        self.last = clock()

    def _broadcast(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (NCCL needs the tensor on the rank's GPU)."""
        if not grouped():
            return flag
        box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(box, src=0)
        return bool(box.item())

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step``; the same answer on every rank."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_s or step % self.check_every:
            return False
        return self.broadcast(self.clock() - self.last >= self.every_s)

    def taken(self) -> None:
        """A checkpoint was just taken: the time interval starts again."""
        self.last = self.clock()
