"""The phase controller: which network trains at a given point of the schedule.

The paper trains in three stages: the generator alone on the reconstruction (+ contextual)
loss, then the discriminator alone against the frozen generator, then both jointly. Position
in the schedule is counted in optimizer steps (``unit=iterations``, the paper's) or in images
seen across all workers (``unit=samples``), which keeps the boundaries where the paper put
them when the world size, and so the global batch, differs from the paper's single GPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from inpaint.config import ScheduleConfig


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

    def crosses_boundary(self, before: tuple[int, int], after: tuple[int, int]) -> bool:
        """Whether a step that moved (step, samples) from ``before`` to ``after`` changed the phase."""
        return self.phase_at(*before) != self.phase_at(*after)

    def steps_left(self, step: int, samples_seen: int, global_batch: int) -> int:
        """Optimizer steps still to run at the given global batch size."""
        pos = self.position(step, samples_seen)
        remaining = max(0, self.boundaries[2] - pos)
        per_step = global_batch if self.config.unit == "samples" else 1
        return -(-remaining // per_step)
