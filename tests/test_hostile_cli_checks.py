"""Every user mistake against the four CLIs is one ``error:`` line on stderr, exit 2, no traceback,
and leaves the files as they were (issue 13): one table per CLI, the hostile cases and the ordinary ones.

The CLIs run in this process (tests/cli_harness.py), so an uncaught exception fails the test as a
traceback would. ``jobs/train.py`` must catch every one of these before Ray starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster import launch
from inpaint.data import DataError, pack_dataset
from tests.cli_harness import run_cli, train_debug_run, tree_digest


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dataset) -> Path:
    """What the cases act on: a run with a config and two checkpoints, images, masks, files in the way."""
    root = tmp_path_factory.mktemp("hostile")
    train_debug_run(root / "runs" / "r", sample_dataset)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "in.png")
    for name, mask in {"small": np.full((10, 10), 255), "empty": np.zeros((40, 50)),
                       "full": np.full((40, 50), 255)}.items():
        Image.fromarray(mask.astype(np.uint8)).save(root / f"mask-{name}.png")
    Image.fromarray(np.full((40, 50), 50, np.uint8)).save(root / "mask-grey.png")  # non-zero, but under 128
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 MP in a few kB: a decompression bomb
    (root / "broken.png").write_bytes(b"not a png")
    whole = (root / "in.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2])
    Image.fromarray(np.zeros((40, 50), np.float32)).save(root / "float.tiff")  # no agreed range
    (root / "afile").write_text("a regular file where a folder is expected")
    (root / "photos-broken").mkdir()
    (root / "photos-broken" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "photos-none").mkdir()
    (root / "photos-none" / "notes.txt").write_text("no image here")
    (root / "images").mkdir()
    shutil.copy(root / "in.png", root / "images" / "x.png")
    (root / "masks").mkdir()
    corrupt = root / "runs" / "corrupt"
    shutil.copytree(root / "runs" / "r", corrupt)
    for checkpoint in corrupt.glob("checkpoint_*"):
        (checkpoint / "generator.safetensors").write_bytes(b"truncated")
    shutil.copytree(sample_dataset, root / "packed")
    return root


def check(world: Path, cli: str, argv: list[str], match: str) -> None:
    """``cli argv`` (``{w}`` in an argument is the world folder) fails in one line matching ``match``."""
    argv = [arg.replace("{w}", str(world)) for arg in argv]
    before = snapshot(world)
    run_cli(cli, *argv).assert_one_line_error(match)
    assert snapshot(world) == before, "a failed command changed, removed or left something"


def snapshot(root: Path) -> tuple[dict[str, str], set[str]]:
    """Every file's digest and every folder: what a failed command must leave as it was."""
    return tree_digest(root), {str(p) for p in root.rglob("*") if p.is_dir()}


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the mistake must be caught before Ray starts")

    monkeypatch.setattr(launch, "ensure_ray", refuse)


TRAIN = "--recipe debug --storage {w}/runs --data {w}/packed".split()
TRAIN_CASES = [
    (["--recipe", "nope"], r"unknown recipe 'nope' \(known: .*debug"),
    (["--set", "model.nope=1"], r"model.nope: unknown field"),
    (["--set", "nosep"], r"expected section.field=value"),
    (["--set", "data.batch_size=abc"], r"data.batch_size: expected an integer, got 'abc'"),
    (["--set", "data.batch_size=inf"], r"data.batch_size: expected an integer, got 'inf'"),
    (["--set", "data.batch_size=nan"], r"data.batch_size: expected an integer"),
    (["--set", "data.batch_size=0"], r"data.batch_size"),
    (["--set", "schedule.joint_steps=1e400"], r"schedule.joint_steps: expected an integer"),
    (["--set", "runtime.seed=1e30"], r"runtime.seed: .* out of range"),
    (["--set", "optim.g_lr=inf"], r"optim.g_lr: expected a finite number"),
    (["--set", "optim.g_lr=-1"], r"optim.g_lr"),
    (["--set", "model.image_size=33"], r"model.image_size: must be a multiple of 16"),
    (["--set", "data.train_split=nosplit"], r"no split 'nosplit' \(splits: test, train\)"),
    (["--workers", "0"], r"--workers: expected N or MIN-MAX"),
    (["--workers", "3-1"], r"--workers: expected N or MIN-MAX"),
    (["--workers", "abc"], r"--workers: expected N or MIN-MAX"),
    (["--storage-option", "novalue"], r"--storage-option: expected key=value"),
    (["--storage-option", "endpoint_url=http://x"], r"--storage-option endpoint_url: not an option of local paths"),
    (["--data", "{w}/nodata"], r"nodata: no index.json"),
    (["--data", "{w}/afile"], r"afile"),
    (["--storage", "{w}/afile/runs"], r"afile"),
    (["--name", "r", "--set", "model.gen_width=16"], r"run r exists with a different config .*model.gen_width: 8 -> 16"),
    (["--name", "../escape"], r"name"),
    (["--set", "runtime.device=cuda"], r"--set runtime.device=cuda contradicts no --gpu"),
    (["--gpu", "--set", "runtime.device=cpu"], r"--set runtime.device=cpu contradicts --gpu"),
]


@pytest.mark.parametrize("argv, match", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_mistakes(world, no_ray, argv, match):
    check(world, "train", [*TRAIN, *argv], match)


MAKE_SHARDS_CASES = [
    (["--dataset", "nope", "--output", "{w}/o"], r"invalid choice: 'nope'"),
    (["--dataset", "folder", "--output", "{w}/o"], r"--dataset folder needs --source"),
    (["--dataset", "folder", "--source", "{w}/none", "--output", "{w}/o"], r"none does not exist"),
    (["--dataset", "folder", "--source", "{w}/in.png", "--output", "{w}/o"], r"in.png is not a folder"),
    (["--dataset", "folder", "--source", "{w}/photos-none", "--output", "{w}/o"], r"no images"),
    (["--dataset", "folder", "--source", "{w}/photos-broken", "--output", "{w}/o"], r"none of the 1 images"),
    (["--dataset", "lfw", "--source", "{w}/photos-none", "--output", "{w}/o"], r"photos-none"),
    (["--dataset", "sample", "--split", "paper", "--output", "{w}/o"], r"--split 'paper' does not apply to sample"),
    (["--dataset", "sample", "--output", "{w}/packed"], r"already holds a packed dataset"),
    (["--dataset", "sample", "--output", "{w}/afile"], r"is a file, not a folder"),
    (["--dataset", "sample", "--output", "{w}/afile/sub/deeper"], r"is a file, not a folder"),
    (["--dataset", "sample", "--shard-size", "0", "--output", "{w}/o"], r"--shard-size: must be >= 1"),
    (["--dataset", "sample", "--shard-size", "-3", "--output", "{w}/o"], r"--shard-size: must be >= 1"),
    (["--dataset", "sample", "--test-fraction", "1.5", "--output", "{w}/o"], r"--test-fraction"),
    (["--dataset", "sample", "--seed", "x", "--output", "{w}/o"], r"--seed"),
    (["--dataset", "sample", "--storage-option", "anon=true", "--output", "{w}/o"],
     r"--storage-option anon: not an option of local paths"),
]


@pytest.mark.parametrize("argv, match", MAKE_SHARDS_CASES, ids=[" ".join(a) for a, _ in MAKE_SHARDS_CASES])
def test_make_shards_mistakes(world, argv, match):
    check(world, "make_shards", [*argv, "--quiet"], match)


CKPT = ["--checkpoint", "{w}/runs/r"]
EVALUATE_CASES = [
    ([], r"give --checkpoint, --watch or --baseline"),
    (["--checkpoint", "{w}/nothing"], r"nothing: no such checkpoint or run folder"),
    (["--checkpoint", "{w}/runs/corrupt"], r"corrupt"),
    ([*CKPT, "--num-images", "0"], r"--num-images: expected a positive integer or 'all'"),
    ([*CKPT, "--num-images", "abc"], r"--num-images"),
    ([*CKPT, "--seed", "1e30"], r"--seed: expected an integer"),
    ([*CKPT, "--workers", "0"], r"--workers: must be >= 1"),
    ([*CKPT, "--device", "tpu"], r"invalid choice: 'tpu'"),
    ([*CKPT, "--split", "nosplit"], r"no split 'nosplit'"),
    ([*CKPT, "--data", "{w}/nodata"], r"nodata: no index.json"),
    ([*CKPT, "--storage-option", "foo=1"], r"--storage-option foo: not an option of local paths"),
    ([*CKPT, "--output", "{w}/in.png"], r"in.png"),
    ([*CKPT, "--output", "{w}/afile/x"], r"afile"),
    ([*CKPT, "--max-polls", "3"], r"--max-polls counts the polls of --watch --interval"),
    (["--baseline", "telea"], r"--baseline without --checkpoint needs --output"),
    (["--baseline", "nope"], r"invalid choice: 'nope'"),
    (["--watch", "{w}/nowhere"], r"no config.json to take the data URL from"),
    (["--watch", "{w}/runs/r", "--interval", "-5"], r"--interval: must be > 0"),
    (["--watch", "{w}/runs/r", "--claim-timeout", "0"], r"--claim-timeout: must be > 0"),
    (["--watch", "{w}/runs/r", "--output", "{w}/o"], r"--watch writes to RUN/evaluations"),
]


@pytest.mark.parametrize("argv, match", EVALUATE_CASES, ids=[" ".join(a) or "nothing" for a, _ in EVALUATE_CASES])
def test_evaluate_mistakes(world, argv, match):
    check(world, "evaluate", argv, match)


FILL = ["--checkpoint", "{w}/runs/r", "--image", "{w}/in.png"]
BOX = ["--box", "1,1,8,8"]
FILL_CASES = [
    ([*FILL, *BOX], r"--output"),  # argparse: a required argument is missing
    ([*FILL, "--mask", "{w}/mask-small.png", "--output", "{w}/o.png"], r"mask is 10x10 but the image is 50x40"),
    ([*FILL, "--mask", "{w}/mask-empty.png", "--output", "{w}/o.png"], r"mask has no hole"),
    ([*FILL, "--mask", "{w}/mask-full.png", "--output", "{w}/o.png"], r"mask covers the whole image"),
    ([*FILL, "--mask", "{w}/nomask.png", "--output", "{w}/o.png"], r"no such mask file"),
    ([*FILL, "--mask", "{w}/mask-grey.png", "--output", "{w}/o.png"], r"no pixel at grey level 128 or above"),
    ([*FILL, "--mask", "{w}/masks", "--output", "{w}/o.png"], r"masks: is a folder; with one --image"),
    # The user's original is never replaced (and, for a JPEG, re-encoded): not the image, not the mask.
    ([*FILL, *BOX, "--output", "{w}/in.png"], r"in.png: would overwrite the input"),
    ([*FILL, "--mask", "{w}/mask-full.png", "--output", "{w}/mask-full.png"], r"would overwrite the input"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/images", *BOX, "--output", "{w}/images"],
     r"x.png: would overwrite the input"),
    ([*FILL, "--box", "40,30,20,10", "--output", "{w}/o.png"], r"not inside the 50x40 image"),
    ([*FILL, "--box", "1,2,3", "--output", "{w}/o.png"], r"expected X,Y,W,H"),
    ([*FILL, *BOX, "--output", "{w}/o.xyz"], r"unknown image format; name the output .png"),
    ([*FILL, *BOX, "--output", "{w}/afile/o.png"], r"cannot write .*afile"),
    ([*FILL, *BOX, "--max-pixels", "0", "--output", "{w}/o.png"], r"--max-pixels: must be >= 1"),
    ([*FILL, "--box", "1,1,40,30", "--max-pixels", "100", "--output", "{w}/o.png"],
     r"needs a 50x40 px window \(2,000 px\), more than the limit of 100 px"),
    ([*FILL, *BOX, "--device", "tpu", "--output", "{w}/o.png"], r"invalid choice: 'tpu'"),
    (["--checkpoint", "{w}/nothing", "--image", "{w}/in.png", *BOX, "--output", "{w}/o.png"],
     r"no such checkpoint or run folder"),
    (["--checkpoint", "{w}/runs/corrupt", "--image", "{w}/in.png", *BOX, "--output", "{w}/o.png"], r"corrupt"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/broken.png", *BOX, "--output", "{w}/o.png"],
     r"broken.png: not an image PIL can read"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/truncated.png", *BOX, "--output", "{w}/o.png"],
     r"truncated.png: cannot decode the image, truncated or damaged"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/float.tiff", *BOX, "--output", "{w}/o.png"],
     r"float.tiff: floating-point pixels \(mode F\) have no agreed range"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/bomb.png", *BOX, "--output", "{w}/o.png"],
     r"bomb.png: 400 MP, more than the 89 MP an image may have here"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/noimage.png", *BOX, "--output", "{w}/o.png"],
     r"no such file or folder"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/images", "--mask", "{w}/masks", "--output", "{w}/out"],
     r"x.png: no mask of the same name"),
    (["--checkpoint", "{w}/runs/r", "--image", "{w}/photos-none", *BOX, "--output", "{w}/out"],
     r"folder holds no image"),
]


@pytest.mark.parametrize("argv, match", FILL_CASES, ids=[" ".join(a[4:]) or "usage" for a, _ in FILL_CASES])
def test_fill_mistakes(world, argv, match):
    check(world, "fill", argv, match)


# ------------------------------------------------------------------ object storage
@pytest.mark.parametrize("cli, argv, match", [
    ("train", [*TRAIN[:2], "--data", "{w}/packed", "--storage", "s3://no-such-bucket/runs"],
     r"no-such-bucket.*(does not exist|no such bucket|not found)"),
    ("train", [*TRAIN[:2], "--data", "s3://no-such-bucket/data", "--storage", "{w}/runs"], r"no-such-bucket"),
    ("train", [*TRAIN[:2], "--data", "s3://no-such-bucket/data", "--storage", "{w}/runs",
               "--storage-option", "anonymous=true"], r"--storage-option anonymous: not an option of s3:// storage"),
    ("make_shards", ["--dataset", "sample", "--output", "s3://no-such-bucket/x", "--quiet"], r"no-such-bucket"),
    ("evaluate", ["--checkpoint", "s3://no-such-bucket/runs/r"], r"no-such-bucket"),
    ("evaluate", ["--watch", "s3://no-such-bucket/runs/r"], r"no-such-bucket"),
    ("fill", ["--checkpoint", "s3://no-such-bucket/runs/r", "--image", "{w}/in.png", *BOX, "--output", "{w}/o.png"],
     r"no-such-bucket"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_missing_buckets_are_one_line_errors_and_never_created(world, no_ray, s3_server, cli, argv, match):
    import s3fs

    check(world, cli, argv, match)
    assert "no-such-bucket" not in {b.rstrip("/") for b in s3fs.S3FileSystem().ls("")}


def test_watch_of_an_unreachable_store_is_one_error_line(monkeypatch):
    import s3fs

    from tests.conftest import _free_port

    for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}"), ("AWS_ACCESS_KEY_ID", "x"),
                        ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        run_cli("evaluate", "--watch", "s3://no-such-bucket/runs/a").assert_one_line_error(
            r"s3://no-such-bucket/runs/a: cannot be read")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_zero_shard_size_is_refused_by_the_library_too(tmp_path):
    with pytest.raises(DataError, match="shard size must be >= 1, got 0"):
        pack_dataset("sample", None, str(tmp_path / "out"), shard_size=0, progress=False)
    assert not Path(tmp_path / "out").exists()
