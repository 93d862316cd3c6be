"""Evaluate checkpoints under the paper's protocol (128 test images; centre holes of 1/4 and 1/3
of the area and of the side, and random holes).

    python jobs/evaluate.py --checkpoint runs/debug-sample --data data/sample            # the run's latest
    python jobs/evaluate.py --checkpoint s3://b/runs/celeba-v1/checkpoint_000100000 --num-images all --workers 8
    python jobs/evaluate.py --baseline biharmonic --checkpoint runs/debug-sample          # what the network buys
    python jobs/evaluate.py --watch s3://b/runs/celeba-v1 --interval 600                  # the CronJob / sidecar

Writes metrics.json, report.md, grid.png and per_image.csv to --output (default
RUN/evaluations/<checkpoint>) and eval/<holes>/<metric> scalars to RUN/tensorboard/eval (raw completions) and
RUN/tensorboard/eval-postprocessed (Poisson-blended, as `fill` gives them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from inpaint.cli import OneLineParser, non_empty, path_text, positive_float, positive_int, seed_int  # noqa: E402  (light: no torch)


def num_images(text: str) -> int | None:
    """A positive count, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", type=path_text, help="checkpoint folder, or a run folder (its latest checkpoint); local or s3://")
    what.add_argument("--watch", metavar="RUN_URL", type=path_text, help="evaluate every checkpoint of this run not evaluated yet")
    parser.add_argument("--data", type=path_text, help="dataset folder URL (default: data.url of the checkpoint's / run's config)")
    parser.add_argument("--output", type=path_text, help="output folder URL (default: RUN/evaluations/<checkpoint name>)")
    parser.add_argument("--num-images", type=num_images, default=128, metavar="N|all",
                        help="test images drawn with --seed (default: 128, the paper's); 'all' = the whole split")
    parser.add_argument("--seed", type=seed_int, default=0, help="draws the images and the random holes (default: 0)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="Ray tasks in parallel when there are more than 2000 images (default: 1)")
    parser.add_argument("--baseline", choices=("mean", "telea", "biharmonic"),
                        help="evaluate a classical method instead (sizes, data, run folder from --checkpoint if given)")
    parser.add_argument("--split", type=non_empty, help="dataset split (default: the config's data.eval_split, i.e. test)")
    parser.add_argument("--interval", type=positive_float, metavar="SECONDS",
                        help="with --watch: keep polling at this interval until the run is done")
    parser.add_argument("--max-polls", type=positive_int, metavar="N", help="with --watch --interval: stop after N polls")
    parser.add_argument("--claim-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                        help="with --watch: a claim not renewed for this long (its holder renews it every "
                             "SECONDS/4) is a crashed evaluator's and is taken over (default: 600)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"),
                        help="the averaged generator (model.ema_decay; default) or the last trained weights; a "
                             "checkpoint without an average uses its raw weights either way")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fsspec option for the data URL, e.g. endpoint_url=http://minio:9000")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.watch or args.baseline):
        parser.error("give --checkpoint, --watch or --baseline")
    if args.watch and (args.baseline or args.output):
        parser.error("--watch writes to RUN/evaluations/<checkpoint>; it takes neither --baseline nor --output")
    if args.max_polls and not (args.watch and args.interval):
        parser.error("--max-polls counts the polls of --watch --interval; give both")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from cluster import evaluator, watcher  # heavy imports after --help
    from inpaint.storage import parse_storage_options

    try:
        request = evaluator.EvaluationRequest(
            data=args.data, output=args.output, num_images=args.num_images, seed=args.seed, workers=args.workers,
            split=args.split, storage_options=parse_storage_options(args.storage_option), device=args.device,
            weights=args.weights)
        if args.watch:
            summary = watcher.watch(args.watch, request, interval=args.interval, max_polls=args.max_polls,
                                       claim_timeout_s=args.claim_timeout)
            print(summary.describe())
            return 0
        if args.baseline:
            result = evaluator.evaluate_baseline(args.baseline, request, checkpoint=args.checkpoint)
        else:
            result = evaluator.evaluate_checkpoint(args.checkpoint, request)
    except evaluator.USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
