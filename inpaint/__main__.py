"""Command line: ``python -m inpaint fill`` (or ``inpaint fill``) completes your own images.

    inpaint fill --checkpoint runs/celeba-v1 --image face.jpg --mask hole.png --output filled.png
    inpaint fill --checkpoint s3://b/runs/celeba-v1 --image photos/ --box 40,40,64,64 --output filled/
    inpaint export --checkpoint runs/celeba-v1 --format onnx --output inpaint.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")

FILL_HELP = """Fill the holes of an image (or of every image in a folder) with a trained generator.

Masks are images of the same size where WHITE marks the hole: a pixel whose grey level is
>= 128 is filled, anything darker is kept. Known pixels come back bit-identical (write PNG:
JPEG would re-encode them). Any image size works: the network sees a square window around the
hole (twice the hole's longer side, at least the checkpoint's image size), the scale it was
trained at; a window over --max-pixels is refused."""

EXPORT_HELP = """Write a checkpoint's generator as one file that runs without this package.

The file maps image (N, 3, H, W) float in [0, 1] and mask (N, 1, H, W), 1 = hole (white in mask
PNGs), to the completed image (known pixels kept); H and W multiples of 4. It is checked against
the eager model on random inputs before it appears (details: inpaint/export.py)."""


def build_parser() -> argparse.ArgumentParser:
    from inpaint.cli import OneLineParser, local_path, path_text, positive_int

    parser = OneLineParser(prog="inpaint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fill = commands.add_parser("fill", description=FILL_HELP, help="fill holes in your own images",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    fill.add_argument("--checkpoint", required=True, type=path_text,
                      help="checkpoint folder, or a run folder (its latest checkpoint); local or s3://")
    fill.add_argument("--image", required=True, type=local_path, help="an image file, or a folder of images")
    holes = fill.add_mutually_exclusive_group(required=True)
    holes.add_argument("--mask", type=local_path,
                       help="mask PNG (white = hole), or with a folder --image a folder of same-named masks")
    holes.add_argument("--box", type=parse_box, metavar="X,Y,W,H",
                       help="a rectangular hole in pixels (top-left x, y, width, height), for every image")
    fill.add_argument("--output", required=True, type=local_path,
                      help="output image file, or a folder (written as <name>.png) for a folder --image")
    fill.add_argument("--blend", action=argparse.BooleanOptionalAction, default=True,
                      help="Poisson-blend the fill into its surroundings as GLCIC does (default; what evaluation "
                           "reports as post-processed); --no-blend writes the network's raw output")
    fill.add_argument("--weights", default="ema", choices=("ema", "raw"),
                      help="the averaged generator (model.ema_decay; default) or the last trained weights; a "
                           "checkpoint without an average uses its raw weights either way")
    fill.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    fill.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                      help="the largest window around a hole filled at once (default 4194304, 2048x2048: "
                           "about 4 GiB with the paper's generator); larger windows are refused")
    export = commands.add_parser("export", help="write the generator as one TorchScript or ONNX file",
                                 description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a run folder (its latest checkpoint); local or s3://")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    export.add_argument("--output", required=True, help="the file to write (local or s3://)")
    return parser


def parse_box(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` as four integers."""
    try:
        x, y, w, h = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H (four integers), got {text!r}") from None
    return x, y, w, h


def read_image(path: Path, mode: str):
    """A PIL image from a file (:func:`inpaint.images.open_image`), or an InpaintError naming the file."""
    from inpaint.images import UnreadableImage, open_image
    from inpaint.inference import InpaintError

    try:
        return open_image(path, mode)
    except UnreadableImage as exc:
        raise InpaintError(f"{path}: {exc}") from None


def plan(image: Path, mask: Path | None, output: Path) -> list[tuple[Path, Path | None, Path]]:
    """(image, mask or None, output) per image; every mask checked to exist before any work."""
    from inpaint.inference import InpaintError

    if not image.exists():
        raise InpaintError(f"{image}: no such file or folder")
    if image.is_file():
        if mask is not None and mask.is_dir():
            raise InpaintError(f"{mask}: is a folder; with one --image, --mask is one mask file")
        if mask is not None and not mask.is_file():
            raise InpaintError(f"{mask}: no such mask file")
        return _refuse_overwriting_inputs([(image, mask, output)])
    images = sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InpaintError(f"{image}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
    if mask is not None and not mask.is_dir():
        raise InpaintError(f"{mask}: with a folder --image, --mask must be a folder of same-named masks")
    jobs = []
    for path in images:
        mask_path = None
        if mask is not None:
            candidates = [mask / path.name, *(mask / (path.stem + s) for s in IMAGE_SUFFIXES)]
            mask_path = next((c for c in candidates if c.is_file()), None)
            if mask_path is None:
                raise InpaintError(f"{path.name}: no mask of the same name in {mask}")
        jobs.append((path, mask_path, output / f"{path.stem}.png"))
    return _refuse_overwriting_inputs(jobs)


def _refuse_overwriting_inputs(jobs: list[tuple[Path, Path | None, Path]]) -> list[tuple[Path, Path | None, Path]]:
    """``jobs``, unless an output would replace one of the inputs: the user's original photo (or
    mask) would be lost, and for a JPEG re-encoded. Checked for every job before any work."""
    from inpaint.inference import InpaintError

    inputs = {path.resolve(): path for image, mask, _ in jobs for path in (image, mask) if path is not None}
    for _, _, output in jobs:
        original = inputs.get(output.resolve())
        if original is not None:
            raise InpaintError(f"{output}: would overwrite the input {original}; write the fill to another "
                               "--output")
    return jobs


def fill(args: argparse.Namespace) -> None:
    """Run ``inpaint fill``: load once, then fill each planned image."""
    from PIL import Image
    from tqdm import tqdm

    from inpaint import storage
    from inpaint.inference import Inpainter, InpaintError, box_hole, hole_array, image_array

    jobs = plan(args.image, args.mask, args.output)
    if args.output.suffix.lower() in LOSSY_SUFFIXES and args.image.is_file():
        print(f"note: {args.output.suffix} re-encodes every pixel; write .png to keep known pixels exact",
              file=sys.stderr)
    inpainter = Inpainter.from_checkpoint(args.checkpoint, device=args.device, weights=args.weights,
                                          **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    for image_path, mask_path, output_path in tqdm(jobs, desc="fill", unit="img", disable=len(jobs) == 1):
        image = image_array(read_image(image_path, "RGB"))
        size = image.shape[:2]
        try:
            hole = box_hole(args.box, size) if args.box else hole_array(read_image(mask_path, "L"), size)
        except InpaintError as exc:
            raise InpaintError(f"{image_path.name}: {exc}") from None
        filled = inpainter.fill_array(image, hole, blend=args.blend)
        try:
            output_path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InpaintError(f"cannot write {output_path}: a part of its folder is a file") from None
        image_format = Image.registered_extensions().get(output_path.suffix.lower())
        if image_format is None:
            raise InpaintError(f"{output_path}: unknown image format; name the output .png")
        if output_path.is_dir():
            raise InpaintError(f"cannot write {output_path}: it is a folder")
        try:
            # Written beside the output and renamed once complete: a full disk or Ctrl-C keeps
            # the old file, and a link at the output's name is replaced, never written through.
            with storage.atomic_local(output_path) as partial:
                Image.fromarray(filled).save(partial, format=image_format)
        except (ValueError, KeyError):  # PIL cannot write this format for this image
            raise InpaintError(f"{output_path}: cannot be written as {image_format}; name the output .png") from None
        print(f"{image_path} -> {output_path} ({int(hole.sum())} px filled)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from inpaint.baselines import BaselineError
    from inpaint.checkpoint import CheckpointError
    from inpaint.export import ExportError
    from inpaint.inference import InpaintError
    from inpaint.storage import StorageError

    try:
        if args.command == "export":
            from inpaint.export import run as export
            export(args)
        else:
            fill(args)
    except (InpaintError, CheckpointError, BaselineError, ExportError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable output path
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
