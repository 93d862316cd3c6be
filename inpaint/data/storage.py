"""fsspec access to datasets: local paths, ``s3://`` and any other fsspec URL.

S3 endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs/botocore honour, plus explicit ``storage_options``
(``--storage-option key=value``). Filesystems are built where they are used, never handed to
another process: fsspec keys its instance cache by process id, and s3fs clients are not
fork-safe. Error messages name the URL and the reason, never a credential.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5


class DataError(RuntimeError):
    """A user-facing data problem (bad URL, no shards, missing split, unreadable index): one line."""


class MissingData(DataError):
    """The URL is reachable but nothing is stored there."""


def parse_storage_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings into fsspec options; ``a.b=v`` nests, JSON values (true, 3) are typed."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--storage-option: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = options
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise DataError(f"--storage-option {key}: {name!r} is both a value and a group")
        node[leaf] = value
    return options


# Options every fsspec filesystem takes (its listings cache, its instance cache) beside its own.
_COMMON_OPTIONS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"})


def check_storage_options(url: str, storage_options: dict | None) -> None:
    """DataError when an option is not one that ``url``'s filesystem takes.

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
            known.update(name for name, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items()
                         if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                                  parameter.KEYWORD_ONLY))
    unknown = sorted(set(storage_options) - known)
    if unknown:
        where = "local paths" if protocol in ("file", "local") else f"{protocol}:// storage"
        raise DataError(f"--storage-option {unknown[0]}: not an option of {where} ({url}); "
                        f"it takes: {', '.join(sorted(known - _COMMON_OPTIONS)) or 'none'}")


def join_url(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of this process for ``url``, and the path inside it."""
    if not url:
        raise DataError("empty dataset URL")
    check_storage_options(url, storage_options)
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as exc:
        raise DataError(f"{url}: cannot open this URL ({_reason(exc)})") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def with_retries(action: Callable[[], T], what: str, attempts: int = READ_ATTEMPTS) -> T:
    """Run ``action``, retrying transient failures (network, throttling) with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # s3fs/aiohttp/botocore raise many unrelated types for one network fault
            if _is_permanent(exc) or attempt == attempts:
                raise
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, _reason(exc), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _reading(url: str, read: Callable[[], T]) -> T:
    """``read()`` of the object at ``url``, with retries; DataError when it is missing or unreachable."""
    try:
        return with_retries(read, f"reading {url}")
    except FileNotFoundError:
        raise MissingData(f"{url}: not found") from None
    except Exception as exc:
        raise DataError(f"cannot read {url}: {_reason(exc)}") from None


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The whole object at ``url``, with retries; DataError when it is missing or unreachable."""
    fs, path = filesystem(url, storage_options)
    return _reading(url, lambda: fs.cat_file(path))


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
        with open(path, "rb") as file:
            target = fit(os.fstat(file.fileno()).st_size)
            view, size = memoryview(target), 0
            while count := file.readinto(view[size:]):
                size += count
            return target, size

    return _reading(url, read)


class Output:
    """A folder that receives files atomically: a file appears under its name only once complete.

    Local files are written to ``NAME.partial`` and renamed; remote ones are uploaded from a local
    temporary file (an object store makes an object visible only when its upload completes, and
    s3fs would commit a half-written ``fs.open`` file when an exception closes it).
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.path = filesystem(self.url, storage_options)
        self.fs.invalidate_cache()  # listings cached by an earlier run in this process may be stale

    def check_writable(self) -> None:
        """A DataError now, before any work, when a local output folder cannot be created or written."""
        if not is_local(self.fs):
            return  # an object store says so on the first upload (and buckets are never created)
        path = os.path.abspath(self.path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise DataError(f"cannot write {self.url}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DataError(f"cannot write {self.url}: {path} is not writable")

    def exists(self, name: str) -> bool:
        try:
            return self.fs.exists(join_url(self.path, name))
        except Exception as exc:
            raise DataError(f"cannot reach {self.url}: {_reason(exc)}") from None

    def read(self, name: str) -> bytes:
        return read_bytes(join_url(self.url, name), self.storage_options)

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator[str]:
        """A local path to write ``name`` into; when the block succeeds it appears as ``name``.

        Locally the path is ``NAME.partial`` beside the target, renamed at the end; remotely a
        temporary file that is uploaded. Either way it is gone afterwards, success or not.
        """
        if is_local(self.fs):
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as exc:
                raise DataError(f"cannot write {self.url}: {_reason(exc)}") from None
            local = join_url(self.path, f"{name}.partial")
        else:
            local = _temp_path(name)
        try:
            yield local
            target = join_url(self.path, name)
            try:
                if is_local(self.fs):
                    os.replace(local, target)
                else:
                    with_retries(lambda: self.fs.put_file(local, target), f"uploading {name}")
            except Exception as exc:
                raise DataError(f"cannot write {join_url(self.url, name)}: {_reason(exc)}") from None
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
