"""One-shot GPU check: the celeba recipe through each phase on one GPU, in under 5 minutes.

    python benchmarks/gpu_check.py                        # on a GPU machine: the full check
    python benchmarks/gpu_check.py --smoke --device cpu   # tiny sizes on CPU (CI): the plumbing only

What it does, in order, and what it reports (one JSON, ``--output``, and the same as a table next
to it, ``.txt``):

1. The device, its bf16 peak (vendor datasheet figure, ``benchmarks.machine.PEAK_TFLOPS``), torch,
   CUDA and NCCL versions.
2. A process group of world size 1 over NCCL (gloo on CPU), both networks wrapped in DDP, so
   every backward allreduces through NCCL as a multi-GPU run does.
3. Per phase (generator, discriminator, joint), eager and under ``torch.compile`` (both networks
   and VGG16; ``--no-compile`` leaves it out): bf16 autocast + channels_last (the trainer's GPU
   defaults), ``--warmup`` untimed steps (compilation happens there), then ``--steps`` timed ones on
   batches already in pinned memory. Reported: images/s, median step time, peak memory
   (``torch.cuda.max_memory_allocated`` over the phase), model FLOPs per image (FlopCounterMode
   over one eager step at a batch of 2) and the model FLOPs utilisation against the bf16 peak.
4. The training loader with the recipe's ``data.num_workers`` worker processes (and
   ``--loader-workers`` more), pinned memory, wall-clock samples/s, next to the rate the fastest
   step consumes.
5. bf16 against fp32: two trainers with the same initial weights on the same batches, a few steps
   of each phase; every logged loss compared step by step (relative difference; they agree when
   all stay within ``--bf16-rtol``). On CUDA, fp32 convolutions use TF32 (PyTorch's default).
6. The paper's schedule (90k + 10k + 400k iterations) projected from the fastest variant of each
   phase, on 1 GPU and on 8 (per-GPU batch kept, 1/8 of the iterations, ``--scaling-efficiency``).

Time: ``--budget-s`` (default 270 s) bounds the run: a compiled phase that would start too late is
skipped and says so, and the steps shrink to fit. VGG16 has random weights (the GPU machine may
have no network; weights do not change speed). Without a GPU (``--smoke``) the sizes are tiny and
nothing is asserted about speed: it checks that every section runs and writes its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from inpaint import recipes  # noqa: E402
from inpaint.config import Config, ConfigError, DataConfig, apply_overrides  # noqa: E402
from inpaint.data import make_train_loader  # noqa: E402
from inpaint.hardware import describe_cpu_line  # noqa: E402
from inpaint.trainer import Trainer  # noqa: E402

PHASES = ("generator", "discriminator", "joint")
PAPER_ITERATIONS = {"generator": 90_000, "discriminator": 10_000, "joint": 400_000}
SMOKE_OVERRIDES = ("model.image_size=32", "model.local_size=16", "model.gen_width=8", "model.disc_width=8",
                   "model.fc_features=32", "model.se_reduction=4", "model.dilations=2,4", "mask.max_side=0.45",
                   "loss.cx_layers=relu2_2", "data.batch_size=2", "data.num_workers=1")


@dataclasses.dataclass
class Options:
    recipe: str = "celeba"
    device: str = "auto"
    overrides: tuple[str, ...] = ()
    warmup: int = 3
    steps: int = 20
    compile: bool = True
    agreement_steps: int = 3  # per phase, bf16 vs fp32
    bf16_rtol: float = 0.05
    loader_batches: int = 60
    loader_workers: tuple[int, ...] = (8,)
    images: int = 600
    budget_s: float = 270.0
    scaling_efficiency: float = 0.9
    smoke: bool = False


# ----------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(device: torch.device):
    """World size 1 over NCCL (gloo off CUDA): DDP's allreduces go through the real backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def phase_config(options: Options, phase: str, bf16: bool = True, steps: int = 10**9) -> Config:
    """The recipe (plus overrides) with a schedule holding only ``phase`` (or the given steps)."""
    lengths = {p: (steps if p == phase else 0) for p in PHASES} if phase != "all" else steps
    overrides = ["loss.vgg_weights=random", *(SMOKE_OVERRIDES if options.smoke else ()), *options.overrides,
                 f"runtime.bf16={str(bf16).lower()}", f"runtime.channels_last={str(bf16).lower()}",
                 "schedule.unit=iterations",
                 *(f"schedule.{p}_steps={n}" for p, n in lengths.items())]
    return apply_overrides(recipes.get(options.recipe), overrides)


def make_trainer(config: Config, device: torch.device, compiled: bool, ddp: bool = True) -> Trainer:
    trainer = Trainer(config, device=device)
    if compiled:
        trainer.compile()  # as training does with runtime.compile: inside DDP
    if ddp:
        trainer.wrap_models(lambda module: DistributedDataParallel(
            module, device_ids=[device.index or 0] if device.type == "cuda" else None))
    return trainer


def fixed_batches(url: str, config: Config, count: int, device: torch.device) -> list[dict]:
    """A few batches from the training loader, pinned on CUDA, reused by every step measured."""
    data = DataConfig(url=url, batch_size=config.data.batch_size, num_workers=0, seed=config.data.seed)
    loader = iter(make_train_loader(data, config.model, config.mask))
    batches = []
    for _ in range(count):
        batch = next(loader)
        if device.type == "cuda":
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batches.append(batch)
    return batches


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak TFLOPS or None) from the datasheet table of benchmarks.machine."""
    from benchmarks.machine import PEAK_TFLOPS

    if device.type != "cuda":
        return describe_cpu_line(), None
    name = torch.cuda.get_device_name(device)
    return name, next((bf16 for key, bf16, _ in PEAK_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------- sections
def flops_per_image(options: Options, phase: str, device: torch.device, batches: list[dict]) -> float:
    """Model FLOPs of one eager step at a batch of 2, per image."""
    trainer = make_trainer(phase_config(options, phase), device, compiled=False, ddp=False)
    small = {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in batches[0].items()}
    trainer.train_step(small)  # lazily built state (optimizer moments) stays out of the count
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(small)
    return counter.get_total_flops() / 2


def time_phase(options: Options, phase: str, device: torch.device, batches: list[dict], compiled: bool,
               steps: int, warmup: int) -> dict[str, Any]:
    """Warm-up then timed steps of one phase; images/s, step time, peak memory, compile time."""
    trainer = make_trainer(phase_config(options, phase), device, compiled)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup):
        trainer.train_step(batches[i % len(batches)])
    _sync(device)
    warmup_s = time.perf_counter() - start
    seconds = []
    for i in range(steps):
        begin = time.perf_counter()
        trainer.train_step(batches[i % len(batches)])
        _sync(device)
        seconds.append(time.perf_counter() - begin)
    step = statistics.median(seconds)
    batch = trainer.config.data.batch_size
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del trainer
    return {"images_per_s": batch / step, "step_s_median": step, "step_s": seconds, "warmup_s": warmup_s,
            "peak_memory_mib": peak / 2**20 if peak is not None else None, "batch": batch}


def loader_rates(options: Options, url: str, config: Config, pin: bool) -> dict[str, Any]:
    """Wall-clock samples/s of the training loader with its worker processes (first batch excluded)."""
    out = {}
    for workers in dict.fromkeys((config.data.num_workers, *options.loader_workers)):
        data = DataConfig(url=url, batch_size=config.data.batch_size, num_workers=workers, seed=config.data.seed)
        loader = iter(make_train_loader(data, config.model, config.mask, pin_memory=pin))
        next(loader)  # worker start-up
        start = time.perf_counter()
        for _ in range(options.loader_batches):
            next(loader)
        seconds = time.perf_counter() - start
        del loader
        out[str(workers)] = {"samples_per_s": options.loader_batches * config.data.batch_size / seconds}
    return out


def bf16_agreement(options: Options, device: torch.device, batches: list[dict]) -> dict[str, Any]:
    """Every logged loss of the first steps of each phase, bf16 autocast against fp32."""
    steps = options.agreement_steps
    config = {precision: phase_config(options, "all", bf16=precision == "bf16",
                                      steps={p: steps for p in PHASES}) for precision in ("bf16", "fp32")}
    trainers = {precision: Trainer(cfg, device=device) for precision, cfg in config.items()}
    history: dict[str, dict[str, list[float]]] = {"bf16": {}, "fp32": {}}
    for i in range(3 * steps):
        for precision, trainer in trainers.items():
            torch.manual_seed(1000 + i)  # the same randomness (if any) in both
            for name, value in trainer.train_step(batches[i % len(batches)]).items():
                history[precision].setdefault(name, []).append(float(value))
    metrics = {}
    for name, fp32 in history["fp32"].items():
        bf16 = history["bf16"][name]
        rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(bf16, fp32)]
        metrics[name] = {"bf16": bf16, "fp32": fp32, "max_rel_diff": max(rel)}
    worst = max(m["max_rel_diff"] for m in metrics.values())
    return {"steps_per_phase": steps, "rtol": options.bf16_rtol, "metrics": metrics, "max_rel_diff": worst,
            "agree": worst <= options.bf16_rtol}


def projection(phases: dict[str, dict], efficiency: float) -> dict[str, Any]:
    """Hours of the paper's schedule with the fastest measured variant of each phase."""
    best = {}
    for phase, variants in phases.items():
        timed = {name: v["step_s_median"] for name, v in variants.items() if "step_s_median" in v}
        if timed:
            name = min(timed, key=timed.get)
            best[phase] = {"variant": name, "step_s": timed[name]}
    if set(best) != set(PHASES):
        return {"skipped": "needs every phase timed"}
    one = sum(PAPER_ITERATIONS[p] * best[p]["step_s"] for p in PHASES) / 3600
    return {"iterations": PAPER_ITERATIONS, "best": best, "scaling_efficiency_8": efficiency,
            "hours": {"1": one, "8": one / (8 * efficiency)},
            "note": "8 GPUs keep the per-GPU batch and see the paper's images in 1/8 of the iterations; "
                    "the efficiency is assumed, not measured here"}


# ----------------------------------------------------------------------------- the run
def run(options: Options) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if options.device == "auto" else options.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if options.compile:
        # Static shapes: the discriminator sees batches of 2B (its step) and B (the adversarial pass);
        # one graph each compiles faster and runs faster than one dynamic-shape graph.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(32, torch._dynamo.config.cache_size_limit)
    name, peak = peak_tflops(device)
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "device_type": device.type, "peak_tflops_bf16": peak, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "cpu": describe_cpu_line(), "options": dataclasses.asdict(options)}}

    def left() -> float:
        return options.budget_s - (time.perf_counter() - started)

    base = phase_config(options, "joint")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, process_group(device) as backend:
        results["meta"]["backend"] = backend
        from benchmarks.workloads import make_dataset

        url = make_dataset(Path(tmp), options.images)
        batches = fixed_batches(url, base, max(2, min(8, options.steps)), device)
        phases: dict[str, dict[str, Any]] = {}
        for phase in PHASES:
            flops = flops_per_image(options, phase, device, batches)
            phases[phase] = {}
            for variant in ("eager", "compiled") if options.compile else ("eager",):
                # Compiling a phase takes tens of seconds; keep a third of what is left for the rest.
                if variant == "compiled" and left() < options.budget_s / 3:
                    phases[phase][variant] = {"skipped": f"budget: {left():.0f} s left of {options.budget_s:g}"}
                    continue
                figures = time_phase(options, phase, device, batches, variant == "compiled", options.steps,
                                     options.warmup)
                achieved = flops * figures["images_per_s"] / 1e12
                figures.update(flops_per_image=flops, achieved_tflops=achieved,
                               mfu=achieved / peak if peak else None)
                phases[phase][variant] = figures
        results["phases"] = phases
        results["loader"] = {"workers": loader_rates(options, url, base, pin=device.type == "cuda"),
                             "batch": base.data.batch_size,
                             "fastest_step_images_per_s": max(v.get("images_per_s", 0) for p in phases.values()
                                                              for v in p.values())}
        results["bf16_vs_fp32"] = bf16_agreement(options, device, batches)
    results["projection"] = projection(phases, options.scaling_efficiency)
    results["meta"]["wall_s"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------------------------- output
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 2) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = (f"{meta['date']}  {meta['device']}  torch {meta['torch']}, CUDA {meta['cuda']}, NCCL {meta['nccl']}, "
            f"backend {meta['backend']}, bf16 peak {_fmt(meta['peak_tflops_bf16'])} TFLOPS, {meta['wall_s']:.0f} s")
    rows = []
    for phase, variants in results["phases"].items():
        for variant, f in variants.items():
            if "skipped" in f:
                rows.append([phase, variant, f["skipped"], None, None, None, None, None])
                continue
            rows.append([phase, variant, f["images_per_s"], f["step_s_median"], f["peak_memory_mib"],
                         f["flops_per_image"] / 1e9, f["achieved_tflops"], f["mfu"]])
    steps = _table(["phase", "variant", "img/s", "step s", "peak MiB", "GFLOP/img", "TFLOP/s", "MFU (bf16 peak)"],
                   rows)
    loader = results["loader"]
    loader_rows = [[workers, f["samples_per_s"]] for workers, f in loader["workers"].items()]
    loader_text = (_table(["workers", "samples/s"], loader_rows, text_columns=1)
                   + f"\nfastest step consumes {_fmt(loader['fastest_step_images_per_s'])} images/s")
    agreement = results["bf16_vs_fp32"]
    agree_rows = [[name, m["max_rel_diff"]] for name, m in agreement["metrics"].items()]
    agree_text = (_table(["loss", "max relative diff"], agree_rows, text_columns=1)
                  + f"\n{agreement['steps_per_phase']} steps per phase; agree within {agreement['rtol']:g}: "
                    f"{'yes' if agreement['agree'] else 'NO'}")
    p = results["projection"]
    iterations = ", ".join(f"{k} {v:,}" for k, v in p.get("iterations", {}).items())
    fastest = ", ".join(f"{k}: {v['variant']}" for k, v in p.get("best", {}).items())
    projection_text = p.get("skipped") or (
        f"paper schedule ({iterations} iterations), fastest variant per phase ({fastest}): "
        f"{p['hours']['1']:.1f} h on 1 device, {p['hours']['8']:.1f} h on 8 (efficiency "
        f"{p['scaling_efficiency_8']:g} assumed)")
    sections = [("Training steps (bf16 autocast, channels_last, DDP)", steps),
                ("Training loader with worker processes", loader_text),
                ("bf16 against fp32, first steps", agree_text), ("Projection", projection_text)]
    return head + "\n\n" + "\n\n".join(f"## {title}\n{body}" for title, body in sections) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="celeba")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    parser.add_argument("--budget-s", type=float)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and few steps (CPU CI): checks the sections run, not the speed")
    parser.add_argument("--output", type=Path, default=Path("out/gpu_check/gpu_check.json"))
    return parser


SMOKE = {"warmup": 1, "steps": 2, "compile": False, "agreement_steps": 1, "loader_batches": 4,
         "loader_workers": (), "images": 32, "budget_s": 600.0}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {**(SMOKE if args.smoke else {}),
              **{k: v for k, v in vars(args).items() if v is not None and k in Options.__dataclass_fields__}}
    fields["overrides"] = tuple(args.overrides)
    options = Options(**fields)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if options.steps < 1 or options.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        phase_config(options, "joint")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    results = run(options)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1, default=str))
    table = args.output.with_suffix(".txt")
    table.write_text(render(results))
    print(table.read_text())
    print(f"wrote {args.output} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
