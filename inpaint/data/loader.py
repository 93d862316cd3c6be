"""Streaming shards to training and evaluation: decode, random crop, per-sample masks.

Each process (training rank or DataLoader worker) builds its own fsspec filesystem and reads
whole shards (one GET each, with retries; the next shard downloads in a background thread while
this one decodes). Samples are found by the offsets in their tar headers, decoded from the
original bytes by ``torchvision.io.decode_image`` (PIL as the fallback), covered up to the
image size if smaller, and cropped by slicing the uint8 tensor. Batches leave a worker as uint8
images; the trainer converts them on its device.

Which samples a rank and worker read is in :mod:`inpaint.data.plan` (its docstring states the
guarantees: disjoint shares, equal batch counts on every rank, a new reproducible order every
epoch, exact mid-epoch resume, also across a change of world size or worker count).

Randomness per sample: the crop and the mask come from a hash of (data seed, epoch, planned
sample key) (:class:`SampleDraws`), so they are reproducible and do not depend on which worker or
run makes them.

Damaged data: a sample that does not decode, or that a truncated or unreadable shard lacks, is
logged with its key, counted (``TrainLoader.skipped``) and replaced by the next readable sample
of the same worker's share (wrapping around to its start), cropped and masked as the lost sample
would have been. Batch counts, and so DDP, stay in step whatever is lost; the replacement is a
duplicate, and the choice is deterministic, so a resumed run makes the same batches.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resize

from inpaint.config import DataConfig, MaskConfig, ModelConfig
from inpaint.data.index import DatasetIndex, ShardInfo, SplitInfo, load_index
from inpaint.data.plan import Structure, WorkerShare, epoch_order, rank_shares, remaining_after
from inpaint.data.shards import parse_shard
from inpaint.data.storage import DataError, read_bytes
from inpaint.masks import MaskSampler

log = logging.getLogger(__name__)

STATE_VERSION = 1

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, but decode_jpeg is still the
# fastest path here (~6,000 CelebA-sized JPEGs/s/core vs PIL's ~2,700); keep logs free of the notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


JPEG_MAGIC = [0xFF, 0xD8]


def decode(data: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (3, H, W) from encoded bytes (a uint8 tensor); raises ValueError if damaged."""
    try:
        if data[:2].tolist() == JPEG_MAGIC:  # the usual case: decode_jpeg skips decode_image's sniffing
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        image = decode_image(data, mode=ImageReadMode.RGB)
        return image[0] if image.dim() == 4 else image  # an animated GIF: its first frame
    except RuntimeError:
        pass  # formats torchvision lacks (BMP, TIFF, CMYK JPEG...) go to PIL
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL raises many types for damaged data
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
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


@dataclass(frozen=True)
class SampleDraws:
    """One sample's randomness in one epoch, from a hash of (data seed, epoch, key): the same in
    every process and run. The crop takes two hash words directly (a torch draw costs ~2 us);
    the mask sampler gets a generator seeded by the rest."""

    crop: tuple[int, int]
    mask_seed: int

    @classmethod
    def of(cls, seed: int, epoch: int, key: str) -> "SampleDraws":
        digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=16).digest()
        return cls((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")),
                   int.from_bytes(digest[8:], "little") >> 1)

    def crop_box(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(top, left) of a ``size`` square, uniform up to a 2^-32 modulo bias."""
        return self.crop[0] % (height - size + 1), self.crop[1] % (width - size + 1)


class _Shard:
    """A shard's bytes in memory and its samples by key."""

    def __init__(self, info: ShardInfo, url: str, storage_options: dict | None) -> None:
        self.info = info
        try:
            data = read_bytes(url, storage_options)
        except DataError as exc:
            log.warning("shard %s unreadable (%s); its samples are skipped", info.name, exc)
            data = b""
        parsed = parse_shard(data)
        if data and parsed.error:
            log.warning("shard %s: %s; %d of %d samples readable, the rest are skipped", info.name,
                        parsed.error, len(parsed.samples), info.samples)
        # bytearray: a writable buffer, so torch.frombuffer shares it without a warning.
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        self.samples = {sample.key: sample for sample in parsed.samples}

    def image(self, key: str, size: int) -> torch.Tensor | None:
        """The decoded image of ``key``, covered to ``size``; None (logged) when lost or damaged."""
        sample = self.samples.get(key)
        if sample is None:
            if self.data.numel():
                log.warning("skipped sample %s: missing from shard %s", key, self.info.name)
            return None
        try:
            return cover(decode(self.data[sample.offset:sample.offset + sample.size]), size)
        except ValueError as exc:
            log.warning("skipped sample %s in shard %s: cannot decode (%s)", key, self.info.name, exc)
            return None


class _SplitReader:
    """Reads one split's samples by position in index order; each process builds its own."""

    def __init__(self, index: DatasetIndex, split: SplitInfo, storage_options: dict | None) -> None:
        self.index = index
        self.split = split
        self.storage_options = storage_options
        self.keys = split.keys()
        self.shard_of = np.repeat(np.arange(len(split.shards)), [s.samples for s in split.shards])

    def fetch(self, shard: int) -> _Shard:
        info = self.split.shards[shard]
        return _Shard(info, self.index.shard_url(info), self.storage_options)

    def images(self, ids: np.ndarray, size: int) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(key, image covered to ``size``, or None if lost) for each id in order; the next shard
        downloads in the background meanwhile."""
        if not len(ids):
            return
        shards = self.shard_of[ids]
        starts = [0, *np.flatnonzero(shards[1:] != shards[:-1]) + 1]
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.fetch, int(shards[0]))
            for run, start in enumerate(starts):
                shard = pending.result()
                stop = starts[run + 1] if run + 1 < len(starts) else len(ids)
                pending = pool.submit(self.fetch, int(shards[stop])) if stop < len(ids) else None
                for sample in ids[start:stop]:
                    key = self.keys[sample]
                    yield key, shard.image(key, size)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor, channels-last if 4-D; in a DataLoader worker it lives in
    shared memory, as default_collate allocates it, so handing the batch over copies nothing.

    Channels-last because decoders return HWC memory: copying a crop into NCHW would gather
    every third byte (~35 us per 160 px image, vs ~10 us row by row).
    """
    if len(shape) == 4:
        _, channels, height, width = shape
        strides = (height * width * channels, 1, width * channels, channels)
    else:
        strides = torch.empty(shape, device="meta").stride()
    if get_worker_info() is None:
        return torch.empty_strided(shape, strides, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


class _Batch:
    """A batch being assembled: each sample is copied in as soon as it is made (still in cache)."""

    def __init__(self, size: int, image_size: int, epoch: int) -> None:
        self.image = _batch_tensor((size, 3, image_size, image_size), torch.uint8)
        # uint8 0/1: a quarter of float32's bytes to fill per sample and to pass between processes.
        self.mask = _batch_tensor((size, 1, image_size, image_size), torch.uint8)
        self.box = _batch_tensor((size, 2), torch.int64)
        self.box_rows = self.box.numpy()  # same memory; numpy row writes cost ~1 us, torch's ~5
        self.keys: list[str | None] = [None] * size
        self.planned: list[str] = []
        self.filled = 0
        self.epoch = epoch

    @property
    def complete(self) -> bool:
        return self.filled == len(self.keys)

    def as_dict(self) -> dict:
        lost = [planned for planned, key in zip(self.planned, self.keys) if key != planned]
        return {"image": self.image, "mask": self.mask, "box": self.box, "key": self.keys, "epoch": self.epoch,
                "skipped": lost}


class _EpochShare(IterableDataset):
    """One rank's batches for (the rest of) one epoch; each DataLoader worker makes its own share."""

    def __init__(self, reader: _SplitReader, shares: list[WorkerShare], rotation: int, epoch: int, seed: int,
                 batch_size: int, image_size: int, sampler: Any) -> None:
        self.reader = reader
        self.shares = shares
        self.rotation = rotation
        self.epoch = epoch
        self.seed = seed
        self.batch_size = batch_size
        self.image_size = image_size
        self.sampler = sampler
        self.generator = torch.Generator()  # reseeded for every sample's mask

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # After a resume the DataLoader starts with its worker 0; rotating keeps the rank's batch
        # sequence (batch j from worker j % W) exactly as an uninterrupted run makes it.
        share = self.shares[((info.id if info else 0) + self.rotation) % len(self.shares)]
        return self._batches(share)

    def _fill(self, batch: _Batch, row: int, draws: SampleDraws, key: str, image: torch.Tensor) -> None:
        size = self.image_size
        top, left = draws.crop_box(image.shape[1], image.shape[2], size)
        batch.image[row] = image[:, top:top + size, left:left + size]
        batch.box_rows[row] = self.sampler.sample_into(batch.mask[row], self.generator.manual_seed(draws.mask_seed))
        batch.keys[row] = key
        batch.filled += 1

    def _batches(self, share: WorkerShare) -> Iterator[dict]:
        batches: deque[_Batch] = deque()
        waiting: list[tuple[_Batch, int, SampleDraws]] = []  # rows whose sample was lost
        for planned, image in self.reader.images(share.samples[share.done * self.batch_size:], self.image_size):
            if not batches or len(batches[-1].planned) == self.batch_size:
                batches.append(_Batch(self.batch_size, self.image_size, self.epoch))
            batch = batches[-1]
            batch.planned.append(planned)
            row = (batch, len(batch.planned) - 1, SampleDraws.of(self.seed, self.epoch, planned))
            if image is None:
                waiting.append(row)
                continue
            for lost in (*waiting, row):
                self._fill(*lost, planned, image)
            waiting.clear()
            while batches and batches[0].complete:
                yield batches.popleft().as_dict()
        if waiting:
            replacement = next(((key, image) for key, image in self.reader.images(share.samples, self.image_size)
                                if image is not None), None)
            if replacement is None:
                raise DataError(f"none of the {len(share.samples)} samples of a worker's share could be read")
            for lost in waiting:
                self._fill(*lost, *replacement)
            yield from (batch.as_dict() for batch in batches)


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate for ready-made batches (its default walks every key string)."""
    return batch


class TrainLoader:
    """One rank's endless stream of training batches, epoch after epoch; resumable mid-epoch.

    Each batch is a dict: ``image`` uint8 (B, 3, S, S) in channels-last memory (the decoders'
    layout; ``.contiguous()`` gives NCHW), ``mask`` uint8 (B, 1, S, S) with 1 = known and
    0 = hole, ``box`` int64 (B, 2) (top, left) of the local patch, ``key`` list[str] and
    ``epoch`` int. ``batches_per_epoch`` (a full epoch's) is the same on every rank; an epoch
    resumed mid-way yields the batches it has left, also the same number on every rank. Build it with
    :func:`make_train_loader`; ``sampler`` is anything with ``sample_into(mask_row, generator) -> (top, left)``.
    """

    def __init__(self, index: DatasetIndex, data_cfg: DataConfig, image_size: int, sampler: Any,
                 rank: int = 0, world_size: int = 1, storage_options: dict | None = None,
                 pin_memory: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.split = index.split(data_cfg.train_split)
        self.structure = Structure(world_size, max(1, data_cfg.num_workers), data_cfg.batch_size)
        self.batches_per_epoch = self.structure.batches(self.split.samples)
        if self.batches_per_epoch < 1:
            raise DataError(f"{index.url}: split {self.split.name!r} has {self.split.samples} images, fewer than one "
                            f"batch on every rank ({world_size} x {data_cfg.batch_size})")
        self.index = index
        self.data_cfg = data_cfg
        self.image_size = image_size
        self.sampler = sampler
        self.rank = rank
        self.storage_options = storage_options
        self.pin_memory = pin_memory
        self.epoch = 0
        self.skipped = 0  # samples lost to damage and replaced, in this process's lifetime
        self._stages: list[tuple[Structure, int]] = []  # earlier structures of this epoch, batches under each
        self._consumed = 0  # batches yielded under the current structure this epoch

    def _shard_sizes(self) -> list[int]:
        return [shard.samples for shard in self.split.shards]

    def _epoch_batches(self) -> Iterator[dict]:
        """The batches left in the current epoch, as planned (see :mod:`inpaint.data.plan`)."""
        order = epoch_order(self._shard_sizes(), self.data_cfg.seed, self.epoch)
        remaining = remaining_after(order, self._stages)
        if self._consumed >= self.structure.batches(len(remaining)):
            return iter(())
        shares = rank_shares(remaining, self.structure, self.rank, self._consumed)
        dataset = _EpochShare(_SplitReader(self.index, self.split, self.storage_options), shares,
                              self._consumed % self.structure.workers, self.epoch, self.data_cfg.seed,
                              self.structure.batch_size, self.image_size, self.sampler)
        return iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=self.data_cfg.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=False))

    def __iter__(self) -> Iterator[dict]:
        while True:
            for batch in self._epoch_batches():
                lost = batch.pop("skipped")
                if lost:
                    self.skipped += len(lost)
                    log.warning("epoch %d: replaced %d lost samples (%s); %d so far", self.epoch, len(lost),
                                ", ".join(lost), self.skipped)
                self._consumed += 1
                yield batch
            self.epoch += 1
            self._stages, self._consumed = [], 0

    def state_dict(self) -> dict:
        """The position after the last batch yielded: small and JSON-able, the same on every rank."""
        stages = [*self._stages, (self.structure, self._consumed)]
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": sum(done for _, done in stages),
                "split": self.split.name, "samples": self.split.samples, "seed": self.data_cfg.seed,
                "stages": [{"world_size": s.world_size, "num_workers": s.workers, "batch_size": s.batch_size,
                            "batches": done} for s, done in stages]}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch yielded when ``state`` was taken; call before iterating."""
        try:
            epoch = int(state["epoch"])
            stages = [(Structure(int(s["world_size"]), int(s["num_workers"]), int(s["batch_size"])), int(s["batches"]))
                      for s in state["stages"]]
            same_data = (state["split"], int(state["samples"]), int(state["seed"])) == (
                self.split.name, self.split.samples, self.data_cfg.seed)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"loader state is malformed ({type(exc).__name__}: {exc})") from None
        if not stages or epoch < 0 or any(done < 0 for _, done in stages):
            raise DataError(f"loader state is malformed: {state}")
        if not same_data:
            log.warning("loader state was saved for split %r of %s samples with seed %s; the data or seed changed, "
                        "so training continues at the start of epoch %d", state["split"], state["samples"],
                        state["seed"], epoch + 1)
            self.epoch, self._stages, self._consumed = epoch + 1, [], 0
            return
        self.epoch = epoch
        if stages[-1][0] == self.structure:
            self._stages, self._consumed = stages[:-1], stages[-1][1]
        else:
            log.info("resuming epoch %d with %s instead of %s: the rest of the epoch is re-planned", epoch,
                     self.structure, stages[-1][0])
            self._stages, self._consumed = stages, 0


def make_train_loader(data_cfg: DataConfig, model_cfg: ModelConfig, mask_cfg: MaskConfig, rank: int = 0,
                      world_size: int = 1, storage_options: dict | None = None,
                      pin_memory: bool = False) -> TrainLoader:
    """The training loader of ``rank`` over ``data_cfg.url``'s ``data_cfg.train_split``."""
    sampler = MaskSampler(mask_cfg, model_cfg.image_size, model_cfg.local_size)
    return TrainLoader(load_index(data_cfg.url, storage_options), data_cfg, model_cfg.image_size, sampler,
                       rank, world_size, storage_options, pin_memory)


def iter_split(url: str, split: str, image_size: int, storage_options: dict | None = None,
               limit: int | None = None, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, uint8 (3, S, S) centre crop) of a split in index order, for evaluation.

    ``keys`` restricts it to those samples (still in index order; only their shards are read),
    e.g. a subset drawn with a fixed seed from :func:`~inpaint.data.index.split_keys`. Damaged
    samples are logged and left out.
    """
    index = load_index(url, storage_options)
    info = index.split(split)
    reader = _SplitReader(index, info, storage_options)
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
