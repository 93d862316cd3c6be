"""Run storage: where checkpoints, TensorBoard logs and evaluations of a run live.

A storage URL is a local path or ``s3://bucket/prefix``. S3 endpoints and credentials come
from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which
s3fs honours; Ray Train gets the same s3fs client wrapped as a pyarrow filesystem. Nothing
here ever prints a credential.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from inpaint.data.storage import DataError, check_storage_options


class StorageError(RuntimeError):
    """Storage that cannot be reached or written; the message names the URL, never secrets."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def normalize(url: str) -> str:
    """Absolute local paths (Ray workers do not share the driver's cwd); remote URLs untouched."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_remote(url):
        return url.rstrip("/")
    return str(Path(url).expanduser().resolve())


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def fsspec_filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of a URL (a fresh client: fork-safe use)."""
    try:
        check_storage_options(url, storage_options)
    except DataError as exc:
        raise StorageError(str(exc)) from None
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create a local folder; on object stores nothing (they have no folders, and s3fs's makedirs
    would create a missing *bucket*: a mistyped bucket name must be an error, never a new bucket)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)


class _NoBucketCreation(pafs.FSSpecHandler):
    """The fsspec handler Ray writes through, except that creating a folder never creates a bucket."""

    def create_dir(self, path: str, recursive: bool) -> None:
        bucket = path.strip("/").split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist (buckets are never created)")
        super().create_dir(path, recursive)


def pyarrow_filesystem(url: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for Ray's RunConfig; (None, local path) for local storage.

    Remote storage goes through fsspec (s3fs for s3://) wrapped for pyarrow, so Ray Train and
    the rest of the system share one client library, one set of environment variables and one
    retry policy. (pyarrow's own S3 client fails CompleteMultipartUpload against some
    S3-compatible stores, moto among them.)
    """
    url = normalize(url)
    if not is_remote(url):
        return None, url
    fs, path = fsspec_filesystem(url)
    # Ray wants the bucket path without the scheme once a filesystem is given.
    return pafs.PyFileSystem(_NoBucketCreation(fs)), path.rstrip("/")


def check_writable(url: str) -> None:
    """Create the (local) folder and round-trip a probe object, or raise StorageError.

    A bucket that does not exist is an error: it is never created.
    """
    url = normalize(url)
    try:
        fs, path = fsspec_filesystem(url)
        makedirs(fs, path)
        probe = f"{path}/.probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except FileNotFoundError as exc:
        if is_remote(url):
            bucket = urlparse(url).netloc
            raise StorageError(f"storage {url}: bucket {bucket!r} does not exist or is not visible with these "
                               "credentials (buckets are never created: create it, or fix the name)") from None
        raise StorageError(f"storage {url} is not writable: {exc}") from None
    except Exception as exc:  # any client error means the same thing to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"storage {url} is not writable or not reachable: {reason}") from None


@dataclass
class RunPaths:
    """Where one run's artefacts live under a storage URL."""

    storage: str
    name: str

    @property
    def run(self) -> str:
        return join(self.storage, self.name)

    @property
    def tensorboard(self) -> str:
        return join(self.run, "tensorboard")

    @property
    def samples(self) -> str:
        return join(self.run, "samples")

    @property
    def evaluations(self) -> str:
        return join(self.run, "evaluations")

    @property
    def config(self) -> str:
        return join(self.run, "config.json")

    @property
    def skipped_samples(self) -> str:
        """JSON list of the training samples lost to damaged data (each replaced), all ranks."""
        return join(self.run, "skipped_samples.json")


def write_text(url: str, text: str) -> None:
    fs, path = fsspec_filesystem(url)
    makedirs(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "w") as f:
        f.write(text)


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder's files to ``url`` (overwriting); a no-op when they are the same place."""
    local_dir = Path(local_dir)
    if not is_remote(url):
        target = Path(normalize(url))
        if target.resolve() == local_dir.resolve():
            return
        shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return
    fs, path = fsspec_filesystem(url)
    for file in local_dir.rglob("*"):
        if file.is_file():
            fs.put_file(str(file), f"{path}/{file.relative_to(local_dir).as_posix()}")


def download_dir(url: str, local_dir: str | Path | None = None) -> Path:
    """A local copy of a folder (the folder itself when already local)."""
    if not is_remote(url):
        return Path(normalize(url))
    target = Path(local_dir or tempfile.mkdtemp(prefix="inpaint-"))
    fs, path = fsspec_filesystem(url)
    if not fs.isdir(path):
        raise StorageError(f"{url}: no such folder")
    fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    return target


def list_subdirs(url: str) -> list[str]:
    """URLs of the folders directly under ``url`` (empty when it does not exist)."""
    if not is_remote(url):
        root = Path(normalize(url))
        return sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    fs, path = fsspec_filesystem(url)
    if not fs.exists(path):
        return []
    scheme = urlparse(url).scheme
    return sorted(f"{scheme}://{entry['name']}" for entry in fs.ls(path, detail=True)
                  if entry["type"] == "directory")
