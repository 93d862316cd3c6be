"""What fp32 layouts and torch.compile buy our ``glcic`` recipe against GLCIC-PyTorch, on this CPU.

    python -m benchmarks.fp32_variants [--phases generator,joint] [--variants nchw,channels_last,compile]

For CPUs without native bf16 (e.g. an AVX2-only AMD EPYC), where the trainer's defaults are fp32
and NCHW: each variant of our ``glcic`` recipe (fp32; NCHW, channels_last, ``torch.compile``, or
both) next to the rebuilt GLCIC-PyTorch step (``benchmarks/glcic_pytorch.py``), 160 px, patch 96,
batch 12, interleaved round by round in one process (``benchmarks.runners``), on four fixed
synthetic batches (smooth random images, the recipe's holes), medians of ``--steps`` timed steps
after one warm-up step (which also pays the compile time). Prints one line per phase.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.runners import Runner, time_interleaved
from benchmarks.vocabulary import GLCIC_PYTORCH, OPTIMIZED, PHASES, Options
from benchmarks.workloads import Workload, size_settings
from inpaint.hardware import describe_cpu_line
from inpaint.masks import MaskSampler

SIZE = size_settings(160, 96, 12)
NCHW = ("runtime.bf16=false", "runtime.channels_last=false")
CHANNELS_LAST = ("runtime.bf16=false", "runtime.channels_last=true")
VARIANTS = {
    "nchw": Workload("glcic/fp32", "glcic", OPTIMIZED, NCHW + SIZE),
    "channels_last": Workload("glcic/fp32+channels_last", "glcic", OPTIMIZED, CHANNELS_LAST + SIZE),
    "compile": Workload("glcic/fp32+compile", "glcic", OPTIMIZED, NCHW + SIZE, compile=True),
    "channels_last_compile": Workload("glcic/fp32+channels_last+compile", "glcic", OPTIMIZED,
                                      CHANNELS_LAST + SIZE, compile=True),
}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--variants", default="nchw,channels_last,compile")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    print(describe_cpu_line())
    theirs = Workload("glcic-pytorch", None, GLCIC_PYTORCH, SIZE)
    for phase in args.phases.split(","):
        runners = [Runner(w, phase, torch.device("cpu"), Options())
                   for w in [theirs, *(VARIANTS[v] for v in args.variants.split(","))]]
        for runner in runners:
            runner.batches = synthetic_batches(runner)
        started = time.perf_counter()
        time_interleaved(runners, 1, args.steps, phase)
        base = statistics.median(runners[0].step_s)
        cells = [f"{r.workload.name} {statistics.median(r.step_s):.2f} s ({base / statistics.median(r.step_s):.2f}x)"
                 for r in runners]
        print(f"{phase}: " + "  ".join(cells) + f"  [{time.perf_counter() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
