"""Epoch plans: which samples each rank and each DataLoader worker reads, and in which order.

A plan is a pure function of the split's shard sizes, the seed, the epoch and the *structure*
(world size, DataLoader workers per rank, batch size); every rank computes the same plan on its
own, so ranks never need to talk about data.

1. Global order. ``np.random.default_rng([seed, epoch])`` shuffles the shard order, then the
   samples inside each shard; the concatenation is the epoch's order. A new order every epoch,
   the same one for the same (seed, epoch).
2. Ranks. Every rank gets ``batches = samples // (world_size * batch_size)`` batches: rank r
   takes the r-th contiguous run of ``batches * batch_size`` samples of the order, so it reads
   about 1/world_size of the shards (sharing at most a boundary shard with each neighbour). The
   last ``samples % (world_size * batch_size)`` samples of the order are not used this epoch; as
   the order changes, so does that remainder. Whatever the shard count (even one shard for three
   ranks), every rank yields the same number of batches: the uneven-data DDP hang cannot happen.
3. Workers. A rank's batches are dealt to its W workers in contiguous runs (the first
   ``batches % W`` workers one batch more), and rank batch j comes from worker ``j % W`` as its
   batch ``j // W``: exactly the order in which ``torch.utils.data.DataLoader`` takes batches
   round-robin from its workers, so the batch sequence of a rank is deterministic.
4. Resume. The position in an epoch is the list of *stages* of that epoch: a structure and the
   batches each rank consumed under it (all ranks consume in lockstep, so one count serves all).
   Replaying the stages tells exactly which samples were consumed; the rest of the epoch, in
   global order, is planned again as in 2-3 with the new structure. With an unchanged structure
   this resumes the very same batch sequence (each worker skips its consumed batches without
   reading them); with a changed world size, worker count or batch size no sample of the epoch
   is repeated and none is skipped, except the new remainder of fewer than
   ``world_size * batch_size`` samples that do not fill a batch on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Structure:
    """How an epoch is cut: ranks, DataLoader workers per rank (>= 1), samples per batch."""

    world_size: int
    workers: int
    batch_size: int

    def __post_init__(self) -> None:
        if min(self.world_size, self.workers, self.batch_size) < 1:
            raise ValueError(f"world_size, workers and batch_size must be >= 1, got {self}")

    def batches(self, samples: int) -> int:
        """Batches every rank yields from ``samples`` samples."""
        return samples // (self.world_size * self.batch_size)


@dataclass(frozen=True)
class WorkerShare:
    """One worker's samples for a stage, in reading order, and how many of its batches are done."""

    samples: np.ndarray
    done: int


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Sample ids (positions in index order) in the epoch's order: shards shuffled, then samples."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    offsets = np.concatenate([[0], np.cumsum(shard_sizes, dtype=np.int64)])
    parts = [offsets[s] + rng.permutation(shard_sizes[s]) for s in rng.permutation(len(shard_sizes))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def worker_batches(batches: int, workers: int) -> list[int]:
    """Batches of each worker of a rank: equal, the first ``batches % workers`` one more."""
    return [batches // workers + (k < batches % workers) for k in range(workers)]


def worker_done(consumed: int, worker: int, workers: int) -> int:
    """Batches of ``worker`` among a rank's first ``consumed`` (rank batch j is worker j % W's)."""
    return (consumed - worker + workers - 1) // workers


def _worker_runs(structure: Structure, rank: int, samples: int) -> list[tuple[int, int]]:
    """(start, batches) in the order of each worker's contiguous run of rank ``rank``."""
    batches = structure.batches(samples)
    start = rank * batches * structure.batch_size
    runs = []
    for count in worker_batches(batches, structure.workers):
        runs.append((start, count))
        start += count * structure.batch_size
    return runs


def rank_shares(remaining: np.ndarray, structure: Structure, rank: int, consumed: int) -> list[WorkerShare]:
    """Each worker's share of ``remaining`` for ``rank``, with ``consumed`` rank batches done."""
    size = structure.batch_size
    return [WorkerShare(remaining[start:start + count * size], min(count, worker_done(consumed, k, structure.workers)))
            for k, (start, count) in enumerate(_worker_runs(structure, rank, len(remaining)))]


def remaining_after(order: np.ndarray, stages: Sequence[tuple[Structure, int]]) -> np.ndarray:
    """The samples of ``order`` not consumed by the finished ``stages`` (structure, rank batches)."""
    remaining = order
    for structure, consumed in stages:
        taken = np.zeros(len(remaining), dtype=bool)
        for rank in range(structure.world_size):
            for k, (start, count) in enumerate(_worker_runs(structure, rank, len(remaining))):
                done = min(count, worker_done(consumed, k, structure.workers))
                taken[start:start + done * structure.batch_size] = True
        remaining = remaining[~taken]
    return remaining
