"""What the Ray Train path costs: per-step overhead vs the plain Trainer, and kill-to-resume time.

    python benchmarks/ray_overhead.py                  # debug recipe at 64 px, 40 timed steps
    python benchmarks/ray_overhead.py --recipe glcic --steps 10 --set model.image_size=96

Both paths run the same recipe, per-worker batch, loader and data (the built-in sample,
packed on first use). The plain path times ``Trainer.train_step`` + the loader in this process;
the Ray path runs ``jobs/train.py`` with one worker and reads the per-worker throughput it
logs to TensorBoard over the same steps (checkpoints only at phase ends, so they do not count).
The kill test runs 2 workers, SIGKILLs rank 1 after the first checkpoint, and times how long
until the new group has loaded the checkpoint and until it has trained its next step.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOG_EVERY = 5  # TensorBoard window, in steps
sys.path.insert(0, str(REPO))

from inpaint import recipes  # noqa: E402
from inpaint.config import apply_overrides  # noqa: E402


def plain_images_per_s(config, data: str, steps: int, warmup: int) -> float:
    import torch

    from inpaint.data import make_train_loader
    from inpaint.trainer import Trainer

    torch.set_num_threads(1)  # the Ray worker gets 1 CPU and sets the same
    trainer = Trainer(config, device="cpu")
    loader = iter(make_train_loader(config.data, config.model, config.mask))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step(next(loader))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return config.data.batch_size / statistics.median(times)


def ray_images_per_s(overrides: list[str], recipe: str, data: str, steps: int, warmup: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as storage:
        args = [sys.executable, str(REPO / "jobs" / "train.py"), "--recipe", recipe, "--data", data,
                "--storage", storage, "--name", "overhead", "--workers", "1",
                *sum((["--set", o] for o in overrides), []),
                "--set", f"log.every_steps={LOG_EVERY}", "--set", "checkpoint.every_steps=100000",
                "--set", "log.image_every_steps=100000"]
        result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"ray run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        events = next(Path(storage, "overhead", "tensorboard").glob("events.out.tfevents.*"))
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        per_step = [e.value for e in accumulator.Scalars("perf/images_per_s_per_worker")]
    # Windows of LOG_EVERY steps; drop those that hold warm-up steps, and the last (its phase-end
    # checkpoint lands after the logging, so no window pays for it anyway).
    window = per_step[-(-warmup // LOG_EVERY):]
    return statistics.median(window)


def kill_to_resume_seconds(data: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as storage, tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "train.py"), "--data", data, "--storage", storage,
             "--name", "kill", "--verbose", "--workers", "2", "--set", "schedule.joint_steps=200",
             "--set", "checkpoint.every_steps=10"], stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            victim = None
            while victim is None:
                time.sleep(0.5)
                text = Path(log.name).read_text()
                if "checkpoint checkpoint_000000010 reported" in text:
                    ranks = dict(re.findall(r"pid=(\d+)\) world_rank=(\d)", text))
                    victim = int(next(pid for pid, rank in ranks.items() if rank == "1"))
                if process.poll() is not None:
                    raise SystemExit(f"training ended early:\n{text[-3000:]}")
            killed_at = time.monotonic()
            import os

            os.kill(victim, signal.SIGKILL)
            offset = len(Path(log.name).read_text())
            resumed = stepped = None
            while stepped is None and process.poll() is None:
                time.sleep(0.2)
                tail = Path(log.name).read_text()[offset:]
                if resumed is None and "resumed from" in tail:
                    resumed = time.monotonic() - killed_at
                if resumed is not None and re.search(r"resumed from.*\n(.*\n)*.*step \d+/\d+", tail):
                    stepped = time.monotonic() - killed_at
        finally:
            process.kill()
            process.wait()
    return {"kill_to_checkpoint_loaded_s": resumed, "kill_to_first_step_s": stepped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="debug")
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["model.image_size=64", "model.local_size=32", "model.gen_width=16",
                                 "model.disc_width=16", "data.batch_size=8"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-kill", action="store_true")
    args = parser.parse_args()

    from cluster.launch import ensure_sample_data

    data = ensure_sample_data(str(REPO / "data" / "sample"))
    schedule = [f"schedule.generator_steps={args.warmup + args.steps}", "schedule.discriminator_steps=0",
                "schedule.joint_steps=0"]
    overrides = [*args.overrides, *schedule, f"data.url={data}", "data.num_workers=0"]
    config = apply_overrides(recipes.get(args.recipe), overrides)

    ray_rate = ray_images_per_s(overrides, args.recipe, data, args.steps, args.warmup)
    plain_rate = plain_images_per_s(config, data, args.steps, args.warmup)
    figures = {"recipe": args.recipe, "overrides": overrides, "steps": args.steps,
               "plain_images_per_s": round(plain_rate, 2), "ray_1_worker_images_per_s": round(ray_rate, 2),
               "ray_overhead_percent": round(100 * (plain_rate / ray_rate - 1), 2)}
    if not args.skip_kill:
        figures.update(kill_to_resume_seconds(data))
    print(json.dumps(figures, indent=2))
    print(f"Ray Train overhead per step: {figures['ray_overhead_percent']:+.1f}% (target < 5%)")


if __name__ == "__main__":
    main()
