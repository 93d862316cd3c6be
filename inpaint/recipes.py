"""Named recipes: the paper's CelebA and LFW settings, the GLCIC baseline, and a CPU debug run.

Every recipe averages its generator (``model.ema_decay``), sized so the average spans a small
fraction of the run: its half-life is ln 0.5 / ln(decay) generator steps. The paper recipes take
0.999 (693 steps, 8.3k images at batch 12: StyleGAN's 10k-image half-life, and under 1% of the
90k-step generator phase). The quick start takes 0.98 (34 steps), measured with
``benchmarks/ema_lr_probe.py``: beside 0.99 and 0.995 it ends within 0.15 dB of the best average on
every hole kind and is the only one that does not swing more than the trained weights when the joint
phase starts (README, "Averaged generator"). The paper names no learning-rate schedule, so its
recipes keep the rate constant, as printed; the quick start warms up and decays (:func:`quickstart`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from inpaint.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LogConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
)


def celeba() -> Config:
    """The paper on CelebA: 160x160 crops, batch 12 per GPU, 90k / 10k / 400k iterations."""
    return Config(
        recipe="celeba",
        schedule=ScheduleConfig(generator_steps=90_000, discriminator_steps=10_000, joint_steps=400_000,
                                reference_batch=12),
        # Holes up to 0.6 of the side (96 px, the local patch): every evaluated hole, the 92 px
        # 1/3-area centre hole included, is one that training drew.
        mask=MaskConfig(max_side=0.6),
        model=ModelConfig(ema_decay=0.999),
        data=DataConfig(batch_size=12),
        # By the clock: a checkpoint (~2 GB with Adam's state) every 15 minutes whatever the step rate, so
        # a fast GPU does not spend its time uploading and a slow one does not lose hours to a failure.
        # Steps still work: --set checkpoint.every_steps=N (either one triggers).
        checkpoint=CheckpointConfig(every_steps=0, every_minutes=15.0),
    )


def lfw() -> Config:
    """The paper on LFW: as CelebA but batch 16 per GPU."""
    base = celeba()
    return base.replace(recipe="lfw", schedule=dataclasses.replace(base.schedule, reference_batch=16),
                        data=dataclasses.replace(base.data, batch_size=16))


def glcic() -> Config:
    """Iizuka et al. (GLCIC) in our system: their networks, Adadelta, no contextual loss.

    The networks are GLCIC-PyTorch's for CelebA (``model.arch=glcic``: its 17-layer completion
    network, five 5x5 stride-2 convs in each discriminator, FC sizes from the image size; 6.07 M /
    39.6 M parameters at 160 / 96 px) and Adadelta at lr 1.0 as both use, so that timing this
    recipe against GLCIC-PyTorch compares the same network and optimizer in two training systems.
    Everything else (losses, masks, phases, data) is this system's.
    """
    base = celeba()
    return base.replace(
        recipe="glcic",
        model=ModelConfig(arch="glcic", block="conv", disc_tail_stride=2, ema_decay=0.999),
        loss=LossConfig(cx_weight=0.0),
        optim=OptimConfig(name="adadelta", g_lr=1.0, d_lr=1.0),
    )


def quickstart() -> Config:
    """The embedded default: the paper's generator and discriminators at 64 px, a working inpainter in ~5 CPU minutes.

    Sized for `python jobs/train.py` on a 2-core CPU (2 DDP workers, one core each): SE-ResNet
    blocks, 64 px crops with a 40 px local patch, holes up to 0.6 of the side so that every
    evaluated hole (the 1/3-area centre hole is 0.58) was seen in training. No contextual loss:
    its VGG16 needs ImageNet weights, which a fresh offline machine does not have, and random
    VGG features carry no perceptual meaning. A higher generator learning rate than the paper's
    recipes: at a few thousand steps, speed of convergence matters more than the last decibel.

    Its learning rate warms up over 50 steps of each phase (Adam's second-moment estimates are
    a few samples old at first, and its first steps are its largest) and then falls along a
    cosine to 0.1x by the phase's end: the last steps of a 5-minute run are small, so the model
    it stops with is not one caught mid-swing. Measured against a constant rate in one quick-start-
    shaped run (``benchmarks/ema_lr_probe.py``): 0.1-1.2 dB more hole PSNR at the end of the generator
    phase, and at the end 0.8-1.2 dB more from the trained weights, -0.1 to +0.5 dB from the 0.98
    average (post-processed: +0.0 to +0.2 dB).
    """
    return Config(
        recipe="quickstart",
        model=ModelConfig(image_size=64, local_size=40, gen_width=16, disc_width=16, fc_features=256,
                          se_reduction=4, dilations=(2, 4, 8), ema_decay=0.98),
        loss=LossConfig(cx_weight=0.0, vgg_weights="random"),
        mask=MaskConfig(min_side=0.25, max_side=0.6),
        optim=OptimConfig(g_lr=5e-4, d_lr=2e-4, beta1=0.9, warmup_steps=50, decay="cosine", min_lr_ratio=0.1),
        schedule=ScheduleConfig(generator_steps=2000, discriminator_steps=100, joint_steps=400, reference_batch=8),
        data=DataConfig(batch_size=8, num_workers=0),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=2),
        log=LogConfig(every_steps=25, image_every_steps=500, image_count=8),
    )


def debug() -> Config:
    """Tiny nets on 32x32 images: all three phases train on one CPU core in seconds."""
    return Config(
        recipe="debug",
        model=ModelConfig(image_size=32, local_size=16, gen_width=8, disc_width=8, fc_features=32,
                          se_reduction=4, dilations=(2, 4), ema_decay=0.9),
        loss=LossConfig(vgg_weights="random", cx_layers=("relu2_2",)),
        # The schedule and the average on, so that every resume test covers them too.
        optim=OptimConfig(warmup_steps=2, decay="cosine", min_lr_ratio=0.1),
        mask=MaskConfig(min_side=0.2, max_side=0.45),
        schedule=ScheduleConfig(generator_steps=8, discriminator_steps=4, joint_steps=8, reference_batch=4),
        data=DataConfig(batch_size=4, num_workers=0),
        checkpoint=CheckpointConfig(every_steps=5, keep_last=2),
        log=LogConfig(every_steps=2, image_every_steps=10, image_count=4),
    )


RECIPES: dict[str, Callable[[], Config]] = {"celeba": celeba, "lfw": lfw, "glcic": glcic, "quickstart": quickstart,
                                            "debug": debug}


def names() -> list[str]:
    return sorted(RECIPES)


def get(name: str) -> Config:
    """The config of a named recipe; a fresh object every call."""
    try:
        return RECIPES[name]()
    except KeyError:
        raise ConfigError(f"recipe: unknown recipe {name!r} (known: {', '.join(names())})") from None
