"""The phase controller: which network trains at a given point of the schedule.

The paper trains in three stages: the generator alone on the reconstruction (+ contextual)
loss, then the discriminator alone against the frozen generator, then both jointly. Position
in the schedule is counted in optimizer steps (``unit=iterations``, the paper's) or in images
seen across all workers (``unit=samples``), which keeps the boundaries where the paper put
them when the world size, and so the global batch, differs from the paper's single GPU.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from inpaint.config import OptimConfig, ScheduleConfig


class Phase(str, enum.Enum):
    GENERATOR = "generator"
    DISCRIMINATOR = "discriminator"
    JOINT = "joint"
    DONE = "done"

    @property
    def trains_generator(self) -> bool:
        return self in (Phase.GENERATOR, Phase.JOINT)

    @property
    def trains_discriminator(self) -> bool:
        return self in (Phase.DISCRIMINATOR, Phase.JOINT)


@dataclass(frozen=True)
class PhaseSchedule:
    """Maps (steps done, samples seen) to the phase of the next step."""

    config: ScheduleConfig

    def _scale(self) -> int:
        return self.config.reference_batch if self.config.unit == "samples" else 1

    @property
    def boundaries(self) -> tuple[int, int, int]:
        """Ends of the generator, discriminator and joint phases, in the schedule's unit."""
        s = self._scale()
        g = self.config.generator_steps * s
        d = g + self.config.discriminator_steps * s
        return g, d, d + self.config.joint_steps * s

    def position(self, step: int, samples_seen: int) -> int:
        return samples_seen if self.config.unit == "samples" else step

    def phase_at(self, step: int, samples_seen: int) -> Phase:
        pos = self.position(step, samples_seen)
        g_end, d_end, j_end = self.boundaries
        if pos < g_end:
            return Phase.GENERATOR
        if pos < d_end:
            return Phase.DISCRIMINATOR
        if pos < j_end:
            return Phase.JOINT
        return Phase.DONE

    def progress(self, step: int, samples_seen: int) -> tuple[Phase, float, float]:
        """(phase, how far into it, its length), both in paper iterations (samples / reference_batch
        with unit=samples): where the phase's learning-rate schedule stands."""
        pos = self.position(step, samples_seen)
        start = 0
        for phase, end in zip((Phase.GENERATOR, Phase.DISCRIMINATOR, Phase.JOINT), self.boundaries):
            if pos < end:
                return phase, (pos - start) / self._scale(), (end - start) / self._scale()
            start = end
        return Phase.DONE, 0.0, 0.0

    def crosses_boundary(self, before: tuple[int, int], after: tuple[int, int]) -> bool:
        """Whether a step that moved (step, samples) from ``before`` to ``after`` changed the phase."""
        return self.phase_at(*before) != self.phase_at(*after)

    def steps_left(self, step: int, samples_seen: int, global_batch: int) -> int:
        """Optimizer steps still to run at the given global batch size."""
        pos = self.position(step, samples_seen)
        remaining = max(0, self.boundaries[2] - pos)
        per_step = global_batch if self.config.unit == "samples" else 1
        return -(-remaining // per_step)


def lr_factor(optim: OptimConfig, done: float, length: float) -> float:
    """The learning rate's multiplier ``done`` iterations into a phase of ``length`` iterations.

    A linear warm-up to 1 over ``optim.warmup_steps`` (the first step already trains, at 1 / warmup),
    then ``optim.decay``: constant, or linear / cosine from 1 down to ``optim.min_lr_ratio`` at the
    phase's end. A pure function of the position, so a resumed run needs no scheduler state.
    """
    warmup = optim.warmup_steps
    if done < warmup:
        return (done + 1) / warmup
    if optim.decay == "constant" or length <= warmup:
        return 1.0
    t = min(1.0, (done - warmup) / (length - warmup))
    shape = 1.0 - t if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape
