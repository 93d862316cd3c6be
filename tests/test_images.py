"""Pictures with more than 8 bits, or no agreed range, reach every entry point right or not at all.

Pillow clips 16-bit grey to white on convert(); torchvision decodes any 16-bit PNG to uint16, which
a uint8 batch would wrap. Every way in (fill, the endpoint, the Python API, packed shards) must see
the same 8-bit picture: ``round(v * 255 / 65535)``.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from inpaint.data import iter_split, pack, pack_dataset
from inpaint.data.reading import decode
from inpaint.images import UnreadableImage, open_image
from inpaint.inference import InpaintError, image_array
from inpaint.serving import RequestError, decode_image


def _ramp16(height: int = 24, width: int = 32) -> np.ndarray:
    """A 16-bit grey ramp over the whole range, 0 .. 65535."""
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


def _expected8(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grey16_png() -> bytes:
    return _png_bytes(Image.fromarray(_ramp16()))


def _rgb16_png(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A 16-bit RGB PNG (Pillow cannot write one; OpenCV can) and its RGB values."""
    rgb = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", rgb[..., ::-1])  # OpenCV writes BGR
    assert ok
    return encoded.tobytes(), rgb


def _float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)).save(buffer, format="TIFF")
    return buffer.getvalue()


def test_16bit_grey_is_scaled_to_8_bits_not_clipped_to_white():
    data = _grey16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the case Pillow's own convert() clips
    want = _expected8(_ramp16())
    grey = np.asarray(open_image(data, "L"))
    assert np.array_equal(grey, want)
    rgb = np.asarray(open_image(data, "RGB"))
    assert all(np.array_equal(rgb[..., c], want) for c in range(3))
    # The endpoint, the Python API and the shards' reader give the same picture.
    assert np.array_equal(np.asarray(decode_image(data, "image", "RGB")), rgb)
    assert np.array_equal(image_array(Image.open(io.BytesIO(data))), rgb)
    assert np.array_equal(decode(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy(), rgb)


def test_16bit_rgb_png_decodes_to_8_bits_in_the_shards_reader():
    data, rgb = _rgb16_png(np.random.default_rng(0))
    decoded = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert decoded.dtype == torch.uint8
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), _expected8(rgb))
    # Pillow reduces 16-bit RGB itself (it keeps the high byte): within one level of the rounding.
    pil = np.asarray(open_image(data, "RGB")).astype(int)
    assert np.abs(pil - _expected8(rgb).astype(int)).max() <= 1


def test_pixels_without_an_agreed_range_are_refused_everywhere_in_one_line():
    data = _float_tiff()
    with pytest.raises(UnreadableImage, match="floating-point pixels .*8 or 16 bits") as caught:
        open_image(data, "RGB")
    assert caught.value.kind == "unsupported"
    with pytest.raises(RequestError) as refused:
        decode_image(data, "image", "RGB")
    assert refused.value.status == 415 and refused.value.message.startswith("image: floating-point pixels")
    with pytest.raises(InpaintError, match="floating-point pixels"):
        image_array(Image.open(io.BytesIO(data)))


def test_packing_scales_16bit_photos_and_skips_float_ones_with_the_reason(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    rng = np.random.default_rng(1)
    grey = _ramp16(32, 32)
    Image.fromarray(grey).save(source / "grey16.png")
    data, rgb = _rgb16_png(rng)
    (source / "rgb16.png").write_bytes(data)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source / "rgb8.png")
    (source / "float.tiff").write_bytes(_float_tiff())
    summary = pack_dataset("folder", source, str(tmp_path / "packed"), shard_size=8, progress=False,
                           test_fraction=0.5)
    assert [Path(name).name for name, _ in summary.skipped] == ["float.tiff"]
    assert "floating-point pixels" in summary.skipped[0][1]
    read = [image for split in ("train", "test") for _, image in iter_split(str(tmp_path / "packed"), split, 24)]
    assert len(read) == 3 and all(image.dtype == torch.uint8 for image in read)
    # Centre crops, scaled: not white (Pillow's clip) nor wrapped (torchvision's uint16 into uint8).
    ramp = _expected8(grey[4:28, 4:28])
    assert any(all(np.array_equal(image[c].numpy(), ramp) for c in range(3)) for image in read)
    assert any(np.array_equal(image.permute(1, 2, 0).numpy(), _expected8(rgb)[:, 4:28]) for image in read)


@pytest.mark.parametrize("kind, orientation", [("JPEG", 6), ("JPEG", 3), ("PNG", 6), ("WEBP", 6)])
def test_shards_read_a_sideways_phone_photo_upright_as_fill_does(kind, orientation):
    """A photo stored sideways with an EXIF orientation tag: the shards train on what `fill` shows.

    WebP matters apart: torchvision's WebP decoder ignores the tag, so the reader hands it to PIL.
    """
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(np.kron(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: turn 90 degrees clockwise to view; 3: turn 180
    buffer = io.BytesIO()
    stored.save(buffer, format=kind, quality=95, exif=exif)
    data = buffer.getvalue()
    upright = np.asarray(open_image(data, "RGB")).astype(int)
    assert upright.shape == ((80, 48, 3) if orientation == 6 else (48, 80, 3))
    decoded = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy().astype(int)
    assert decoded.shape == upright.shape and np.abs(decoded - upright).mean() < 1.0  # two decoders, lossy formats
    extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[kind]
    assert pack._inspect(data) == (extension, upright.shape[1], upright.shape[0])  # the shard's meta: upright size


def test_a_picture_over_the_pixel_limit_is_refused_from_its_header_and_not_packed(tmp_path, monkeypatch):
    """Between PIL's limit and twice it PIL only warns; every reader here refuses, thread-safely."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 px below: over the limit, under twice it
    data = _png_bytes(Image.fromarray(np.zeros((30, 40, 3), np.uint8)))
    with pytest.raises(UnreadableImage, match="more than the 0 MP an image may have here") as caught:
        open_image(data, "RGB")
    assert caught.value.kind == "too_large"
    with pytest.raises(RequestError) as refused:
        decode_image(data, "image", "RGB")
    assert refused.value.status == 413
    with pytest.raises(UnreadableImage):
        pack._inspect(data)


def test_a_mode_pil_cannot_convert_is_a_one_line_inpaint_error():
    with pytest.raises(InpaintError, match="image: conversion from La"):
        image_array(Image.new("La", (8, 8)))
