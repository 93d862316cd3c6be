"""Hole masks and the local patch that contains each hole.

A mask is a float32 tensor ``(1, H, W)``: 1 on known pixels, 0 in the hole (a loader's
uint8 batch row takes the same values). Every mask comes with a local box ``(top, left)`` of a
``local_size`` square that contains the whole hole; the local discriminator sees that patch.
Holes are drawn per image, and all randomness comes from an explicit ``torch.Generator`` or
:class:`Draws`, so a data loader can make the same masks for the same sample. Masks are made
per sample in loader workers, on small CPU arrays: torch, and numpy where per-call cost shows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from inpaint.config import ConfigError, MaskConfig

EVALUATION_MASK_KINDS = ("center_1/4", "center_1/3", "center_side_1/4", "center_side_1/3", "random")

# The paper's evaluation holes: "a centre hole of 1/4 and 1/3 of the image", which reads as a
# fraction of the area (center_1/4: 80 px at 160 px; center_1/3: 92 px) or of the side
# (center_side_1/4: 40 px, 1/16 of the area; center_side_1/3: 53 px, 1/9), so both are scored;
# and random rectangles with sides in [1/4, 1/2] of the image side. Values: fraction of the area.
_EVAL_CENTER_AREA = {"center_1/4": 1 / 4, "center_1/3": 1 / 3, "center_side_1/4": 1 / 16, "center_side_1/3": 1 / 9}
_EVAL_RANDOM_SIDES = (0.25, 0.5)

# Free-form stroke shape, after DeepFill v2's generator: 4-12 vertices per stroke, each step
# turning by at most 72 degrees, with steps of 5-25% of the box the strokes are drawn in.
_STROKE_VERTICES = (4, 12)
_STROKE_MAX_TURN = 2 * math.pi / 5
_STROKE_STEP = (0.05, 0.25)


def _check_size(height: int, width: int) -> None:
    """Reject an empty image size."""
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniform in [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """One int uniform in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _uniform_int(draw: float, low: int, high: int) -> int:
    """A draw in [0, 1) mapped to an int uniform in [low, high] (inclusive)."""
    return low + min(int(draw * (high - low + 1)), high - low)


def _draws(generator: torch.Generator, count: int) -> list[float]:
    # One generator call for all of a mask's numbers: each call costs ~4 us, per sample.
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


class Draws:
    """One mask's randomness: given uniform floats first, then a torch generator made on demand.

    A loader already hashes (seed, epoch, sample) per sample; handing the sampler that hash's
    words as floats spares seeding a generator and drawing from it (~10 us of a ~200 us sample)
    for the shapes that need few numbers. Shapes that need many (strokes) use ``generator``.
    """

    __slots__ = ("_ready", "_seed", "_generator")

    def __init__(self, uniforms: Sequence[float] = (), seed: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self._ready = list(uniforms)
        self._seed = seed
        self._generator = generator

    @classmethod
    def of(cls, generator: torch.Generator) -> "Draws":
        """Every draw from ``generator`` (which advances as they are made)."""
        return cls(generator=generator)

    @property
    def generator(self) -> torch.Generator:
        """The generator for further draws, seeded on first use."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self._seed)
        return self._generator

    def uniforms(self, count: int) -> list[float]:
        """``count`` floats uniform in [0, 1): the given ones while they last, then the generator's."""
        if count <= len(self._ready):
            taken, self._ready = self._ready[:count], self._ready[count:]
            return taken
        self._ready = []
        return _draws(self.generator, count)


def _rect_mask(height: int, width: int, top: int, left: int, hole_h: int, hole_w: int) -> Tensor:
    """A (1, H, W) mask with one solid rectangular hole."""
    mask = torch.ones(1, height, width)
    mask[:, top:top + hole_h, left:left + hole_w] = 0
    return mask


def center_mask(height: int, width: int, area_fraction: float) -> Tensor:
    """A centred hole with the image's aspect ratio covering ``area_fraction`` of the area."""
    _check_size(height, width)
    if not 0 < area_fraction <= 1:
        raise ValueError(f"area_fraction must be in (0, 1], got {area_fraction}")
    hole_h, hole_w = _center_side(height, area_fraction), _center_side(width, area_fraction)
    return _rect_mask(height, width, (height - hole_h) // 2, (width - hole_w) // 2, hole_h, hole_w)


def _center_side(size: int, area_fraction: float) -> int:
    """The side (px) along ``size`` of a centred hole covering ``area_fraction`` of the area."""
    return max(1, round(size * math.sqrt(area_fraction)))


def _side_range(size: int, min_side: float, max_side: float, max_extent: int | None) -> tuple[int, int]:
    """Inclusive pixel range of a rectangle side, capped so it fits ``max_extent`` and the image."""
    high = min(size, round(max_side * size), max_extent if max_extent is not None else size)
    high = max(1, high)
    low = min(high, max(1, round(min_side * size)))
    return low, high


def random_rect_mask(height: int, width: int, min_side: float, max_side: float,
                     generator: torch.Generator, max_extent: int | None = None) -> Tensor:
    """A rectangular hole, each side uniform in [min_side, max_side] x the image side, anywhere."""
    _check_size(height, width)
    if not 0 < min_side <= max_side <= 1:
        raise ValueError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
    if max_extent is not None and max_extent < 1:
        raise ValueError(f"max_extent must be >= 1, got {max_extent}")
    return _rect_mask(height, width, *_draw_rect(height, width,
                                                 _side_range(height, min_side, max_side, max_extent),
                                                 _side_range(width, min_side, max_side, max_extent),
                                                 _draws(generator, 4)))


def _draw_rect(height: int, width: int, sides_h: tuple[int, int], sides_w: tuple[int, int],
               draws: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, hole_h, hole_w) of a random rectangle with sides in the inclusive pixel
    ranges ``sides_h`` and ``sides_w`` (from :func:`_side_range`), from four uniform draws."""
    hole_h = _uniform_int(draws[0], *sides_h)
    hole_w = _uniform_int(draws[1], *sides_w)
    return (_uniform_int(draws[2], 0, height - hole_h), _uniform_int(draws[3], 0, width - hole_w),
            hole_h, hole_w)


def _reflect(value: float, low: float, high: float) -> tuple[float, bool]:
    """value mirrored back into [low, high] at the edge it crossed, and whether it was."""
    if value < low:
        return min(2 * low - value, high), True
    if value > high:
        return max(2 * high - value, low), True
    return value, False


def _random_walk(generator: torch.Generator, low: tuple[float, float], high: tuple[float, float],
                 step: tuple[float, float]) -> Tensor:
    """Vertices (V, 2) of a walk that turns a little at each step, kept inside [low, high]."""
    count = _randint(generator, *_STROKE_VERTICES)
    draws = torch.rand(2 * count + 1, generator=generator, dtype=torch.float64).tolist()
    y = low[0] + (high[0] - low[0]) * draws[0]
    x = low[1] + (high[1] - low[1]) * draws[1]
    angle = 2 * math.pi * draws[2]
    vertices = [(y, x)]
    for turn, length in zip(draws[3::2], draws[4::2]):
        angle += (2 * turn - 1) * _STROKE_MAX_TURN
        length = step[0] + (step[1] - step[0]) * length
        y, flip_y = _reflect(y + length * math.sin(angle), low[0], high[0])
        x, flip_x = _reflect(x + length * math.cos(angle), low[1], high[1])
        # Bouncing off the box edge, instead of sliding along it, keeps strokes irregular.
        if flip_y:
            angle = -angle
        if flip_x:
            angle = math.pi - angle
        vertices.append((y, x))
    return torch.tensor(vertices, dtype=torch.float32)


def _draw_stroke(hole: Tensor, vertices: Tensor, radius: float) -> None:
    """Set hole pixels whose centre lies within radius of the polyline (V, 2) of y/x vertices."""
    # Only the stroke's own bounding box can be touched; working there saves most of the cost.
    top = max(0, math.floor(vertices[:, 0].min().item() - radius))
    left = max(0, math.floor(vertices[:, 1].min().item() - radius))
    bottom = min(hole.shape[0], math.ceil(vertices[:, 0].max().item() + radius))
    right = min(hole.shape[1], math.ceil(vertices[:, 1].max().item() + radius))
    starts, ends = vertices[:-1], vertices[1:]
    dy = (torch.arange(top, bottom) + 0.5)[None, :, None] - starts[:, 0, None, None]
    dx = (torch.arange(left, right) + 0.5)[None, None, :] - starts[:, 1, None, None]
    vy, vx = (ends - starts).unbind(1)
    inv_length_sq = 1 / (vy * vy + vx * vx).clamp_min(1e-12)
    t = (dy * (vy * inv_length_sq)[:, None, None] + dx * (vx * inv_length_sq)[:, None, None]).clamp_(0, 1)
    ey = dy - t * vy[:, None, None]
    ex = dx - t * vx[:, None, None]
    hole[top:bottom, left:right] |= (ey * ey + ex * ex <= radius * radius).any(0)


def freeform_mask(height: int, width: int, generator: torch.Generator, strokes: int = 4,
                  max_width: float = 0.1, max_extent: int | None = None) -> Tensor:
    """Irregular brush strokes (DeepFill v2 style) whose bounding box fits max_extent; never empty.

    Each stroke is a thick polyline; its width is uniform in [max_width / 2, max_width] x the
    image's shorter side (at least 2 px).
    """
    _check_size(height, width)
    if strokes < 1:
        raise ValueError(f"strokes must be >= 1, got {strokes}")
    if not 0 < max_width <= 1:
        raise ValueError(f"max_width must be in (0, 1], got {max_width}")
    if max_extent is not None and max_extent < 1:
        raise ValueError(f"max_extent must be >= 1, got {max_extent}")
    box_h = min(height, max_extent or height)
    box_w = min(width, max_extent or width)
    box_top = _randint(generator, 0, height - box_h)
    box_left = _randint(generator, 0, width - box_w)
    box_side = min(box_h, box_w)
    # Radius >= 1 px puts at least one pixel centre (at most 0.71 px away) under every vertex.
    brush = max_width * min(height, width)
    hole = torch.zeros(box_h, box_w, dtype=torch.bool)
    for _ in range(strokes):
        radius = min(max(1.0, _uniform(generator, brush / 2, brush) / 2), box_side / 2)
        # Vertices stay a radius away from the box edges, so the thick stroke stays inside it.
        step = (_STROKE_STEP[0] * box_side, _STROKE_STEP[1] * box_side)
        vertices = _random_walk(generator, (radius, radius), (box_h - radius, box_w - radius), step)
        _draw_stroke(hole, vertices, radius)
    mask = torch.ones(1, height, width)
    mask[0, box_top:box_top + box_h, box_left:box_left + box_w] = (~hole).float()
    return mask


def hole_bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the hole (mask < 0.5), bottom/right exclusive."""
    if mask.dim() < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {tuple(mask.shape)}")
    # numpy: a third of torch's per-op overhead on these small masks, which loader workers
    # build for every sample.
    hole = (mask.detach().reshape(-1, *mask.shape[-2:]).cpu().numpy() < 0.5).any(0)
    rows = np.flatnonzero(hole.any(1))
    if rows.size == 0:
        raise ValueError("mask has no hole (no pixel below 0.5)")
    cols = np.flatnonzero(hole.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _patch_start(start: int, stop: int, size: int, patch: int, draw: float | None) -> int:
    """Patch start along one axis: covers [start, stop) if it fits, lies in [0, size).

    With a uniform ``draw`` the start is uniform among the valid ones; without, centred.
    """
    if draw is not None:
        return _uniform_int(draw, max(0, stop - patch), min(start, size - patch))
    # Centred on the hole; when the hole fits this already covers it, so only the image clamps.
    return min(max((start + stop - patch) // 2, 0), size - patch)


def _box(mask: Tensor, patch_size: int, generator: torch.Generator | None, require_fit: bool) -> tuple[int, int]:
    """(top, left) of the patch; without require_fit an oversized hole gets a centred patch."""
    height, width = mask.shape[-2:]
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size must be in [1, {min(height, width)}] for a {height}x{width} mask, "
                         f"got {patch_size}")
    top, left, bottom, right = hole_bbox(mask)
    if require_fit and max(bottom - top, right - left) > patch_size:
        raise ValueError(f"the {bottom - top}x{right - left} hole does not fit a {patch_size} px local patch")
    draws = _draws(generator, 2) if generator is not None else (None, None)
    return (_patch_start(top, bottom, height, patch_size, draws[0]),
            _patch_start(left, right, width, patch_size, draws[1]))


def local_box(mask: Tensor, patch_size: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """(top, left) of a patch_size square inside the image that contains the whole hole.

    With a generator the position is uniform among the valid ones; without, the patch is
    centred on the hole and clamped to the image.
    """
    return _box(mask, patch_size, generator, require_fit=True)


class MaskSampler:
    """Training holes and local boxes of one kind, drawn per image from a generator."""

    def __init__(self, mask_cfg: MaskConfig, image_size: int, local_size: int) -> None:
        if not 1 <= local_size <= image_size:
            raise ConfigError(f"model.local_size: must be in [1, {image_size}], got {local_size}")
        self.cfg = mask_cfg
        self.image_size = image_size
        self.local_size = local_size
        self._center = center_mask(image_size, image_size, mask_cfg.center_area)
        # Hole sides for "random", fixed by the config: worked out once, not per sample.
        self._rect_sides = _side_range(image_size, mask_cfg.min_side, mask_cfg.max_side, local_size)
        top, _, bottom, _ = hole_bbox(self._center)
        if mask_cfg.kind == "center" and bottom - top > local_size:
            raise ConfigError(f"mask.center_area: a {mask_cfg.center_area} centre hole "
                              f"({bottom - top} px) does not fit the {local_size} px local patch")

    def _hole(self, kind: str, generator: torch.Generator) -> Tensor:
        """A centre or free-form hole (rectangles are drawn in ``sample`` with their box)."""
        size, cfg = self.image_size, self.cfg
        if kind == "center":
            return self._center.clone()
        return freeform_mask(size, size, generator, strokes=cfg.freeform_strokes,
                             max_width=cfg.freeform_max_width, max_extent=self.local_size)

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One mask (1, S, S) and its local box (2,) long, at a random valid position."""
        mask = torch.empty(1, self.image_size, self.image_size)
        return mask, torch.tensor(self.sample_into(mask.numpy(), Draws.of(generator)), dtype=torch.long)

    def sample_into(self, out: np.ndarray, draws: Draws) -> tuple[int, int]:
        """Write one mask into the array ``out`` (1, S, S) in place; return its box.

        numpy, not torch: a loader writes every sample's mask into its batch row, and numpy's
        per-call cost is a quarter of torch's.
        """
        kind = self.cfg.kind
        if kind == "mixed":
            kind = "random" if draws.uniforms(1)[0] < 0.5 else "freeform"
        # A random patch position keeps the local discriminator from learning that holes sit
        # at the patch centre (GLCIC also draws the patch first and the hole inside it).
        if kind == "random":  # the bbox is known as drawn: no scan of the mask
            size, patch = self.image_size, self.local_size
            u = draws.uniforms(6)
            top, left, hole_h, hole_w = _draw_rect(size, size, self._rect_sides, self._rect_sides, u)
            out.fill(1)
            out[:, top:top + hole_h, left:left + hole_w] = 0
            return (_patch_start(top, top + hole_h, size, patch, u[4]),
                    _patch_start(left, left + hole_w, size, patch, u[5]))
        mask = self._hole(kind, draws.generator)
        out[...] = mask.numpy()
        return local_box(mask, self.local_size, draws.generator)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n masks (n, 1, S, S) and boxes (n, 2), each image with its own hole."""
        masks, boxes = zip(*(self.sample(generator) for _ in range(n)))
        return torch.stack(masks), torch.stack(boxes)


def evaluation_hole_side(kind: str, image_size: int, local_size: int) -> int:
    """The largest side (px) of an evaluation hole of this kind."""
    if kind in _EVAL_CENTER_AREA:
        return _center_side(image_size, _EVAL_CENTER_AREA[kind])
    return _side_range(image_size, *_EVAL_RANDOM_SIDES, local_size)[1]


def training_hole_side(mask_cfg: MaskConfig, image_size: int, local_size: int) -> int:
    """The largest rectangle side (px) training draws: what the generator has learnt to fill whole."""
    rect = _side_range(image_size, mask_cfg.min_side, mask_cfg.max_side, local_size)[1]
    center = _center_side(image_size, mask_cfg.center_area)
    return {"random": rect, "center": center, "mixed": max(rect, center)}.get(mask_cfg.kind, 0)


def uncovered_evaluation_holes(mask_cfg: MaskConfig, image_size: int, local_size: int,
                               kinds: Sequence[str] = EVALUATION_MASK_KINDS) -> list[str]:
    """Evaluation hole kinds larger than any rectangle training draws (free-form strokes draw none)."""
    trained = training_hole_side(mask_cfg, image_size, local_size)
    return [kind for kind in kinds if evaluation_hole_side(kind, image_size, local_size) > trained]


def evaluation_masks(kind: str, count: int, image_size: int, local_size: int,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """The paper's evaluation holes (count, 1, S, S) and centred boxes (count, 2); fixed by seed.

    The seed only matters for "random". A centre hole larger than the local patch (1/3 of a
    tiny debug image) keeps the paper's size; its box then covers the hole's middle only.
    """
    if kind not in EVALUATION_MASK_KINDS:
        raise ValueError(f"unknown evaluation mask kind {kind!r} (known: {', '.join(EVALUATION_MASK_KINDS)})")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 1 <= local_size <= image_size:
        raise ValueError(f"local_size must be in [1, {image_size}], got {local_size}")
    if kind in _EVAL_CENTER_AREA:
        mask = center_mask(image_size, image_size, _EVAL_CENTER_AREA[kind])
        box = torch.tensor(_box(mask, local_size, None, require_fit=False), dtype=torch.long)
        return mask.expand(count, -1, -1, -1).clone(), box.expand(count, -1).clone()
    generator = torch.Generator().manual_seed(seed)
    masks = [random_rect_mask(image_size, image_size, *_EVAL_RANDOM_SIDES, generator, max_extent=local_size)
             for _ in range(count)]
    boxes = [torch.tensor(local_box(m, local_size), dtype=torch.long) for m in masks]
    return torch.stack(masks), torch.stack(boxes)
