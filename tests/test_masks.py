"""Hole masks, local boxes and patch crops."""

import numpy as np
import pytest
import torch

from inpaint.config import ConfigError, MaskConfig
from inpaint.masks import (
    EVALUATION_MASK_KINDS,
    Draws,
    MaskSampler,
    center_mask,
    evaluation_masks,
    freeform_mask,
    hole_bbox,
    local_box,
    random_rect_mask,
)
from inpaint.models import crop_local


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def hole_size(mask):
    top, left, bottom, right = hole_bbox(mask)
    return bottom - top, right - left


def assert_box_holds_hole(mask, box, patch):
    """The patch lies inside the image and covers every hole pixel."""
    height, width = mask.shape[-2:]
    top, left = (int(v) for v in box)
    assert 0 <= top <= height - patch and 0 <= left <= width - patch
    hole_top, hole_left, hole_bottom, hole_right = hole_bbox(mask)
    assert top <= hole_top and hole_bottom <= top + patch
    assert left <= hole_left and hole_right <= left + patch


def rect_mask(height, width, top, left, bottom, right):
    mask = torch.ones(1, height, width)
    mask[:, top:bottom, left:right] = 0
    return mask


@pytest.mark.parametrize("height,width", [(160, 160), (161, 161), (97, 131), (161, 80)])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 3])
def test_center_mask_area_and_centring(height, width, fraction):
    mask = center_mask(height, width, fraction)
    assert mask.shape == (1, height, width) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    hole_area = (mask == 0).sum().item()
    # Within 1% of the image area: whole-pixel sides cannot do better on odd sizes like 161.
    assert abs(hole_area / (height * width) - fraction) < 0.01
    top, left, bottom, right = hole_bbox(mask)
    assert hole_area == (bottom - top) * (right - left)  # a solid rectangle
    assert abs(top - (height - bottom)) <= 1 and abs(left - (width - right)) <= 1


def test_center_mask_keeps_aspect_ratio():
    assert hole_size(center_mask(160, 80, 0.25)) == (80, 40)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_center_mask_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="area_fraction"):
        center_mask(64, 64, fraction)


def test_random_rect_sides_within_bounds_and_positions_vary():
    g = generator(1)
    sides, corners = set(), set()
    for _ in range(300):
        mask = random_rect_mask(160, 120, 0.25, 0.5, g)
        top, left, bottom, right = hole_bbox(mask)
        assert 40 <= bottom - top <= 80 and 30 <= right - left <= 60
        assert (mask == 0).sum() == (bottom - top) * (right - left)
        sides.add((bottom - top, right - left))
        corners.add((top, left))
    assert len(sides) > 100 and len(corners) > 200
    assert {h for h, _ in sides} >= {40, 80}  # both ends of the range are reachable


def test_random_rect_capped_by_max_extent():
    g = generator(2)
    for _ in range(100):
        height, width = hole_size(random_rect_mask(160, 160, 0.25, 0.9, g, max_extent=50))
        assert 40 <= height <= 50 and 40 <= width <= 50


def test_random_rect_reproducible_with_same_seed():
    first = [random_rect_mask(64, 64, 0.2, 0.6, generator(7)) for _ in range(3)]
    again = [random_rect_mask(64, 64, 0.2, 0.6, generator(7)) for _ in range(3)]
    other = random_rect_mask(64, 64, 0.2, 0.6, generator(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other)


def test_random_rect_rejects_bad_sides():
    with pytest.raises(ValueError, match="min_side"):
        random_rect_mask(64, 64, 0.6, 0.3, generator())


@pytest.mark.parametrize("max_extent", [None, 96, 40, 2, 1])
def test_freeform_non_empty_and_within_extent(max_extent):
    g = generator(3)
    for _ in range(40):
        mask = freeform_mask(160, 144, g, strokes=3, max_width=0.1, max_extent=max_extent)
        assert mask.shape == (1, 160, 144)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        height, width = hole_size(mask)  # raises if the mask is empty
        limit = max_extent or 160
        assert height <= limit and width <= limit


def test_freeform_is_irregular():
    g = generator(4)
    fill = []
    for _ in range(20):
        mask = freeform_mask(160, 160, g, max_extent=96)
        height, width = hole_size(mask)
        fill.append((mask == 0).sum().item() / (height * width))
    # Strokes leave gaps inside their bounding box, unlike rectangles.
    assert sum(f < 0.9 for f in fill) >= 15


def test_freeform_reproducible_with_same_seed():
    first = freeform_mask(96, 96, generator(5), strokes=4)
    assert torch.equal(first, freeform_mask(96, 96, generator(5), strokes=4))
    assert not torch.equal(first, freeform_mask(96, 96, generator(6), strokes=4))


def test_hole_bbox_exclusive_ends():
    assert hole_bbox(rect_mask(10, 12, 2, 3, 5, 12)) == (2, 3, 5, 12)
    assert hole_bbox(rect_mask(10, 12, 2, 3, 5, 12)[0]) == (2, 3, 5, 12)


def test_hole_bbox_without_hole_raises():
    with pytest.raises(ValueError, match="no hole"):
        hole_bbox(torch.ones(1, 8, 8))


@pytest.mark.parametrize("corner", [(0, 0, 20, 30), (140, 130, 160, 160), (0, 100, 96, 160), (70, 0, 90, 5)])
def test_local_box_for_holes_touching_the_border(corner):
    mask = rect_mask(160, 160, *corner)
    assert_box_holds_hole(mask, local_box(mask, 96), 96)
    g = generator(9)
    for _ in range(50):
        assert_box_holds_hole(mask, local_box(mask, 96, g), 96)


def test_local_box_centres_on_hole_without_generator():
    assert local_box(rect_mask(160, 160, 60, 70, 80, 90), 40) == (50, 60)


def test_local_box_random_positions_vary():
    mask = rect_mask(160, 160, 60, 60, 80, 80)
    g = generator(10)
    positions = {local_box(mask, 96, g) for _ in range(100)}
    assert len(positions) > 50


def test_local_box_rejects_hole_bigger_than_patch():
    with pytest.raises(ValueError, match="does not fit"):
        local_box(rect_mask(160, 160, 10, 10, 110, 50), 96)


@pytest.mark.parametrize("make", [
    lambda g: random_rect_mask(160, 160, 0.25, 0.6, g, max_extent=96),
    lambda g: freeform_mask(160, 160, g, max_extent=96),
    lambda g: center_mask(160, 160, 1 / 3),
], ids=["random", "freeform", "center"])
def test_local_box_holds_hole_for_every_kind(make):
    g = generator(11)
    for _ in range(60):
        mask = make(g)
        assert_box_holds_hole(mask, local_box(mask, 96, g), 96)
        assert_box_holds_hole(mask, local_box(mask, 96), 96)


def test_crop_local_matches_loop_and_passes_gradients():
    torch.manual_seed(0)
    images = torch.randn(5, 3, 20, 24, requires_grad=True)
    boxes = torch.tensor([[0, 0], [12, 16], [3, 7], [12, 0], [0, 16]])
    patches = crop_local(images, boxes, 8)
    expected = torch.stack([images[i, :, t:t + 8, l:l + 8] for i, (t, l) in enumerate(boxes.tolist())])
    assert torch.equal(patches, expected)

    weights = torch.randn_like(patches)
    (grad,) = torch.autograd.grad((patches * weights).sum(), images)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), images)
    assert torch.equal(grad, expected_grad)


def test_crop_local_channels_last_input():
    images = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[1, 2], [8, 8]])
    assert torch.equal(crop_local(images, boxes, 8)[1], images[1, :, 8:16, 8:16])


def test_crop_local_rejects_bad_boxes_shape():
    with pytest.raises(ValueError, match="boxes"):
        crop_local(torch.zeros(2, 3, 16, 16), torch.zeros(3, 2, dtype=torch.long), 8)


@pytest.mark.parametrize("kind", ["random", "center", "freeform", "mixed"])
def test_mask_sampler_boxes_hold_holes(kind):
    sampler = MaskSampler(MaskConfig(kind=kind), image_size=160, local_size=96)
    g = generator(12)
    masks, boxes = sampler.batch(24, g)
    assert masks.shape == (24, 1, 160, 160) and masks.dtype == torch.float32
    assert boxes.shape == (24, 2) and boxes.dtype == torch.long
    for mask, box in zip(masks, boxes):
        assert_box_holds_hole(mask, box, 96)
    if kind == "center":
        assert all(torch.equal(m, masks[0]) for m in masks)
    else:
        assert len({m.numpy().tobytes() for m in masks}) == 24  # one hole per image, not per batch


def test_mask_sampler_mixed_draws_both_shapes():
    sampler = MaskSampler(MaskConfig(kind="mixed"), image_size=64, local_size=48)
    g = generator(13)
    solid = []
    for _ in range(40):
        mask, _ = sampler.sample(g)
        height, width = hole_size(mask)
        solid.append(bool((mask == 0).sum() == height * width))
    assert 5 <= sum(solid) <= 35


def test_mask_sampler_reproducible():
    sampler = MaskSampler(MaskConfig(kind="mixed"), image_size=64, local_size=48)
    first = sampler.batch(6, generator(14))
    again = sampler.batch(6, generator(14))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_mask_sampler_rejects_centre_hole_bigger_than_patch():
    with pytest.raises(ConfigError, match="mask.center_area"):
        MaskSampler(MaskConfig(kind="center", center_area=0.5), image_size=160, local_size=96)


@pytest.mark.parametrize("kind", EVALUATION_MASK_KINDS)
def test_evaluation_masks_fixed_and_boxed(kind):
    masks, boxes = evaluation_masks(kind, 16, 160, 96)
    again_masks, again_boxes = evaluation_masks(kind, 16, 160, 96)
    assert masks.shape == (16, 1, 160, 160) and boxes.shape == (16, 2)
    assert torch.equal(masks, again_masks) and torch.equal(boxes, again_boxes)
    for mask, box in zip(masks, boxes):
        assert_box_holds_hole(mask, box, 96)


def test_evaluation_masks_differ_between_kinds_and_seeds():
    sets = [evaluation_masks(kind, 8, 160, 96)[0] for kind in EVALUATION_MASK_KINDS]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not torch.equal(sets[i], sets[j])
    assert not torch.equal(evaluation_masks("random", 8, 160, 96, seed=1)[0], sets[2])


def test_evaluation_random_holes_follow_the_paper():
    masks, _ = evaluation_masks("random", 64, 160, 96)
    sizes = [hole_size(m) for m in masks]
    assert all(40 <= h <= 80 and 40 <= w <= 80 for h, w in sizes)
    assert len(set(sizes)) > 20


def test_evaluation_centre_hole_larger_than_tiny_patch_still_boxed_in_image():
    masks, boxes = evaluation_masks("center_1/3", 2, 32, 16)
    assert hole_size(masks[0]) == (18, 18)
    assert boxes[0].tolist() == [8, 8]


def test_evaluation_masks_rejects_unknown_kind():
    with pytest.raises(ValueError, match="center_1/4"):
        evaluation_masks("center_1/2", 4, 160, 96)


@pytest.mark.parametrize("size, local", [(160, 96), (64, 48), (32, 16)])
def test_sampler_rectangles_from_given_draws_match_random_rect_mask(size, local):
    from inpaint.masks import _draw_rect, _side_range

    sampler = MaskSampler(MaskConfig(kind="random"), image_size=size, local_size=local)
    rng = np.random.default_rng(size)
    for _ in range(300):
        uniforms = rng.random(6).tolist()
        out = np.full((1, size, size), 7, dtype=np.uint8)  # a loader's uint8 row, dirty
        box = sampler.sample_into(out, Draws(uniforms))
        sides = _side_range(size, 0.25, 0.5, local)
        top, left, height, width = _draw_rect(size, size, sides, sides, uniforms)
        expected = np.ones((1, size, size), dtype=np.uint8)
        expected[:, top:top + height, left:left + width] = 0
        assert np.array_equal(out, expected)
        assert_box_holds_hole(torch.from_numpy(out).float(), torch.tensor(box), local)


def test_draws_use_given_numbers_first_then_a_seeded_generator():
    draws = Draws([0.25, 0.5], seed=9)
    assert draws.uniforms(2) == [0.25, 0.5]
    later = draws.uniforms(3)
    assert later == Draws(seed=9).uniforms(3) and all(0 <= x < 1 for x in later)
    assert Draws([0.1], seed=9).uniforms(2) == Draws(seed=9).uniforms(2)  # too few given: all from the generator
