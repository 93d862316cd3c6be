"""Per-image quality metrics for inpainting: PSNR, SSIM, L1, and their hole-only versions.

Images are ``(B, C, H, W)`` floats (``[0, 1]`` for RGB unless ``data_range`` says otherwise);
masks are ``(B, 1, H, W)`` or ``(B, C, H, W)`` with 1 on known pixels and 0 in the hole.
Every function returns one float64 value per image, shape ``(B,)``; the work is done in
float64 on the inputs' device so the figures match scikit-image to rounding. Nothing here needs
gradients, and nothing breaks under ``torch.no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Wang et al. 2004, as scikit-image's structural_similarity(gaussian_weights=True) uses them.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's gaussian_filter truncation at 3.5 sigma
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(pred: Tensor, target: Tensor) -> None:
    """Reject anything but two 4D tensors of one shape."""
    if pred.dim() != 4 or target.dim() != 4:
        raise ValueError(f"images must be 4D (B, C, H, W), got shapes {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")


def _hole(mask: Tensor, images: Tensor) -> Tensor:
    """The hole (mask < 0.5) as a bool tensor broadcast to the images' shape."""
    batch, channels, height, width = images.shape
    matches = mask.dim() == 4 and mask.shape[0] == batch and mask.shape[1] in (1, channels)
    if not (matches and mask.shape[2:] == images.shape[2:]):
        raise ValueError(f"mask must be ({batch}, 1 or {channels}, {height}, {width}), got {tuple(mask.shape)}")
    return (mask < 0.5).expand_as(images)


def _check_range(data_range: float) -> None:
    """Reject a non-positive data range."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per image, float64."""
    return (pred.double() - target.double()).square().flatten(1).mean(1)


def _psnr_from_mse(mse: Tensor, data_range: float) -> Tensor:
    """PSNR in dB; +inf where the MSE is 0."""
    _check_range(data_range)
    return 10 * torch.log10(data_range ** 2 / mse)


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """10 log10(range^2 / MSE) per image (B,) float64; identical images give +inf."""
    _check_pair(pred, target)
    return _psnr_from_mse(_mse(pred, target), data_range)


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per image (B,) float64."""
    _check_pair(pred, target)
    return (pred.double() - target.double()).abs().flatten(1).mean(1)


def _hole_mean(values: Tensor, hole: Tensor) -> Tensor:
    """Mean of values over hole elements per image; NaN for an image without a hole."""
    values = torch.where(hole, values, values.new_zeros(()))
    return values.flatten(1).sum(1) / hole.flatten(1).sum(1)


def hole_psnr(pred: Tensor, target: Tensor, mask: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR over hole pixels (mask 0), all channels, per image (B,) float64; NaN if no hole."""
    _check_pair(pred, target)
    error = (pred.double() - target.double()).square()
    return _psnr_from_mse(_hole_mean(error, _hole(mask, pred)), data_range)


def hole_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over hole pixels (mask 0), all channels, per image (B,) float64."""
    _check_pair(pred, target)
    return _hole_mean((pred.double() - target.double()).abs(), _hole(mask, pred))


def _gaussian_window(device: torch.device) -> Tensor:
    """The 11-tap normalised Gaussian (sigma 1.5), float64."""
    taps = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    window = torch.exp(-0.5 * (taps / _SSIM_SIGMA) ** 2)
    return window / window.sum()


def _band(size: int, window: Tensor) -> Tensor:
    """(size - k + 1, size) matrix whose rows apply the k-tap window at each valid position."""
    taps = window.numel()
    rows = torch.arange(size - taps + 1, device=window.device)
    offset = torch.arange(size, device=window.device)[None, :] - rows[:, None]
    inside = (offset >= 0) & (offset < taps)
    return torch.where(inside, window[offset.clamp(0, taps - 1)], window.new_zeros(()))


def _blur_valid(images: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter of every plane, valid region only (no padding)."""
    # Two banded matmuls beat a grouped float64 conv ~6x on CPU: BLAS has no slow float64 path.
    height, width = images.shape[-2:]
    return _band(height, window) @ images @ _band(width, window).T


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per image (B,) float64: per channel over the valid region, then averaged.

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=-1)``: skimage filters
    with reflection and then crops the 5 px border, which is exactly the unpadded region.
    """
    _check_pair(pred, target)
    _check_range(data_range)
    size = 2 * _SSIM_RADIUS + 1
    if min(pred.shape[-2:]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size}, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), target.double()
    channels = x.shape[1]
    # One pass filters all five moment images of every channel at once.
    moments = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], 1), _gaussian_window(x.device))
    mu_x, mu_y, xx, yy, xy = moments.split(channels, 1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov_xy = xy - mu_x * mu_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return similarity.flatten(1).mean(1)
