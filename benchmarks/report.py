"""Plain-text tables of a ``benchmarks.system`` result, for the terminal and benchmarks/RESULTS.md."""

from __future__ import annotations

from typing import Any

from benchmarks.vocabulary import SHARES

MIB = 2**20


def table(header: list[str], rows: list[list[Any]], text_columns: int = 3) -> str:
    """Columns padded to their widest cell: the first ``text_columns`` left-aligned, numbers right."""
    cells = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _steps(results: dict[str, Any]) -> str:
    rows = []
    for r in results["steps"]:
        shares = r.get("shares", {})
        rows.append([r["recipe"], r["variant"], r["phase"], r["batch"], r["images_per_s"], r["step_s_median"],
                     r.get("peak_memory_mib"), (r.get("flops_per_image") or 0) / 1e9, r.get("achieved_tflops"),
                     *(f"{100 * shares[k]:.0f}%" if k in shares else None for k in SHARES)])
    header = ["recipe", "variant", "phase", "batch", "img/s", "step s", "peak MiB", "GFLOP/img", "TFLOP/s",
              *(k.replace("contextual_loss", "cx").replace("discriminator", "disc").replace("generator", "gen")
                for k in SHARES)]
    return table(header, rows)


def _speedups(results: dict[str, Any]) -> str:
    rows = [[recipe, phase, value] for recipe, phases in results["speedups"].items() for phase, value in phases.items()]
    return table(["recipe", "phase", "optimized / straightforward img/s"], rows, text_columns=2)


def _comparison(c: dict[str, Any]) -> str:
    if "skipped" in c:
        return c["skipped"]
    theirs, published = c["glcic_pytorch_parameters"], c["glcic_pytorch_published_parameters"]
    ours = c.get("glcic_recipe_parameters", {})
    lines = [(f"{c['image_size']} px, patch {c['local_size']}, batch {c['batch']}; GLCIC-PyTorch rebuilt: "
              f"G {theirs['generator'] / 1e6:.2f} M / D {theirs['discriminator'] / 1e6:.2f} M parameters "
              f"(published {published['generator'] / 1e6:.1f} M / {published['discriminator'] / 1e6:.1f} M); "
              f"our glcic recipe: G {ours.get('generator', 0) / 1e6:.2f} M / D {ours.get('discriminator', 0) / 1e6:.2f} M"
              f"; ours run with {' '.join(c.get('settings', []))}")]
    suffixes = [s for s in ("", "_fp32") if all(f"glcic{s}" in e for e in c["phases"].values())]
    header = ["phase", "GLCIC-PyTorch img/s"]
    for s in suffixes:
        label = " fp32" if s else ""
        header += [f"glcic{label} img/s", f"glcic{label} speed-up", f"celeba{label} img/s",
                   f"celeba{label} time / GLCIC-PyTorch"]
    rows = []
    for phase, e in c["phases"].items():
        row = [phase, e["glcic_pytorch"]["images_per_s"]]
        for s in suffixes:
            row += [e[f"glcic{s}"]["images_per_s"], e[f"glcic{s}"]["speedup"], e[f"celeba{s}"]["images_per_s"],
                    e[f"celeba{s}"]["time_ratio"]]
        rows.append(row)
    lines.append(table(header, rows, text_columns=1))
    t = c["targets"]
    for s in suffixes:
        label = " (fp32)" if s else ""
        lines.append(f"targets{label}: glcic >= {t['glcic_speedup_min']}x in every phase: "
                     f"{_verdict(t[f'glcic_speedup{s}_met'])}; celeba joint time <= "
                     f"{t['celeba_joint_time_ratio_max']}x: {_verdict(t[f'celeba_joint_time_ratio{s}_met'])}")
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def _allreduce(results: dict[str, Any]) -> str:
    rows = [[*key.split("/"), value / MIB] for key, value in results["allreduce_bytes"].items()]
    return table(["recipe", "phase", "gradient MiB per step"], rows, text_columns=2)


def _ddp(d: dict[str, Any]) -> str:
    if "skipped" in d:
        return d["skipped"]
    rows = []
    for world, result in d["workers"].items():
        for phase, figures in result["phases"].items():
            rows.append([phase, world, "yes" if result["oversubscribed"] else "no", result["threads_per_worker"],
                         figures["images_per_s"], d["efficiency_by_phase"].get(phase, {}).get(world),
                         figures["allreduce_bytes_per_step"] / MIB])
    header = ["phase", "workers", "oversubscribed", "threads/worker", "img/s", "efficiency", "allreduce MiB/step"]
    return (f"recipe {d['recipe']}, backend {d['backend']}, {d['logical_cpus']} logical CPUs\n"
            + table(header, rows, text_columns=1))


def _ladder(ladder: dict[str, Any]) -> str:
    if "skipped" in ladder:
        return ladder["skipped"]
    rows = [[recipe, rung, phase, figures["images_per_s"], figures["step_s_median"]]
            for recipe, phases in ladder.items() for phase, rungs in phases.items() for rung, figures in rungs.items()]
    return table(["recipe", "settings", "phase", "img/s", "step s"], rows)


def _changes(c: dict[str, Any]) -> str:
    rows = []
    for change in ("fused_adam", "fp32_discriminator_fc", "flush_denormal"):
        if change not in c:
            continue
        (before, before_s), (after, after_s) = c[change]["seconds"].items()
        rows.append([c[change]["what"], before, after, before_s, after_s, before_s / after_s])
    return f"recipe {c['recipe']}\n" + table(["measured", "before", "after", "before s", "after s", "speed-up"], rows)


def _precision(p: dict[str, Any]) -> str:
    return (f"L_CX at {p['layer']} on {p['images']} photographs (VGG16 weights: {p['vgg_weights']}): fp32 "
            f"{', '.join(f'{v:.4f}' for v in p['loss_fp32'])}; bf16 features "
            f"{', '.join(f'{v:.4f}' for v in p['loss_bf16'])}; max |diff| {p['max_abs_diff']:.2g} "
            f"(relative {p['max_rel_diff']:.2g})")


def _contextual(c: dict[str, Any]) -> str:
    if "skipped" in c:
        return c["skipped"]
    rows = [[variant, c["seconds"][variant], c["peak_mib"][variant]] for variant in c["seconds"]]
    t = c["targets"]
    return (f"features {tuple(c['shape'])} fp32 on {c['device']}, forward + backward, {c['threads']} threads, "
            f"medians of {c['repeats']} interleaved runs; peak memory in a fresh subprocess per variant\n"
            + table(["variant", "median s", "peak MiB"], rows, text_columns=1)
            + f"\nours / port: time {c['port_time_fraction']:.3f} (target <= {t['port_time_fraction_max']:g}: "
              f"{_verdict(c['port_time_fraction'] <= t['port_time_fraction_max'])}), peak memory "
              f"{c['port_memory_fraction']:.3f} (target <= {t['port_memory_fraction_max']:g}: "
              f"{_verdict(c['port_memory_fraction'] <= t['port_memory_fraction_max'])}); losses equal our "
              f"reference's to {c['max_loss_diff']:.2g}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _loader(d: dict[str, Any]) -> str:
    if "skipped" in d:
        return d["skipped"]
    n, ratio = d["workers"], d["steady_per_worker_cpu_s_ratio"]
    rows = [[label, d[key], _percent(d[key + "_ratio"])] for key, label in (
        ("steady_per_worker_cpu_s", "per worker CPU-second, steady state"),
        ("steady_wall_per_worker", f"wall / {n}, steady state"),
        ("wall_per_worker", f"wall / {n}, whole pass (workers start each pass)"))]
    return (f"{n} workers, batch {d['batch']}, {d['image_size']} px, {d['samples_per_pass']} samples a pass; "
            f"in-process {d['in_process']:.0f} samples/s per CPU-second (medians of per-round figures)\n"
            + table(["measure", "samples/s", "of in-process"], rows, text_columns=1)
            + f"\nper worker core: {_percent(ratio)} (target >= {d['target_ratio']:.0%}: "
              f"{_verdict(None if ratio is None else ratio >= d['target_ratio'])})")


def _projection(p: dict[str, Any]) -> str:
    if "skipped" in p:
        return p["skipped"]
    rows = [[count, f["hours"], f["days"], f["device_hours"], f["cost"]] for count, f in p["devices"].items()]
    iterations = ", ".join(f"{k} {v:,}" for k, v in p["schedule_iterations"].items())
    return (f"recipe {p['recipe']} on {p['device']}, batch {p['batch_per_device']} per device, "
            f"{iterations} iterations, {p['price_per_device_hour']:g} USD per device-hour\n"
            + table(["devices", "hours", "days", "device-hours", "cost USD"], rows, text_columns=0) + "\n"
            + p["scaling_note"])


def render(results: dict[str, Any]) -> str:
    """Every section of the result as text."""
    meta, device = results["meta"], results["meta"]["device"]
    options = meta["options"]
    head = (f"{meta['date']}  {device['name']} ({device['type']}, {device['logical_cpus']} logical CPUs, "
            f"{device['torch_threads']} torch threads, native bf16: {device['native_bf16']})  torch {meta['torch']}\n"
            f"CPU detected: {device.get('cpu_line', '-')}\n"
            f"command: {meta['command']}\nmedians of {options['steps']} timed steps after {options['warmup']} "
            f"warm-up, workloads of a group interleaved; load average (1, 5, 15 min) at start "
            f"{meta['load_average']}, at end {meta.get('load_average_end')}, {meta['wall_s']:.0f} s in all")
    sections = [
        ("Training step per recipe, variant and phase (shares of data + step time)", _steps(results)),
        ("Speed-up of the optimized step", _speedups(results)),
        ("Against GLCIC-PyTorch (same process, same batches, interleaved)", _comparison(results["comparison"])),
        ("Allreduce volume (gradients of the networks a phase trains)", _allreduce(results)),
        ("DDP scaling on this machine", _ddp(results["ddp"])),
        ("Code changes of this benchmark's issue, each alone (interleaved)", _changes(results["code_changes"])),
        ("Contextual loss with bf16 VGG16 features", _precision(results["contextual_precision"])),
        ("Contextual loss against S-aiueo32's port", _contextual(results["contextual_loss"])),
        ("Training loader in worker processes", _loader(results["loader_workers"])),
        ("Optimisation ladder (GPU: bf16 / channels_last / torch.compile)", _ladder(results["ladder"])),
        ("Projection: the paper's schedule with the optimized step", _projection(results["projection"])),
    ]
    return head + "\n\n" + "\n\n".join(f"## {title}\n{body}" for title, body in sections) + "\n"
