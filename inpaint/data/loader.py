"""Training batches from packed shards: random crops, per-sample masks, resumable positions.

Each process (training rank or DataLoader worker) reads its shards with
:class:`~inpaint.data.reading.SplitReader` (bytes -> images: one GET a shard, decoded from the
original bytes); each image is covered up to the image size if smaller and cropped straight into
the batch. Batches leave a worker as uint8 images; the trainer converts them on
its device. A DataLoader worker fills a few shared-memory batch buffers in turn (``_SlotRing``)
and sends each buffer once; the training process copies each batch out as it arrives (into
pinned memory on GPU machines), so no batch pays fresh shared memory or a file-descriptor hand-over. Where the time goes, and what each choice saved: ``benchmarks/loader_throughput.py``.

Which samples a rank and worker read is in :mod:`inpaint.data.plan` (its docstring states the
guarantees: disjoint shares, equal batch counts on every rank, a new reproducible order every
epoch, exact mid-epoch resume, also across a change of world size or worker count).

Randomness per sample: the crop and the mask come from a hash of (data seed, epoch, planned
sample) (:class:`SampleDraws`), so they are reproducible and do not depend on which worker or
run makes them.

Damaged data: a sample that does not decode, or that a truncated or unreadable shard lacks, is
logged with its key, counted (``TrainLoader.skipped``; its keys, merged over ranks by the training
loop, ride in the loader's state and so in every checkpoint) and replaced by the next readable sample
of the same worker's share (wrapping around to its start), cropped and masked as the lost sample
would have been. Batch counts, and so DDP, stay in step whatever is lost; the replacement is a
duplicate, and the choice is deterministic, so a resumed run makes the same batches.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from inpaint.config import DataConfig, MaskConfig, ModelConfig
from inpaint.data.errors import DataError
from inpaint.data.index import DatasetIndex, load_index
from inpaint.data.plan import Structure, WorkerShare, epoch_order, rank_shares, remaining_after
from inpaint.data.reading import SplitReader
from inpaint.masks import Draws, MaskSampler

log = logging.getLogger(__name__)

STATE_VERSION = 1

_MASK_UNIFORMS = 8  # enough for every hole shape but strokes, which draw from a generator
_WORDS = 2 + _MASK_UNIFORMS


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 arrays whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SampleDraws:
    """One sample's randomness in one epoch: crop offsets, the mask's first uniform draws, and a
    seed for a generator if the mask needs more numbers (strokes)."""

    __slots__ = ("crop", "mask_uniforms", "mask_seed")

    def __init__(self, crop: tuple[int, int], mask_uniforms: list[float], mask_seed: int) -> None:
        self.crop = crop
        self.mask_uniforms = mask_uniforms
        self.mask_seed = mask_seed

    @staticmethod
    def of_samples(seed: int, epoch: int, ids: np.ndarray) -> list["SampleDraws"]:
        """The draws of samples ``ids`` (positions in the split) in ``epoch``: a counter-based
        hash of (data seed, epoch, id, word), so the same in every process, worker and run.

        Made in numpy for many samples at once: hashing each sample in Python cost ~10 us.
        """
        stream = _mix64(_mix64(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(epoch % 2**64))
        counters = np.asarray(ids, dtype=np.uint64)[:, None] * np.uint64(_WORDS) + np.arange(_WORDS, dtype=np.uint64)
        words = _mix64(stream + counters * np.uint64(0x9E3779B97F4A7C15))
        crops = zip((words[:, 0] >> np.uint64(32)).tolist(), (words[:, 0] & np.uint64(0xFFFFFFFF)).tolist())
        uniforms = ((words[:, 2:] >> np.uint64(11)) * 2.0 ** -53).tolist()  # 53 random bits in [0, 1)
        return list(map(SampleDraws, crops, uniforms, (words[:, 1] >> np.uint64(1)).tolist()))

    def crop_box(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(top, left) of a ``size`` square, uniform up to a 2^-32 modulo bias."""
        return self.crop[0] % (height - size + 1), self.crop[1] % (width - size + 1)

    def mask_draws(self) -> Draws:
        """The mask sampler's draws (a fresh stream each call)."""
        return Draws(self.mask_uniforms, self.mask_seed)


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


PREFETCH_FACTOR = 2  # batches each DataLoader worker works ahead (PyTorch's default, passed explicitly)


class _SlotRing:
    """A worker's reusable shared-memory batch buffers, handed out in turn.

    A fresh shared-memory batch costs a page fault per 4 KiB on first write, and every tensor sent
    through a DataLoader queue costs a file-descriptor hand-over (a socket connection with an
    authentication round trip, ~0.7 ms in the receiver) and a new mapping there. A buffer is sent
    once, with its first batch; later batches in it travel as a small ``(ring, index)`` reference
    that :class:`TrainLoader` resolves to the mapping it kept. A buffer comes round again only after
    ``slots`` more batches of this worker: more than the DataLoader can have in flight for it (at
    most ``PREFETCH_FACTOR`` x workers tasks, all on one worker once the others have finished), and
    :class:`TrainLoader` copies every batch out of its buffer as it receives it.
    """

    def __init__(self, size: int, image_size: int, workers: int) -> None:
        self.shapes = {"image": ((size, 3, image_size, image_size), torch.uint8),
                       "mask": ((size, 1, image_size, image_size), torch.uint8), "box": ((size, 2), torch.int64)}
        self.slots: list[dict[str, torch.Tensor]] = [{} for _ in range(PREFETCH_FACTOR * workers + 2)]
        self.name = f"{os.getpid()}-{id(self)}"
        self.turn = 0

    def next(self) -> tuple[tuple[str, int], dict[str, torch.Tensor], bool]:
        """(reference, tensors, whether they are new): the next buffer in turn."""
        index = self.turn % len(self.slots)
        self.turn += 1
        slot, new = self.slots[index], not self.slots[index]
        if new:  # allocated on first use, so a short share never maps the whole ring
            slot.update({name: _batch_tensor(shape, dtype) for name, (shape, dtype) in self.shapes.items()})
        return (self.name, index), slot, new


class _Batch:
    """A batch being assembled: each sample is copied in as soon as it is made (still in cache)."""

    def __init__(self, size: int, image_size: int, epoch: int, ring: _SlotRing | None = None) -> None:
        if ring is None:
            self.reference, self.send, slot = None, True, {
                "image": _batch_tensor((size, 3, image_size, image_size), torch.uint8),
                # uint8 0/1: a quarter of float32's bytes to fill per sample and to pass between processes.
                "mask": _batch_tensor((size, 1, image_size, image_size), torch.uint8),
                "box": _batch_tensor((size, 2), torch.int64)}
        else:
            self.reference, slot, self.send = ring.next()
        self.image, self.mask, self.box = slot["image"], slot["mask"], slot["box"]
        # numpy views of the same memory, written per sample: numpy's row writes cost a
        # quarter of torch's. Images as (B, S, S, 3): channels-last is NHWC in memory.
        self.image_rows = self.image.permute(0, 2, 3, 1).numpy()
        self.mask_rows = self.mask.numpy()
        self.box_rows = self.box.numpy()
        self.keys: list[str | None] = [None] * size
        self.planned: list[str] = []
        self.filled = 0
        self.epoch = epoch

    @property
    def complete(self) -> bool:
        return self.filled == len(self.keys)

    def as_dict(self) -> dict:
        lost = [planned for planned, key in zip(self.planned, self.keys) if key != planned]
        out = {"key": self.keys, "epoch": self.epoch, "skipped": lost}
        tensors = {"image": self.image, "mask": self.mask, "box": self.box}
        if self.reference is None:
            return {**tensors, **out}
        return {**out, "slot": self.reference, "tensors": tensors if self.send else None}


_DRAWS_CHUNK = 1024  # samples whose draws are made at once


class _LaterEpochs:
    """What a worker needs to plan the full epochs after the first one on its own (see _EpochShare)."""

    def __init__(self, shard_sizes: list[int], structure: Structure, rank: int, epoch: int, first_batches: int,
                 seed: int) -> None:
        self.shard_sizes = shard_sizes
        self.structure = structure
        self.rank = rank
        self.epoch = epoch  # the first (possibly partial) epoch's number
        self.first_batches = first_batches  # the rank batches left in it
        self.seed = seed

    def shares(self, worker: int) -> Iterator[tuple[int, WorkerShare]]:
        """(epoch, this worker's share of it) for every epoch after the first, endlessly.

        The DataLoader takes its batch n from worker n % W (round robin from its start, W workers,
        none ever exhausted), and rank batch j of an epoch belongs to share j % W. An epoch whose
        first batch is the DataLoader's batch n therefore has worker k serve share (k - n) mod W.
        """
        workers = self.structure.workers
        start = self.first_batches
        full = self.structure.batches(sum(self.shard_sizes))
        epoch = self.epoch
        while True:
            epoch += 1
            shares = rank_shares(epoch_order(self.shard_sizes, self.seed, epoch), self.structure, self.rank, 0)
            yield epoch, shares[(worker - start) % workers]
            start += full


class _EpochShare(IterableDataset):
    """One rank's batches from its position on: the rest of the current epoch, then (with ``later``)
    every epoch after it. Each DataLoader worker makes its own share of each epoch, so one DataLoader,
    and its worker processes, serve the whole run: no respawned workers, no refilled prefetch queue
    at each epoch boundary."""

    def __init__(self, reader: SplitReader, shares: list[WorkerShare], rotation: int, epoch: int, seed: int,
                 batch_size: int, image_size: int, sampler: Any, later: _LaterEpochs | None = None) -> None:
        self.reader = reader
        self.shares = shares
        self.rotation = rotation
        self.epoch = epoch
        self.seed = seed
        self.batch_size = batch_size
        self.image_size = image_size
        self.sampler = sampler
        self.later = later

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        # One ring of buffers per worker for the whole stream (see _SlotRing).
        ring = _SlotRing(self.batch_size, self.image_size, info.num_workers) if info is not None else None
        # After a resume the DataLoader starts with its worker 0; rotating keeps the rank's batch
        # sequence (batch j from worker j % W) exactly as an uninterrupted run makes it.
        yield from self._batches(self.shares[(worker + self.rotation) % len(self.shares)], self.epoch, ring)
        if self.later is not None:
            for epoch, share in self.later.shares(worker):
                yield from self._batches(share, epoch, ring)

    def _fill(self, batch: _Batch, row: int, draws: SampleDraws, key: str, image: torch.Tensor) -> None:
        size = self.image_size
        pixels = image.numpy().transpose(1, 2, 0)  # (H, W, 3), the decoders' memory order; numpy's
        # transpose costs a tenth of torch's permute
        top, left = draws.crop_box(pixels.shape[0], pixels.shape[1], size)
        batch.image_rows[row] = pixels[top:top + size, left:left + size]
        batch.box_rows[row] = self.sampler.sample_into(batch.mask_rows[row], draws.mask_draws())
        batch.keys[row] = key
        batch.filled += 1

    def _batches(self, share: WorkerShare, epoch: int, ring: _SlotRing | None) -> Iterator[dict]:
        batch_size = self.batch_size
        ids = share.samples[share.done * batch_size:]
        batches: deque[_Batch] = deque()  # more than one only while a lost sample awaits its replacement
        waiting: list[tuple[_Batch, int, SampleDraws]] = []  # rows whose sample was lost
        for position, (planned, image) in enumerate(self.reader.images(ids, self.image_size)):
            if position % _DRAWS_CHUNK == 0:
                chunk = SampleDraws.of_samples(self.seed, epoch, ids[position:position + _DRAWS_CHUNK])
            if not batches or len(batches[-1].planned) == batch_size:
                batches.append(_Batch(batch_size, self.image_size, epoch, ring))
            batch = batches[-1]
            row = len(batch.planned)
            batch.planned.append(planned)
            draws = chunk[position % _DRAWS_CHUNK]
            if image is None:
                waiting.append((batch, row, draws))
                continue
            if waiting:
                for lost in waiting:
                    self._fill(*lost, planned, image)
                waiting.clear()
            self._fill(batch, row, draws, planned, image)
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
    :func:`make_train_loader`; ``sampler`` is anything with ``sample_into(mask_row, draws) -> (top, left)``
    that writes a numpy (1, S, S) row (see :class:`~inpaint.masks.MaskSampler`).
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
        # Keys of the samples lost, since the run began: this rank's, and other ranks' once merged in
        # (merge_skipped) or restored from a checkpoint (load_state_dict).
        self.skipped_keys: set[str] = set()
        self._stages: list[tuple[Structure, int]] = []  # earlier structures of this epoch, batches under each
        self._consumed = 0  # batches yielded under the current structure this epoch

    def _shard_sizes(self) -> list[int]:
        return [shard.samples for shard in self.split.shards]

    def _stream(self) -> tuple[int, Iterator[dict]]:
        """(rank batches left in the current epoch, every batch from here on, epoch after epoch).

        The rest of the current epoch is planned from the position (see :mod:`inpaint.data.plan`);
        the later epochs, always whole, each worker plans for itself (:class:`_LaterEpochs`). An epoch
        with nothing left is stepped over here.
        """
        while True:
            order = epoch_order(self._shard_sizes(), self.data_cfg.seed, self.epoch)
            remaining = remaining_after(order, self._stages)
            left = self.structure.batches(len(remaining)) - self._consumed
            if left > 0:
                break
            self.epoch, self._stages, self._consumed = self.epoch + 1, [], 0
        shares = rank_shares(remaining, self.structure, self.rank, self._consumed)
        later = _LaterEpochs(self._shard_sizes(), self.structure, self.rank, self.epoch, left, self.data_cfg.seed)
        dataset = _EpochShare(SplitReader(self.index, self.split, self.storage_options), shares,
                              self._consumed % self.structure.workers, self.epoch, self.data_cfg.seed,
                              self.structure.batch_size, self.image_size, self.sampler, later)
        workers = self.data_cfg.num_workers
        # With workers, batches are pinned as they are copied out of the workers' buffers (_received).
        # One endless iterator: its workers live as long as this loader iterates (persistent across epochs).
        return left, iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                     pin_memory=self.pin_memory and not workers,
                                     prefetch_factor=PREFETCH_FACTOR if workers else None))

    def _received(self, batch: dict, buffers: dict) -> dict:
        """A worker's batch copied out of its reusable buffer (see :class:`_SlotRing`) into memory of
        this process's own, pinned if asked (and possible). ``buffers`` keeps every buffer a worker
        has sent, by reference, for the batches that come back in it."""
        if "slot" not in batch:
            return batch
        reference, tensors = batch.pop("slot"), batch.pop("tensors")
        if tensors is not None:
            buffers[reference] = tensors
        pin = self.pin_memory and torch.cuda.is_available()
        for name, source in buffers[reference].items():
            copy = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, pin_memory=pin)
            batch[name] = copy.copy_(source)
        return batch

    def __iter__(self) -> Iterator[dict]:
        left, stream = self._stream()
        buffers: dict = {}  # the workers' buffers
        while True:
            if not left:  # the previous epoch is done: its state stayed until this next batch was asked for
                self.epoch, self._stages, self._consumed = self.epoch + 1, [], 0
                left = self.batches_per_epoch
            batch = self._received(next(stream), buffers)
            if batch["epoch"] != self.epoch:  # the workers' own plan of later epochs disagrees with ours
                raise RuntimeError(f"loader out of step: a batch of epoch {batch['epoch']} in epoch {self.epoch}")
            lost = batch.pop("skipped")
            if lost:
                self.skipped += len(lost)
                self.skipped_keys.update(lost)
                log.warning("epoch %d: replaced %d lost samples (%s); %d so far", self.epoch, len(lost),
                            ", ".join(lost), self.skipped)
            self._consumed += 1
            left -= 1
            yield batch

    def merge_skipped(self, keys: Iterable[str]) -> None:
        """Add samples other ranks lost, so that :meth:`state_dict` lists every rank's."""
        self.skipped_keys.update(keys)

    def state_dict(self) -> dict:
        """The position after the last batch yielded: small and JSON-able, the same on every rank
        (``skipped`` too once every rank's keys are merged in, see :meth:`merge_skipped`)."""
        stages = [*self._stages, (self.structure, self._consumed)]
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": sum(done for _, done in stages),
                "split": self.split.name, "samples": self.split.samples, "seed": self.data_cfg.seed,
                "stages": [{"world_size": s.world_size, "num_workers": s.workers, "batch_size": s.batch_size,
                            "batches": done} for s, done in stages],
                "skipped": sorted(self.skipped_keys)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch yielded when ``state`` was taken; call before iterating."""
        try:
            epoch = int(state["epoch"])
            stages = [(Structure(int(s["world_size"]), int(s["num_workers"]), int(s["batch_size"])), int(s["batches"]))
                      for s in state["stages"]]
            same_data = (state["split"], int(state["samples"]), int(state["seed"])) == (
                self.split.name, self.split.samples, self.data_cfg.seed)
            skipped = {str(key) for key in state.get("skipped", ())}  # absent in states saved before it was kept
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"loader state is malformed ({type(exc).__name__}: {exc})") from None
        if not stages or epoch < 0 or any(done < 0 for _, done in stages):
            raise DataError(f"loader state is malformed: {state}")
        if same_data:
            self.skipped_keys = skipped
        else:
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
