"""Generator and discriminator losses.

The generator minimises ``L_rec + adv_weight * L_adv + cx_weight * L_CX``; the discriminator
minimises binary cross-entropy of real images (label 1) vs completed ones (label 0). Both
discriminators return logits, so every adversarial term goes through a log-sigmoid.

Reconstruction masking (``reconstruction_loss``; ``mask`` is 1 on known pixels, 0 in the hole):

- ``hole`` (default): squared error over hole pixels only, normalised per image by its number of
  hole values, then averaged over the batch. Small and large holes weigh alike, and the known
  pixels, which the composite copies exactly from the input, do not dilute the loss.
- ``full``: mean squared error of the raw prediction over the whole image; the generator is also
  asked to reproduce the known pixels. (GLCIC-PyTorch's loss is neither: it is the squared error
  over the hole, summed and divided by the whole image's size, i.e. ``hole`` times the hole's
  fraction of the image, so its adversarial weight counts 1/fraction times more against it.)
- ``weighted``: known pixels weight 1, hole pixels weight ``hole_weight``, normalised per image by
  the total weight.

Contextual loss (Mechrez et al.), on features X = {x_i} of the completion and Y = {y_j} of the
original, N positions each, with mu_y the mean of Y over its positions (per image)::

    d_ij  = 1 - cos(x_i - mu_y, y_j - mu_y)
    d~_ij = d_ij / (min_k d_ik + eps)
    CX_ij = softmax_j((1 - d~_ij) / h)
    L_CX  = -log(mean_j max_i CX_ij)

``contextual_loss`` computes it with a custom autograd function that works through ``chunk``
images at a time with a few N x N buffers each and forms each image's gradient analytically on
the way, instead of the ~7 B x N x N tensors that autograd keeps for
``contextual_loss_reference`` (~3.5x faster and 1/7 of the peak memory at relu3_3 on CPU; see
``benchmarks/contextual_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Centred features equal to mu_y have zero norm; flooring the squared norm maps them to the zero
# vector (cosine 0 with everything) instead of NaN, like F.normalize's eps=1e-12.
_SQUARED_NORM_FLOOR = 1e-24


def reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor, masking: str = "hole",
                        hole_weight: float = 1.0) -> Tensor:
    """Masked L2 between the generator output and the original image (see module docstring)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    squared_error = (prediction - target).square()
    if masking == "full":
        return squared_error.mean()
    hole = (1.0 - mask.to(squared_error.dtype)).expand_as(squared_error)
    if masking == "hole":
        weight = hole
    elif masking == "weighted":
        weight = (1.0 - hole) + hole_weight * hole
    else:
        raise ValueError(f"masking must be one of full, hole, weighted, got {masking!r}")
    per_image = (weight * squared_error).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)
    return per_image.mean()


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss -log sigmoid(D(completion))."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """BCE with real -> 1 and completed -> 0: -log D(x) - log(1 - D(completion))."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def _centred_unit_features(x_feat: Tensor, y_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Centre both on each image's mean of y over positions, then L2-normalise channels: (B, C, N)."""
    if x_feat.shape != y_feat.shape or x_feat.dim() != 4:
        raise ValueError(f"contextual loss needs two (B, C, H, W) features of one shape, "
                         f"got {tuple(x_feat.shape)} and {tuple(y_feat.shape)}")
    x = x_feat.float().flatten(2)
    y = y_feat.float().flatten(2)
    mu_y = y.mean(dim=2, keepdim=True)
    return _unit_channels(x - mu_y), _unit_channels(y - mu_y)


def _unit_channels(features: Tensor) -> Tensor:
    """Scale each position's channel vector to unit length (zero stays zero)."""
    # x * rsqrt(sum x^2) runs forward + backward ~1.7x faster than F.normalize on (B, C, N) on CPU.
    return features * torch.rsqrt(features.square().sum(dim=1, keepdim=True).clamp_min(_SQUARED_NORM_FLOOR))


def contextual_loss_reference(x_feat: Tensor, y_feat: Tensor, band_width: float = 0.5,
                              eps: float = 1e-5) -> Tensor:
    """The contextual loss written as plain autograd ops: the readable spec, (B,) per image."""
    with torch.autocast(x_feat.device.type, enabled=False):
        x, y = _centred_unit_features(x_feat, y_feat)
        distance = 1.0 - torch.bmm(x.transpose(1, 2), y)
        # 1 - cos can round below 0 for identical vectors; the clamp keeps the divisor >= eps.
        nearest = distance.min(dim=2, keepdim=True).values.clamp_min(0.0)
        relative = distance / (nearest + eps)
        cx = torch.softmax((1.0 - relative) / band_width, dim=2)
        return -torch.log(cx.max(dim=1).values.mean(dim=1))


class _ContextualSimilarity(torch.autograd.Function):
    """-log CX per image from unit features (B, C, N), with its gradient formed during forward.

    Each image's loss is a scalar, so its gradient is a fixed (C, N) tensor times the incoming
    scalar: forward computes it while the N x N matrices of one chunk are at hand and backward
    only rescales it. Nothing N x N outlives a chunk, and no matmul is repeated.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, band_width: float, eps: float, chunk: int) -> Tensor:
        want_x, want_y = ctx.needs_input_grad[:2]
        losses, grads_x, grads_y = [], [], []
        for start in range(0, x.shape[0], chunk):
            loss, grad_x, grad_y = _contextual_chunk(x[start:start + chunk], y[start:start + chunk],
                                                     band_width, eps, want_x, want_y)
            losses.append(loss)
            grads_x.append(grad_x)
            grads_y.append(grad_y)
        ctx.save_for_backward(torch.cat(grads_x) if want_x else None, torch.cat(grads_y) if want_y else None)
        return torch.cat(losses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        grad_x, grad_y = ctx.saved_tensors
        scale = grad_loss.float().view(-1, 1, 1)
        return (None if grad_x is None else grad_x * scale,
                None if grad_y is None else grad_y * scale, None, None, None)


def _contextual_chunk(x: Tensor, y: Tensor, h: float, eps: float, want_x: bool,
                      want_y: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """-log CX of a few images and, if wanted, its gradients wrt the unit features x and y.

    With m_i = min_k d_ik and a_i = 1 / (h (m_i + eps)), the logits (1 - d~_ij) / h differ from
    their row maximum by -a_i (d_ij - m_i), so the row softmax is computed without overflow
    however small m_i gets. The gradient is analytic: mean_j max_i CX_ij reaches one entry per
    column, the softmax and the row-min divisor have closed forms, and d = 1 - x^T y turns the
    result into two matmuls.
    """
    distance = torch.baddbmm(x.new_ones(1, 1, 1), x.transpose(1, 2), y, alpha=-1.0)
    row_min, row_argmin = distance.min(dim=2, keepdim=True)
    # 1 - cos can round below 0 for identical vectors; the clamp keeps the divisor >= eps.
    nearest = row_min.clamp_min(0.0)
    slope = 1.0 / (h * (nearest + eps))
    # Logits more than 80 below the row maximum count as exp(-80) ~ 2e-35 instead of underflowing:
    # nothing next to the row's largest entry, 1, and exp of very negative inputs takes a ~20x
    # slower path on CPU, which the many near-exact matches of an inpainted pair hit constantly.
    cx = torch.addcmul(slope * row_min, distance, slope, value=-1.0).clamp_min_(-80.0).exp_()
    cx.div_(cx.sum(dim=2, keepdim=True))
    col_max, col_argmax = cx.max(dim=1)
    cx_mean = col_max.mean(dim=1)
    loss = -torch.log(cx_mean)
    if not (want_x or want_y):
        return loss, None, None

    positions = distance.shape[1]
    # dL/dCX_ij = -1 / (N CX) at (argmax_i of column j, j), else 0; picked_grad_j multiplies it by CX there.
    picked_grad = col_max * (-1.0 / (positions * cx_mean)).unsqueeze(1)
    # Row softmax backward dz_ij = CX_ij (dL/dCX_ij - r_i), r_i = sum_j dL/dCX_ij CX_ij.
    row_dot = torch.zeros_like(col_max).scatter_add_(1, col_argmax, picked_grad)
    grad_z = cx.mul_(-row_dot.unsqueeze(2))
    picked = col_argmax * positions + torch.arange(positions, device=x.device)
    grad_z.view(grad_z.shape[0], -1).scatter_add_(1, picked, picked_grad)
    # z_ij = (1 - d_ij / (m_i + eps)) / h: dz/dd_ij = -a_i directly, dz/dm_i = h a_i^2 d_ij via the divisor.
    grad_min = torch.linalg.vecdot(grad_z, distance).unsqueeze(2) * h * slope.square() * (row_min >= 0)
    grad_distance = grad_z.mul_(-slope).scatter_add_(2, row_argmin, grad_min)
    del distance
    # d = 1 - x^T y
    grad_x = -torch.bmm(y, grad_distance.transpose(1, 2)) if want_x else None
    grad_y = -torch.bmm(x, grad_distance) if want_y else None
    return loss, grad_x, grad_y


def contextual_loss(x_feat: Tensor, y_feat: Tensor, band_width: float = 0.5, eps: float = 1e-5,
                    chunk: int = 1) -> Tensor:
    """Per-image contextual loss -log CX(x, y), (B,); ``chunk`` images share the N x N work at a time.

    Always fp32 with autocast off: bf16 rounding of the cosine is amplified by d / min d.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.autocast(x_feat.device.type, enabled=False):
        x, y = _centred_unit_features(x_feat, y_feat)
        return _ContextualSimilarity.apply(x, y, float(band_width), float(eps), int(chunk))
