"""Pack an image source into WebDataset shards plus ``index.json``, locally or in object storage.

Two passes. The first decodes every image once (threads: PIL releases the GIL) and reports the
unreadable ones by name; they are skipped, never fatal. The second shuffles each split with the
seed (so every shard is a random sample of its split), cuts it into shards of equal size (give
or take one) and stores the original bytes, unchanged, with a small JSON per sample.

A shard appears under its final name only once complete (see :class:`~inpaint.storage.Output`)
and ``index.json`` is written last. Re-running into the same output refuses when ``index.json``
exists; otherwise it resumes: each shard already there is kept if it holds exactly the planned
samples (same source, seed and shard size), else rewritten.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from inpaint import __version__
from inpaint.data.index import INDEX_NAME, DatasetIndex, ShardInfo, SplitInfo
from inpaint.data.shards import parse_shard, write_shard
from inpaint.data.sources import SourceImage, open_source
from inpaint.data.errors import DataError, as_data_errors
from inpaint.errors import one_line
from inpaint.images import check_pixels, refuse_unsupported
from inpaint.storage import Output

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
SAMPLE_SHARD_SIZE = 16  # several shards even for the tiny built-in set, so ranks read different ones
SPLIT_ORDER = ("train", "valid", "test")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_CHECK_CHUNK = 256
ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class CheckedImage:
    """An image that decodes, with what the shard records about it."""

    image: SourceImage
    ext: str
    width: int
    height: int


@dataclass
class PackSummary:
    output_url: str
    dataset: str
    split_method: str
    samples: dict[str, int]
    shards: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused_shards: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        splits = ", ".join(f"{name} {self.samples[name]:,} images in {self.shards[name]} shards" for name in self.samples)
        lines = [f"packed {self.dataset} into {self.output_url} in {self.seconds:.1f} s: {splits}",
                 f"  split: {self.split_method}"]
        if self.reused_shards:
            lines.append(f"  kept {self.reused_shards} finished shards of an interrupted run")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} images:")
            lines += [f"    {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _inspect(data: bytes) -> tuple[str, int, int]:
    """(extension, width, height) of an image that fully decodes; raises on any damage.

    One over PIL's 89 MP limit is skipped with its reason, the limit ``fill`` and the endpoint keep
    (:mod:`inpaint.images`): a small file can hold a huge picture, and the shards' PIL path refuses it.
    """
    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image)
        ext = _FORMAT_EXT.get(image.format or "")
        if ext is None:
            raise ValueError(f"unsupported image format {image.format}")
        image.load()  # a header is not enough: truncated JPEGs only fail here
        refuse_unsupported(image)  # here, not at every epoch's read
        if image.getexif().get(ORIENTATION_TAG, 1) in TRANSPOSED_ORIENTATIONS:  # read upright: turned a quarter
            return ext, image.height, image.width
        return ext, image.width, image.height


def _check(image: SourceImage) -> CheckedImage | str:
    try:
        return CheckedImage(image, *_inspect(image.read()))
    except Exception as exc:  # PIL raises many types for damaged files; each just means "skip it"
        return f"unreadable image ({one_line(exc)})"


def _check_all(images: list[SourceImage], progress: bool) -> tuple[list[CheckedImage], list[tuple[str, str]]]:
    good, bad = [], []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(images), desc="checking images", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), _CHECK_CHUNK):
            chunk = images[start:start + _CHECK_CHUNK]
            for image, result in zip(chunk, pool.map(_check, chunk)):
                if isinstance(result, str):
                    log.warning("skipped %s: %s", image.name, result)
                    bad.append((image.name, result))
                else:
                    good.append(result)
            bar.update(len(chunk))
    return good, bad


def plan_shards(images: list[CheckedImage], shard_size: int, seed: int) -> dict[str, list[list[CheckedImage]]]:
    """Per split, its images shuffled with the seed and cut into equal shards (give or take one)."""
    by_split: dict[str, list[CheckedImage]] = {}
    for image in images:
        by_split.setdefault(image.image.split, []).append(image)
    plan = {}
    for split in sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)):
        members = sorted(by_split[split], key=lambda c: c.image.key)
        random.Random(f"{seed}:{split}:shards").shuffle(members)
        count = -(-len(members) // shard_size)
        base, extra = divmod(len(members), count)
        bounds = [i * base + min(i, extra) for i in range(count + 1)]
        plan[split] = [members[bounds[i]:bounds[i + 1]] for i in range(count)]
    return plan


def _meta(checked: CheckedImage) -> dict:
    return {"source": checked.image.name, "split": checked.image.split, "width": checked.width,
            "height": checked.height}


def _reusable(output: Output, name: str, shard: list[CheckedImage]) -> ShardInfo | None:
    """The ShardInfo of a finished shard already in the output, if it holds exactly these samples."""
    if not output.exists(name):
        return None
    data = output.read(name)
    parsed = parse_shard(data)
    keys = tuple(c.image.key for c in shard)
    if parsed.error is not None or tuple(s.key for s in parsed.samples) != keys:
        log.info("rewriting %s: it does not hold the planned samples", name)
        return None
    return ShardInfo(name, len(shard), len(data), hashlib.sha256(data).hexdigest(), keys)


def _write(output: Output, name: str, shard: list[CheckedImage]) -> ShardInfo:
    try:
        return _publish_shard(output, name, shard)
    except OSError as exc:  # a full disk or a read-only output: the partial shard is gone, nothing is marked done
        raise DataError(f"cannot write {name} in {output.url}: {exc.strerror or exc}; "
                        "free space and rerun the same command to resume") from None


def _publish_shard(output: Output, name: str, shard: list[CheckedImage]) -> ShardInfo:
    with output.publish(name) as local:
        with open(local, "wb") as f:
            write_shard(f, ((c.image.key, c.ext, c.image.read(), _meta(c)) for c in shard))
        digest, size = hashlib.sha256(), 0
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return ShardInfo(name, len(shard), size, digest.hexdigest(), tuple(c.image.key for c in shard))


@as_data_errors()  # storage failures (unwritable output, unreachable store) are the packer's DataErrors
def pack_dataset(kind: str, source: str | Path | None, output_url: str, shard_size: int | None = None,
                 split: str | None = None, seed: int = 0, storage_options: dict | None = None,
                 progress: bool = True, test_fraction: float | None = None) -> PackSummary:
    """Pack ``source`` (a ``kind`` layout, see :mod:`inpaint.data.sources`) into ``output_url``.

    ``shard_size`` defaults to DEFAULT_SHARD_SIZE images (SAMPLE_SHARD_SIZE for ``sample``).
    """
    started = time.perf_counter()
    if kind == "sample" and source is not None:
        raise DataError("--source: the built-in sample dataset has no source; drop --source")
    if shard_size is None:  # not `or`: 0 is a mistake, not "the default"
        shard_size = SAMPLE_SHARD_SIZE if kind == "sample" else DEFAULT_SHARD_SIZE
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    output = Output(str(output_url), storage_options)
    output.check_writable()
    if output.exists(INDEX_NAME):
        raise DataError(f"{output.url} already holds a packed dataset ({INDEX_NAME}); "
                        "choose another --output or delete it")
    with open_source(kind, source, split, seed, test_fraction) as listing:
        checked, unreadable = _check_all(listing.images, progress)
        if not checked:
            raise DataError(f"{source}: none of the {len(listing.images)} images could be read")
        # The seeded split is drawn over the images that decode (same draw when all of them do).
        redrawn = {image.name: image for image in listing.without({name for name, _ in unreadable})}
        checked = [dataclasses.replace(c, image=redrawn[c.image.name]) for c in checked]
        plan = plan_shards(checked, shard_size, seed)
        splits, reused = {}, 0
        with tqdm(total=len(checked), desc="writing shards", unit="img", disable=not progress) as bar:
            for split_name, shards in plan.items():
                infos = []
                for number, shard in enumerate(shards):
                    name = f"{split_name}-{number:06d}.tar"
                    info = _reusable(output, name, shard)
                    reused += info is not None
                    infos.append(info or _write(output, name, shard))
                    bar.update(len(shard))
                splits[split_name] = SplitInfo(split_name, tuple(infos))
    skipped = listing.skipped + unreadable
    meta = {"tool": "jobs/make_shards.py", "tool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": str(source) if source is not None else kind, "split_method": listing.split_method,
            "seed": seed, "shard_size": shard_size,
            "skipped": [{"name": name, "reason": reason} for name, reason in skipped]}
    index = DatasetIndex(output.url, kind, splits, meta)
    try:  # last: only once every shard is in place does the output hold a dataset
        output.write_bytes(INDEX_NAME, index.to_json().encode())
    except OSError as exc:
        raise DataError(f"cannot write {INDEX_NAME} in {output.url}: {exc.strerror or exc}; "
                        "free space and rerun the same command to resume") from None
    return PackSummary(output.url, kind, listing.split_method, {s: i.samples for s, i in splits.items()},
                       {s: len(i.shards) for s, i in splits.items()}, skipped, reused,
                       time.perf_counter() - started)
