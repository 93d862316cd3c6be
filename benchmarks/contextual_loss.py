"""Contextual loss: the custom-gradient ``contextual_loss`` against the most used public PyTorch port
(S-aiueo32/contextual_loss_pytorch) and against our plain-autograd reference.

    python -m benchmarks.contextual_loss [--device cuda] [--batch 12] [--size 40] [--repeats 7]

Times forward + backward on relu3_3-sized features (default (12, 256, 40, 40), fp32), measures
each variant's peak memory, compares losses and gradients, and says whether the targets hold:
against the port, at most 0.4x its time and 1/4 of its peak memory; against our reference, at
least 2x faster, at most 1/4 of its peak memory, losses equal to 1e-4.

The port (``port_contextual_loss``, rebuilt here from its published ``functional.py``, cosine
distance) computes a different formula in its details: it centres both features on the mean of
y over the whole batch (ours: per image), adds 1e-5 inside the log, and returns the batch mean;
the work per call (one B x N x N similarity, its relative distance, softmax and column max, all
kept by autograd) is what is compared.

Timings alternate the two variants in this process (reference, fast, reference, ...) so that
load from other processes on shared cores hits both alike; medians are reported. Peak memory is
measured in a fresh subprocess per variant, after one warm-up call (so lazily loaded library code
and thread pools are not counted). On CPU it is the resident set's high-water mark (VmHWM) during
one forward + backward, reset just before it through /proc/self/clear_refs, minus the resident
size at that moment; glibc is told to mmap every allocation over 64 KiB and never to keep freed
memory, so the resident set follows the live tensors instead of malloc's cache. On CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before the call.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from inpaint.losses import contextual_loss, contextual_loss_reference

VARIANTS = ("port", "reference", "contextual_loss")
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_FRACTION = 0.25
TARGET_LOSS_DIFF = 1e-4
TARGET_PORT_TIME_FRACTION = 0.4  # our time / the port's
TARGET_PORT_MEMORY_FRACTION = 0.25


def port_contextual_loss(x: torch.Tensor, y: torch.Tensor, band_width: float = 0.5) -> torch.Tensor:
    """S-aiueo32's contextual loss (cosine), the same computation as its published code, as autograd ops."""
    n, c = x.shape[:2]
    centre = y.mean(dim=(0, 2, 3), keepdim=True)  # one mean over batch and positions
    x_unit = torch.nn.functional.normalize(x - centre, p=2, dim=1).reshape(n, c, -1)
    y_unit = torch.nn.functional.normalize(y - centre, p=2, dim=1).reshape(n, c, -1)
    distance = 1 - torch.bmm(x_unit.transpose(1, 2), y_unit)
    relative = distance / (torch.min(distance, dim=2, keepdim=True)[0] + 1e-5)
    weights = torch.exp((1 - relative) / band_width)
    cx = weights / torch.sum(weights, dim=2, keepdim=True)
    similarity = torch.mean(torch.max(cx, dim=1)[0], dim=1)
    return torch.mean(-torch.log(similarity + 1e-5))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --child and --result are for the memory subprocesses only."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=40, help="feature map side: 40 = relu3_3 of a 160 px image")
    parser.add_argument("--chunk", type=int, default=1, help="images per chunk in contextual_loss")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant; the median is reported")
    parser.add_argument("--pair", default="inpainting", choices=("inpainting", "independent"),
                        help="inpainting: x equals y outside a centre hole of 1/4 area; independent: unrelated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--grad-y", action="store_true", help="also differentiate wrt y (training does not)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative, ReLU-like features; the same ones in every subprocess."""
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    y = torch.randn(shape, generator=generator).relu_()
    x = torch.randn(shape, generator=generator).relu_()
    if args.pair == "inpainting":
        hole = slice(args.size // 4, args.size // 4 + args.size // 2)
        completed = y.clone()
        completed[:, :, hole, hole] = x[:, :, hole, hole]
        x = completed
    return x.to(args.device), y.to(args.device)


def forward_backward(loss_fn, x: torch.Tensor, y: torch.Tensor, grad_y: bool):
    """One training-style use: per-image losses, their sum backpropagated to x (and y)."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_(grad_y)
    loss = loss_fn(x, y)
    loss.sum().backward()
    return loss.detach(), x.grad, y.grad


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def resident_kib(field: str) -> int:
    """VmRSS or VmHWM of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_mib(loss_fn, x, y, args) -> float:
    """Memory one forward + backward needs beyond what is already allocated, in MiB."""
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(loss_fn, x, y, args.grad_y)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = resident_kib("VmRSS")
    forward_backward(loss_fn, x, y, args.grad_y)
    return (resident_kib("VmHWM") - before) / 1024


def variant_fn(variant: str, args: argparse.Namespace):
    """The loss function a variant name stands for."""
    if variant == "port":
        return port_contextual_loss
    if variant == "reference":
        return contextual_loss_reference
    return functools.partial(contextual_loss, chunk=args.chunk)


def run_memory_child(args: argparse.Namespace) -> None:
    """In this fresh process: one warm-up call, then the peak memory of one more; saved to --result."""
    loss_fn = variant_fn(args.child, args)
    x, y = make_features(args)
    forward_backward(loss_fn, x, y, args.grad_y)
    Path(args.result).write_text(json.dumps(peak_extra_mib(loss_fn, x, y, args)))


def peak_mib_in_subprocess(variant: str, args: argparse.Namespace) -> float:
    """Run one variant in a fresh Python process and return its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "peak.json"
        command = [sys.executable, "-m", "benchmarks.contextual_loss", "--child", variant, "--result", str(result)]
        for flag in ("device", "batch", "channels", "size", "chunk", "pair", "threads"):
            command += [f"--{flag}", str(getattr(args, flag))]
        command += ["--grad-y"] if args.grad_y else []
        # Fixed thresholds also turn off glibc's dynamic threshold, which would otherwise start
        # keeping freed blocks of up to 32 MiB in its heap after the first large free.
        root = str(Path(__file__).resolve().parent.parent)  # importable however this module was reached
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=path)
        if subprocess.run(command, env=env).returncode != 0:
            sys.exit(f"error: measuring the peak memory of {variant} failed (its output is above)")
        return json.loads(result.read_text())


def time_interleaved(args: argparse.Namespace) -> dict[str, dict]:
    """Seconds per forward + backward of each variant, alternating them; and their last outputs."""
    x, y = make_features(args)
    results = {variant: {"seconds": []} for variant in VARIANTS}
    for repeat in tqdm(range(args.repeats + 1), desc="timing", leave=False):
        for variant in VARIANTS:
            synchronize(args.device)
            start = time.perf_counter()
            loss, grad_x, grad_y = forward_backward(variant_fn(variant, args), x, y, args.grad_y)
            synchronize(args.device)
            if repeat > 0:  # the first round is a warm-up
                results[variant]["seconds"].append(time.perf_counter() - start)
            results[variant].update(loss=loss.cpu(), grad_x=grad_x.cpu(),
                                    grad_y=None if grad_y is None else grad_y.cpu())
    return results


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """Largest absolute difference, next to the size of the values it is measured against."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return f"{diff:.3g} (max |value| {scale:.3g}, relative {diff / max(scale, 1e-30):.2g})"


def verdict(ok: bool) -> str:
    """How a target check reads in the output."""
    return "met" if ok else "NOT met"


def measure(args: argparse.Namespace) -> dict:
    """Interleaved times, peak memory per variant, and the ratios the targets are about."""
    results = time_interleaved(args)
    for variant in VARIANTS:
        results[variant]["peak_mib"] = peak_mib_in_subprocess(variant, args)
    median = {variant: statistics.median(result["seconds"]) for variant, result in results.items()}
    port, ref, fast = results["port"], results["reference"], results["contextual_loss"]
    return {
        "shape": [args.batch, args.channels, args.size, args.size], "device": args.device,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "seconds": median, "min_seconds": {v: min(r["seconds"]) for v, r in results.items()},
        "peak_mib": {v: r["peak_mib"] for v, r in results.items()},
        "port_time_fraction": median["contextual_loss"] / median["port"],
        "port_memory_fraction": fast["peak_mib"] / port["peak_mib"],
        "speedup": median["reference"] / median["contextual_loss"],
        "memory_fraction": fast["peak_mib"] / ref["peak_mib"],
        "max_loss_diff": (fast["loss"] - ref["loss"]).abs().max().item(),
        "loss_range": [ref["loss"].min().item(), ref["loss"].max().item()],
        "grad_x_diff": max_diff(fast["grad_x"], ref["grad_x"]),
        "grad_y_diff": max_diff(fast["grad_y"], ref["grad_y"]) if args.grad_y else None,
        "targets": {"port_time_fraction_max": TARGET_PORT_TIME_FRACTION,
                    "port_memory_fraction_max": TARGET_PORT_MEMORY_FRACTION},
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_memory_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("error: CPU peak memory is read from Linux's /proc/self/clear_refs, absent here")
    shape = (args.batch, args.channels, args.size, args.size)
    print(f"contextual loss, features {shape} fp32 on {args.device}, pair={args.pair}, chunk={args.chunk}, "
          f"grad wrt {'x and y' if args.grad_y else 'x'}, {args.repeats} timed runs per variant (interleaved), "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    m = measure(args)
    print(f"{'variant':<16} {'median s':>9} {'min s':>7} {'peak MiB':>9}")
    for variant in VARIANTS:
        print(f"{variant:<16} {m['seconds'][variant]:>9.3f} {m['min_seconds'][variant]:>7.3f} "
              f"{m['peak_mib'][variant]:>9.1f}")
    print(f"against the port (S-aiueo32): time {m['port_time_fraction']:.3f} of its (target <= "
          f"{TARGET_PORT_TIME_FRACTION:g}): {verdict(m['port_time_fraction'] <= TARGET_PORT_TIME_FRACTION)}; "
          f"peak memory {m['port_memory_fraction']:.3f} of its (target <= {TARGET_PORT_MEMORY_FRACTION:g}): "
          f"{verdict(m['port_memory_fraction'] <= TARGET_PORT_MEMORY_FRACTION)}")
    print(f"speed-up over our reference {m['speedup']:.2f}x (target >= {TARGET_SPEEDUP:g}x): "
          f"{verdict(m['speedup'] >= TARGET_SPEEDUP)}")
    print(f"peak memory {m['memory_fraction']:.3f} of the reference's (target <= {TARGET_MEMORY_FRACTION:g}): "
          f"{verdict(m['memory_fraction'] <= TARGET_MEMORY_FRACTION)}")
    low, high = m["loss_range"]
    print(f"max |loss difference| {m['max_loss_diff']:.3g} (losses {low:.4f}..{high:.4f}; "
          f"target <= {TARGET_LOSS_DIFF:g}): {verdict(m['max_loss_diff'] <= TARGET_LOSS_DIFF)}")
    print(f"max |grad x difference| {m['grad_x_diff']}")
    if args.grad_y:
        print(f"max |grad y difference| {m['grad_y_diff']}")
    print("peak memory method: " + PEAK_METHOD[args.device == "cuda"])
    print(json.dumps({k: round(m[k], 4) for k in ("port_time_fraction", "port_memory_fraction", "speedup",
                                                   "memory_fraction")} | {"max_loss_diff": m["max_loss_diff"]}))


PEAK_METHOD = {True: "torch.cuda.max_memory_allocated minus memory allocated before the call",
               False: "VmHWM during one forward+backward minus VmRSS before it (VmHWM reset via "
                      "/proc/self/clear_refs; glibc mmaps allocations > 64 KiB and keeps no "
                      "freed memory), after a warm-up call, each variant in a fresh subprocess"}


if __name__ == "__main__":
    main()
