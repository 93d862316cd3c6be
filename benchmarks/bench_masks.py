"""Cost of making masks per sample (data-loader workers) and of the evaluation metrics.

    python -m benchmarks.bench_masks [--threads 1] [--samples 500]

Prints ms per mask for each MaskSampler kind, ms per crop_local forward+backward on a batch,
and images/s for PSNR and SSIM at the paper's 160x160.
"""

from __future__ import annotations

import argparse
import time

import torch

from inpaint.config import MaskConfig
from inpaint.masks import MaskSampler
from inpaint.models import crop_local
from inpaint.metrics import psnr, ssim


def seconds_per_call(fn, repeats: int) -> float:
    """Mean wall time of fn() over repeats calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker uses 1)")
    parser.add_argument("--samples", type=int, default=500, help="masks drawn per kind")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, local = args.image_size, args.local_size
    print(f"torch {torch.__version__}, {args.threads} thread(s), {size}x{size} images, {local} px patch")

    generator = torch.Generator().manual_seed(0)
    for kind in ("random", "center", "freeform", "mixed"):
        sampler = MaskSampler(MaskConfig(kind=kind), size, local)
        ms = 1e3 * seconds_per_call(lambda: sampler.sample(generator), args.samples)
        print(f"mask {kind:9s} {ms:7.3f} ms/sample  ({1e3 / ms:8.0f} samples/s per core)")

    images = torch.rand(args.batch, 3, size, size, requires_grad=True)
    _, boxes = MaskSampler(MaskConfig(), size, local).batch(args.batch, generator)
    ms = 1e3 * seconds_per_call(lambda: crop_local(images, boxes, local).sum().backward(), 50)
    print(f"crop_local fwd+bwd batch {args.batch}: {ms:.3f} ms")

    pred, target = torch.rand(64, 3, size, size), torch.rand(64, 3, size, size)
    for name, metric in (("psnr", psnr), ("ssim", ssim)):
        seconds = seconds_per_call(lambda: metric(pred, target), 5)
        print(f"{name} {len(pred) / seconds:8.0f} images/s")


if __name__ == "__main__":
    main()
