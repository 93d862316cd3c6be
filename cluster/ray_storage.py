"""Run storage as Ray Train sees it: the project's fsspec client wrapped for pyarrow.

Everything else about storage (reads, writes, retries, errors) is :mod:`inpaint.storage`'s; the
run folder's layout is :mod:`inpaint.run_folder`'s.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from inpaint import storage


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
    url = storage.normalize(url)
    if not storage.is_remote(url):
        return None, url
    fs, path = storage.filesystem(url)
    # Ray wants the bucket path without the scheme once a filesystem is given.
    return pafs.PyFileSystem(_NoBucketCreation(fs)), path.rstrip("/")
