"""Fill holes in users' own images with a trained generator.

    from inpaint import Inpainter
    inpainter = Inpainter.from_checkpoint("runs/celeba-v1")   # a checkpoint, or a run folder (its latest)
    result = inpainter.fill(image, mask)

``image`` is a PIL image (converted to RGB) or a uint8 ``(H, W, 3)`` array; ``mask`` is a PIL
image (grey levels >= 128 are hole, as in the CLI's mask PNGs: white = hole) or an ``(H, W)``
array, bool or integer, where True / non-zero is hole. The result has the image's type and
size, and every known pixel is returned bit for bit: only hole pixels change.

Any size works. The generator sees a window around the hole (:func:`context_window`): the
hole's bounding box centred in a square of ``max(model.image_size, 2 x its longer side)`` px,
the scale training saw (holes up to about half a crop's side), or the whole image when that is
smaller. The window is reflection-padded to a multiple of 4, completed and pasted back, so a
small hole in a 6000 x 6000 photo costs what a 160 px crop costs. Memory grows with the
window's area (the paper's generator holds 64 channels at full resolution: measured 1.0 GiB
of activations for a 1024 x 1024 window in fp32 on CPU, 21 s on 2 AMD EPYC cores), so a window over ``max_pixels`` (MAX_FILL_PIXELS, 4 MP, by default) is refused
with an InpaintError; raise it, or split a mask with far-apart holes into several fills.
By default (``blend=True``) the fill gets GLCIC's post-processing, as evaluation measures it
(:func:`poisson_blend`): the completed hole is Poisson-blended (OpenCV's ``seamlessClone``,
NORMAL_CLONE) into a Telea-filled copy of the image, which matches the fill's colour to its
surroundings and hides the seam; ``blend=False`` returns the network's own output.

A checkpoint trained with ``model.ema_decay`` holds an averaged generator beside the trained
one: ``weights="ema"`` (the default) uses it, ``weights="raw"`` the last trained weights; a
checkpoint without an average falls back to its raw weights and says so in the log.

Checkpoints load without unpickling anything (safetensors and JSON). A URL may be local or any
fsspec URL (``s3://...``); of a remote checkpoint only meta.json, config.json and the generator
are copied, to a temporary folder, and the generator is checked against meta.json's sha256.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inpaint import checkpoint as ckpt
from inpaint import storage
from inpaint.config import Config
from inpaint.errors import one_line
from inpaint.images import convert
from inpaint.models import Generator, build_generator
from inpaint.run_folder import first_loadable
from inpaint.hardware import resolve_device

MULTIPLE = 4  # the generator downsamples twice
MAX_FILL_PIXELS = 2048 * 2048  # the largest window filled at once by default (see the module doc)
MASK_THRESHOLD = 128  # grey level from which a PIL / PNG mask pixel counts as hole
BLEND_DILATION = 3  # px of known pixels around the hole that anchor the Poisson solve
WEIGHTS = ("ema", "raw")  # the averaged generator (model.ema_decay), or the last trained weights
POSTPROCESSING = "Poisson blending (OpenCV seamlessClone, NORMAL_CLONE) into a Telea-filled copy"

log = logging.getLogger(__name__)


class InpaintError(ValueError):
    """An image, mask or box the inpainter cannot use; the message is one line."""


def fetch_checkpoint(url: str, directory: str | Path) -> Path:
    """A local folder holding what inference needs of the checkpoint at ``url`` (itself when local).

    Only meta.json, config.json and the generator(s) are copied: the discriminator and the
    optimizer state are ~95% of a paper-size checkpoint (~2 GB) and inference never reads them.
    """
    if not storage.is_remote(url):
        return Path(url.removeprefix("file://"))
    storage.get_file(storage.join(url, ckpt.META_FILE), Path(directory) / ckpt.META_FILE)
    try:
        meta = ckpt.check_meta_shape(json.loads((Path(directory) / ckpt.META_FILE).read_text()), url)
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = {}  # the load below reports the unreadable meta.json in its own words
    for name in ckpt.inference_files(meta):
        storage.get_file(storage.join(url, name), Path(directory) / name)
    return Path(directory)


def load_generator(directory: str | Path) -> ckpt.CheckpointContents:
    """Config, meta and generator weights of a checkpoint folder, verified against meta.json."""
    return ckpt.load_checkpoint(directory, weights_only=True)


def load_generator_model(url: str, weights: str = "ema") -> tuple[Generator, ckpt.CheckpointContents]:
    """The built generator and the contents of the checkpoint at ``url``, or a CheckpointError.

    ``weights``: "ema" loads the averaged generator where the checkpoint holds one (else its raw
    weights, with a log line), "raw" the last trained weights; ``contents.meta["weights"]`` says which.

    Weights that do not fit the network the checkpoint's config describes (a config edited to
    another width, weights of another model) raise UnloadableCheckpoint, not a size-mismatch error.
    """
    with tempfile.TemporaryDirectory(prefix="inpaint-ckpt-") as tmp:
        try:
            local = fetch_checkpoint(url, tmp)
        except storage.MissingObject:
            raise ckpt.CheckpointError(f"{url}: incomplete or deleted checkpoint") from None
        contents = load_generator(local)
    if weights not in WEIGHTS:
        raise InpaintError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    state = contents.generator
    if weights == "ema" and contents.generator_ema is None:
        log.info("%s holds no averaged generator (trained without model.ema_decay); using its raw weights", url)
        weights = "raw"
    elif weights == "ema":
        state = contents.generator_ema
    contents.meta = {**contents.meta, "weights": weights}
    try:
        generator = build_generator(contents.config.model)
        generator.load_state_dict(state)
    except Exception as exc:  # size mismatch, missing keys, a model the config cannot build
        raise ckpt.UnloadableCheckpoint(f"{url}: weights do not fit the model of its config.json "
                                        f"({one_line(exc)})") from None
    return generator, contents


def _device(name: str | torch.device) -> torch.device:
    try:
        return resolve_device(str(name))
    except RuntimeError as exc:
        raise InpaintError(str(exc)) from None


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8, rounding to nearest (how a saved PNG would store them)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def image_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) array of a PIL image or an array, or an InpaintError."""
    if isinstance(image, Image.Image):
        return np.asarray(_convert(image, "RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InpaintError(f"image must be a PIL image or a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return array


def _convert(image: Image.Image, mode: str) -> Image.Image:
    try:
        return convert(image, mode)
    except ValueError as exc:  # UnreadableImage, or a mode PIL cannot convert (La)
        raise InpaintError(f"image: {one_line(exc)}") from None


def hole_array(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The hole as a bool (H, W) array, checked against the image size (H, W)."""
    if isinstance(mask, Image.Image):
        hole = np.asarray(_convert(mask, "L")) >= MASK_THRESHOLD
        marks = f"no pixel at grey level {MASK_THRESHOLD} or above; paint the pixels to fill white"
    else:
        hole = np.asarray(mask)
        if hole.ndim != 2:
            raise InpaintError(f"mask must be (H, W), got shape {hole.shape}")
        hole = hole.astype(bool)
        marks = "no True / non-zero pixel"
    if hole.shape != tuple(size):
        raise InpaintError(f"mask is {hole.shape[1]}x{hole.shape[0]} but the image is {size[1]}x{size[0]} (WxH)")
    if not hole.any():
        raise InpaintError(f"mask has no hole: {marks}")
    if hole.all():
        raise InpaintError("mask covers the whole image: nothing is left to condition the fill on")
    return hole


def box_hole(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The hole of a rectangle (x, y, w, h) in an image of size (H, W)."""
    x, y, w, h = box
    height, width = size
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise InpaintError(f"box x={x},y={y},w={w},h={h} is not inside the {width}x{height} image")
    hole = np.zeros(size, dtype=bool)
    hole[y:y + h, x:x + w] = True
    return hole_array(hole, size)


def context_window(hole: np.ndarray, image_size: int) -> tuple[slice, slice]:
    """(rows, cols) of the part of the image the generator sees to fill ``hole`` (see the module doc)."""
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(image_size, 2 * max(bottom - top, right - left))

    def span(start: int, stop: int, length: int) -> slice:
        begin = max(0, min((start + stop - side) // 2, length - side))
        return slice(begin, min(length, begin + side))

    return span(top, bottom, hole.shape[0]), span(left, right, hole.shape[1])


def poisson_blend(image: np.ndarray, completed: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """GLCIC's post-processing: the completed hole Poisson-blended into a Telea-filled copy of ``image``.

    GLCIC blends with "fast marching followed by Poisson image blending"; here OpenCV's
    ``seamlessClone`` in NORMAL_CLONE mode keeps the fill's own gradients (its structure) and takes
    its level from the boundary, so a fill a shade off its surroundings' colour is shifted to match
    them. MIXED_CLONE would keep the stronger of the two gradients per pixel, and the Telea fill's
    smooth gradients would win nowhere useful while the fill's noise would stay.
    """
    from inpaint.baselines import require_cv2, telea

    cv2 = require_cv2()
    # The solver's boundary lies on known pixels a few px outside the hole; inside, the
    # Telea fill (not the hole's original content) is what the clone replaces.
    region = cv2.dilate(hole.astype(np.uint8) * 255, np.ones((3, 3), np.uint8), iterations=BLEND_DILATION)
    x, y, w, h = cv2.boundingRect(region)
    blended = cv2.seamlessClone(np.ascontiguousarray(completed), telea(image, hole), region,
                                (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
    return np.where(hole[..., None], blended, image)


def postprocess(images: torch.Tensor, masks: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
    """:func:`poisson_blend` of a batch: uint8 images, masks (B, 1, H, W) with 1 = known, and completions."""
    out = [poisson_blend(image.permute(1, 2, 0).numpy(), done.permute(1, 2, 0).numpy(), mask[0].numpy() < 0.5)
           for image, mask, done in zip(images.cpu(), masks.cpu(), completed.cpu())]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


class Inpainter:
    """A trained generator ready to complete images of any size."""

    def __init__(self, generator: Generator, config: Config, *, device: str | torch.device = "cpu",
                 meta: dict[str, Any] | None = None, max_pixels: int = MAX_FILL_PIXELS):
        if max_pixels < 1:
            raise InpaintError(f"max_pixels must be >= 1, got {max_pixels}")
        self.device = _device(device)
        self.generator = generator.to(self.device).eval()
        self.config = config
        self.meta = meta or {}
        self.max_pixels = max_pixels

    @classmethod
    def from_checkpoint(cls, url: str, device: str | torch.device = "cpu",
                        max_pixels: int = MAX_FILL_PIXELS, weights: str = "ema") -> "Inpainter":
        """Load the generator of a checkpoint folder, or of a run folder's newest checkpoint that loads.

        ``weights``: "ema" (the averaged generator, when the checkpoint has one) or "raw".
        """
        _device(device)  # a wrong device is the user's mistake, not the checkpoint's
        if weights not in WEIGHTS:
            raise InpaintError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        try:
            _, (generator, contents) = first_loadable(url, lambda found: load_generator_model(found, weights))
        except storage.StorageError as exc:  # unreachable storage, bad credentials, no such bucket
            raise ckpt.CheckpointError(f"{url}: cannot read the checkpoint ({exc})") from None
        return cls(generator, contents.config, device=device, meta=contents.meta, max_pixels=max_pixels)

    @torch.no_grad()
    def complete(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Completed uint8 (B, 3, H, W) from uint8 images and masks (B, 1, H, W), 1 = known."""
        known = masks.to(self.device) >= 0.5
        images = images.to(self.device)
        prediction = quantize(self.generator(images.float() / 255, known.float()))
        return torch.where(known, images, prediction)

    def fill(self, image: Image.Image | np.ndarray, mask: Image.Image | np.ndarray, *,
             blend: bool = True) -> Image.Image | np.ndarray:
        """``image`` with its hole filled, as the same type (PIL or uint8 array); see the module doc."""
        array = image_array(image)
        filled = self.fill_array(array, hole_array(mask, array.shape[:2]), blend=blend)
        return Image.fromarray(filled) if isinstance(image, Image.Image) else filled

    def fill_array(self, image: np.ndarray, hole: np.ndarray, *, blend: bool = True) -> np.ndarray:
        """uint8 (H, W, 3) image with the bool (H, W) hole filled; known pixels untouched."""
        rows, cols = context_window(hole, self.config.model.image_size)
        height, width = rows.stop - rows.start, cols.stop - cols.start
        if height * width > self.max_pixels:
            raise InpaintError(f"the hole needs a {width}x{height} px window ({height * width:,} px), more than the "
                               f"limit of {self.max_pixels:,} px (--max-pixels); fill far-apart holes one at a time")
        filled = image.copy()
        filled[rows, cols] = self._fill_window(np.ascontiguousarray(image[rows, cols]), hole[rows, cols], blend)
        return filled

    def _fill_window(self, image: np.ndarray, hole: np.ndarray, blend: bool) -> np.ndarray:
        height, width = hole.shape
        pad_h, pad_w = -height % MULTIPLE, -width % MULTIPLE
        # Reflection needs the pad to be smaller than the side; tiny images replicate instead.
        mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
        # torch.tensor copies: a PIL image's array is read-only, which torch.from_numpy warns about.
        pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
        known = torch.from_numpy(~hole)[None, None].float()
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode=mode)
        known = F.pad(known, (0, pad_w, 0, pad_h), mode=mode)
        with torch.no_grad():
            prediction = self.generator(pixels.to(self.device), known.to(self.device))
        completed = quantize(prediction[0, :, :height, :width]).permute(1, 2, 0).cpu().numpy()
        if blend:
            completed = poisson_blend(image, completed, hole)
        return np.where(hole[..., None], completed, image)
