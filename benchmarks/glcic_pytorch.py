"""GLCIC-PyTorch's networks and per-step work, rebuilt from its published layer list for comparison.

GLCIC-PyTorch (github.com/otenim/GLCIC-PyTorch) is the most used public PyTorch GLCIC. This is
not its code: it is the same computation, written from the layer list in its README/models and
the training loop it documents, so that :mod:`benchmarks.system` can time it next to ours at the
same batch and image size, in the same process, on the same inputs.

Re-checked against its published code (models.py and train.py at commit 3f9de13): every layer
is conv (with bias) -> ReLU -> BN in that order, as its ``forward`` applies them; the real
image's local patch is cropped at a random area of its own, not the fake's.

- Completion network, 17 layers, each conv/deconv with a bias and followed by ReLU + BN except the
  last (sigmoid): 5x5 64; 3x3 s2 128; 128; s2 256; 256, 256; dilated 256 (2, 4, 8, 16); 256, 256;
  4x4 s2 deconv 128; 128; deconv 64; 32; 3. Input: the image with its hole filled by the mean
  pixel value, plus the mask channel. 6.07 M parameters.
- Local discriminator: five 5x5 stride-2 convs (64, 128, 256, 512, 512) + FC 1024 on a 96 px patch.
- Global discriminator: the same five convs + FC 1024 on the 160 px image. This is its default
  ``celeba`` architecture; the ``places2`` one adds a sixth conv, but then its FC size is computed
  for 64x downsampling while a 160 px input ends at 3x3 and does not fit. With five convs the
  context discriminator (+ FC 1 + sigmoid on both concatenated) has 39.56 M parameters, the
  39.6 M published for it.
- Optimizer: Adadelta for both networks; losses: MSE over the hole, BCELoss on sigmoid outputs.

Per step, as its training loop does (and it is these habits our trainer avoids):
phase 1 (generator): forward, MSE on the hole, backward, step.
phase 2 (discriminator): a generator forward in train mode that records autograd history although
only its detached output is used; the discriminator on the raw (not composited) output and,
separately, on the real image with its own random patch; BCE, backward, step.
phase 3 (joint): phase 2's discriminator update (loss scaled by alpha), then a third
discriminator forward on the generator output whose backward also fills the discriminator's
parameter gradients, MSE + alpha * BCE, backward, generator step. One hole region per batch.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 4e-4  # GLCIC's weight of the adversarial loss
IMAGE_SIZE = 160
LOCAL_SIZE = 96
PUBLISHED_PARAMETERS = {"generator": 6.1e6, "discriminator": 39.6e6}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1) -> list[nn.Module]:
    """A biased conv padded to keep (stride 1) or halve (stride 2) the size, then ReLU, then BN
    (GLCIC-PyTorch's order: ``self.bn1(self.act1(self.conv1(x)))``)."""
    padding = dilation * (kernel_size - 1) // 2
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation),
            nn.ReLU(), nn.BatchNorm2d(out_channels)]


def deconv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A biased 4x4 stride-2 transposed conv that doubles the size, ReLU, BN."""
    return [nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1), nn.ReLU(), nn.BatchNorm2d(out_channels)]


class CompletionNetwork(nn.Module):
    """The 17-layer completion network: (B, 4, H, W) masked image + mask -> (B, 3, H, W) in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            *conv_bn_relu(4, 64, 5),
            *conv_bn_relu(64, 128, 3, 2),
            *conv_bn_relu(128, 128, 3),
            *conv_bn_relu(128, 256, 3, 2),
            *conv_bn_relu(256, 256, 3),
            *conv_bn_relu(256, 256, 3),
            *(layer for d in (2, 4, 8, 16) for layer in conv_bn_relu(256, 256, 3, dilation=d)),
            *conv_bn_relu(256, 256, 3),
            *conv_bn_relu(256, 256, 3),
            *deconv_bn_relu(256, 128),
            *conv_bn_relu(128, 128, 3),
            *deconv_bn_relu(128, 64),
            *conv_bn_relu(64, 32, 3),
            nn.Conv2d(32, 3, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DiscriminatorBranch(nn.Module):
    """Five 5x5 stride-2 conv-BN-ReLU layers, flatten, FC-ReLU to 1024 features."""

    def __init__(self, input_size: int):
        super().__init__()
        widths = (3, 64, 128, 256, 512, 512)
        self.convs = nn.Sequential(*(layer for c_in, c_out in itertools.pairwise(widths)
                                     for layer in conv_bn_relu(c_in, c_out, 5, 2)))
        side = input_size // 32
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(512 * side * side, 1024), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x))


class ContextDiscriminator(nn.Module):
    """Local (patch) and global (image) branches, concatenated, FC 1, sigmoid: P(real)."""

    def __init__(self, local_size: int = LOCAL_SIZE, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.local_net = DiscriminatorBranch(local_size)
        self.global_net = DiscriminatorBranch(image_size)
        self.head = nn.Sequential(nn.Linear(2048, 1), nn.Sigmoid())

    def forward(self, patches: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.local_net(patches), self.global_net(images)], dim=1))


def crop(images: torch.Tensor, area: tuple[int, int], size: int) -> torch.Tensor:
    """The same (top, left) square of every image in the batch: one region per batch."""
    top, left = area
    return images[:, :, top:top + size, left:left + size]


class GlcicPytorchStep:
    """GLCIC-PyTorch's networks, optimizers and per-phase step on our batch format."""

    def __init__(self, device: torch.device | str = "cpu", image_size: int = IMAGE_SIZE,
                 local_size: int = LOCAL_SIZE, seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.local_size = local_size
        self.generator = CompletionNetwork().to(self.device)
        self.discriminator = ContextDiscriminator(local_size, image_size).to(self.device)
        self.g_optimizer = torch.optim.Adadelta(self.generator.parameters())
        self.d_optimizer = torch.optim.Adadelta(self.discriminator.parameters())
        self.mean_pixel = 0.5  # it averages the training set once; any constant costs the same

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int],
                                            tuple[int, int]]:
        """(image in [0, 1], hole mask 1 = hole, generator input, the batch's one patch position,
        another position for the real images' patch)."""
        image = batch["image"].to(self.device).float().div(255.0).contiguous()
        hole = 1.0 - batch["mask"].to(self.device).float()
        generator_input = torch.cat([image - image * hole + self.mean_pixel * hole, hole], dim=1)
        fake_area, real_area = (tuple(int(v) for v in batch["box"][i]) for i in (0, -1))
        return image, hole, generator_input, fake_area, real_area

    def _discriminator_update(self, image, output, area, real_area, alpha: float) -> torch.Tensor:
        """BCE of the detached raw output (fake) and of the real image, separately; step."""
        fake_images = output.detach()
        fake = self.discriminator(crop(fake_images, area, self.local_size), fake_images)
        loss_fake = F.binary_cross_entropy(fake, torch.zeros_like(fake))
        real = self.discriminator(crop(image, real_area, self.local_size), image)
        loss_real = F.binary_cross_entropy(real, torch.ones_like(real))
        loss = (loss_fake + loss_real) * alpha / 2
        loss.backward()
        self.d_optimizer.step()
        self.d_optimizer.zero_grad()
        return loss.detach()

    def train_step(self, batch: dict, phase: str) -> torch.Tensor:
        """One step of ``phase`` (generator, discriminator or joint); returns its last loss."""
        self.generator.train()
        self.discriminator.train()
        image, hole, generator_input, area, real_area = self._inputs(batch)
        output = self.generator(generator_input)
        if phase == "discriminator":
            return self._discriminator_update(image, output, area, real_area, alpha=1.0)
        if phase == "joint":
            self._discriminator_update(image, output, area, real_area, alpha=ALPHA)
        loss = F.mse_loss(output * hole, image * hole)
        if phase == "joint":
            fake = self.discriminator(crop(output, area, self.local_size), output)
            loss = (loss + ALPHA * F.binary_cross_entropy(fake, torch.ones_like(fake))) / 2
        loss.backward()
        self.g_optimizer.step()
        self.g_optimizer.zero_grad()
        return loss.detach()

    def parameter_counts(self) -> dict[str, int]:
        return {"generator": sum(p.numel() for p in self.generator.parameters()),
                "discriminator": sum(p.numel() for p in self.discriminator.parameters())}
