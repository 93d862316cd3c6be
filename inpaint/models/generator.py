"""The completion network: a fully convolutional encoder-decoder with two downsamplings.

Layer layout at ``width`` w (paper: w = 64, ~6.7 M parameters with SE-ResNet blocks)::

    input   masked RGB in [-1, 1] (holes = 0) + mask          4 x H x W
    stem    5x5 conv-BN-ReLU                                   w   @ 1
    down    block stride 2, block stride 2                     2w  @ 1/2, 4w @ 1/4
    middle  2 x 3x3 conv, one dilated 3x3 conv per dilation,
            2 x 3x3 conv (GLCIC's layout), all BN-ReLU         4w  @ 1/4
    decoder 4x4 transposed conv, 3x3 conv                      2w  @ 1/2
            4x4 transposed conv, 3x3 conv                      w, w/2 @ 1
    head    3x3 conv, sigmoid                                  3   @ 1, in [0, 1]

``arch="glcic"`` (and ``glcic_places2``) is Iizuka et al.'s completion network as GLCIC-PyTorch
lists it: plain 3x3 convs, with one more 3x3 conv 2w @ 1/2 between the two downsamplings
(w = 64: 6.07 M parameters, as GLCIC-PyTorch's).
"""

from __future__ import annotations

import torch
from torch import nn

from inpaint.models.blocks import ConvBNReLU, UpConvBNReLU, make_block


def composite(image: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the known pixels (mask = 1) of ``image`` and take the hole (mask = 0) from ``prediction``."""
    return image * mask + prediction * (1 - mask)


class Generator(nn.Module):
    """Predicts a full RGB image in [0, 1] from a masked image and its mask; any H, W divisible by 4.

    The known pixels are mapped to [-1, 1] and the hole set to 0 (mid-grey) so that the hole
    carries no colour of its own; the mask channel tells the network which zeros are holes.
    ``forward`` returns the raw prediction for every pixel: pass it through :func:`composite`
    to get the completed image.
    """

    def __init__(self, width: int = 64, block: str = "se_res", se_reduction: int = 16,
                 dilations: tuple[int, ...] = (2, 4, 8, 16), arch: str = "paper"):
        super().__init__()
        w1, w2, w4 = width, 2 * width, 4 * width
        self.stem = ConvBNReLU(4, w1, kernel_size=5)
        if arch == "paper":
            self.down = nn.Sequential(
                make_block(block, w1, w2, 2, se_reduction),
                make_block(block, w2, w4, 2, se_reduction),
            )
        else:  # GLCIC's conv2 (stride 2), conv3, conv4 (stride 2)
            self.down = nn.Sequential(ConvBNReLU(w1, w2, 3, 2), ConvBNReLU(w2, w2), ConvBNReLU(w2, w4, 3, 2))
        self.middle = nn.Sequential(
            ConvBNReLU(w4, w4),
            ConvBNReLU(w4, w4),
            *(ConvBNReLU(w4, w4, dilation=d) for d in dilations),
            ConvBNReLU(w4, w4),
            ConvBNReLU(w4, w4),
        )
        self.decoder = nn.Sequential(
            UpConvBNReLU(w4, w2),
            ConvBNReLU(w2, w2),
            UpConvBNReLU(w2, w1),
            ConvBNReLU(w1, max(1, w1 // 2)),
        )
        self.head = nn.Conv2d(max(1, w1 // 2), 3, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height % 4 or width % 4:
            raise ValueError(f"Generator: image height and width must be multiples of 4, got {height}x{width}")
        mask = mask.to(image.dtype)
        x = torch.cat([(2 * image - 1) * mask, mask], dim=1)
        x = self.decoder(self.middle(self.down(self.stem(x))))
        return torch.sigmoid(self.head(x))
