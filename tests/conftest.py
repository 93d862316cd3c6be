"""Shared fixtures: a local S3 (moto) endpoint, real photographs, a packed sample dataset, a trained debug run.

Tests that use ``s3_server`` (directly or through ``s3_bucket``) get the ``s3`` marker
automatically, so ``-m "not s3"`` deselects them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from typing import Iterator

import numpy as np
import pytest

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


def pytest_configure(config: pytest.Config) -> None:
    # inpaint.data keeps torchvision's JPEG decoder (fastest here) despite its TorchCodec notice.
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clear_s3fs_cache() -> None:
    import s3fs

    # Clients cached before the endpoint changed would keep talking to the old one.
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL.

    The standard AWS variables (endpoint, dummy credentials, region) point every client at it
    (s3fs, botocore, pyarrow, subprocesses) and are restored afterwards.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request drowns test output
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                            ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        _clear_s3fs_cache()
        try:
            yield endpoint
        finally:
            server.stop()
            _clear_s3fs_cache()


@contextlib.contextmanager
def fresh_bucket(prefix: str = "test") -> Iterator[str]:
    """A new, empty bucket on the moto server; yields ``s3://NAME`` and deletes it afterwards."""
    import s3fs

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    try:
        yield f"s3://{name}"
    finally:
        fs.rm(name, recursive=True)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket for one test (see :func:`fresh_bucket`)."""
    with fresh_bucket() as url:
        yield url


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """A few real RGB uint8 photographs (H, W, 3) that scikit-image ships, by name."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTOS}


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> str:
    """The built-in sample dataset packed once into a local folder; yields its path (read-only use)."""
    from inpaint.data import pack_dataset

    path = tmp_path_factory.mktemp("sample-dataset") / "sample"
    pack_dataset("sample", None, str(path), progress=False)
    return str(path)


@pytest.fixture(scope="session")
def template_run(tmp_path_factory, sample_dataset):
    """A debug-recipe run folder with checkpoints at steps 2 and 4 (tests/corruptions.py's OLD, NEW); never changed."""
    from tests.cli_harness import train_debug_run

    return train_debug_run(tmp_path_factory.mktemp("template") / "run", sample_dataset)


@pytest.fixture
def run(template_run, tmp_path):
    """A fresh copy of ``template_run`` that a test may evaluate into, corrupt or resume."""
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(template_run, tmp_path / "run"))
