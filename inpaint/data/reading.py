"""Reading packed shards: bytes -> images, for training (:mod:`inpaint.data.loader`) and evaluation.

A process reads whole shards (one GET each, with retries, through :mod:`inpaint.storage`; the next
shard downloads in a background thread while this one decodes) into two buffers it reuses.
Samples are found by the offsets in their tar headers and decoded from the original bytes by
torchvision's JPEG and PNG decoders (PIL for other formats, :mod:`inpaint.images`). A sample
that does not decode, or that a truncated or unreadable shard lacks, is logged and read as None.
:func:`iter_split` streams a split's centre crops for evaluation.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resize

from inpaint.data.errors import DataError
from inpaint.data.index import DatasetIndex, ShardInfo, SplitInfo, load_index
from inpaint.data.shards import parse_shard
from inpaint.errors import one_line
from inpaint.images import open_image, to_uint8
from inpaint.storage import StorageError, read_into

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, but decode_jpeg is still the
# fastest path here (~6,000 CelebA-sized JPEGs/s/core vs PIL's ~2,700); keep logs free of the notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jpeg_decoder():
    """torchvision's decode_jpeg operator itself: its Python wrapper's deprecation check, usage
    logging and argument handling cost ~30 us a call, a tenth of decoding a CelebA image."""
    try:
        operator = torch.ops.image.decode_jpeg
    except (AttributeError, RuntimeError):  # a torchvision built without its image extension
        return lambda data: decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    rgb = ImageReadMode.RGB.value
    return lambda data: operator(data, rgb, True)


_decode_jpeg_rgb = _jpeg_decoder()


def decode(data: torch.Tensor, jpeg: bool | None = None) -> torch.Tensor:
    """Upright RGB uint8 (3, H, W) from encoded bytes (a uint8 tensor); raises ValueError if damaged.

    The same picture as ``fill`` and the endpoint read (:mod:`inpaint.images`): a phone photo
    stored sideways with an orientation tag trains upright, and 16 bits per channel become 8.
    ``jpeg``: whether the bytes start with JPEG's marker, if the caller knows (None: look).
    """
    try:
        if jpeg if jpeg is not None else data[:2].numpy().tobytes() == JPEG_MAGIC:
            return _decode_jpeg_rgb(data)  # the usual case: decode_image would sniff the format again
        if data[:8].numpy().tobytes() == PNG_MAGIC:
            return to_uint8(decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))  # 16-bit: uint16
    except RuntimeError:
        pass  # what torchvision cannot decode (a CMYK JPEG...) goes to PIL
    # Other formats go to PIL as well: torchvision's WebP decoder ignores the EXIF orientation.
    try:
        array = np.asarray(open_image(data.numpy().tobytes(), "RGB"))
    except Exception as exc:  # PIL raises many types for damaged data
        raise ValueError(one_line(exc)) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def cover(image: torch.Tensor, size: int) -> torch.Tensor:
    """The image, scaled up (aspect kept) only if its shorter side is below ``size``."""
    height, width = image.shape[-2:]
    if min(height, width) >= size:
        return image
    scale = size / min(height, width)
    return resize(image, [max(size, round(height * scale)), max(size, round(width * scale))], antialias=True)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top:top + size, left:left + size]


class Shard:
    """A shard's bytes in memory (in a buffer the reader reuses) and its samples by key."""

    def __init__(self, info: ShardInfo, url: str, storage_options: dict | None, buffer: bytearray) -> None:
        """Read the shard at ``url`` into ``buffer``, or into a new one if it does not fit."""
        self.info = info
        try:
            buffer, size = read_into(url, buffer, storage_options)
        except StorageError as exc:
            log.warning("shard %s unreadable (%s); its samples are skipped", info.name, exc)
            size = 0
        parsed = parse_shard(buffer, size)
        if size and parsed.error:
            log.warning("shard %s: %s; %d of %d samples readable, the rest are skipped", info.name,
                        parsed.error, len(parsed.samples), info.samples)
        self.buffer = buffer
        self.data = (torch.frombuffer(buffer, dtype=torch.uint8, count=size) if size
                     else torch.zeros(0, dtype=torch.uint8))
        # key -> (start, stop, is JPEG): worked out here, in the background thread that reads.
        self.samples = {sample.key: (sample.offset, sample.offset + sample.size,
                                     buffer[sample.offset:sample.offset + 2] == JPEG_MAGIC)
                        for sample in parsed.samples}

    def image(self, key: str, size: int) -> torch.Tensor | None:
        """The decoded image of ``key``, covered to ``size``; None (logged) when lost or damaged."""
        sample = self.samples.get(key)
        if sample is None:
            if self.data.numel():
                log.warning("skipped sample %s: missing from shard %s", key, self.info.name)
            return None
        start, stop, jpeg = sample
        try:
            image = decode(self.data[start:stop], jpeg)
        except ValueError as exc:
            log.warning("skipped sample %s in shard %s: cannot decode (%s)", key, self.info.name, exc)
            return None
        return image if min(image.shape[1:]) >= size else cover(image, size)


# Shard buffers between passes of a process's readers (list.pop/extend are atomic under the GIL).
_SPARE_BUFFERS: list[bytearray] = []
_SPARE_LIMIT = 2


class SplitReader:
    """Reads one split's samples by position in index order; each process builds its own."""

    def __init__(self, index: DatasetIndex, split: SplitInfo, storage_options: dict | None) -> None:
        self.index = index
        self.split = split
        self.storage_options = storage_options
        self.keys = split.keys()
        self.shard_of = np.repeat(np.arange(len(split.shards)), [s.samples for s in split.shards])

    def fetch(self, shard: int, buffer: bytearray) -> Shard:
        info = self.split.shards[shard]
        return Shard(info, self.index.shard_url(info), self.storage_options, buffer)

    def images(self, ids: np.ndarray, size: int) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(key, image covered to ``size``, or None if lost) for each id in order; the next shard
        downloads in the background meanwhile.

        Two shard buffers take turns: the next shard is read into the one the shard before this
        was in. Nothing yielded points into them (decoding copies). They come from, and go back
        to, a spare pair kept for this process's next pass (the next epoch, in-process).
        """
        if not len(ids):
            return
        shards = self.shard_of[ids]
        starts = [0, *np.flatnonzero(shards[1:] != shards[:-1]) + 1]
        buffers = [_SPARE_BUFFERS.pop() if _SPARE_BUFFERS else bytearray() for _ in range(2)]
        try:
            yield from self._read_runs(ids, shards, starts, buffers, size)
        finally:
            _SPARE_BUFFERS.extend(buffers[:_SPARE_LIMIT - len(_SPARE_BUFFERS)])

    def _read_runs(self, ids: np.ndarray, shards: np.ndarray, starts: list[int], buffers: list[bytearray],
                   size: int) -> Iterator[tuple[str, torch.Tensor | None]]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.fetch, int(shards[0]), buffers[0])
            for run, start in enumerate(starts):
                shard = pending.result()
                buffers[run % 2] = shard.buffer  # a larger one, if the shard did not fit
                stop = starts[run + 1] if run + 1 < len(starts) else len(ids)
                pending = (pool.submit(self.fetch, int(shards[stop]), buffers[(run + 1) % 2]) if stop < len(ids)
                           else None)
                for sample in ids[start:stop].tolist():
                    key = self.keys[sample]
                    yield key, shard.image(key, size)


def iter_split(url: str, split: str, image_size: int, storage_options: dict | None = None,
               limit: int | None = None, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, uint8 (3, S, S) centre crop) of a split in index order, for evaluation.

    ``keys`` restricts it to those samples (still in index order; only their shards are read),
    e.g. a subset drawn with a fixed seed from :func:`~inpaint.data.index.split_keys`. Damaged
    samples are logged and left out.
    """
    index = load_index(url, storage_options)
    info = index.split(split)
    reader = SplitReader(index, info, storage_options)
    ids = np.arange(len(reader.keys))
    if keys is not None:
        wanted = set(keys)
        unknown = wanted.difference(reader.keys)
        if unknown:
            raise DataError(f"{url}: {len(unknown)} requested keys are not in split {split!r}, e.g. {min(unknown)!r}")
        ids = np.array([i for i, key in enumerate(reader.keys) if key in wanted], dtype=np.int64)
    yielded = 0
    for key, image in reader.images(ids, image_size):
        if limit is not None and yielded >= limit:
            return
        if image is not None:
            yield key, center_crop(image, image_size).contiguous()
            yielded += 1
