"""Workloads timed side by side: ours optimized vs straightforward, vs GLCIC-PyTorch, and the ladder."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.glcic_pytorch import GlcicPytorchStep
from benchmarks.runners import count_flops, measure_group
from benchmarks.vocabulary import (
    COMPARED_RECIPES,
    GLCIC_PYTORCH,
    OPTIMIZED,
    STRAIGHTFORWARD,
    TARGET_CELEBA_JOINT_TIME,
    TARGET_GLCIC_SPEEDUP,
    Options,
    StepRecord,
    brief,
)
from benchmarks.workloads import FP32_SETTINGS, STRAIGHTFORWARD_SETTINGS, Workload, optimized_settings, size_settings
from inpaint.models import build_discriminator, build_generator, count_parameters


def recipe_steps(options: Options, device: torch.device, url: str, info: dict) -> list[StepRecord]:
    """Optimized vs straightforward, interleaved, per recipe and phase."""
    records = []
    for recipe in options.recipes:
        group = [Workload(f"{recipe}/{OPTIMIZED}", recipe, OPTIMIZED, optimized_settings(device)),
                 Workload(f"{recipe}/{STRAIGHTFORWARD}", recipe, STRAIGHTFORWARD, STRAIGHTFORWARD_SETTINGS)]
        for phase in options.phases:
            flops = {(w, phase): count_flops(w, phase, device, options, url) for w in group[:1]}
            flops[(group[1], phase)] = flops[(group[0], phase)]
            records += measure_group(group, phase, device, options, url, info, flops, f"{recipe} {phase}")
    return records


def speedups(records: list[StepRecord]) -> dict[str, dict[str, float]]:
    """optimized / straightforward images/s, per recipe and phase."""
    rate = {(r["recipe"], r["variant"], r["phase"]): r["images_per_s"] for r in records}
    out: dict[str, dict[str, float]] = {}
    for (recipe, variant, phase), value in rate.items():
        if variant == OPTIMIZED and (recipe, STRAIGHTFORWARD, phase) in rate:
            out.setdefault(recipe, {})[phase] = value / rate[(recipe, STRAIGHTFORWARD, phase)]
    return out


def comparison(options: Options, device: torch.device, url: str, info: dict) -> dict[str, Any]:
    """GLCIC-PyTorch next to our glcic and celeba recipes, same size, batch and batches, interleaved.

    Ours run with this device's defaults (``optimized_settings``). Where those use bf16, ``glcic_fp32``
    and ``celeba_fp32`` run too: what a device without native bf16 gets (GLCIC-PyTorch is fp32).
    """
    image, local, batch = options.compare_size
    size = size_settings(image, local, batch)
    ours = {r: Workload(f"{r}/{OPTIMIZED}@{image}", r, OPTIMIZED, optimized_settings(device) + size)
            for r in COMPARED_RECIPES}
    if optimized_settings(device) != FP32_SETTINGS:
        for r in COMPARED_RECIPES:
            ours[f"{r}_fp32"] = Workload(f"{r}/fp32@{image}", r, OPTIMIZED, FP32_SETTINGS + size)
    theirs = Workload(f"{GLCIC_PYTORCH}@{image}", None, GLCIC_PYTORCH, size)
    parameters = GlcicPytorchStep("meta", image, local).parameter_counts()
    glcic_model = ours["glcic"].config("joint").model
    with torch.device("meta"):
        ours_parameters = {"generator": count_parameters(build_generator(glcic_model)),
                           "discriminator": count_parameters(build_discriminator(glcic_model))}
    phases: dict[str, Any] = {}
    for phase in options.phases:
        flops = {(w, phase): count_flops(w, phase, device, options, url) for w in (theirs, *ours.values())}
        records = measure_group([theirs, *ours.values()], phase, device, options, url, info, flops,
                                f"vs GLCIC-PyTorch {phase}", profiled=False)
        by_name = {r["workload"]: r for r in records}
        baseline = by_name[theirs.name]
        entry = {"glcic_pytorch": brief(baseline)}
        for key, workload in ours.items():
            mine = by_name[workload.name]
            entry[key] = {**brief(mine), "speedup": mine["images_per_s"] / baseline["images_per_s"],
                          "time_ratio": mine["step_s_median"] / baseline["step_s_median"]}
        phases[phase] = entry
    targets = {"glcic_speedup_min": TARGET_GLCIC_SPEEDUP, "celeba_joint_time_ratio_max": TARGET_CELEBA_JOINT_TIME}
    for suffix in ("", "_fp32"):
        if f"glcic{suffix}" not in ours:
            continue
        targets[f"glcic_speedup{suffix}_met"] = all(p[f"glcic{suffix}"]["speedup"] >= TARGET_GLCIC_SPEEDUP
                                                    for p in phases.values())
        targets[f"celeba_joint_time_ratio{suffix}_met"] = (
            phases["joint"][f"celeba{suffix}"]["time_ratio"] <= TARGET_CELEBA_JOINT_TIME if "joint" in phases else None)
    return {"image_size": image, "local_size": local, "batch": batch, "glcic_pytorch_parameters": parameters,
            "glcic_pytorch_published_parameters": {"generator": 6.1e6, "discriminator": 39.6e6},
            "glcic_recipe_parameters": ours_parameters, "settings": list(optimized_settings(device)),
            "phases": phases, "targets": targets}


def ladder(options: Options, device: torch.device, url: str, info: dict) -> dict[str, Any]:
    """Each optimisation added in turn, interleaved: what each one buys on this device."""
    if device.type != "cuda" and not options.ladder_recipes:
        return {"skipped": "CUDA is not available: the bf16 / channels_last / torch.compile ladder runs on GPUs "
                           "(on CPU ask for it with --ladder RECIPE; compile is left out there)"}
    rungs = [("straightforward", STRAIGHTFORWARD, STRAIGHTFORWARD_SETTINGS, False),
             ("+fused CX and Adam, no denormals", OPTIMIZED, STRAIGHTFORWARD_SETTINGS, False),
             ("+channels_last", OPTIMIZED, ("runtime.bf16=false", "runtime.channels_last=true"), False),
             ("+bf16 autocast", OPTIMIZED, ("runtime.bf16=true", "runtime.channels_last=true"), False)]
    if device.type == "cuda":
        rungs.append(("+torch.compile", OPTIMIZED, ("runtime.bf16=true", "runtime.channels_last=true"), True))
    out: dict[str, Any] = {}
    for recipe in options.ladder_recipes or ("celeba",):
        group = [Workload(f"{recipe}/{label}", recipe, variant, settings, compiled)
                 for label, variant, settings, compiled in rungs]
        for phase in options.phases:
            records = measure_group(group, phase, device, options, url, info, {}, f"ladder {recipe} {phase}",
                                    profiled=False)
            out.setdefault(recipe, {})[phase] = {r["workload"].split("/", 1)[1]: brief(r) for r in records}
    return out
