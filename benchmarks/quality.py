"""Does training produce an inpainter? Learning curves under a wall-clock budget, beside classical methods.

    python benchmarks/quality.py                         # 30 min per network on this CPU, both networks at once
    python benchmarks/quality.py --budget-s 300 --networks paper --eval-points 4   # a quick look
    python benchmarks/quality.py --bn-steps 300          # also the discriminator-BatchNorm experiment

Trains the ``quickstart`` recipe's sizes (64 px crops of the built-in sample dataset: real
photos, faces first, test tiles disjoint from training tiles) in this process with the plain
Trainer, for each network at an equal budget:

- ``paper``: SE-ResNet blocks + contextual loss (VGG16 ``--vgg-weights``: ImageNet weights where
  they can be had; ``random`` here, offline, which keeps the loss's structure but not its
  perceptual meaning);
- ``glcic``: the ablation the paper's Table 1 compares with: plain conv blocks, no contextual loss.

The budget is split between the phases as the paper splits its 500k iterations (18% generator,
2% discriminator, 80% joint) unless ``--phase-shares`` says otherwise; step counts come from a
short calibration of each phase's step time, so the budget holds on a slower or busier machine.
At ``--eval-points`` points the generator is evaluated on the whole held-out split under the
evaluation protocol (every hole kind) in four variants: its trained (raw) weights and its moving
average (``model.ema_decay``; ``ema``), each as the network outputs it and post-processed as
``fill`` does by default (GLCIC's Poisson blending; ``+post``). Mean fill, Telea and biharmonic
are scored once on the same images and holes. Prints the table, how much the average smooths
each curve (the standard deviation of successive differences of hole PSNR between evaluation
points, from the first joint-phase point on, where the curves swing) and what each variant
ends at, and writes ``quality.json`` and ``quality.png`` (hole PSNR against training time, one
panel per hole kind) to ``--output``.

``--bn-steps N`` then continues the paper network's final state for N joint steps once per
``loss.adv_disc_bn`` mode (train / eval / mixed) and reports the discriminator's view and the
figures after each, to choose how its BatchNorm sees the generator's adversarial pass.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inpaint import baselines, recipes  # noqa: E402
from inpaint import evaluation as ev  # noqa: E402
from inpaint.config import Config, ConfigError, LossConfig, ModelConfig, ScheduleConfig  # noqa: E402
from inpaint.data import iter_split, load_index, pack_dataset  # noqa: E402
from inpaint.data.loader import make_train_loader  # noqa: E402
from inpaint.hardware import describe_cpu_line  # noqa: E402
from inpaint.inference import Inpainter, postprocess  # noqa: E402
from inpaint.trainer import Trainer  # noqa: E402

NETWORKS = ("paper", "glcic")
BASELINES = ("mean", "telea", "biharmonic")
PAPER_SHARES = (0.18, 0.02, 0.80)  # 90k / 10k / 400k of the paper's 500k iterations
CALIBRATION_STEPS = (12, 6, 8)  # per phase; the first two of each are warm-up and not timed
VARIANTS = ("raw", "raw+post", "ema", "ema+post")  # weights (trained / averaged) x output (network / post-processed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=1800.0, help="training seconds per network (default: 1800)")
    parser.add_argument("--networks", default="paper,glcic", help="comma-separated: paper, glcic")
    parser.add_argument("--eval-points", type=int, default=8, help="evaluations along each curve")
    parser.add_argument("--phase-shares", default=None, metavar="G,D,J",
                        help="budget shares of the three phases (default: the paper's 0.18,0.02,0.80)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per network")
    parser.add_argument("--sequential", action="store_true",
                        help="train the networks one after the other (default: at once, one process each)")
    parser.add_argument("--data", default=None, help="packed dataset URL (default: the sample, packed to a temp dir)")
    parser.add_argument("--vgg-weights", default="random", help="loss.vgg_weights of the paper network")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the quickstart recipe for both networks")
    parser.add_argument("--bn-steps", type=int, default=0, help="joint steps per mode in the BatchNorm experiment")
    parser.add_argument("--output", default="benchmarks/out/quality", help="folder for quality.json and quality.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    if not args.networks or any(n not in NETWORKS for n in args.networks):
        parser.error(f"--networks: choose from {', '.join(NETWORKS)}")
    shares = PAPER_SHARES if args.phase_shares is None else tuple(float(x) for x in args.phase_shares.split(","))
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        parser.error("--phase-shares: three non-negative numbers G,D,J")
    args.phase_shares = tuple(x / sum(shares) for x in shares)
    if args.budget_s <= 0 or args.eval_points < 1 or args.threads < 1 or args.bn_steps < 0:
        parser.error("--budget-s, --eval-points and --threads must be positive, --bn-steps >= 0")
    return args


def network_config(name: str, data: str, args: argparse.Namespace) -> Config:
    """The quickstart recipe as the named network, on ``data``, with the run's overrides."""
    from inpaint.config import apply_overrides

    base = apply_overrides(recipes.get("quickstart"), args.overrides)
    if name == "paper":
        model = dataclasses.replace(base.model, block="se_res")
        loss = dataclasses.replace(base.loss, cx_weight=LossConfig().cx_weight, vgg_weights=args.vgg_weights)
    else:
        model = dataclasses.replace(base.model, block="conv")
        loss = dataclasses.replace(base.loss, cx_weight=0.0)
    return base.replace(recipe=f"quality-{name}", model=model, loss=loss,
                        data=dataclasses.replace(base.data, url=data, num_workers=0),
                        runtime=dataclasses.replace(base.runtime, device="cpu", seed=args.seed))


# ------------------------------------------------------------------ held-out split
def held_out(config: Config) -> tuple[ev.Protocol, list[ev.Sample]]:
    """The whole test split, centre-cropped, with the evaluation protocol's holes."""
    index = load_index(config.data.url)
    keys = index.keys(config.data.eval_split)
    samples = [(position, key, image) for position, (key, image)
               in enumerate(iter_split(config.data.url, config.data.eval_split, config.model.image_size))]
    protocol = ev.Protocol(data=config.data.url, split=config.data.eval_split, seed=0, count=len(keys),
                           image_size=config.model.image_size, local_size=config.model.local_size)
    return protocol, samples


def figures(complete: ev.Completer, protocol: ev.Protocol, samples: list[ev.Sample]) -> dict[str, dict[str, float]]:
    """{kind: {metric: mean}} of a completer on the held-out samples."""
    scores = ev.evaluate_samples(complete, samples, protocol, batch_size=32)
    return {kind: {name: summary["mean"] for name, summary in values.items()}
            for kind, values in ev.summarize(scores.rows, protocol.kinds).items()}


def variant_figures(trainer: Trainer, config: Config, protocol: ev.Protocol,
                    samples: list[ev.Sample]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {kind: {metric: mean}}} of the trainer's generator and its average, raw and post-processed."""
    networks = {"raw": trainer.generator, "ema": trainer.ema.module if trainer.ema is not None else None}
    out = {}
    for weights, network in networks.items():
        if network is None:
            continue
        inpainter = Inpainter(copy.deepcopy(network), config, device="cpu")
        scores = ev.evaluate_samples(inpainter.complete, samples, protocol, batch_size=32, postprocess=postprocess)
        for variant, prefix in ((weights, ""), (f"{weights}+post", ev.POST)):
            out[variant] = {kind: {name: summary["mean"] for name, summary in values.items()}
                            for kind, values in ev.summarize(scores.rows, protocol.kinds, prefix).items()}
    return out


def smoothness(curve: dict[str, Any], kinds: list[str]) -> dict[str, dict[str, float]]:
    """{variant: {kind: std of successive hole-PSNR differences}} from the first joint-phase point on
    (all points when there is none): how much a curve swings between evaluations."""
    points = curve["points"]
    start = next((i for i, p in enumerate(points) if p["phase"] == "joint"), 0)
    start = max(0, start - 1)  # the difference into the joint phase counts: that is where the dip is
    out: dict[str, dict[str, float]] = {}
    for variant in points[0].get("variants", {}):
        out[variant] = {}
        for kind in kinds:
            values = [p["variants"][variant][kind]["hole_psnr"] for p in points[start:]]
            steps = [b - a for a, b in zip(values, values[1:])]
            mean = sum(steps) / len(steps) if steps else 0.0
            out[variant][kind] = (sum((d - mean) ** 2 for d in steps) / len(steps)) ** 0.5 if steps else 0.0
    return out


def baseline_figures(protocol: ev.Protocol, samples: list[ev.Sample]) -> dict[str, Any]:
    out = {}
    for name in BASELINES:
        try:
            out[name] = figures(ev.baseline_completer(baselines.get(name)), protocol, samples)
        except baselines.BaselineError as exc:
            print(f"  baseline {name} skipped: {exc}", flush=True)
    return out


# ------------------------------------------------------------------ training
def _batches(config: Config):
    loader = make_train_loader(config.data, config.model, config.mask)
    while True:
        yield from loader


def calibrate(config: Config) -> tuple[float, float, float]:
    """Seconds per step of each phase, measured on a throwaway trainer."""
    schedule = ScheduleConfig(generator_steps=CALIBRATION_STEPS[0], discriminator_steps=CALIBRATION_STEPS[1],
                              joint_steps=CALIBRATION_STEPS[2], reference_batch=config.data.batch_size)
    trainer = Trainer(config.replace(schedule=schedule), device="cpu")
    times: dict[str, list[float]] = {}
    batches = _batches(config)
    while not trainer.done:
        phase, batch = trainer.phase.value, next(batches)
        start = time.perf_counter()
        trainer.train_step(batch)
        times.setdefault(phase, []).append(time.perf_counter() - start)
    return tuple(sum(t[2:]) / len(t[2:]) for t in (times["generator"], times["discriminator"], times["joint"]))


def plan_schedule(config: Config, budget_s: float, shares: tuple[float, float, float],
                  step_s: tuple[float, float, float]) -> ScheduleConfig:
    steps = [int(round(budget_s * share / seconds)) for share, seconds in zip(shares, step_s)]
    if sum(steps) == 0:
        steps[0] = 1
    return ScheduleConfig(generator_steps=steps[0], discriminator_steps=steps[1], joint_steps=steps[2],
                          reference_batch=config.data.batch_size)


def train_curve(name: str, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network within the budget; evaluate at evenly spaced steps."""
    torch.set_num_threads(args.threads)
    protocol, samples = held_out(config)
    step_s = calibrate(config)
    schedule = plan_schedule(config, args.budget_s, args.phase_shares, step_s)
    config = config.replace(schedule=schedule)
    print(f"[{name}] {step_s[0] * 1e3:.0f} / {step_s[1] * 1e3:.0f} / {step_s[2] * 1e3:.0f} ms per "
          f"generator / discriminator / joint step: {schedule.generator_steps} + {schedule.discriminator_steps}"
          f" + {schedule.joint_steps} steps in {args.budget_s:.0f} s", flush=True)
    trainer = Trainer(config, device="cpu")
    total = schedule.total_steps
    marks = sorted({max(1, round(total * (i + 1) / args.eval_points)) for i in range(args.eval_points)})
    batches = _batches(config)
    points, trained_s = [], 0.0
    for mark in marks:
        start = time.perf_counter()
        while trainer.step < mark:
            trainer.train_step(next(batches))
        trained_s += time.perf_counter() - start
        variants = variant_figures(trainer, config, protocol, samples)
        result = variants["raw"]
        points.append({"step": trainer.step, "phase": trainer.schedule.phase_at(trainer.step - 1, 0).value,
                       "train_s": round(trained_s, 1), "figures": result, "variants": variants})
        for variant, figs in variants.items():
            print(f"[{name}] step {trainer.step:>6} ({points[-1]['phase']:<13}) {trained_s:7.0f} s  {variant:<8} "
                  "hole PSNR " + "  ".join(f"{kind} {figs[kind]['hole_psnr']:.2f}" for kind in protocol.kinds),
                  flush=True)
    out = {"network": name, "config": config.to_dict(), "step_s": step_s, "points": points}
    out["smoothness"] = smoothness(out, list(protocol.kinds))
    if args.bn_steps and name == "paper":
        out["bn_experiment"] = bn_experiment(trainer, config, args.bn_steps, protocol, samples)
    return out


def bn_experiment(trainer: Trainer, config: Config, steps: int, protocol: ev.Protocol,
                  samples: list[ev.Sample]) -> dict[str, Any]:
    """From one trained state, ``steps`` joint steps per discriminator-BatchNorm mode."""
    results = {}
    for mode in ("train", "eval", "mixed"):
        branch = copy.deepcopy(trainer)
        branch.config = config.replace(loss=dataclasses.replace(config.loss, adv_disc_bn=mode))
        branch.schedule = type(trainer.schedule)(dataclasses.replace(
            config.schedule, joint_steps=config.schedule.joint_steps + steps))
        batches = _batches(config)
        logs: dict[str, list[float]] = {}
        for _ in range(steps):
            for key, value in branch.train_step(next(batches)).items():
                logs.setdefault(key.rsplit("/", 1)[-1], []).append(float(value))
        tail = {key: sum(v[-max(1, steps // 4):]) / max(1, len(v[-max(1, steps // 4):])) for key, v in logs.items()}
        result = figures(Inpainter(branch.generator, config, device="cpu").complete, protocol, samples)
        results[mode] = {"last_quarter": tail, "figures": result}
        print(f"[bn {mode:<5}] D(real) {tail.get('d_prob_real', 0):.3f} D(fake) {tail.get('d_prob_fake', 0):.3f} "
              f"g_adv {tail.get('g_adv', 0):.3f}  hole PSNR center_1/4 {result['center_1/4']['hole_psnr']:.2f}"
              f" random {result['random']['hole_psnr']:.2f}", flush=True)
    return results


def _train_curve_entry(payload: tuple[str, dict, argparse.Namespace]) -> dict[str, Any]:
    name, config, args = payload
    return train_curve(name, Config.from_dict(config), args)


# ------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    kinds = result["kinds"]
    lines = ["| method | step | phase | train s | " + " | ".join(f"{k} hole PSNR" for k in kinds)
             + " | random PSNR / SSIM |", "|---|---|---|---|" + "---|" * (len(kinds) + 1)]
    for name, figs in result["baselines"].items():
        lines.append(f"| {name} | - | - | - | " + " | ".join(f"{figs[k]['hole_psnr']:.2f}" for k in kinds)
                     + f" | {figs['random']['psnr']:.2f} / {figs['random']['ssim']:.3f} |")
    for curve in result["curves"]:
        for point in curve["points"]:
            for variant, figs in point.get("variants", {"raw": point["figures"]}).items():
                lines.append(f"| {curve['network']} {variant} | {point['step']} | {point['phase']} | "
                             f"{point['train_s']:.0f} | " + " | ".join(f"{figs[k]['hole_psnr']:.2f}" for k in kinds)
                             + f" | {figs['random']['psnr']:.2f} / {figs['random']['ssim']:.3f} |")
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    """Per network and variant: where it ends (hole PSNR per kind, beside biharmonic) and how much it swings."""
    kinds = result["kinds"]
    lines = ["| network | variant | " + " | ".join(f"{k} final" for k in kinds) + " | swing (dB) |",
             "|---|---|" + "---|" * (len(kinds) + 1)]
    reference = result["baselines"].get("biharmonic")
    if reference:
        lines.append("| biharmonic | - | " + " | ".join(f"{reference[k]['hole_psnr']:.2f}" for k in kinds) + " | - |")
    for curve in result["curves"]:
        last = curve["points"][-1].get("variants", {"raw": curve["points"][-1]["figures"]})
        for variant, figs in last.items():
            swing = curve.get("smoothness", {}).get(variant, {})
            mean_swing = sum(swing.values()) / len(swing) if swing else float("nan")
            lines.append(f"| {curve['network']} | {variant} | " + " | ".join(f"{figs[k]['hole_psnr']:.2f}" for k in kinds)
                         + f" | {mean_swing:.2f} |")
    lines.append("")
    lines.append("swing: the standard deviation of the change in hole PSNR between successive evaluation points from "
                 "the point before the first joint-phase one on, averaged over the hole kinds; lower is smoother.")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = result["kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=False)
    colours = {"mean": "tab:gray", "telea": "tab:orange", "biharmonic": "tab:green"}
    styles = {"raw": ("-", "o"), "raw+post": ("-", "^"), "ema": ("--", "o"), "ema+post": ("--", "^")}
    for axis, kind in zip(axes, kinds):
        for index, curve in enumerate(result["curves"]):
            minutes = [p["train_s"] / 60 for p in curve["points"]]
            for variant in curve["points"][0].get("variants", {"raw": None}):
                values = [p.get("variants", {"raw": p["figures"]})[variant][kind]["hole_psnr"] for p in curve["points"]]
                line, marker = styles.get(variant, ("-", "o"))
                axis.plot(minutes, values, linestyle=line, marker=marker, markersize=4, color=("tab:blue", "tab:purple", "tab:red")[index % 3],
                          label=f"{curve['network']} {variant}")
        for name, figs in result["baselines"].items():
            axis.axhline(figs[kind]["hole_psnr"], linestyle="--", color=colours.get(name), label=name)
        axis.set_title(kind)
        axis.set_xlabel("training minutes")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("hole PSNR (dB), held-out tiles")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inpaint-quality-") as tmp:
        data = args.data or pack_dataset("sample", None, f"{tmp}/sample", progress=False).output_url
        try:
            configs = {name: network_config(name, data, args) for name in args.networks}
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        protocol, samples = held_out(next(iter(configs.values())))
        print(f"cpu: {describe_cpu_line()}", flush=True)
        print(f"held-out split: {len(samples)} images of {data} at {protocol.image_size} px; "
              f"budget {args.budget_s:.0f} s per network; torch threads {args.threads} each", flush=True)
        started = time.perf_counter()
        base = baseline_figures(protocol, samples)
        payloads = [(name, config.to_dict(), args) for name, config in configs.items()]
        if args.sequential or len(payloads) == 1:
            curves = [_train_curve_entry(p) for p in payloads]
        else:
            with multiprocessing.get_context("spawn").Pool(len(payloads)) as pool:
                curves = pool.map(_train_curve_entry, payloads)
        result = {"cpu": describe_cpu_line(), "command": " ".join(["python", "benchmarks/quality.py", *(argv or sys.argv[1:])]),
                  "budget_s": args.budget_s, "kinds": list(protocol.kinds), "images": len(samples),
                  "phase_shares": args.phase_shares, "threads": args.threads, "baselines": base, "curves": curves,
                  "wall_s": round(time.perf_counter() - started, 1)}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.json").write_text(json.dumps(result, indent=2))
    plot(result, output / "quality.png")
    print(table(result))
    print()
    print(summary_table(result))
    print(f"wrote {output / 'quality.json'} and {output / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
