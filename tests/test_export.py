"""``python -m inpaint export``: the TorchScript / ONNX file reproduces the eager completion."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from inpaint import Inpainter, export as export_module
from inpaint.__main__ import main
from inpaint.export import Completion, ExportError, export
from tests.serve_harness import debug_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A debug-recipe checkpoint after two training steps (batch-norm statistics away from their init)."""
    folder = debug_checkpoint(tmp_path_factory.mktemp("export") / "run", (2,))
    return str(folder / "checkpoint_000000002")


@pytest.fixture(scope="module")
def eager(checkpoint) -> Completion:
    return Completion(Inpainter.from_checkpoint(checkpoint).generator).eval()


def fresh_input(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input of a size none of the export's own checks used."""
    generator = torch.Generator().manual_seed(123)
    image = torch.rand(n, 3, h, w, generator=generator)
    mask = torch.zeros(n, 1, h, w)
    mask[..., h // 3: h // 2, w // 4: w // 2] = 1
    return image, mask


def assert_completes_like_eager(output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, eager: Completion):
    with torch.no_grad():
        expected = eager(image, mask)
    assert float((output - expected).abs().max()) <= export_module.TOLERANCE
    known = mask.expand_as(image) == 0
    assert torch.equal(output[known], image[known]), "known pixels must come back as they went in"
    assert not torch.allclose(output[~known], image[~known], atol=1e-3), "the hole must be filled"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trips_at_other_sizes_and_batches(checkpoint, eager, tmp_path):
    path = tmp_path / "inpaint.pt"
    report = export(checkpoint, "torchscript", path)
    assert report.max_abs_diff is not None and report.max_abs_diff <= export_module.TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inpaint.pt"]  # no .partial left behind
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["meta.json"])
    assert meta["step"] == 2 and meta["recipe"] == "debug" and "1 = hole" in meta["format"]
    image, mask = fresh_input(3, 44, 60)
    with torch.no_grad():
        assert_completes_like_eager(loaded(image, mask), image, mask, eager)
    assert not loaded(image, mask).requires_grad  # README's snippet calls it without no_grad and reads .numpy()


@pytest.mark.slow
def test_onnx_round_trips_with_dynamic_axes(checkpoint, eager, tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is in the test extra: pip install -e '.[test]'")
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    path = tmp_path / "inpaint.onnx"
    report = export(checkpoint, "onnx", path)
    assert report.max_abs_diff is not None and report.max_abs_diff <= export_module.TOLERANCE
    assert "onnxruntime" in report.checked_with
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props}["step"] == "2"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["image"][1] == 3 and all(isinstance(d, str) for d in shapes["image"][2:]), shapes
    image, mask = fresh_input(2, 52, 36)
    output = session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0]
    assert_completes_like_eager(torch.from_numpy(output), image, mask, eager)


def test_cli_prints_the_difference_to_the_eager_model(checkpoint, tmp_path, capsys):
    output = tmp_path / "out" / "model.pt"
    assert main(["export", "--checkpoint", str(Path(checkpoint).parent), "--format", "torchscript",
                 "--output", str(output)]) == 0  # a run folder: its newest checkpoint
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and output.is_file(), printed


def test_an_export_that_does_not_reproduce_the_model_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="differs from the eager one"):
        export(checkpoint, "torchscript", tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, message", [
    ("format", "invalid choice"),
    ("checkpoint", "no such checkpoint"),
    ("output-under-a-file", "is a file"),
    ("output-is-a-folder", "is a folder"),
    ("suffix", "a torchscript file is named .pt or .pth or .ts"),
])
def test_bad_input_is_one_error_line_with_exit_2(case, message, checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = {"--checkpoint": checkpoint, "--format": "torchscript", "--output": str(tmp_path / "model.pt")}
    if case == "format":
        args["--format"] = "tflite"
    elif case == "checkpoint":
        args["--checkpoint"] = str(tmp_path / "missing")
    elif case == "output-under-a-file":
        args["--output"] = str(tmp_path / "file" / "model.pt")
    elif case == "suffix":
        args["--output"] = str(tmp_path / "model.onnx")
    else:
        args["--output"] = str(tmp_path)
    try:
        code = main(["export", *(part for item in args.items() for part in item)])
    except SystemExit as exc:  # argparse
        code = exc.code
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "model.pt").exists()


def test_exports_to_object_storage(checkpoint, eager, s3_bucket):
    from inpaint import storage

    url = f"{s3_bucket}/models/inpaint.pt"
    export(checkpoint, "torchscript", url)
    assert storage.list_files(f"{s3_bucket}/models") == [url]  # the file only, no temporary beside it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(io.BytesIO(storage.read_bytes(url)))
    image, mask = fresh_input(1, 36, 40)
    with torch.no_grad():
        assert_completes_like_eager(loaded(image, mask), image, mask, eager)


def test_onnx_without_its_packages(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # None in sys.modules makes the import fail
    code = main(["export", "--checkpoint", checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert code == 2 and 'pip install -e ".[export]"' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_onnx_without_onnxruntime_is_checked_by_the_onnx_checker_only(checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="onnx is in the test extra: pip install -e '.[test]'")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--checkpoint", checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "onnx.checker only" in printed and "not compared" in printed, printed
    assert (tmp_path / "m.onnx").is_file()
