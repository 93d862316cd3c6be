"""The system benchmark: its quick form end to end, and the pieces whose arithmetic must be right."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import glcic_pytorch as gp
from benchmarks.profiling import attribute, peak_allocated
from benchmarks.projection import projection
from benchmarks.vocabulary import SHARES, Options
from inpaint.config import MaskConfig
from inpaint.masks import MaskSampler

ROOT = Path(__file__).resolve().parent.parent


# A tiny workload: this checks that the output is well formed, not how fast anything is, so the
# timeouts leave room for a 2-core machine whose other core (or both) is busy with other work.
TINY = ("--quick", "--warmup", "0", "--steps", "1", "--ddp-steps", "1", "--images", "16", "--loader-images", "128")


def run_cli(*args, timeout=1500):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_run_writes_json_and_table_with_positive_figures(tmp_path):
    output = tmp_path / "bench.json"
    result = run_cli(*TINY, "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert {"meta", "steps", "speedups", "allreduce_bytes", "comparison", "ladder", "code_changes",
            "contextual_precision", "contextual_loss", "loader_workers", "ddp", "projection"} <= set(data)
    table = output.with_suffix(".txt").read_text()
    assert table.count("## ") == 11 and "CPU detected:" in table and "native bf16" in table

    steps = data["steps"]
    assert {(s["variant"], s["phase"]) for s in steps} == {
        (v, p) for v in ("optimized", "straightforward") for p in ("generator", "discriminator", "joint")}
    for s in steps:
        assert s["images_per_s"] > 0 and s["peak_memory_mib"] > s["state_memory_mib"] > 0
        assert s["flops_per_image"] > 0 and len(s["step_s"]) == 1  # --steps 1
        assert set(s["shares"]) == set(SHARES) and sum(s["shares"].values()) == pytest.approx(1, abs=0.02)
        assert all(v >= 0 for v in s["shares"].values())
    joint = next(s for s in steps if s["variant"] == "optimized" and s["phase"] == "joint")
    assert joint["shares"]["generator"] > 0 and joint["shares"]["discriminator"] > 0
    assert joint["shares"]["vgg16"] > 0 and joint["shares"]["contextual_loss"] > 0

    for phase, entry in data["comparison"]["phases"].items():
        assert entry["glcic_pytorch"]["images_per_s"] > 0
        assert entry["glcic"]["speedup"] > 0 and entry["celeba"]["time_ratio"] > 0
    assert set(data["comparison"]["targets"]) >= {"glcic_speedup_met", "celeba_joint_time_ratio_met"}

    # DDP's hook counts exactly the gradient bytes that one process produces in each phase.
    for phase in ("generator", "discriminator", "joint"):
        counted = data["ddp"]["workers"]["2"]["phases"][phase]["allreduce_bytes_per_step"]
        assert counted == data["allreduce_bytes"][f"debug/{phase}"] > 0
    assert data["ddp"]["workers"]["1"]["phases"]["joint"]["images_per_s"] > 0

    for change in ("fused_adam", "fp32_discriminator_fc", "flush_denormal"):
        before, after = data["code_changes"][change]["seconds"].values()
        assert before > 0 and after > 0
    precision = data["contextual_precision"]
    assert precision["max_abs_diff"] >= 0 and len(precision["loss_bf16"]) == 4
    assert set(data["ladder"]["debug"]["joint"]) == {"straightforward", "+fused CX and Adam, no denormals",
                                                     "+channels_last", "+bf16 autocast"}
    cx = data["contextual_loss"]
    assert set(cx["seconds"]) == {"port", "reference", "contextual_loss"} and all(v > 0 for v in cx["seconds"].values())
    assert cx["port_time_fraction"] > 0 and cx["port_memory_fraction"] > 0 and cx["max_loss_diff"] < 1e-4
    loader = data["loader_workers"]
    assert loader["workers"] == 2 and loader["in_process"] > 0
    assert loader["steady_wall_per_worker_ratio"] > 0 and loader["wall_per_worker_ratio"] > 0
    assert loader["steady_per_worker_cpu_s_ratio"] is None or loader["steady_per_worker_cpu_s_ratio"] > 0
    comparison = data["comparison"]
    assert comparison["glcic_recipe_parameters"]["generator"] > 0
    one, eight = data["projection"]["devices"]["1"], data["projection"]["devices"]["8"]
    assert one["hours"] > 0 and eight["hours"] == pytest.approx(one["hours"] / (8 * 0.9))
    assert one["cost"] == pytest.approx(one["hours"] * 2.5)


@pytest.mark.parametrize("args, message", [
    (["--recipes", "nope"], "error: recipe: unknown recipe 'nope'"),
    (["--set", "model.image_size=7"], "error: model.image_size: must be a multiple of 16"),
    (["--steps", "0"], "error: --steps: must be >= 1"),
    (["--compare-size", "100,96,12"], "error: --compare-size"),
    (["--output", "/proc/benchmark.json"], "error: --output /proc/benchmark.json: cannot write there"),
])
def test_user_mistakes_give_one_line_errors(args, message, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_job", ROOT / "jobs" / "benchmark.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and "\n" not in error


def test_glcic_pytorch_rebuild_has_the_published_parameter_counts():
    with torch.device("meta"):
        generator, discriminator = gp.CompletionNetwork(), gp.ContextDiscriminator()
    counts = [sum(p.numel() for p in net.parameters()) for net in (generator, discriminator)]
    assert counts[0] == pytest.approx(gp.PUBLISHED_PARAMETERS["generator"], rel=0.01)
    assert counts[1] == pytest.approx(gp.PUBLISHED_PARAMETERS["discriminator"], rel=0.01)


@pytest.mark.parametrize("phase, generator_trains, discriminator_trains", [
    ("generator", True, False), ("discriminator", False, True), ("joint", True, True)])
def test_glcic_pytorch_step_trains_the_networks_of_its_phase(phase, generator_trains, discriminator_trains):
    step = gp.GlcicPytorchStep("cpu", image_size=64, local_size=32)
    generator = torch.Generator().manual_seed(0)
    mask, box = MaskSampler(MaskConfig(), 64, 32).batch(2, generator)
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
             "mask": mask, "box": box}
    before = [[p.detach().clone() for p in net.parameters()] for net in (step.generator, step.discriminator)]
    loss = step.train_step(batch, phase)
    assert torch.isfinite(loss)
    changed = [any(not torch.equal(a, b) for a, b in zip(old, net.parameters()))
               for old, net in zip(before, (step.generator, step.discriminator))]
    assert changed == [generator_trains, discriminator_trains]


def _event(name, seconds, parent=None, sequence_nr=-1, thread=1, fwd_thread=0):
    return SimpleNamespace(name=name, cpu_time_total=seconds * 1e6, device_time_total=0, cpu_parent=parent,
                           sequence_nr=sequence_nr, thread=thread, fwd_thread=fwd_thread)


def test_attribute_charges_backward_ops_to_the_range_of_their_forward_op():
    generator_range = _event("generator", 1.0)
    discriminator_range = _event("discriminator", 2.0)
    events = [
        generator_range, _event("aten::conv2d", 0.9, generator_range, sequence_nr=7),
        discriminator_range, _event("aten::linear", 1.9, discriminator_range, sequence_nr=8),
        _event("aten::mse_loss", 0.5, sequence_nr=9),
        _event("autograd::engine::evaluate_function: MseLossBackward0", 0.25, sequence_nr=9, fwd_thread=1),
        _event("autograd::engine::evaluate_function: AddmmBackward0", 4.0, sequence_nr=8, fwd_thread=1),
        _event("autograd::engine::evaluate_function: ConvolutionBackward0", 3.0, sequence_nr=7, fwd_thread=1),
        _event("optimizer", 0.5),
    ]
    seconds = attribute(events, torch.device("cpu"))
    assert seconds == {"generator": 4.0, "discriminator": 6.0, "vgg16": 0.0, "contextual_loss": 0.0,
                       "optimizer": 0.5}


def test_peak_allocated_follows_allocations_and_frees_in_order():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        first = torch.empty(2**20, dtype=torch.uint8)
        del first
        second = torch.empty(3 * 2**20, dtype=torch.uint8)
        del second
    assert 3 * 2**20 <= peak_allocated(prof, torch.device("cpu")) < 4 * 2**20


def test_projection_scales_the_measured_step_time_to_the_paper_schedule():
    records = [{"recipe": "celeba", "variant": "optimized", "phase": phase, "step_s_median": seconds, "batch": 12}
               for phase, seconds in (("generator", 1.0), ("discriminator", 0.5), ("joint", 2.0))]
    info = {"name": "test device"}
    out = projection(records, Options(gpu_hour_price=2.0, scaling_efficiency=0.8), info, ddp=None)
    hours = (90_000 * 1.0 + 10_000 * 0.5 + 400_000 * 2.0) / 3600
    assert out["devices"]["1"]["hours"] == pytest.approx(hours)
    assert out["devices"]["8"]["hours"] == pytest.approx(hours / (8 * 0.8))
    assert out["devices"]["8"]["cost"] == pytest.approx(hours / 0.8 * 2.0)


@pytest.mark.slow  # a fresh interpreter importing torch, then a few small passes
def test_loader_benchmark_prints_every_rate_and_the_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_throughput.py"), "--images", "160",
                             "--shard-size", "40", "--repeats", "2"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rates = {re.split(r"\s{2,}", line.strip())[0]: float(line.split()[-4]) for line in result.stdout.splitlines()
             if "samples/s/core" in line}
    assert set(rates) == {"PIL decode", "torchvision decode_jpeg", "its operator, no Python wrapper",
                          "the same, EXIF orientation applied", "mask sampler alone", "loader",
                          "loader with a fixed mask"}, result.stdout
    assert all(rate > 0 for rate in rates.values())
    assert "median" in result.stdout and "(target >= 80%)" in result.stdout


@pytest.mark.slow  # a fresh interpreter importing torch and webdataset, then a few tiny passes
def test_webdataset_compat_prints_every_rate_and_finds_tarwriter_shards_identical():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "webdataset_compat.py"), "--images", "40",
                             "--shard-size", "10", "--repeats", "1"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^  (\S.*?)\s{2,}([\d,]+) /CPU-s\s+([\d,]+) /s\s+(\d+)% of ours$", result.stdout, re.MULTILINE)
    assert len({name for name, *_ in rows}) == len(rows) == 8, result.stdout
    assert all(int(cpu.replace(",", "")) > 0 and int(wall.replace(",", "")) > 0 for _, cpu, wall, _ in rows)
    assert [rows[i][0].startswith("ours:") and rows[i][3] for i in (0, 2, 5)] == ["100"] * 3  # each table's ours
    assert "writes byte-identical shards: yes" in result.stdout
    assert "every reader yields the same samples in the index's order" in result.stdout


@pytest.mark.slow  # a fresh interpreter, then one tiny step per workload and a FLOP count of each recipe
def test_fp32_variants_prints_ratios_and_a_ceiling_from_equal_flops_for_the_same_networks():
    result = subprocess.run([sys.executable, "-m", "benchmarks.fp32_variants", "--phases", "generator",
                             "--variants", "nchw,celeba", "--size", "64,64,2", "--steps", "1", "--matmul-side", "256"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"fp32 matmul rate, 256x256, \d+ threads: \d+ GFLOP/s", out), out
    timing = re.search(r"^generator: glcic-pytorch ([\d.]+) s \(([\d.]+) GFLOP/image, \d+ GFLOP/s\)"
                       r"  glcic/fp32 ([\d.]+) s \(([\d.]+)x\)  celeba/fp32 ([\d.]+) s \(([\d.]+)x\)", out, re.MULTILINE)
    assert timing, out
    ceiling = re.search(r"^generator ceiling at the matmul rate: glcic ([\d.]+)x \(([\d.]+) GFLOP/image\)"
                        r"  celeba ([\d.]+)x \(([\d.]+) GFLOP/image\)$", out, re.MULTILINE)
    assert ceiling, out
    # The faithful glcic recipe is GLCIC-PyTorch's generator: the same FLOPs; the paper's network does more.
    assert ceiling[2] == timing[2]
    assert float(ceiling[4]) > float(ceiling[2]) > 0
    assert float(ceiling[1]) > float(ceiling[3]) > 0  # more FLOPs, lower ceiling


def test_fp32_variants_names_an_unknown_variant_in_one_line(capsys):
    from benchmarks import fp32_variants
    with pytest.raises(SystemExit):
        fp32_variants.main(["--variants", "nchw,turbo"])
    assert "--variants: unknown turbo; choose from nchw" in capsys.readouterr().err
