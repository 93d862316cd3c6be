"""The networks: SE-ResNet generator and global + local context discriminator.

Plain single-process modules: the cluster layer adds DDP / SyncBatchNorm. They run in
channels_last memory format and under ``torch.autocast`` (bfloat16) unchanged.
"""

from __future__ import annotations

from torch import nn

from inpaint.config import ModelConfig
from inpaint.models.blocks import SEResBlock, SqueezeExcite, make_block
from inpaint.models.discriminator import ContextDiscriminator, GlobalDiscriminator, LocalDiscriminator, crop_local
from inpaint.models.generator import Generator, composite

# Named model sizes, as ModelConfig fields (apply with dataclasses.replace or --set model.<field>=...).
# Parameters with se_res blocks at the paper's 160 / 96 px: generator / context discriminator.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "paper": {"gen_width": 64, "disc_width": 64, "fc_features": 1024},  # 6.71 M / 156.2 M
    "small": {"gen_width": 32, "disc_width": 32, "fc_features": 512},  # 1.68 M / 39.1 M
    "tiny": {"gen_width": 8, "disc_width": 8, "fc_features": 32},  # 0.11 M / 0.95 M (the debug recipe's widths)
}
# arch=glcic (the glcic recipe) at 160 / 96 px: 6.07 M / 39.6 M, GLCIC-PyTorch's counts.


def build_generator(model_cfg: ModelConfig) -> Generator:
    """The generator described by ``model_cfg``."""
    return Generator(model_cfg.gen_width, model_cfg.block, model_cfg.se_reduction, model_cfg.dilations,
                     model_cfg.arch)


def build_discriminator(model_cfg: ModelConfig, *, fc_fp32: bool = True) -> ContextDiscriminator:
    """The context discriminator described by ``model_cfg``, FC sizes fitted to its image/local sizes.

    ``fc_fp32=False`` lets autocast run its FC layers in bf16 (see :mod:`inpaint.models.discriminator`).
    """
    return ContextDiscriminator(model_cfg.image_size, model_cfg.local_size, model_cfg.disc_width,
                                model_cfg.block, model_cfg.se_reduction, model_cfg.fc_features,
                                model_cfg.disc_tail_stride, model_cfg.arch, fc_fp32=fc_fp32)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not, buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "MODEL_SIZES",
    "ContextDiscriminator",
    "Generator",
    "GlobalDiscriminator",
    "LocalDiscriminator",
    "SEResBlock",
    "SqueezeExcite",
    "build_discriminator",
    "build_generator",
    "composite",
    "crop_local",
    "count_parameters",
    "make_block",
]
