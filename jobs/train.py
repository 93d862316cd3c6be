"""Train the inpainting GAN under Ray Train (DDP), locally or on a cluster.

    python jobs/train.py                                   # quickstart recipe, built-in sample data, local Ray, CPU
    ray job submit -- python jobs/train.py --recipe celeba --data s3://b/celeba \\
        --storage s3://b/runs --name celeba-v1 --workers 8 --gpu

Re-running the same command resumes the run from its latest checkpoint. When training ends, the
final checkpoint is evaluated on held-out images beside mean fill, Telea and biharmonic inpainting
(RUN/evaluations/; --no-evaluate skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from inpaint.cli import OneLineParser, non_negative_float, number_type, path_text, positive_float  # noqa: E402  (light: no torch)

DEFAULT_DATA = "data/sample"
DEFAULT_STORAGE = "runs"
MAX_FAILURES = 10_000  # a bound on a count, not a real limit: "-1" is the way to say "no limit"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart",
                        help="quickstart | celeba | lfw | glcic | debug (default: quickstart, ~5 min on 2 CPU cores)")
    parser.add_argument("--data", default=None, type=path_text,
                        help=f"dataset folder URL with index.json (default: the built-in sample, packed to {DEFAULT_DATA})")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, type=path_text,
                        help="where runs live: local path or s3://bucket/prefix (default: ./runs)")
    parser.add_argument("--name", default=None, help="run name; the same name resumes (default: <recipe>-sample)")
    parser.add_argument("--workers", default="2", help="training workers: N, or MIN-MAX for an elastic run")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker: NCCL, bf16 autocast, channels_last")
    parser.add_argument("--max-failures", type=number_type(int, low=-1, high=MAX_FAILURES), default=3,
                        help=f"worker-group restarts before giving up (-1: no limit; at most {MAX_FAILURES})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optim.g_lr=1e-4 (repeatable)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fsspec option for the data URL, e.g. endpoint_url=http://minio:9000")
    parser.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs each worker reserves")
    parser.add_argument("--resource-timeout", type=non_negative_float, default=None, metavar="SECONDS",
                        help="how long to wait for the cluster to fit the workers (default: 0 locally, "
                             "600 on a cluster, so an autoscaler can add nodes)")
    parser.add_argument("--resize-interval", type=non_negative_float, default=60.0, metavar="SECONDS",
                        help="elastic runs (--workers MIN-MAX): how often Ray Train checks for room to grow "
                             "the group; each resize restarts it from the latest checkpoint (default: 60)")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="skip the final evaluation beside classical methods")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own INFO messages and core log lines, as Ray prints them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.launch import UserError, TrainRequest, run_training  # heavy imports after --help
    from inpaint.storage import StorageError, parse_storage_options

    try:
        request = TrainRequest.create(
            recipe=args.recipe, overrides=args.overrides, data=args.data, storage=args.storage, name=args.name,
            workers=args.workers, gpu=args.gpu, max_failures=args.max_failures,
            storage_options=parse_storage_options(args.storage_option), cpus_per_worker=args.cpus_per_worker,
            resource_timeout_s=args.resource_timeout, resize_interval_s=args.resize_interval,
            evaluate=not args.no_evaluate, verbose=args.verbose, default_data=DEFAULT_DATA)
        summary = run_training(request)
    except (UserError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
