"""Building blocks shared by the generator and the discriminators.

Every convolution that feeds a BatchNorm has no bias (the BN shift replaces it). The block
kind of ``ModelConfig.block`` picks what :func:`make_block` returns:

- ``se_res``: :class:`SEResBlock` with squeeze-and-excitation (the paper);
- ``res``: the same residual block without SE (ablation);
- ``conv``: :class:`ConvBNReLU`, one 3x3 conv with the same stride and channels (GLCIC).
"""

from __future__ import annotations

import torch
from torch import nn

from inpaint.config import BLOCK_KINDS


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU, padded so that stride 1 keeps the size and stride 2 halves it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpConvBNReLU(nn.Sequential):
    """4x4 stride-2 ConvTranspose2d -> BatchNorm2d -> ReLU: exactly doubles height and width."""

    def __init__(self, in_channels: int, out_channels: int):
        # Kernel 4 with stride 2 covers every output pixel equally often (no checkerboard from 3x3).
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, FC-ReLU-FC-sigmoid, then scale each channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)  # narrow nets (debug) would otherwise get 0 units
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3))
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(squeezed))))
        return x * scale[:, :, None, None]


class SEResBlock(nn.Module):
    """Basic residual block (3x3 conv-BN-ReLU, 3x3 conv-BN), SE on the residual branch, add, ReLU.

    The shortcut is a strided 1x1 conv + BN whenever the stride or the width changes, else identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, reduction: int = 16,
                 use_se: bool = True):
        super().__init__()
        self.residual = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, 3, stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.excite = SqueezeExcite(out_channels, reduction) if use_se else nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.excite(self.residual(x)) + self.shortcut(x))


def make_block(kind: str, in_ch: int, out_ch: int, stride: int, se_reduction: int) -> nn.Module:
    """The block of ``ModelConfig.block`` kind mapping in_ch to out_ch channels at the given stride."""
    if kind == "se_res":
        return SEResBlock(in_ch, out_ch, stride, se_reduction, use_se=True)
    if kind == "res":
        return SEResBlock(in_ch, out_ch, stride, se_reduction, use_se=False)
    if kind == "conv":
        return ConvBNReLU(in_ch, out_ch, 3, stride)
    raise ValueError(f"block: unknown kind {kind!r} (known: {', '.join(BLOCK_KINDS)})")
