"""Evaluation throughput: images per second for the paper-size generator and the classical baselines.

    python -m benchmarks.eval_throughput [--images 32] [--threads 1] [--batch-size 16] [--device cpu]

Completes and scores real photographs (the built-in sample dataset, packed to a temporary folder
and read once, centre-cropped to 160 px) under the evaluation protocol: per hole kind alone, then
all three kinds as one evaluation does, for the celeba recipe's generator (random weights: speed
does not depend on them) and for the biharmonic (and, if OpenCV is installed, Telea) baselines.
Reading the shards is timed separately. The median of ``--repeats`` runs is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from inpaint import baselines, recipes
from inpaint import evaluation as ev
from inpaint.data import iter_split, pack_dataset
from inpaint.inference import Inpainter
from inpaint.masks import EVALUATION_MASK_KINDS
from inpaint.models import build_generator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per timed run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--baseline-images", type=int, default=8, help="images per baseline run (they are slow)")
    return parser.parse_args()


def load_samples(count: int, size: int) -> tuple[list[ev.Sample], float]:
    """``count`` centre-cropped photographs (repeating the sample test split) and the read rate."""
    with tempfile.TemporaryDirectory() as tmp:
        pack_dataset("sample", None, tmp, progress=False)
        start = time.perf_counter()
        photos = list(iter_split(tmp, "train", size))
        read_rate = len(photos) / (time.perf_counter() - start)
    return [(i, photos[i % len(photos)][0], photos[i % len(photos)][1]) for i in range(count)], read_rate


def seconds(complete: ev.Completer, samples: list[ev.Sample], protocol: ev.Protocol, batch_size: int) -> float:
    """Wall time of one evaluation of ``samples`` with the protocol's hole kinds."""
    start = time.perf_counter()
    ev.evaluate_samples(complete, samples, protocol, batch_size=batch_size)
    return time.perf_counter() - start


def report(name: str, complete: ev.Completer, samples: list[ev.Sample], base: ev.Protocol,
           args: argparse.Namespace, repeats: int) -> None:
    """Images/s per hole kind and for all three; variants interleave so that load from other
    processes on a shared machine spreads over all of them rather than skewing one."""
    variants = {kind: ev.Protocol(**{**vars(base), "kinds": (kind,)}) for kind in EVALUATION_MASK_KINDS}
    variants["all 3"] = base
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, protocol in variants.items():
            times[label].append(seconds(complete, samples, protocol, args.batch_size))
    for label, measured in times.items():
        note = "  (one evaluation: 3 completions per image)" if label == "all 3" else ""
        print(f"{name:<28} {label:<11} {len(samples) / statistics.median(measured):8.2f} img/s{note}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = recipes.get("celeba")
    size = config.model.image_size
    samples, read_rate = load_samples(args.images, size)
    base = ev.Protocol("sample", "train", seed=0, count=args.images, image_size=size,
                       local_size=config.model.local_size)
    print(f"device {args.device}, {args.threads} torch thread(s), {args.images} images of {size}x{size}, "
          f"batch {args.batch_size}, median of {args.repeats}")
    print(f"{'reading + decoding shards':<40} {read_rate:8.1f} img/s")
    generator = build_generator(config.model)
    inpainter = Inpainter(generator, config, device=args.device)
    ev.evaluate_samples(inpainter.complete, samples[:2], base, batch_size=2)  # warm-up
    report("generator (celeba, 6.7 M)", inpainter.complete, samples, base, args, args.repeats)
    for name in baselines.BASELINES:
        try:
            complete = ev.baseline_completer(baselines.get(name))
        except baselines.BaselineError as exc:
            print(f"baseline {name}: skipped ({exc})")
            continue
        report(f"baseline {name}", complete, samples[:args.baseline_images], base, args, 1)


if __name__ == "__main__":
    main()
