"""Export a checkpoint's generator as one file that runs without this package: TorchScript or ONNX.

    python -m inpaint export --checkpoint runs/celeba-v1 --format torchscript --output inpaint.pt
    python -m inpaint export --checkpoint runs/celeba-v1 --format onnx --output inpaint.onnx

The exported model is the completion, not the raw generator (the same contract in both formats):

    inputs   image      float32 (N, 3, H, W), RGB in [0, 1]
             mask       float32 (N, 1, H, W), 1 = hole (white in the CLI's mask PNGs), 0 = known;
                        values >= 0.5 count as hole
    output   completed  float32 (N, 3, H, W) in [0, 1]:
                        image * (1 - mask) + G(image with the hole blanked, 1 - mask) * mask

so known pixels come back as they went in. N, H and W are free (dynamic axes in ONNX), but H and
W must be multiples of 4 (the generator downsamples twice): pad first, e.g. by reflection, and
crop the result. The file sees only what it is given: for a small hole in a large photo, crop a
window around the hole first, as ``Inpainter.fill`` does (:func:`inpaint.inference.context_window`).

Before the file appears under its name it is loaded back (``torch.jit.load`` or onnxruntime) and
compared with the eager model on random images and masks of sizes other than the one it was traced
at; the largest absolute difference is reported and over ``TOLERANCE`` the export fails. Without
onnxruntime an ONNX file is checked with ``onnx.checker`` only. The file is written beside the
output as ``NAME.partial`` and renamed, so a failed export never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inpaint import storage
from inpaint.inference import MULTIPLE, Inpainter
from inpaint.models.generator import Generator, composite

FORMATS = ("torchscript", "onnx")
# The names each format's loaders expect; another suffix (an ONNX file called .pt) misleads whoever loads it.
SUFFIXES = {"torchscript": (".pt", ".pth", ".ts"), "onnx": (".onnx",)}
INSTALL_EXPORT = 'pip install -e ".[export]" in the checkout'  # the extra; the package is not on PyPI
TOLERANCE = 1e-4  # float32 graphs of the same convolutions; measured differences are ~1e-7
MAX_SIDE = 16384  # the largest H, W the ONNX graph's dynamic axes admit
OPSET = 18


class ExportError(ValueError):
    """An export that cannot be done or did not reproduce the model; the message is one line."""


class Completion(nn.Module):
    """``(image, mask) -> completed image`` around a generator, with mask 1 = hole (see the module doc)."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        known = (mask < 0.5).to(image.dtype)
        return composite(image, self.generator(image, known), known)


@dataclass
class ExportReport:
    output: str
    format: str
    max_abs_diff: float | None  # None: not compared (ONNX without onnxruntime)
    checked_with: str
    shapes: list[tuple[int, ...]]


def sample_inputs(image_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (image, mask) pairs to compare on: batches of 1 and 2, square and not, other sizes than traced."""
    generator = torch.Generator().manual_seed(seed)
    side = max(MULTIPLE, image_size - image_size % MULTIPLE)
    pairs = []
    for n, h, w in ((1, side, side), (2, side + 2 * MULTIPLE, side + MULTIPLE), (1, side + MULTIPLE, 2 * side)):
        image = torch.rand(n, 3, h, w, generator=generator)
        mask = (torch.rand(n, 1, h, w, generator=generator) < 0.3).float()
        pairs.append((image, mask))
    return pairs


def _trace_input(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    side = max(MULTIPLE, image_size - image_size % MULTIPLE)
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4: side // 2, side // 4: side // 2] = 1
    return image, mask


def _save_torchscript(model: Completion, example: tuple[torch.Tensor, torch.Tensor], path: str,
                      meta: dict[str, Any]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The generator's "multiple of 4" check is Python on concrete sizes: tracing warns that it is
        # not recorded. The convolutions themselves carry no size, so the trace takes any H, W.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated in favour of torch.export, but it is still the one format that
        # C++ (libtorch) and any torch >= 1.x load without the model's code: keep offering it.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files={"meta.json": json.dumps(meta)})


def _require(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{why} needs the {module} package: {INSTALL_EXPORT}") from None


def _save_onnx(model: Completion, example: tuple[torch.Tensor, torch.Tensor], path: str,
               meta: dict[str, Any]) -> None:
    onnx = _require("onnx", "--format onnx")
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=1024)
    # H = 4 h, W = 4 w: the graph states the multiple-of-4 rule, so the generator's check holds symbolically.
    height, width = MULTIPLE * dim("h", min=1, max=MAX_SIDE // MULTIPLE), MULTIPLE * dim("w", min=1, max=MAX_SIDE // MULTIPLE)
    shapes = {"image": {0: batch, 2: height, 3: width}, "mask": {0: batch, 2: height, 3: width}}
    # The exporter prints its progress and warns about axis names; the report says what matters.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, input_names=["image", "mask"],
                                    output_names=["completed"], dynamic_shapes=shapes, opset_version=OPSET,
                                    external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, path)


def _max_diff(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(float((out - ref).abs().max()) for out, ref in zip(outputs, expected))


def _run_file(path: str, fmt: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[list[torch.Tensor] | None, str]:
    """(the file's outputs on ``pairs``, or None when it cannot be run here; what checked it)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice, see _save_torchscript
            loaded = torch.jit.load(path, map_location="cpu")
        with torch.no_grad():
            return [loaded(image, mask) for image, mask in pairs], "torch.jit.load"
    onnx = _require("onnx", "--format onnx")
    onnx.checker.check_model(path, full_check=True)
    try:
        import onnxruntime
    except ImportError:
        return None, f"onnx.checker only (onnxruntime is not installed: {INSTALL_EXPORT} to compare)"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0])
               for image, mask in pairs]
    return outputs, f"onnx.checker + onnxruntime {onnxruntime.__version__}"


def export(checkpoint: str, fmt: str, output: str | Path) -> ExportReport:
    """Write the completion model of ``checkpoint`` (a checkpoint or run folder) to ``output``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "onnx":  # before any work: a missing package is the quickest thing to tell
        _require("onnx", "--format onnx")
        _require("onnxscript", "--format onnx")  # torch's exporter builds the graph with it
    output = str(output)
    if not storage.name(output) or output.endswith("/"):
        raise ExportError(f"{output}: name a file to write, not a folder")
    if not storage.is_remote(output) and Path(output).is_dir():
        raise ExportError(f"{output} is a folder: name a file to write")
    if not storage.name(output).lower().endswith(SUFFIXES[fmt]):
        raise ExportError(f"{output}: a {fmt} file is named {' or '.join(SUFFIXES[fmt])}")
    folder = storage.Output(storage.parent(output) if storage.is_remote(output) else str(Path(output).absolute().parent))
    try:
        folder.check_writable()
    except storage.StorageError as exc:
        raise ExportError(str(exc)) from None
    inpainter = Inpainter.from_checkpoint(checkpoint, device="cpu")
    model = Completion(inpainter.generator.float()).eval().requires_grad_(False)  # outputs .numpy() as they come
    image_size = inpainter.config.model.image_size
    meta = {"format": "inpaint completion: image [0,1] (N,3,H,W), mask (N,1,H,W) 1 = hole, H and W multiples of 4",
            "checkpoint": checkpoint, "step": inpainter.meta.get("step"),
            "recipe": inpainter.config.recipe,
            "image_size": image_size}
    pairs = sample_inputs(image_size)
    with torch.no_grad():
        expected = [model(image, mask) for image, mask in pairs]
    save = _save_torchscript if fmt == "torchscript" else _save_onnx
    try:
        with folder.publish(storage.name(output)) as local:
            save(model, _trace_input(image_size), local, meta)
            outputs, checked_with = _run_file(local, fmt, pairs)
            diff = None if outputs is None else _max_diff(outputs, expected)
            if diff is not None and not diff <= TOLERANCE:
                raise ExportError(f"the exported model differs from the eager one by up to {diff:.3g} "
                                  f"(tolerance {TOLERANCE:g}); nothing written")
    except storage.StorageError as exc:
        raise ExportError(str(exc)) from None
    return ExportReport(output, fmt, diff, checked_with, [tuple(image.shape) for image, _ in pairs])


def run(args: argparse.Namespace) -> None:
    report = export(args.checkpoint, args.format, args.output)
    diff = "not compared" if report.max_abs_diff is None else f"max abs difference {report.max_abs_diff:.3g}"
    shapes = ", ".join("x".join(map(str, shape)) for shape in report.shapes)
    print(f"{report.output}: {report.format}, checked against the eager model on {shapes} "
          f"with {report.checked_with}: {diff}")
