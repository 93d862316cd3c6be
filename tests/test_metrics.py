"""PSNR / SSIM against scikit-image on real photographs, and the hole-only metrics."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, filters, transform
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from inpaint.metrics import hole_l1, hole_psnr, l1, psnr, ssim

PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee}


def as_float32(image):
    """Round to float32 and back, so skimage (float64) and our tensors see the same values."""
    return np.clip(image, 0, 1).astype(np.float32).astype(np.float64)


def jpeg(image, quality):
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255


def degradations(image, rng):
    """Typical inpainting-output errors: noise, blur, JPEG artefacts and a flat grey hole."""
    holed = image.copy()
    holed[image.shape[0] // 4:image.shape[0] // 2, image.shape[1] // 3:image.shape[1] // 2] = 0.5
    return {
        "noise": image + rng.normal(0, 0.05, image.shape),
        "blur": filters.gaussian(image, sigma=1.2, channel_axis=-1),
        "jpeg": jpeg(image, quality=15),
        "hole": holed,
    }


def photo_pairs(height, width):
    """(name, degraded, reference) HWC float64 arrays cut from each photograph at this size."""
    rng = np.random.default_rng(0)
    pairs = []
    for name, load in PHOTOS.items():
        photo = load()
        side = min(photo.shape[:2])
        square = photo[:side, (photo.shape[1] - side) // 2:][:, :side]
        reference = as_float32(transform.resize(square, (height, width), anti_aliasing=True))
        for kind, degraded in degradations(reference, rng).items():
            pairs.append((f"{name}-{kind}", as_float32(degraded), reference))
    return pairs


def to_batch(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("height,width", [(160, 160), (96, 128), (37, 53)])
def test_psnr_and_ssim_match_scikit_image(height, width):
    pairs = photo_pairs(height, width)
    pred = to_batch([p for _, p, _ in pairs])
    target = to_batch([t for _, _, t in pairs])
    ours_psnr = psnr(pred, target)
    ours_ssim = ssim(pred, target)
    assert ours_psnr.shape == ours_ssim.shape == (len(pairs),)
    for i, (name, degraded, reference) in enumerate(pairs):
        expected_psnr = peak_signal_noise_ratio(reference, degraded, data_range=1)
        expected_ssim = structural_similarity(degraded, reference, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert ours_psnr[i].item() == pytest.approx(expected_psnr, abs=1e-4), name
        assert ours_ssim[i].item() == pytest.approx(expected_ssim, abs=1e-5), name
    # The degradations are real: a test of identical images would pass with any formula.
    assert ours_ssim.max() < 0.99 and ours_ssim.min() > 0.2


def test_ssim_with_other_data_range_matches_scikit_image():
    reference = transform.resize(data.chelsea(), (48, 64)) * 255
    degraded = reference + np.random.default_rng(1).normal(0, 8, reference.shape)
    reference, degraded = (as_float32(x / 255) * 255 for x in (reference, degraded))
    expected = structural_similarity(degraded, reference, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255, channel_axis=-1)
    ours = ssim(to_batch([degraded]), to_batch([reference]), data_range=255)
    assert ours.item() == pytest.approx(expected, abs=1e-5)


def test_identical_images():
    image = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(image, image)).all()
    assert torch.allclose(ssim(image, image), torch.ones(2, dtype=torch.float64))
    assert torch.equal(l1(image, image), torch.zeros(2, dtype=torch.float64))


def test_metrics_are_float64_and_work_with_and_without_grad():
    pred = torch.rand(2, 3, 16, 16, requires_grad=True)
    target = torch.rand(2, 3, 16, 16)
    mask = torch.ones(2, 1, 16, 16)
    mask[:, :, 4:8, 4:8] = 0
    with torch.no_grad():
        quiet = [psnr(pred, target), ssim(pred, target), l1(pred, target),
                 hole_psnr(pred, target, mask), hole_l1(pred, target, mask)]
    loud = [psnr(pred, target), ssim(pred, target), l1(pred, target),
            hole_psnr(pred, target, mask), hole_l1(pred, target, mask)]
    for a, b in zip(quiet, loud):
        assert a.dtype == torch.float64 and a.shape == (2,)
        assert torch.equal(a, b.detach())


def hand_made_case():
    """Image 0: error 0.5 in a 2x2 hole, 0.1 elsewhere. Image 1: error 0.2 in a 4x4 hole."""
    target = torch.zeros(2, 3, 8, 8)
    pred = torch.full((2, 3, 8, 8), 0.1)
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, 2:4, 2:4] = 0
    pred[0, :, 2:4, 2:4] = 0.5
    mask[1, :, 4:8, 4:8] = 0
    pred[1, :, 4:8, 4:8] = 0.2
    return pred, target, mask


def test_hole_metrics_hand_made():
    pred, target, mask = hand_made_case()
    assert torch.allclose(hole_l1(pred, target, mask), torch.tensor([0.5, 0.2], dtype=torch.float64))
    expected_psnr = torch.tensor([10 * math.log10(1 / 0.25), 10 * math.log10(1 / 0.04)], dtype=torch.float64)
    assert torch.allclose(hole_psnr(pred, target, mask), expected_psnr)
    # The full-image figures mix in the known pixels, so they must differ from the hole ones.
    full_l1_0 = (4 * 0.5 + 60 * 0.1) / 64
    assert torch.allclose(l1(pred, target), torch.tensor([full_l1_0, (16 * 0.2 + 48 * 0.1) / 64], dtype=torch.float64))


def test_hole_metrics_accept_per_channel_masks_and_soft_values():
    pred, target, mask = hand_made_case()
    per_channel = mask.expand(-1, 3, -1, -1)
    soft = mask * 0.8 + 0.1  # a resized mask: known ~0.9, hole ~0.1
    assert torch.equal(hole_l1(pred, target, per_channel), hole_l1(pred, target, mask))
    assert torch.equal(hole_psnr(pred, target, soft), hole_psnr(pred, target, mask))


def test_hole_psnr_counts_every_channel():
    target = torch.zeros(1, 3, 4, 4)
    pred = torch.zeros(1, 3, 4, 4)
    pred[0, 0] = 1.0  # only red is wrong: MSE over the hole's 3 channels is 1/3
    mask = torch.zeros(1, 1, 4, 4)
    assert hole_psnr(pred, target, mask).item() == pytest.approx(10 * math.log10(3))


def test_hole_metrics_without_hole_are_nan():
    pred, target, _ = hand_made_case()
    assert torch.isnan(hole_l1(pred, target, torch.ones(2, 1, 8, 8))).all()


@pytest.mark.parametrize("metric", [psnr, ssim, l1])
def test_bad_shapes_raise(metric):
    with pytest.raises(ValueError, match="4D"):
        metric(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="differ"):
        metric(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


@pytest.mark.parametrize("metric", [hole_psnr, hole_l1])
def test_bad_mask_shape_raises(metric):
    with pytest.raises(ValueError, match="mask"):
        metric(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        metric(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.ones(1, 8, 8))


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))


def test_bad_data_range_raises():
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), data_range=0)
