"""A user's picture as the networks take it: upright, 8 bits per channel, RGB (or grey for masks).

Every way in reads through here: ``fill`` (:mod:`inpaint.__main__`), the page and the endpoint
(:mod:`inpaint.serving`), the Python API (:mod:`inpaint.inference`) and the shards
(:mod:`inpaint.data.reading`). Why not just ``Image.convert``: Pillow clips 16-bit grey (a PNG or
TIFF in mode ``I;16``) to 255 on conversion, a white picture, and torchvision's decoders return
uint16 for any 16-bit PNG, which a uint8 batch wraps modulo 256, noise. Both are scaled to 8 bits
here (``v * 255 / 65535``, rounded). 32-bit or signed integer and float pixels (modes ``I`` and
``F``) have no agreed range, so they are refused rather than guessed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from inpaint.errors import one_line

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UNSUPPORTED_MODES = {"I": "32-bit or signed integer", "F": "floating-point"}


class UnreadableImage(ValueError):
    """A picture that cannot be read; ``kind``: too_large, not_image, damaged, unreadable or unsupported."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def open_image(source: bytes | str | Path, mode: str) -> Image.Image:
    """The picture in ``source`` (encoded bytes or a file), upright per its EXIF, in ``mode`` (RGB or L).

    PIL's decompression-bomb limit is enforced: an image over ``Image.MAX_IMAGE_PIXELS`` (89 MP) is
    refused from its header before it is decoded, since a small file can hold a huge picture.
    (Checked here, not by turning PIL's warning into an error: ``warnings.catch_warnings`` is
    process-wide state, and the endpoint and the packer decode in threads.)
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            check_pixels(image)
            return convert(ImageOps.exif_transpose(image), mode)
    except Image.DecompressionBombError as exc:  # PIL's own refusal, at twice the limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise UnreadableImage("too_large", _too_large(int(found.group(1)) if found else None)) from None
    except UnidentifiedImageError:
        raise UnreadableImage("not_image", "not an image PIL can read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
    except UnreadableImage:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file itself: permission denied, a folder...
            raise UnreadableImage("unreadable", f"cannot read the file ({exc.strerror})") from None
        raise UnreadableImage("damaged", f"cannot decode the image, truncated or damaged ({one_line(exc)})") from None
    except (ValueError, SyntaxError) as exc:  # a damaged chunk
        raise UnreadableImage("damaged", f"cannot decode the image, truncated or damaged ({one_line(exc)})") from None


def check_pixels(image: Image.Image) -> None:
    """Raise UnreadableImage when an opened (not yet decoded) image is over PIL's 89 MP limit."""
    if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise UnreadableImage("too_large", _too_large(image.width * image.height))


def _too_large(pixels: int | None) -> str:
    size = f"{pixels / 1e6:.0f} MP, " if pixels else ""
    return (f"{size}more than the {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP an image may have here "
            "(a decompression-bomb guard)")


def convert(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)``, with 16-bit grey scaled to 8 bits instead of clipped."""
    refuse_unsupported(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray(to_uint8(torch.from_numpy(np.asarray(image).astype(np.int32))).numpy(), "L")
    return image if image.mode == mode else image.convert(mode)


def refuse_unsupported(image: Image.Image) -> None:
    """Raise UnreadableImage for pixels whose range nobody agrees on (32-bit or signed integer, float)."""
    if image.mode in UNSUPPORTED_MODES:
        raise UnreadableImage("unsupported", f"{UNSUPPORTED_MODES[image.mode]} pixels (mode {image.mode}) have no "
                                             "agreed range: save the picture with 8 or 16 bits per channel")


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels of uint8 or 16-bit ones (torchvision's uint16, or int32 holding 0..65535)."""
    if pixels.dtype == torch.uint8:
        return pixels
    return ((pixels.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
