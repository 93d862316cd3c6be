"""Our recipes in fp32 against GLCIC-PyTorch on this CPU, and the ceiling the CPU puts on the ratio.

    python -m benchmarks.fp32_variants [--phases generator,joint] [--variants nchw,channels_last,compile,celeba]
                                       [--size 160,96,12] [--steps 3]

For CPUs without native bf16 (e.g. an AVX2-only AMD EPYC), where the trainer's defaults are fp32
and NCHW: each variant of our ``glcic`` recipe (fp32; NCHW, channels_last, ``torch.compile``, or
both) and our ``celeba`` recipe in fp32, next to the rebuilt GLCIC-PyTorch step
(``benchmarks/glcic_pytorch.py``), 160 px, patch 96, batch 12, interleaved round by round in one
process (``benchmarks.runners``), on four fixed synthetic batches (smooth random images, the
recipe's holes), medians of ``--steps`` timed steps after one warm-up step (which also pays the
compile time). Prints one line per phase.

The ceiling: the FLOPs of one step (``FlopCounterMode``, per image, at a batch of 2) and this
CPU's fp32 matmul rate (the best of a few 4096 x 4096 fp32 matmuls, the densest work the CPU
does) bound how fast a step can be: ``ceiling = GLCIC-PyTorch's step time / (our FLOPs per step
/ matmul rate)`` is the largest speed-up over GLCIC-PyTorch a step of those FLOPs could reach
if every FLOP ran at the matmul rate. A target above the ceiling cannot be met in fp32 by any
system running the same networks with the same convolution algorithm.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.runners import Runner, count_flops, time_interleaved
from benchmarks.vocabulary import GLCIC_PYTORCH, OPTIMIZED, PHASES, Options
from benchmarks.workloads import Workload, size_settings
from inpaint.hardware import describe_cpu_line
from inpaint.masks import MaskSampler

NCHW = ("runtime.bf16=false", "runtime.channels_last=false")
CHANNELS_LAST = ("runtime.bf16=false", "runtime.channels_last=true")
VARIANTS = {  # name: (recipe, settings, compile)
    "nchw": ("glcic", NCHW, False),
    "channels_last": ("glcic", CHANNELS_LAST, False),
    "compile": ("glcic", NCHW, True),
    "channels_last_compile": ("glcic", CHANNELS_LAST, True),
    "celeba": ("celeba", NCHW, False),
    "celeba_channels_last": ("celeba", CHANNELS_LAST, False),
}
CPU = torch.device("cpu")


def workload(variant: str, size: tuple[str, ...]) -> Workload:
    recipe, settings, compiled = VARIANTS[variant]
    layout = "+channels_last" if settings == CHANNELS_LAST else ""
    return Workload(f"{recipe}/fp32{layout}{'+compile' if compiled else ''}", recipe, OPTIMIZED,
                    settings + size, compile=compiled)


def synthetic_batches(runner: Runner, count: int = 4):
    """``count`` fixed batches at the runner's size, repeated forever."""
    config = runner.config
    generator = torch.Generator().manual_seed(0)
    sampler = MaskSampler(config.mask, config.model.image_size, config.model.local_size)
    batches = []
    for _ in range(count):
        side, n = config.model.image_size, config.data.batch_size
        low = torch.rand(n, 3, side // 4, side // 4, generator=generator)
        image = (torch.nn.functional.interpolate(low, size=side, mode="bilinear") * 255).to(torch.uint8)
        mask, box = sampler.batch(n, generator)
        batches.append({"image": image, "mask": mask, "box": box})
    while True:
        yield from batches


def matmul_flops_per_s(side: int = 4096, repeats: int = 5) -> float:
    """This CPU's fp32 rate on its densest work: the best of ``repeats`` side x side matmuls."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        image, patch, batch = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IMAGE,PATCH,BATCH, got {text!r}") from None
    return image, patch, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--variants", default="nchw,channels_last,compile,celeba")
    parser.add_argument("--size", type=parse_size, default=(160, 96, 12), metavar="IMAGE,PATCH,BATCH")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--matmul-side", type=int, default=4096, help=argparse.SUPPRESS)  # small in tests
    args = parser.parse_args(argv)
    phases, variants = args.phases.split(","), args.variants.split(",")
    for name, given, known in (("--phases", phases, PHASES), ("--variants", variants, VARIANTS)):
        unknown = [v for v in given if v not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    size = size_settings(*args.size)
    batch = args.size[2]
    print(describe_cpu_line())
    peak = matmul_flops_per_s(args.matmul_side)
    print(f"fp32 matmul rate, {args.matmul_side}x{args.matmul_side}, {torch.get_num_threads()} threads: "
          f"{peak / 1e9:.0f} GFLOP/s (the ceiling below)", flush=True)
    theirs = Workload("glcic-pytorch", None, GLCIC_PYTORCH, size)
    works = [workload(v, size) for v in variants]
    for phase in phases:
        runners = [Runner(w, phase, CPU, Options()) for w in [theirs, *works]]
        for runner in runners:
            runner.batches = synthetic_batches(runner)
        started = time.perf_counter()
        time_interleaved(runners, 1, args.steps, phase)
        base = statistics.median(runners[0].step_s)
        flops = {}
        for work in [theirs, *works]:
            if work.recipe not in flops:  # counted uncompiled: compiling does not change the FLOPs
                flops[work.recipe] = count_flops(dataclasses.replace(work, compile=False), phase, CPU, Options(),
                                                 batches=synthetic_batches)
        cells = [f"glcic-pytorch {base:.2f} s ({flops[None] / 1e9:.1f} GFLOP/image, "
                 f"{flops[None] * batch / base / 1e9:.0f} GFLOP/s)"]
        cells += [f"{r.workload.name} {statistics.median(r.step_s):.2f} s "
                  f"({base / statistics.median(r.step_s):.2f}x)" for r in runners[1:]]
        ceilings = [f"{recipe} {base / (flops[recipe] * batch / peak):.2f}x ({flops[recipe] / 1e9:.1f} GFLOP/image)"
                    for recipe in flops if recipe is not None]
        print(f"{phase}: " + "  ".join(cells) + f"  [{time.perf_counter() - started:.0f} s]", flush=True)
        print(f"{phase} ceiling at the matmul rate: " + "  ".join(ceilings), flush=True)


if __name__ == "__main__":
    main()
