"""Measure training speed, memory, FLOPs and cost on this machine, next to GLCIC-PyTorch.

    python jobs/benchmark.py                  # full: celeba, glcic, debug (~10 min on a 2-core CPU)
    python jobs/benchmark.py --quick          # debug recipe and small sizes, a few steps (CI)
    python jobs/benchmark.py --recipes celeba --phases joint --steps 5 --gpu-hour-price 3.9

Writes a JSON (--output, default out/benchmark/system.json) and the same figures as tables next
to it (.txt), and prints the tables. The method is in benchmarks/system.py's docstring.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install
# The profiler's tracer logs an error line per profile on machines without a GPU; keep only fatal ones.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

QUICK = {"recipes": ("debug",), "warmup": 1, "steps": 2, "compare_size": (64, 64, 2), "ddp_workers": (1, 2),
         "ddp_steps": 2, "ladder_recipes": ("debug",), "images": 32, "contextual": (2, 32, 16, 16),
         "loader_images": 160}


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI form: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--recipes", type=_names, help="comma-separated (default: celeba,glcic,debug)")
    parser.add_argument("--phases", type=_names, help="comma-separated (default: generator,discriminator,joint)")
    parser.add_argument("--warmup", type=int, help="untimed steps per workload and phase (default 1)")
    parser.add_argument("--steps", type=int, help="timed steps per workload and phase; medians reported (default 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for every recipe measured (repeatable)")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip GLCIC-PyTorch")
    parser.add_argument("--compare-size", type=_ints, metavar="IMAGE,PATCH,BATCH",
                        help="size of the GLCIC-PyTorch comparison (default 160,96,12)")
    parser.add_argument("--ddp-workers", type=_ints, metavar="N,N,...|none", help="default 1,2,4")
    parser.add_argument("--ddp-recipe", help="recipe of the DDP scaling runs (default debug)")
    parser.add_argument("--ddp-steps", type=int, help="timed DDP steps per phase (default 5)")
    parser.add_argument("--ladder", dest="ladder_recipes", type=_names, metavar="RECIPES",
                        help="add each optimisation in turn for these recipes (default on CUDA: celeba)")
    parser.add_argument("--gpu-hour-price", type=float, help="USD per device-hour for the projection (default 2.5)")
    parser.add_argument("--scaling-efficiency", type=float, help="8-device efficiency assumed (default 0.9)")
    parser.add_argument("--images", type=int, help="JPEGs in the benchmark dataset (default 96)")
    parser.add_argument("--contextual-size", dest="contextual", type=_ints, metavar="B,C,H,W",
                        help="features of the contextual-loss comparison (default 12,256,40,40)")
    parser.add_argument("--loader-workers", type=int, help="DataLoader processes of the loader comparison, "
                                                           "0 skips it (default 2)")
    parser.add_argument("--loader-images", type=int, help="JPEGs of the loader comparison (default 3000)")
    parser.add_argument("--output", type=Path, default=Path("out/benchmark/system.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.system import run, write  # torch loads after --help
    from benchmarks.vocabulary import Options
    from inpaint.config import ConfigError

    fields = {**(QUICK if args.quick else {}),
              **{k: v for k, v in vars(args).items() if v is not None and k in Options.__dataclass_fields__},
              "overrides": tuple(args.overrides)}
    command = "python jobs/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        options = Options(**fields)
        options.check()
        try:  # fail before minutes of measuring, not after
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.touch()
        except OSError as exc:
            raise ConfigError(f"--output {args.output}: cannot write there ({exc.strerror})") from None
        results = run(options, command=command.strip())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = write(results, args.output)
    print(table.read_text())
    print(f"wrote {args.output} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
