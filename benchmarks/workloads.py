"""What a measured step is: a recipe in a variant (or GLCIC-PyTorch), its settings, and its dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from benchmarks.vocabulary import PHASES
from inpaint import recipes
from inpaint.config import Config, apply_overrides
from inpaint.data import pack_dataset
from inpaint.hardware import native_bf16
from inpaint.losses import contextual_loss_reference
from inpaint.trainer import Trainer

STRAIGHTFORWARD_SETTINGS = ("runtime.bf16=false", "runtime.channels_last=false")
FP32_SETTINGS = ("runtime.bf16=false", "runtime.channels_last=false")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One kind of training step: our recipe in a variant (with settings), or GLCIC-PyTorch."""

    name: str
    recipe: str | None
    variant: str
    settings: tuple[str, ...] = ()  # --set overrides that define the variant and its size
    compile: bool = False

    def config(self, phase: str, base_overrides: tuple[str, ...] = (), batch: int | None = None) -> Config:
        """The recipe's config with this variant's settings and a schedule of only ``phase``."""
        lengths = {p: (10**9 if p == phase else 0) for p in PHASES}
        overrides = ["loss.vgg_weights=random", *base_overrides, *self.settings,
                     f"schedule.generator_steps={lengths['generator']}",
                     f"schedule.discriminator_steps={lengths['discriminator']}",
                     f"schedule.joint_steps={lengths['joint']}", "schedule.unit=iterations"]
        if batch is not None:
            overrides.append(f"data.batch_size={batch}")
        return apply_overrides(recipes.get(self.recipe or "glcic"), overrides)


def optimized_settings(device: torch.device) -> tuple[str, ...]:
    """The trainer's defaults on this device (inpaint.hardware): bf16 + channels_last where bf16 is
    native, else fp32 + NCHW; spelled out so that the record says what ran."""
    native = str(native_bf16(device)).lower()
    return (f"runtime.bf16={native}", f"runtime.channels_last={native}")


def size_settings(image: int, local: int, batch: int) -> tuple[str, ...]:
    return (f"model.image_size={image}", f"model.local_size={local}", f"data.batch_size={batch}")


def reference_contextual_loss(x_feat, y_feat, band_width: float, eps: float, chunk: int) -> torch.Tensor:
    """The trainer's contextual-loss call in its plain-autograd reference form (no chunking)."""
    return contextual_loss_reference(x_feat, y_feat, band_width=band_width, eps=eps)


def unfused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with PyTorch's default (foreach) implementation instead of the fused one."""
    settings = {**optimizer.defaults, "foreach": None}
    if "fused" in settings:  # Adam has a fused form; Adadelta has none (its default is already this)
        settings["fused"] = None
    return type(optimizer)(optimizer.param_groups[0]["params"], **settings)


def make_straightforward(trainer: Trainer) -> None:
    """Undo the trainer's code-level optimisations (reference contextual loss, foreach Adam)."""
    trainer.contextual_loss = reference_contextual_loss
    trainer.g_optimizer = unfused(trainer.g_optimizer)
    trainer.d_optimizer = unfused(trainer.d_optimizer)


def make_dataset(folder: Path, images: int) -> str:
    """CelebA-sized JPEGs packed into local shards; returns the dataset URL."""
    from benchmarks.loader_throughput import make_jpegs  # scikit-image photos cut to CelebA's 178x218

    source = folder / "jpegs"
    source.mkdir()
    make_jpegs(source, images)
    url = str(folder / "shards")
    pack_dataset("folder", source, url, shard_size=max(8, images // 4), test_fraction=0.05, progress=False)
    return url
