"""The dataset index: ``index.json`` beside the shards, written last by the packer.

It lists, per split, the shards in order with their sample counts, sizes, SHA-256 checksums and
sample keys, so that loaders plan epochs and evaluation draws keys without opening a shard.
Shard names are relative: a dataset folder can be copied anywhere (local, S3) as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from inpaint.data.errors import DataError, MissingData, as_data_errors
from inpaint.storage import join, read_bytes

INDEX_NAME = "index.json"
FORMAT = "inpaint-webdataset"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class SplitInfo:
    name: str
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def keys(self) -> list[str]:
        """Every key of the split in index order (shard by shard, as stored)."""
        return [key for shard in self.shards for key in shard.keys]


@dataclass
class DatasetIndex:
    """A packed dataset: its splits and where its shards are."""

    url: str
    dataset: str
    splits: dict[str, SplitInfo]
    meta: dict[str, Any] = field(default_factory=dict)  # the rest of index.json: tool version, seed, skipped

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"{self.url}: no split {name!r} (splits: {', '.join(sorted(self.splits))})") from None

    def split_size(self, name: str) -> int:
        return self.split(name).samples

    def keys(self, split: str) -> list[str]:
        return self.split(split).keys()

    def shard_url(self, shard: ShardInfo) -> str:
        return join(self.url, shard.name)

    def to_json(self) -> str:
        splits = {
            name: {"samples": info.samples,
                   "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256,
                               "keys": list(s.keys)} for s in info.shards]}
            for name, info in self.splits.items()
        }
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta,
                    "dataset": self.dataset, "splits": splits}
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, url: str, text: str | bytes) -> "DatasetIndex":
        where = join(url, INDEX_NAME)
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise DataError(f"{where}: not an index written by jobs/make_shards.py")
        if document.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{where}: index format version {document.get('format_version')!r}, this tool reads "
                            f"{FORMAT_VERSION}; re-pack the dataset")
        try:
            splits = {name: SplitInfo(name, tuple(_shard(s) for s in info["shards"]))
                      for name, info in document.pop("splits").items()}
            dataset = str(document.pop("dataset"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{where}: malformed index ({_describe(exc)})") from None
        for key in ("format", "format_version"):
            document.pop(key)
        return cls(url=url.rstrip("/"), dataset=dataset, splits=splits, meta=document)


def _shard(entry: dict) -> ShardInfo:
    keys = tuple(str(k) for k in entry["keys"])
    if len(keys) != int(entry["samples"]):
        raise ValueError(f"shard {entry['name']} lists {len(keys)} keys for {entry['samples']} samples")
    return ShardInfo(str(entry["name"]), int(entry["samples"]), int(entry["bytes"]), str(entry["sha256"]), keys)


def _describe(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def load_index(url: str, storage_options: dict | None = None) -> DatasetIndex:
    """The index of the dataset folder at ``url`` (local path or any fsspec URL)."""
    if not url:
        raise DataError("no dataset URL given (data.url is empty); pack one with jobs/make_shards.py")
    try:
        with as_data_errors():
            text = read_bytes(join(url, INDEX_NAME), storage_options)
    except MissingData:
        raise DataError(f"{url}: no {INDEX_NAME} (not a dataset packed by jobs/make_shards.py?)") from None
    return DatasetIndex.from_json(url, text)


def split_keys(url: str, split: str, storage_options: dict | None = None) -> list[str]:
    """The keys of one split, from the index alone (evaluation draws its subset from these)."""
    return load_index(url, storage_options).keys(split)
