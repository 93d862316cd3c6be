"""Global, local and context discriminators (Iizuka et al. layout, SE-ResNet last layers).

At ``width`` w the global net maps an S x S image through
5x5 conv w @ S/2, 5x5 conv 2w @ S/4, 5x5 conv 4w @ S/8, block 8w @ S/16, block 8w, block 8w,
then flatten and FC to ``fc_features``. The local net is the same without its first layer, so
an L x L patch ends at 8w @ L/8. The last two layers keep the size (``tail_stride=1``, the
default reading of the paper) or halve it again (``tail_stride=2``: S/64 and L/32, rounded up).
The FC input sizes follow from the sizes given instead of being hard-wired to one resolution.

``arch="glcic"`` builds Iizuka et al.'s discriminators as GLCIC-PyTorch does for CelebA: five
5x5 stride-2 conv-BN-ReLU layers (w, 2w, 4w, 8w, 8w) in each net, then FC; ``glcic_places2``
adds the paper's sixth 8w conv to the global net. At 160 / 96 px and w = 64 the context
discriminator holds 39.6 M (glcic) or 37.7 M (glcic_places2) parameters.

Inputs are images in [0, 1], shifted to [-1, 1] like the generator's input.

``fc_fp32`` (every class, default True): the FC layers run outside ``torch.autocast``, in fp32,
whatever the rest runs in. False lets autocast run them in bf16 like the convolutions; the
weights and the state dict are the same either way. The default is what training uses; False
exists so that ``benchmarks/ablations.py`` can time what the fp32 FC saves.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from inpaint.models.blocks import ConvBNReLU, make_block


def crop_local(images: torch.Tensor, boxes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The local discriminator's input: the (B, C, p, p) patches at boxes (B, 2) = (top, left), in one
    differentiable gather (the boxes come from :class:`inpaint.masks.MaskSampler`)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if boxes.shape != (batch, 2):
        raise ValueError(f"boxes must be ({batch}, 2), got shape {tuple(boxes.shape)}")
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size must be in [1, {min(height, width)}], got {patch_size}")
    offsets = torch.arange(patch_size, device=images.device)
    boxes = boxes.to(device=images.device, dtype=torch.long)
    rows = boxes[:, 0, None] + offsets
    cols = boxes[:, 1, None] + offsets
    flat_index = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, -1)
    patches = images.reshape(batch, channels, -1).gather(2, flat_index.expand(-1, channels, -1))
    return patches.view(batch, channels, patch_size, patch_size)


def _check_size(name: str, x: torch.Tensor, size: int) -> None:
    # Without this a wrong crop size fails deep inside the FC with an opaque matmul shape error.
    if tuple(x.shape[-2:]) != (size, size):
        height, width = x.shape[-2:]
        raise ValueError(f"{name}: expected {size}x{size} inputs (built for this size), got {height}x{width}")


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Turn autocast off inside; a no-op on devices without autocast (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _halved(size: int, times: int) -> int:
    """Side after ``times`` stride-2 layers padded as ours are: each rounds up (k5 p2, k3 p1, 1x1 p0)."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def _glcic_convs(widths: tuple[int, ...]) -> list[nn.Module]:
    """GLCIC's discriminator layers: 5x5 stride-2 conv-BN-ReLU from RGB through ``widths``."""
    return [ConvBNReLU(c_in, c_out, 5, 2) for c_in, c_out in zip((3, *widths), widths)]


class _Features(nn.Module):
    """Conv stack, flatten, FC-ReLU: the shared tail of the global and local discriminators."""

    def __init__(self, convs: list[nn.Module], out_channels: int, out_side: int, fc_features: int,
                 fc_fp32: bool = True):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.fc = nn.Linear(out_channels * out_side * out_side, fc_features)
        self.fc_fp32 = fc_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.convs(2 * x - 1).flatten(1)
        # ReLU after the FC keeps it from composing with the context head into one linear map.
        if not self.fc_fp32:
            return torch.relu(self.fc(features))
        # The FC holds most of the weights (128 M of 156 M at 160 px) for a small product: under
        # autocast, casting it to bf16 every forward (256 MB of copies) and its gradient back costs
        # more than the fp32 product itself (benchmarks/RESULTS.md), so it stays fp32.
        with _without_autocast(features.device.type):
            return torch.relu(self.fc(features.float()))


class GlobalDiscriminator(nn.Module):
    """Whole-image critic: (B, 3, S, S) in [0, 1] -> (B, fc_features) features."""

    def __init__(self, image_size: int, width: int = 64, block: str = "se_res", se_reduction: int = 16,
                 fc_features: int = 1024, tail_stride: int = 1, arch: str = "paper", *, fc_fp32: bool = True):
        super().__init__()
        if image_size < 16 or image_size % 16:
            raise ValueError(f"GlobalDiscriminator: image_size must be a multiple of 16, got {image_size}")
        self.image_size = image_size
        if arch == "paper":
            convs = [
                ConvBNReLU(3, width, 5, 2),
                ConvBNReLU(width, 2 * width, 5, 2),
                ConvBNReLU(2 * width, 4 * width, 5, 2),
                make_block(block, 4 * width, 8 * width, 2, se_reduction),
                make_block(block, 8 * width, 8 * width, tail_stride, se_reduction),
                make_block(block, 8 * width, 8 * width, tail_stride, se_reduction),
            ]
            side = _halved(image_size, 4 + 2 * (tail_stride == 2))
        else:
            widths = (width, 2 * width, 4 * width, 8 * width, 8 * width)
            widths += (8 * width,) if arch == "glcic_places2" else ()
            convs = _glcic_convs(widths)
            side = _halved(image_size, len(widths))
        self.features = _Features(convs, 8 * width, side, fc_features, fc_fp32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_size("GlobalDiscriminator", images, self.image_size)
        return self.features(images)


class LocalDiscriminator(nn.Module):
    """Critic of the patch around the hole: (B, 3, L, L) in [0, 1] -> (B, fc_features) features."""

    def __init__(self, local_size: int, width: int = 64, block: str = "se_res", se_reduction: int = 16,
                 fc_features: int = 1024, tail_stride: int = 1, arch: str = "paper", *, fc_fp32: bool = True):
        super().__init__()
        if local_size < 8 or local_size % 8:
            raise ValueError(f"LocalDiscriminator: local_size must be a multiple of 8, got {local_size}")
        self.local_size = local_size
        if arch == "paper":
            convs = [
                ConvBNReLU(3, 2 * width, 5, 2),
                ConvBNReLU(2 * width, 4 * width, 5, 2),
                make_block(block, 4 * width, 8 * width, 2, se_reduction),
                make_block(block, 8 * width, 8 * width, tail_stride, se_reduction),
                make_block(block, 8 * width, 8 * width, tail_stride, se_reduction),
            ]
            side = _halved(local_size, 3 + 2 * (tail_stride == 2))
        else:
            convs = _glcic_convs((width, 2 * width, 4 * width, 8 * width, 8 * width))
            side = _halved(local_size, 5)
        self.features = _Features(convs, 8 * width, side, fc_features, fc_fp32)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        _check_size("LocalDiscriminator", patches, self.local_size)
        return self.features(patches)


class ContextDiscriminator(nn.Module):
    """Concatenates global and local features and scores them: real (1) vs completed (0).

    ``forward`` returns the LOGIT, not the probability: train it with
    ``F.binary_cross_entropy_with_logits``, which applies the sigmoid inside the log in a
    numerically stable way (a sigmoid followed by ``log`` saturates to -inf for confident
    scores). Use :meth:`probability` where a value in (0, 1) is wanted.
    """

    def __init__(self, image_size: int, local_size: int, width: int = 64, block: str = "se_res",
                 se_reduction: int = 16, fc_features: int = 1024, tail_stride: int = 1, arch: str = "paper", *,
                 fc_fp32: bool = True):
        super().__init__()
        self.global_net = GlobalDiscriminator(image_size, width, block, se_reduction, fc_features, tail_stride, arch,
                                              fc_fp32=fc_fp32)
        self.local_net = LocalDiscriminator(local_size, width, block, se_reduction, fc_features, tail_stride, arch,
                                            fc_fp32=fc_fp32)
        self.head = nn.Linear(2 * fc_features, 1)

    def forward(self, images: torch.Tensor, local_patches: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.global_net(images), self.local_net(local_patches)], dim=1)
        return self.head(features).squeeze(1)

    def probability(self, images: torch.Tensor, local_patches: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the logit: the probability that each (image, patch) pair is real, shape (B,)."""
        return torch.sigmoid(self(images, local_patches))
