"""The paper's schedule in hours and cost on 1 and 8 devices, from the measured optimized step."""

from __future__ import annotations

from typing import Any

from benchmarks.vocabulary import OPTIMIZED, PHASES, Options, StepRecord
from inpaint import recipes


def projection(records: list[StepRecord], options: Options, info: dict,
               ddp: dict[str, Any] | None) -> dict[str, Any]:
    """Wall time and cost of the paper's schedule with the optimized step of celeba (else another recipe)."""
    schedule = recipes.get("celeba").schedule
    steps = {"generator": schedule.generator_steps, "discriminator": schedule.discriminator_steps,
             "joint": schedule.joint_steps}
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
