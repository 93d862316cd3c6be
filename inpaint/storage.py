"""The one way in and out of storage: local paths, ``s3://`` and any other fsspec URL.

Every read and write of the system goes through here (datasets, checkpoints, inference fetches,
evaluation outputs and claims, TensorBoard uploads, run configs), so there is one retry policy
(:func:`with_retries`: transient faults retried with exponential backoff, permanent ones such as
a missing object never) and one error translator (:func:`reason`, :class:`StorageError`: one
line that names the URL and the cause, never a credential). Dataset-specific errors
(``DataError``) stay with the data code, which turns these into its own.

S3 endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs/botocore honour, plus explicit ``storage_options``
(``--storage-option key=value``). Filesystems are built where they are used, never handed to
another process: fsspec keys its instance cache by process id, and s3fs clients are not
fork-safe. Buckets are never created: a mistyped bucket name is an error.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem

from inpaint.errors import one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5
# Options every fsspec filesystem takes (its listings cache, its instance cache) beside its own.
_COMMON_OPTIONS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"})
# Client errors that no retry can fix (botocore's class names: matched by name, botocore is optional).
_PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "NoSuchBucket", "InvalidAccessKeyId",
                              "SignatureDoesNotMatch", "AccessDenied"})


class StorageError(RuntimeError):
    """Storage that cannot be reached, read or written; the message names the URL, never secrets."""


class MissingObject(StorageError):
    """The storage answers, but nothing is stored at the URL."""


# ------------------------------------------------------------------ errors and retries
# A full disk, an exceeded quota, a read-only filesystem: waiting a few seconds fixes none of them.
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _is_permanent(exc: BaseException) -> bool:
    return (isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                             NotADirectoryError, ValueError, TypeError))
            or (isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS)
            or type(exc).__name__ in _PERMANENT_NAMES)


def with_retries(action: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """Run ``action``, retrying transient failures (network, throttling) with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # s3fs/aiohttp/botocore raise many unrelated types for one network fault
            if _is_permanent(exc) or attempt == attempts:
                raise
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, one_line(exc, typed=True), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _do(url: str, what: str, action: Callable[[], T]) -> T:
    """``action()`` on ``url`` with retries; a failure becomes a one-line StorageError."""
    try:
        return with_retries(action, f"{what} {url}")
    except StorageError:
        raise
    except FileNotFoundError:
        raise MissingObject(f"{url}: not found") from None
    except Exception as exc:
        raise StorageError(f"cannot {what} {url}: {one_line(exc, typed=True)}") from None


# ------------------------------------------------------------------ URLs
def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def normalize(url: str) -> str:
    """Absolute local paths (Ray workers do not share the driver's cwd); remote URLs untouched."""
    url = url.removeprefix("file://")
    if is_remote(url):
        return url.rstrip("/")
    return str(Path(url).expanduser().resolve())


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def name(url: str) -> str:
    """The last segment of a URL or path: ``s3://b/runs/r/checkpoint_1`` -> ``checkpoint_1``."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    """The URL of the folder holding ``url``."""
    return url.rstrip("/").rsplit("/", 1)[0]


def bucket(url: str) -> str:
    return urlparse(url).netloc


# ------------------------------------------------------------------ options and filesystems
def parse_storage_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings into fsspec options; ``a.b=v`` nests, JSON values (true, 3) are typed."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = options
        for group in parents:
            node = node.setdefault(group, {})
            if not isinstance(node, dict):
                raise StorageError(f"--storage-option {key}: {group!r} is both a value and a group")
        node[leaf] = value
    return options


def check_storage_options(url: str, storage_options: dict | None) -> None:
    """StorageError when an option is not one that ``url``'s filesystem takes.

    fsspec filesystems accept any keyword and ignore the ones they do not know, so a mistyped
    ``--storage-option`` (or one meant for S3 given with local data) would silently do nothing.
    The known ones are the named parameters of the filesystem class's constructors.
    """
    if not storage_options:
        return
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return  # filesystem() says why the URL cannot be opened
    known = set(_COMMON_OPTIONS)
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            known.update(param for param, spec in inspect.signature(vars(klass)["__init__"]).parameters.items()
                         if param != "self" and spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY))
    unknown = sorted(set(storage_options) - known)
    if unknown:
        where = "local paths" if protocol in ("file", "local") else f"{protocol}:// storage"
        raise StorageError(f"--storage-option {unknown[0]}: not an option of {where} ({url}); "
                           f"it takes: {', '.join(sorted(known - _COMMON_OPTIONS)) or 'none'}")


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of this process for ``url``, and the path inside it."""
    if not url:
        raise StorageError("empty storage URL")
    check_storage_options(url, storage_options)
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open this URL ({one_line(exc, typed=True)})") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# ------------------------------------------------------------------ reading
# The largest JSON document (meta.json, config.json, metrics.json, claims) read whole: a planted
# multi-GiB file named meta.json must not exhaust memory.
JSON_LIMIT = 64 << 20


def _regular_size(url: str, path: str) -> int:
    """The size of the local regular file ``path``; a StorageError for a FIFO, device or socket.

    Opening a FIFO blocks until someone writes to it, so a planted ``meta.json`` FIFO would hang
    any reader: such files are refused before they are opened.
    """
    info = os.stat(path)  # FileNotFoundError: the caller's MissingObject
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{url}: not a regular file; refusing to read it")
    return info.st_size


def read_bytes(url: str, storage_options: dict | None = None, limit: int | None = None) -> bytes:
    """The whole object at ``url``; MissingObject when nothing is there, StorageError when unreachable.

    Only regular files are read locally; ``limit`` (bytes) refuses larger objects before reading.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        size = _do(url, "read", lambda: _regular_size(url, path))
    elif limit is not None:
        size = _do(url, "stat", lambda: fs.size(path)) or 0
    else:
        size = 0
    if limit is not None and size > limit:
        raise StorageError(f"{url}: {size} bytes, more than the {limit} this file may have; refusing to read it")
    return _do(url, "read", lambda: fs.cat_file(path))


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    """The JSON document at ``url``; None when it is missing or not JSON (e.g. still being written).

    A file that cannot be JSON here (not a regular file, over :data:`JSON_LIMIT`) is a StorageError.
    """
    try:
        return json.loads(read_bytes(url, storage_options, limit=JSON_LIMIT))
    except (MissingObject, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_into(url: str, buffer: bytearray, storage_options: dict | None = None) -> tuple[bytearray, int]:
    """The whole object at ``url`` in ``buffer`` if it is large enough, else in a new one:
    (the buffer, the object's size).

    For readers that go through many large objects, like shards: a reused buffer is memory
    already mapped, where a new one page-faults on every 4 KiB (seen at ~15 us a CelebA sample;
    mapping the file instead cost as much). Local files are read straight in, others' bytes
    copied in once. Retries and errors as :func:`read_bytes`.
    """
    fs, path = filesystem(url, storage_options)

    def fit(size: int) -> bytearray:
        return buffer if len(buffer) >= size else bytearray(size)

    def read() -> tuple[bytearray, int]:
        if not is_local(fs):
            data = fs.cat_file(path)
            target = fit(len(data))
            target[:len(data)] = data
            return target, len(data)
        _regular_size(url, path)
        with open(path, "rb") as file:
            target = fit(os.fstat(file.fileno()).st_size)
            view, size = memoryview(target), 0
            while count := file.readinto(view[size:]):
                size += count
            return target, size

    return _do(url, "read", read)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return _do(url, "reach", lambda: fs.exists(path))


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return _do(url, "reach", lambda: fs.isdir(path))


def isfile(url: str) -> bool:
    fs, path = filesystem(url)
    return _do(url, "reach", lambda: fs.isfile(path))


def modified(url: str) -> float:
    """When the object at ``url`` was last written (seconds since the epoch)."""
    fs, path = filesystem(url)
    return _do(url, "stat", lambda: fs.modified(path).timestamp())


def list_subdirs(url: str) -> list[str]:
    """URLs of the folders directly under ``url``, sorted (empty when it does not exist)."""
    if not is_remote(url):
        root = Path(normalize(url))
        return sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    fs, path = filesystem(url)

    def listing() -> list[str]:
        if not fs.exists(path):
            return []
        scheme = urlparse(url).scheme
        return sorted(f"{scheme}://{entry['name'].rstrip('/')}" for entry in fs.ls(path, detail=True)
                      if entry["type"] == "directory")

    return _do(url, "list", listing)


def list_files(url: str) -> list[str]:
    """URLs of every file under ``url``, at any depth, sorted (empty when it does not exist)."""
    fs, path = filesystem(url)

    def listing() -> list[str]:
        fs.invalidate_cache()  # files other processes wrote since this process last listed
        if not fs.exists(path):
            return []
        base = path.rstrip("/")
        return sorted(join(url, found[len(base):].lstrip("/")) for found in fs.find(path))

    return _do(url, "list", listing)


def refuse_links(url: str, levels: int) -> None:
    """StorageError when the local ``url`` or one of its ``levels - 1`` parents is a symbolic link.

    For outputs placed inside a folder the command did not create (a run's evaluations): a link
    planted there would send the writes outside it. Object stores have no links.
    """
    if is_remote(url):
        return
    path = os.path.abspath(url.removeprefix("file://"))
    for _ in range(levels):
        if os.path.islink(path):
            raise StorageError(f"{path} is a symbolic link; refusing to write through it (remove it)")
        path = os.path.dirname(path)


def file_sizes(url: str) -> dict[str, int]:
    """Name -> size in bytes of the regular files directly in the folder ``url`` (empty when missing).

    Links and other non-regular entries are left out: a checkpoint's files must be its own.
    """
    fs, path = filesystem(url)

    def listing() -> dict[str, int]:
        if is_local(fs):
            if not os.path.isdir(path):
                return {}
            found = {}
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        found[entry.name] = entry.stat(follow_symlinks=False).st_size
            return found
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return {}
        return {name(entry["name"]): int(entry.get("size") or 0) for entry in fs.ls(path, detail=True)
                if entry["type"] == "file"}

    return _do(url, "list", listing)


def get_file(url: str, local: str | Path) -> None:
    fs, path = filesystem(url)
    _do(url, "download", lambda: fs.get_file(path, str(local)))


def download_dir(url: str, local_dir: str | Path | None = None) -> Path:
    """A local copy of a folder (the folder itself when already local)."""
    if not is_remote(url):
        return Path(normalize(url))
    target = Path(local_dir or tempfile.mkdtemp(prefix="inpaint-"))
    fs, path = filesystem(url)
    if not _do(url, "reach", lambda: fs.isdir(path)):
        raise MissingObject(f"{url}: no such folder")
    _do(url, "download", lambda: fs.get(path.rstrip("/") + "/", str(target), recursive=True))
    return target


# ------------------------------------------------------------------ writing
@contextlib.contextmanager
def atomic_local(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside the local file ``path``; when the block succeeds it replaces ``path``.

    The temporary is flushed to disk (fsync) before the rename, so a full disk, a crash or
    Ctrl-C leaves either the old file or the new one, never a part; on failure it is removed.
    A symlink at ``path`` is replaced by the new file, never written through.
    """
    path = os.fspath(path)
    partial = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        if os.path.lexists(partial):
            os.remove(partial)


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_local(path) as partial, open(partial, "wb") as f:
        f.write(data)


def makedirs(url: str) -> None:
    """Create a local folder; on object stores nothing (they have no folders, and s3fs's makedirs
    would create a missing *bucket*: a mistyped bucket name must be an error, never a new bucket)."""
    fs, path = filesystem(url)
    if is_local(fs):
        _do(url, "create", lambda: fs.makedirs(path, exist_ok=True))


def write_bytes(url: str, data: bytes) -> None:
    """Store ``data`` at ``url``, complete or not at all (a local temporary renamed; one upload)."""
    fs, path = filesystem(url)
    if is_local(fs):
        _do(url, "write", lambda: _write_local(path, data))
    else:
        _do(url, "write", lambda: fs.pipe_file(path, data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` only if it does not exist (``O_EXCL`` locally, ``If-None-Match: *`` on S3,
    which s3fs sends for mode ``"xb"``); False when someone else did first."""
    fs, path = filesystem(url)

    def create() -> bool:
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    return _do(url, "create", create)


def remove(url: str) -> None:
    """Delete the object at ``url``; nothing when it is already gone."""
    fs, path = filesystem(url)
    with contextlib.suppress(MissingObject):
        _do(url, "delete", lambda: fs.rm(path))


def _copy_local(source: str | Path, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_local(path) as partial:
        shutil.copyfile(source, partial)


def move(url: str, new_url: str) -> None:
    """Rename a file or folder (an object store copies then deletes); refuses to replace ``new_url``."""
    fs, path = filesystem(url)
    _, new_path = filesystem(new_url)

    def rename() -> None:
        if fs.exists(new_path):
            raise FileExistsError(f"{new_url} exists")
        if is_local(fs):
            os.rename(path, new_path)
        else:
            fs.mv(path, new_path, recursive=True)

    _do(url, "move", rename)


def put_file(local: str | Path, url: str) -> None:
    """Copy a local file to ``url``, complete or not at all (an object appears when its upload completes)."""
    fs, path = filesystem(url)
    if is_local(fs):
        _do(url, "write", lambda: _copy_local(local, path))
    else:
        _do(url, "upload", lambda: fs.put_file(str(local), path))


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder's files to ``url`` (overwriting); a no-op when they are the same place."""
    local_dir = Path(local_dir)
    if not is_remote(url):
        target = Path(normalize(url))
        if target.resolve() != local_dir.resolve():
            # File by file through a temporary renamed into place: a link planted at a target
            # name is replaced, never written through, and a full disk leaves no partial file.
            for file in sorted(local_dir.rglob("*")):
                if file.is_file():
                    destination = str(Path(os.path.abspath(target)) / file.relative_to(local_dir))
                    _do(url, "write", lambda: _copy_local(file, destination))
        return
    for file in sorted(local_dir.rglob("*")):
        if file.is_file():
            put_file(file, join(url, file.relative_to(local_dir).as_posix()))


def check_writable(url: str) -> None:
    """Create the (local) folder and round-trip a probe object, or raise StorageError.

    A bucket that does not exist is an error: it is never created.
    """
    url = normalize(url)
    try:
        makedirs(url)
        probe = join(url, f".probe-{uuid.uuid4().hex}")
        fs, path = filesystem(probe)
        with_retries(lambda: fs.pipe_file(path, b"ok"), f"writing {probe}")
        with_retries(lambda: fs.rm(path), f"deleting {probe}")
    except FileNotFoundError as exc:
        if is_remote(url):
            raise StorageError(f"storage {url}: bucket {bucket(url)!r} does not exist or is not visible with these "
                               "credentials (buckets are never created: create it, or fix the name)") from None
        raise StorageError(f"storage {url} is not writable: {exc}") from None
    except Exception as exc:  # any client error means the same thing to the user
        raise StorageError(f"storage {url} is not writable or not reachable: {one_line(exc)}") \
            from None


class Output:
    """A folder that receives files atomically: a file appears under its name only once complete.

    Local files are written to ``NAME.partial-XXXX``, flushed and renamed; remote ones are uploaded from a local
    temporary file (an object store makes an object visible only when its upload completes, and
    s3fs would commit a half-written ``fs.open`` file when an exception closes it).
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.path = filesystem(self.url, storage_options)
        self.fs.invalidate_cache()  # listings cached by an earlier run in this process may be stale

    def check_writable(self) -> None:
        """A StorageError now, before any work, when a local output folder cannot be created or written."""
        if not is_local(self.fs):
            return  # an object store says so on the first upload (and buckets are never created)
        path = os.path.abspath(self.path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise StorageError(f"cannot write {self.url}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write {self.url}: {path} is not writable")

    def exists(self, name: str) -> bool:
        target = join(self.path, name)
        return _do(self.url, "reach", lambda: self.fs.exists(target))

    def read(self, name: str) -> bytes:
        return read_bytes(join(self.url, name), self.storage_options)

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator[str]:
        """A local path to write ``name`` into; when the block succeeds it appears as ``name``.

        Locally the path is ``NAME.partial-XXXX`` beside the target, renamed at the end; remotely a
        temporary file that is uploaded. Either way it is gone afterwards, success or not.
        """
        if is_local(self.fs):
            _do(self.url, "write", lambda: os.makedirs(self.path, exist_ok=True))
            # A fresh name: a file or link planted at a fixed temporary name is never written through.
            local = join(self.path, f"{name}.partial-{uuid.uuid4().hex[:8]}")
        else:
            local = _temp_path(name)
        try:
            yield local
            target = join(self.path, name)
            if is_local(self.fs):
                def place() -> None:
                    with open(local, "rb+") as written:
                        os.fsync(written.fileno())  # on disk before it appears under its name
                    os.replace(local, target)
                _do(join(self.url, name), "write", place)
            else:
                _do(join(self.url, name), "write", lambda: self.fs.put_file(local, target))
        finally:
            if os.path.exists(local):
                os.remove(local)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.publish(name) as local, open(local, "wb") as f:
            f.write(data)


def _temp_path(name: str) -> str:
    handle, path = tempfile.mkstemp(prefix="inpaint-", suffix=f"-{name.replace('/', '_')}")
    os.close(handle)
    return path
