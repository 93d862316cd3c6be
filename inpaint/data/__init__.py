"""Datasets as WebDataset shards: packing sources into shards, and streaming them to training.

- :func:`pack_dataset` packs CelebA, LFW, any image folder or the built-in sample into shards
  plus an ``index.json`` (local folder or any fsspec URL such as ``s3://bucket/prefix``).
- :func:`load_index` / :func:`split_keys` read that index.
- :func:`make_train_loader` streams one rank's training batches (see ``loader`` and ``plan``
  for the distribution and resume guarantees); :func:`iter_split` streams a split for evaluation.

Never imports ray: distribution is by the explicit ``rank`` / ``world_size`` arguments.
"""

from inpaint.data.index import DatasetIndex, ShardInfo, SplitInfo, load_index, split_keys
from inpaint.data.loader import TrainLoader, make_train_loader
from inpaint.data.reading import iter_split
from inpaint.data.pack import PackSummary, pack_dataset
from inpaint.data.errors import DataError
from inpaint.storage import parse_storage_options  # re-exported: the jobs parse --storage-option with the data

__all__ = ["DataError", "DatasetIndex", "PackSummary", "ShardInfo", "SplitInfo", "TrainLoader", "iter_split",
           "load_index", "make_train_loader", "pack_dataset", "parse_storage_options", "split_keys"]
