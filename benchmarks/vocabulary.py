"""The system benchmark's shared vocabulary: phases, variant names, targets, options and step records."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

from inpaint import recipes
from inpaint.config import ConfigError, apply_overrides
from inpaint.trainer import SECTIONS

PHASES = ("generator", "discriminator", "joint")
SHARES = ("data", *SECTIONS, "other")
OPTIMIZED, STRAIGHTFORWARD, GLCIC_PYTORCH = "optimized", "straightforward", "glcic-pytorch"
COMPARED_RECIPES = ("glcic", "celeba")
TARGET_GLCIC_SPEEDUP = 1.5  # our glcic recipe vs GLCIC-PyTorch, images/s, every phase
TARGET_CELEBA_JOINT_TIME = 1.3  # our celeba joint step vs GLCIC-PyTorch's joint step, seconds


@dataclasses.dataclass
class Options:
    """What to measure and how long; the CLI's flags."""

    recipes: tuple[str, ...] = ("celeba", "glcic", "debug")
    phases: tuple[str, ...] = PHASES
    warmup: int = 1
    steps: int = 3
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    overrides: tuple[str, ...] = ()  # --set, applied to every recipe
    compare: bool = True
    compare_size: tuple[int, int, int] = (160, 96, 12)  # image, local patch, batch
    ddp_workers: tuple[int, ...] = (1, 2, 4)
    ddp_recipe: str = "debug"
    ddp_steps: int = 5
    ladder_recipes: tuple[str, ...] = ()  # the per-optimisation ladder; on CUDA default celeba
    gpu_hour_price: float = 2.5
    scaling_efficiency: float = 0.9
    images: int = 96  # JPEGs in the benchmark's dataset
    contextual: tuple[int, int, int, int] = (12, 256, 40, 40)  # features of the contextual-loss comparison
    loader_workers: int = 2  # DataLoader processes of the loader comparison; 0 skips it
    loader_images: int = 3000

    def check(self) -> None:
        """Raise ConfigError on values that cannot be measured."""
        for name in self.recipes + ((self.ddp_recipe,) if self.ddp_workers else ()) + self.ladder_recipes:
            apply_overrides(recipes.get(name), list(self.overrides))
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ConfigError(f"--phases: choose from {', '.join(PHASES)}, got {', '.join(self.phases) or 'none'}")
        if self.loader_workers < 0 or (self.loader_workers and self.loader_images < 64 * self.loader_workers):
            raise ConfigError(f"--loader-workers / --loader-images: need workers >= 0 and >= 64 images per worker, "
                              f"got {self.loader_workers} and {self.loader_images}")
        if len(self.contextual) != 4 or min(self.contextual) < 1 or self.contextual[2] != self.contextual[3]:
            raise ConfigError(f"--contextual-size: expected BATCH,CHANNELS,SIDE,SIDE, got {list(self.contextual)}")
        for flag, value, low in (("--warmup", self.warmup, 0), ("--steps", self.steps, 1),
                                 ("--ddp-steps", self.ddp_steps, 1), ("--images", self.images, 16)):
            if value < low:
                raise ConfigError(f"{flag}: must be >= {low}, got {value}")
        if any(n < 1 for n in self.ddp_workers):
            raise ConfigError(f"--ddp-workers: worker counts must be >= 1, got {list(self.ddp_workers)}")
        if len(self.compare_size) != 3:
            raise ConfigError("--compare-size: expected IMAGE,PATCH,BATCH")
        image, local, batch = self.compare_size
        if image % 32 or local % 32 or local > image or batch < 1:
            raise ConfigError(f"--compare-size: GLCIC-PyTorch needs image and patch sides that are multiples "
                              f"of 32 with patch <= image, and batch >= 1; got {image},{local},{batch}")
        if not 0 < self.scaling_efficiency <= 1:
            raise ConfigError(f"--scaling-efficiency: must be in (0, 1], got {self.scaling_efficiency}")
        if self.gpu_hour_price < 0:
            raise ConfigError(f"--gpu-hour-price: must be >= 0, got {self.gpu_hour_price}")


class StepRecord(TypedDict, total=False):
    """One workload in one phase, as the JSON's ``steps`` list and the tables hold it (a plain dict)."""

    workload: str  # Workload.name
    recipe: str | None  # None for GLCIC-PyTorch
    variant: str  # OPTIMIZED, STRAIGHTFORWARD or GLCIC_PYTORCH
    phase: str
    batch: int
    image_size: int
    settings: list[str]  # the --set overrides of the variant
    compile: bool
    images_per_s: float
    step_s_median: float
    step_s: list[float]  # every timed step
    cpu_s_median: float
    data_s_median: float
    gradient_mib: float  # what DDP allreduces per step in this phase
    # With a profiled step:
    shares: dict[str, float]  # SHARES -> fraction of data + step time
    peak_memory_mib: float
    state_memory_mib: float
    # With counted FLOPs:
    flops_per_image: float
    achieved_tflops: float
    peak_fraction: float | None  # None where the device's peak is unknown


BRIEF_FIELDS = ("images_per_s", "step_s_median", "step_s", "flops_per_image")


def brief(record: StepRecord) -> dict[str, Any]:
    """The speed fields of a record, as comparisons and the ladder keep them."""
    return {k: record[k] for k in BRIEF_FIELDS if k in record}
