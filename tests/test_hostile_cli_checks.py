"""Issue-13 cases that still gave a traceback or were silently accepted: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import launch
from inpaint.data import DataError, pack_dataset
from tests.cli_harness import run_cli, tree_digest


def test_train_with_a_mistyped_split_is_one_error_line(sample_dataset, tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("the mistake must be caught before Ray starts")

    monkeypatch.setattr(launch, "ensure_ray", no_ray)
    run_cli("train", "--storage", str(tmp_path / "runs"), "--name", "x", "--data", sample_dataset,
            "--set", "data.train_split=nosplit").assert_one_line_error(r"no split 'nosplit' \(splits: test, train\)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_make_shards_output_under_a_regular_file_is_one_error_line(tmp_path, below):
    regular = tmp_path / "afile"
    regular.write_text("not a folder")
    output = regular / below if below else regular
    before = tree_digest(tmp_path)
    run_cli("make_shards", "--dataset", "sample", "--output", str(output), "--quiet").assert_one_line_error(
        r"is a file, not a folder")
    assert tree_digest(tmp_path) == before


def test_a_zero_shard_size_is_refused_not_taken_for_the_default(tmp_path):
    with pytest.raises(DataError, match="shard size must be >= 1, got 0"):
        pack_dataset("sample", None, str(tmp_path / "out"), shard_size=0, progress=False)
    assert not Path(tmp_path / "out").exists()
    run_cli("make_shards", "--dataset", "sample", "--output", str(tmp_path / "out"),
            "--shard-size", "0").assert_one_line_error(r"--shard-size: must be >= 1")


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
