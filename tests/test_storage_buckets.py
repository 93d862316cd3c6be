"""A mistyped bucket is a one-line error, never a new bucket (issue 13)."""

from __future__ import annotations

import uuid

import pytest

from cluster import launch
from cluster.ray_storage import pyarrow_filesystem
from inpaint import storage
from tests.cli_harness import run_cli


def _buckets() -> set[str]:
    import boto3

    return {bucket["Name"] for bucket in boto3.client("s3").list_buckets()["Buckets"]}


@pytest.fixture
def missing(s3_server) -> str:
    name = f"nobucket-{uuid.uuid4().hex[:8]}"
    assert name not in _buckets()
    return name


def test_check_writable_refuses_a_missing_bucket(missing):
    with pytest.raises(storage.StorageError, match=f"bucket '{missing}' does not exist.*never created") as info:
        storage.check_writable(f"s3://{missing}/runs")
    assert "\n" not in str(info.value)
    assert missing not in _buckets()


def test_writes_and_ray_folders_never_create_a_bucket(missing):
    with pytest.raises(storage.MissingObject):
        storage.write_text(f"s3://{missing}/runs/x/config.json", "{}")
    filesystem, path = pyarrow_filesystem(f"s3://{missing}/runs")
    with pytest.raises(FileNotFoundError):
        filesystem.create_dir(f"{path}/x")
    assert missing not in _buckets()


def test_an_existing_bucket_still_works(s3_bucket):
    storage.check_writable(f"{s3_bucket}/runs")
    storage.write_text(f"{s3_bucket}/runs/x/config.json", "{}")
    filesystem, path = pyarrow_filesystem(f"{s3_bucket}/runs")
    filesystem.create_dir(f"{path}/y")


def test_train_cli_with_a_mistyped_bucket(missing, sample_dataset, monkeypatch):
    monkeypatch.setattr(launch, "ensure_ray", lambda: pytest.fail("must fail before Ray starts"))
    run_cli("train", "--data", sample_dataset, "--storage", f"s3://{missing}/runs").assert_one_line_error(
        f"bucket '{missing}' does not exist")
    assert missing not in _buckets()
