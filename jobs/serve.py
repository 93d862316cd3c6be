"""Serve a trained model over HTTP (Ray Serve): the painting page, the API and its docs.

    python jobs/serve.py                                           # the quick start's run, newest checkpoint
    python jobs/serve.py --checkpoint s3://b/runs/celeba-v1 --follow best --gpu --replicas 2 --port 8000

Prints the page's URL and serves until Ctrl-C. --follow moves every replica to each newer loadable
checkpoint of the run (or to the best evaluated one) without failing a request in flight. The same
app runs under `serve run cluster.serve:app_builder checkpoint=URL` or a Serve config file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from inpaint.cli import OneLineParser, positive_float, positive_int  # noqa: E402  (light: no torch)

DEFAULT_RUN = "runs/quickstart-sample"  # jobs/train.py's default --storage and --name with no arguments


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"checkpoint folder or run folder (its newest loadable); local or s3:// (default: {DEFAULT_RUN})")
    parser.add_argument("--follow", nargs="?", const="newest", choices=("newest", "best"),
                        help="move to each newer checkpoint of the run (newest) or to the best evaluated one (best)")
    parser.add_argument("--follow-interval", type=positive_float, default=30.0, metavar="SECONDS",
                        help="how often --follow looks at the run (default: 30)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 to share)")
    parser.add_argument("--port", type=number_port, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica")
    parser.add_argument("--replicas", type=positive_int, default=1, help="model replicas (default: 1)")
    parser.add_argument("--cpus", type=positive_int, default=None,
                        help="CPUs (torch threads) per replica (default: this machine's CPUs / --replicas; 1 with --gpu)")
    parser.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                        help="the largest window around a hole filled at once (default 4194304, 2048x2048)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and Serve's own INFO lines and Serve's access log")
    return parser


def number_port(text: str) -> int:
    from inpaint.cli import number_type

    return number_type(int, low=1, high=65535)(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from inpaint.checkpoint import CheckpointError
    from inpaint.inference import InpaintError
    from inpaint.serving import load_model
    from inpaint.storage import StorageError

    url = args.checkpoint or DEFAULT_RUN
    try:
        # Load it here once: a run without a loadable checkpoint is one line now, not replicas failing in Ray's
        # logs later; and every replica starts on this same checkpoint (--follow moves on from it).
        checkpoint = load_model(url).checkpoint_url
    except (CheckpointError, InpaintError, StorageError) as exc:
        hint = "; train one first: python jobs/train.py" if args.checkpoint is None else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    from cluster.serve_runtime import ServeError, serve_forever

    cpus = args.cpus or (1 if args.gpu else max(1, (os.cpu_count() or 1) // args.replicas))
    if not os.environ.get("RAY_ADDRESS") and args.replicas * cpus > (os.cpu_count() or 1):
        # A local Ray has this machine's CPUs: replicas that do not fit would wait for them forever.
        print(f"error: {args.replicas} replica(s) x {cpus} CPU(s) do not fit this machine's {os.cpu_count()} CPUs; "
              "lower --replicas or --cpus", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve_forever(checkpoint, follow=args.follow, follow_interval_s=args.follow_interval, host=args.host,
                      port=args.port, gpu=args.gpu, replicas=args.replicas, max_pixels=args.max_pixels, cpus=cpus,
                      verbose=args.verbose, stop=stop, announce=lambda line: print(line, flush=True))
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
