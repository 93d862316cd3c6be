"""The data code's own errors, and the one place storage errors become them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from inpaint.storage import MissingObject, StorageError


class DataError(RuntimeError):
    """A user-facing data problem (bad URL, no shards, missing split, unreadable index): one line."""


class MissingData(DataError):
    """The URL is reachable but nothing is stored there."""


@contextlib.contextmanager
def as_data_errors() -> Iterator[None]:
    """Storage failures inside the block as DataError (MissingData for a missing object), same words."""
    try:
        yield
    except MissingObject as exc:
        raise MissingData(str(exc)) from None
    except StorageError as exc:
        raise DataError(str(exc)) from None
