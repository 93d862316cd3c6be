"""Inpainting users' own images: the Inpainter API and ``python -m inpaint fill``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inpaint import Inpainter
from inpaint.__main__ import main
from inpaint.checkpoint import CheckpointError
from inpaint.inference import InpaintError, hole_array
from tests.cli_harness import train_debug_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with two debug-recipe checkpoints (steps 1 and 3)."""
    return train_debug_run(tmp_path_factory.mktemp("inference") / "run", save_at=(1, 3))


@pytest.fixture(scope="module")
def inpainter(run) -> Inpainter:
    return Inpainter.from_checkpoint(str(run / "checkpoint_000000003"))


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def rect_hole(height: int, width: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    hole = np.zeros((height, width), dtype=bool)
    hole[top:top + h, left:left + w] = True
    return hole


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


# ------------------------------------------------------------------ API
@pytest.mark.parametrize("height, width", [(37, 53), (32, 32), (5, 9)])
def test_fill_keeps_known_pixels_bit_identical_at_any_size(inpainter, height, width):
    image = photo(height, width)
    hole = rect_hole(height, width, 1, 2, height // 2, width // 2)
    filled = inpainter.fill(image, hole)
    assert filled.shape == image.shape and filled.dtype == np.uint8
    assert np.array_equal(filled[~hole], image[~hole])
    assert not np.array_equal(filled[hole], image[hole])


def test_fill_returns_the_input_type_and_reads_pil_masks_at_128(inpainter):
    image = photo(37, 53)
    mask = np.zeros((37, 53), dtype=np.uint8)
    mask[10:20, 10:30] = 128
    mask[25:30, 5:10] = 127  # below the threshold: known
    filled = inpainter.fill(Image.fromarray(image), Image.fromarray(mask))
    assert isinstance(filled, Image.Image) and filled.size == (53, 37)
    hole = mask >= 128
    assert np.array_equal(np.asarray(filled)[~hole], image[~hole])
    assert np.array_equal(hole_array(Image.fromarray(mask), (37, 53)), hole)


def test_fill_matches_the_generator_on_a_multiple_of_four(inpainter):
    image = photo(32, 32, seed=1)
    hole = rect_hole(32, 32, 8, 8, 16, 16)
    known = torch.from_numpy(~hole)[None, None].float()
    with torch.no_grad():
        expected = inpainter.generator(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, known)
    expected = (expected[0] * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.array_equal(inpainter.fill(image, hole, blend=False)[hole], expected[hole])


def test_a_small_hole_in_a_large_photo_is_filled_from_a_window_at_the_training_scale(inpainter):
    """The generator sees the hole centred in max(image_size, 2 x hole side) px, not the whole photo."""
    image, hole = photo(400, 600, seed=2), rect_hole(400, 600, 100, 300, 8, 12)
    seen = []
    handle = inpainter.generator.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        filled = inpainter.fill(image, hole)
        window = inpainter.fill(image[88:120, 290:322], hole[88:120, 290:322])  # 32 px: the debug image size
    finally:
        handle.remove()
    assert inpainter.config.model.image_size == 32 and seen == [(1, 3, 32, 32)] * 2
    assert np.array_equal(filled[88:120, 290:322], window) and np.array_equal(filled[~hole], image[~hole])
    large = rect_hole(400, 600, 10, 10, 150, 100)  # a 2 x 150 px window, kept inside the image
    seen.clear()
    handle = inpainter.generator.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        inpainter.fill(image, large)
    finally:
        handle.remove()
    assert seen == [(1, 3, 300, 300)]


def test_a_window_over_the_pixel_limit_is_refused_before_any_work(run):
    small = Inpainter.from_checkpoint(str(run), max_pixels=32 * 32)
    small.fill(photo(400, 600), rect_hole(400, 600, 100, 300, 8, 12))  # a 32 x 32 window fits
    with pytest.raises(InpaintError, match=r"needs a 40x40 px window \(1,600 px\), more than the limit of 1,024 px"):
        small.fill(photo(400, 600), rect_hole(400, 600, 100, 300, 20, 20))
    with pytest.raises(InpaintError, match="max_pixels must be >= 1"):
        Inpainter.from_checkpoint(str(run), max_pixels=0)


def test_from_a_run_folder_loads_its_latest_checkpoint(run):
    assert Inpainter.from_checkpoint(str(run)).meta["step"] == 3
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Inpainter.from_checkpoint(str(run / "missing"))


def test_from_a_run_folder_in_s3(run, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(run) + "/", f"{s3_bucket}/run".removeprefix("s3://"), recursive=True)
    for name in ("discriminator.safetensors", "trainer.pt"):  # inference never downloads these
        fs.rm(f"{s3_bucket}/run/checkpoint_000000003/{name}")
    remote = Inpainter.from_checkpoint(f"{s3_bucket}/run")
    local = Inpainter.from_checkpoint(str(run))
    assert remote.meta["step"] == 3
    image, hole = photo(20, 24), rect_hole(20, 24, 4, 4, 8, 8)
    assert np.array_equal(remote.fill(image, hole), local.fill(image, hole))


def test_a_corrupt_generator_is_refused(run, tmp_path):
    import shutil

    copy = shutil.copytree(run / "checkpoint_000000003", tmp_path / "checkpoint")
    weights = copy / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="fails its sha256"):
        Inpainter.from_checkpoint(str(copy))


@pytest.mark.parametrize("mask, message", [
    (np.zeros((10, 12), dtype=bool), "is 12x10 but the image is 16x16"),
    (np.zeros((16, 16), dtype=bool), "no hole"),
    (np.ones((16, 16), dtype=bool), "whole image"),
])
def test_bad_masks_are_clear_errors(inpainter, mask, message):
    with pytest.raises(InpaintError, match=message):
        inpainter.fill(photo(16, 16), mask)


def test_blend_keeps_known_pixels_and_smooths_the_seam(inpainter):
    pytest.importorskip("cv2")
    y, x = np.mgrid[0:40, 0:44]
    image = np.stack([3 * x + 20, 4 * y + 10, x + y + 60], -1).astype(np.uint8)  # smooth: a seam stands out
    hole = rect_hole(40, 44, 10, 12, 16, 20)

    def seam(out: np.ndarray) -> float:
        """Mean step between the hole's top/bottom rows and the known rows next to them."""
        rows = [(10, 9), (25, 26)]
        return float(np.mean([np.abs(out[a, 12:32].astype(int) - out[b, 12:32]).mean() for a, b in rows]))

    plain = inpainter.fill(image, hole, blend=False)
    blended = inpainter.fill(image, hole)  # post-processing is the default
    assert np.array_equal(blended[~hole], image[~hole])
    assert seam(blended) < seam(plain) / 2


# ------------------------------------------------------------------ CLI
def test_cli_fills_an_odd_sized_image_and_keeps_known_pixels(run, tmp_path, capsys):
    image = photo(37, 53)
    hole = rect_hole(37, 53, 5, 7, 12, 20)
    save_png(image, tmp_path / "in.png")
    save_png(hole.astype(np.uint8) * 255, tmp_path / "mask.png")
    code = main(["fill", "--checkpoint", str(run), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png"), "--device", "cpu"])
    assert code == 0 and "240 px filled" in capsys.readouterr().out
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == image.shape and np.array_equal(out[~hole], image[~hole])


def test_cli_fills_a_folder_with_same_named_masks_or_a_box(run, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, (h, w) in {"a": (37, 53), "b": (24, 20)}.items():
        save_png(photo(h, w), tmp_path / "images" / f"{name}.png")
        save_png(rect_hole(h, w, 2, 3, 8, 8).astype(np.uint8) * 255, tmp_path / "masks" / f"{name}.png")
    assert main(["fill", "--checkpoint", str(run), "--image", str(tmp_path / "images"),
                 "--mask", str(tmp_path / "masks"), "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "out" / "b.png").size == (20, 24)

    assert main(["fill", "--checkpoint", str(run), "--image", str(tmp_path / "images"),
                 "--box", "1,2,6,5", "--output", str(tmp_path / "boxed")]) == 0
    original = photo(24, 20)
    boxed = np.asarray(Image.open(tmp_path / "boxed" / "b.png"))
    hole = rect_hole(24, 20, 2, 1, 5, 6)
    assert np.array_equal(boxed[~hole], original[~hole]) and not np.array_equal(boxed[hole], original[hole])


@pytest.mark.parametrize("case, message", [
    ("size_mismatch", "mask is 10x10 but the image is 53x37"),
    ("empty", "no hole"),
    ("all_hole", "whole image"),
    ("box_outside", "not inside the 53x37 image"),
    ("bad_image", "in.png: not an image PIL can read"),
    ("missing_checkpoint", "no such checkpoint"),
    ("missing_folder_mask", "no mask of the same name"),
    ("bad_output", "unknown image format"),
])
def test_cli_errors_are_one_line_with_exit_code_2(case, message, run, tmp_path, capsys):
    image = save_png(photo(37, 53), tmp_path / "in.png")
    masks = {"size_mismatch": np.full((10, 10), 255, np.uint8), "empty": np.zeros((37, 53), np.uint8),
             "all_hole": np.full((37, 53), 255, np.uint8)}
    hole_args = ["--mask", str(save_png(masks.get(case, masks["all_hole"]), tmp_path / "mask.png"))]
    checkpoint = str(run)
    if case == "box_outside":
        hole_args = ["--box", "40,30,20,10"]
    elif case == "bad_image":
        image.write_text("not a png")
    elif case == "missing_checkpoint":
        checkpoint = str(tmp_path / "nowhere")
    elif case == "missing_folder_mask":
        (tmp_path / "images").mkdir()
        image = save_png(photo(8, 8), tmp_path / "images" / "x.png")
        image = image.parent
        (tmp_path / "masks").mkdir()
        hole_args = ["--mask", str(tmp_path / "masks")]
    output = tmp_path / ("out.xyz" if case == "bad_output" else "out.png")
    if case == "bad_output":
        hole_args = ["--box", "1,1,4,4"]
    code = main(["fill", "--checkpoint", checkpoint, "--image", str(image), *hole_args, "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_blends_by_default_and_no_blend_writes_the_raw_fill(run, tmp_path):
    image, hole = photo(37, 53, seed=3), rect_hole(37, 53, 8, 10, 14, 18)
    save_png(image, tmp_path / "in.png")
    save_png(hole.astype(np.uint8) * 255, tmp_path / "mask.png")
    outputs = {}
    for name, flags in {"default": [], "no-blend": ["--no-blend"], "raw-weights": ["--no-blend", "--weights", "raw"]}.items():
        assert main(["fill", "--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--output", str(tmp_path / f"{name}.png"), *flags]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert np.array_equal(outputs[name][~hole], image[~hole])
    averaged = Inpainter.from_checkpoint(str(run))
    assert np.array_equal(outputs["default"], averaged.fill(image, hole, blend=True))
    assert np.array_equal(outputs["no-blend"], averaged.fill(image, hole, blend=False))
    assert not np.array_equal(outputs["default"], outputs["no-blend"])
    raw = Inpainter.from_checkpoint(str(run), weights="raw")
    assert np.array_equal(outputs["raw-weights"], raw.fill(image, hole, blend=False))
    assert raw.meta["weights"] == "raw" and averaged.meta["weights"] == "ema"  # the average is not the last weights:
    assert any(not torch.equal(a, b) for a, b in zip(raw.generator.parameters(), averaged.generator.parameters()))


def test_cli_without_opencv_is_a_clear_error_unless_no_blend(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)
    save_png(photo(16, 16), tmp_path / "in.png")
    args = ["fill", "--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--box", "4,4,6,6",
            "--output", str(tmp_path / "out.png")]
    assert main(args) == 2 and "pip install opencv-python-headless" in capsys.readouterr().err
    assert main([*args, "--no-blend"]) == 0


def test_cli_usage_errors_exit_2(run):
    with pytest.raises(SystemExit) as exit_info:
        main(["fill", "--checkpoint", str(run), "--image", "x.png", "--box", "1,2,3", "--output", "y.png"])
    assert exit_info.value.code == 2
