"""The paper's schedule in hours and cost on 1 and 8 devices, from the measured optimized step."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.vocabulary import OPTIMIZED, PHASES, Options, StepRecord
from inpaint import recipes


def paper_iterations() -> dict[str, int]:
    """The paper's optimizer steps per phase (the celeba recipe's schedule: 90k / 10k / 400k)."""
    schedule = recipes.get("celeba").schedule
    return {"generator": schedule.generator_steps, "discriminator": schedule.discriminator_steps,
            "joint": schedule.joint_steps}


def ring_allreduce_bytes(nbytes: float, world: int) -> float:
    """Bytes each rank sends (and receives) in a ring allreduce of ``nbytes``: 2 (n - 1) / n x nbytes."""
    return 2 * (world - 1) / world * nbytes


def schedule_hours(step_s: dict[str, float], iterations: dict[str, int], *, devices: int = 1,
                   unit: str = "iterations", comm_s: dict[str, float] | None = None, save_s: float = 0.0,
                   save_every_steps: int | None = None, save_every_minutes: float = 0.0) -> dict[str, Any]:
    """Hours of a schedule on ``devices`` devices, each keeping the per-device batch of ``step_s``.

    ``unit="iterations"`` (the trainer's default): every device runs every iteration, so more devices
    train on more images in the same steps; ``"samples"``: the same images in 1/devices of the steps.
    ``comm_s`` (seconds per step and phase, counted only with several devices) is added to each step as
    if nothing overlapped it: an upper bound. A checkpoint costs ``save_s`` every ``save_every_steps``
    and/or every ``save_every_minutes`` of training (``checkpoint.every_minutes``), whichever comes first."""
    per_device = {p: n if unit == "iterations" else math.ceil(n / devices) for p, n in iterations.items()}
    compute = sum(per_device[p] * step_s[p] for p in per_device)
    comm = sum(per_device[p] * (comm_s or {}).get(p, 0.0) for p in per_device) if devices > 1 else 0.0
    by_steps = sum(per_device.values()) // save_every_steps if save_every_steps else 0
    by_time = int((compute + comm) // (save_every_minutes * 60)) if save_every_minutes else 0
    saves = max(by_steps, by_time)
    total = compute + comm + saves * save_s
    return {"hours": total / 3600, "compute_hours": compute / 3600, "communication_hours": comm / 3600,
            "checkpoint_hours": saves * save_s / 3600, "steps_per_device": per_device, "checkpoints": saves}


def projection(records: list[StepRecord], options: Options, info: dict,
               ddp: dict[str, Any] | None) -> dict[str, Any]:
    """Wall time and cost of the paper's schedule with the optimized step of celeba (else another recipe)."""
    steps = paper_iterations()
    measured_phases: dict[str, dict[str, StepRecord]] = {}
    for r in records:
        if r["variant"] == OPTIMIZED:
            measured_phases.setdefault(r["recipe"], {})[r["phase"]] = r
    complete = [name for name in ("celeba", *options.recipes) if set(measured_phases.get(name, {})) == set(PHASES)]
    if not complete:
        return {"skipped": "needs a recipe measured in all three phases"}
    recipe = complete[0]
    rate = measured_phases[recipe]
    seconds_one = sum(steps[p] * rate[p]["step_s_median"] for p in PHASES)
    measured = (ddp or {}).get("efficiency", {})
    out = {"device": info["name"], "recipe": recipe, "schedule_iterations": steps,
           "batch_per_device": rate["joint"]["batch"],
           "price_per_device_hour": options.gpu_hour_price, "scaling_efficiency_8": options.scaling_efficiency,
           "scaling_note": ("8 devices keep the per-device batch and see the paper's images in 1/8 of the "
                            f"iterations: time = 1-device time / (8 x {options.scaling_efficiency:g}). The efficiency "
                            "is assumed (--scaling-efficiency): the DDP section's measured figures "
                            f"({', '.join(f'{n}: {e:.2f}' for n, e in measured.items()) or 'none'}) share this "
                            "machine's cores between workers and say nothing about separate GPUs."),
           "devices": {}}
    for count in (1, 8):
        efficiency = 1.0 if count == 1 else options.scaling_efficiency
        hours = seconds_one / (count * efficiency) / 3600
        out["devices"][str(count)] = {"hours": hours, "days": hours / 24, "device_hours": hours * count,
                                      "cost": hours * count * options.gpu_hour_price}
    return out
