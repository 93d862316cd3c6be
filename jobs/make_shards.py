"""Pack an image dataset into WebDataset shards plus index.json, locally or in object storage.

    python jobs/make_shards.py --dataset celeba --source ~/data/celeba --output s3://bucket/celeba
    python jobs/make_shards.py --dataset lfw --source ~/data/lfw.tgz --output data/lfw
    python jobs/make_shards.py --dataset folder --source ~/photos --output data/photos --test-fraction 0.05
    python jobs/make_shards.py --dataset sample --output data/sample

S3 endpoint and credentials come from the AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
...) or --storage-option. An output that already holds index.json is refused; an interrupted
run into the same output resumes, keeping the shards it finished.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from inpaint.cli import OneLineParser, fraction, non_empty, path_text, positive_int, seed_int  # noqa: E402  (light: no torch)

DATASETS = ("celeba", "lfw", "folder", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="source layout")
    parser.add_argument("--source", default=None, type=path_text, help="folder or archive as published (not for sample)")
    parser.add_argument("--output", required=True, type=path_text, help="dataset folder URL: local path or s3://bucket/prefix")
    parser.add_argument("--split", default=None, type=non_empty,
                        help="celeba: official (default) | paper; lfw: official (default) | person; others: random")
    parser.add_argument("--shard-size", type=positive_int, default=None,
                        help="images per shard (default: 1000; 32 for sample)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the shuffles and random splits")
    parser.add_argument("--test-fraction", type=fraction, default=None,
                        help="test share of folder and sample splits (default: 0.1; 0.2 of each photo for sample)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for --output, e.g. endpoint_url=http://minio:9000 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset == "sample" and args.source is not None:
        parser.error("--source: the built-in sample dataset has no source (it is cut from installed packages' photos)")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from inpaint.data import DataError, pack_dataset
    from inpaint.storage import StorageError, parse_storage_options

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("inpaint").setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            summary = pack_dataset(args.dataset, args.source, args.output, shard_size=args.shard_size,
                                   split=args.split, seed=args.seed,
                                   storage_options=parse_storage_options(args.storage_option),
                                   progress=not args.quiet, test_fraction=args.test_fraction)
    except (DataError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output's disk full or read-only while writing a shard
        print(f"error: cannot write {args.output}: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename else ''}; rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # index.json is written last, so the output holds no dataset yet: the same command resumes.
        print(f"interrupted: {args.output} holds no index.json yet; rerun the same command to resume "
              "(finished shards are kept)", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
