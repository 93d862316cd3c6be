"""The one-shot GPU check, run on CPU at tiny sizes: every section writes its figures, a failing
section loses no other's, and a run stopped early (its budget, SIGTERM) leaves a valid JSON.

Nothing here is about speed; on a GPU the same script measures (benchmarks/RESULTS.md).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.profiling import busy_time
from benchmarks.projection import ring_allreduce_bytes, schedule_hours

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")
# What the lent GPU machine lacks: nothing the check imports, in any of its processes, may need them.
ABSENT = ("ray", "s3fs", "boto3", "botocore", "aiobotocore")
BLOCKER = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)")
        return None
sys.meta_path.insert(0, _Absent())
"""
TITLES = ("Training steps", "bf16 against fp32", "Training loader", "Checkpoint save", "Gradient allreduce",
          "Projection")


def without_cloud_packages(tmp_path: Path) -> dict[str, str]:
    """An environment whose Pythons (the check, its loader workers, its compile child) cannot import
    ray, s3fs, boto3, botocore or aiobotocore: a sitecustomize on PYTHONPATH blocks them."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}


def check(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, "--smoke", "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def figures(entry: dict) -> bool:
    return isinstance(entry, dict) and "failed" not in entry and "skipped" not in entry


@pytest.mark.slow  # a fresh interpreter, every section at tiny sizes, a compile child process
def test_smoke_run_without_ray_s3fs_boto3_writes_figures_in_every_section(tmp_path):
    env = without_cloud_packages(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True, text=True, env=env)
    assert "blocked: the GPU machine has none" in blocked.stderr  # the block is in force for every process

    output = tmp_path / "check.json"
    result = check("--output", str(output), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    sections = data["sections"]
    assert data["status"] == {"complete": True, "stopped": None, "failed": [], "out_of_time": []}
    expected = {"device", "dataset", "process_group", "loader", "checkpoint", "compile", "allreduce", "projection",
                *(f"{kind}/{p}" for kind in ("bf16_vs_fp32", "compile") for p in gpu_check.PHASES),
                *(f"steps/{p}/b{b}" for p in gpu_check.PHASES for b in (2, 4))}
    assert expected <= set(sections)
    assert all(figures(sections[name]) for name in expected), {n: e for n, e in sections.items() if not figures(e)}
    assert sections["process_group"]["backend"] == "gloo" and sections["device"]["type"] == "cpu"

    for phase in gpu_check.PHASES:
        for name in (f"steps/{phase}/b2", f"steps/{phase}/b4", f"compile/{phase}"):
            step = sections[name]
            assert step["images_per_s"] > 0 and step["step_s_median"] > 0 and len(step["step_s"]) == 2
            assert step["gradient_mib"] > 0 and step["state_mib"] > 0
            assert {"mfu", "busy_fraction", "peak_allocated_mib", "peak_reserved_mib", "bound"} <= set(step)
            assert sum(step["section_s"].values()) > 0
        assert sections[f"steps/{phase}/b2"]["flops_per_image"] > 0
        compiled = sections[f"compile/{phase}"]
        assert compiled["speedup_vs_eager"] > 0 and compiled["compile_s"] > 0
        for agreement in (sections[f"bf16_vs_fp32/{phase}"], compiled["numerics"]):
            trained = {"generator": ["generator"], "discriminator": ["discriminator"],
                       "joint": ["generator", "discriminator"]}[phase]
            assert sorted(agreement["gradient_cosine_step0"]) == sorted(trained)
            assert all(-1 <= c <= 1 for c in agreement["gradient_cosine_step0"].values())
            assert agreement["steps"] == 2 and all(len(v["test"]) == 2 for v in agreement["losses"].values())
    assert sections["compile/joint"]["numerics"]["max_rel_diff"] < 1e-3  # the eager backend: the same arithmetic

    loader = sections["loader"]
    assert loader["steps"] >= 1 and loader["images_per_s"] > 0 and 0 <= loader["data_wait_share"] < 1
    assert sections["checkpoint"]["bytes"] > 0 and sections["checkpoint"]["save_s"] > 0
    joint = sections["allreduce"]["phases"]["joint"]
    assert joint["ring_bytes_per_gpu_8"] == pytest.approx(1.75 * joint["gradient_bytes"])
    devices = sections["projection"]["devices"]
    assert set(devices) == {"1", "8, unit=iterations", "8, unit=samples"}
    # celeba checkpoints every 15 minutes of training (checkpoint.every_minutes), not every N steps
    assert devices["1"]["hours"] > 0
    assert devices["1"]["checkpoints"] == int(devices["1"]["compute_hours"] * 60 // 15)
    assert devices["8, unit=samples"]["hours"] < devices["8, unit=iterations"]["hours"]

    table = output.with_suffix(".txt").read_text()
    assert all(f"## {title}" in table for title in TITLES) and "FAILED" not in table


@pytest.mark.slow  # a fresh interpreter, the eager sections at one tiny batch
def test_a_failing_section_is_recorded_in_one_line_and_the_others_keep_their_figures(tmp_path):
    output = tmp_path / "check.json"
    result = check("--no-compile", "--large-batch", "2", "--fail-section", "steps/discriminator/*",
                   "--fail-section", "checkpoint", "--output", str(output))
    assert result.returncode == 1, result.stderr[-3000:]
    data = json.loads(output.read_text())
    sections = data["sections"]
    assert sections["steps/discriminator/b2"]["failed"] == "InjectedFailure: injected by --fail-section " \
                                                           "(steps/discriminator/b2)"
    assert sections["checkpoint"]["failed"] == "InjectedFailure: injected by --fail-section (checkpoint)"
    assert data["status"]["failed"] == ["steps/discriminator/b2", "checkpoint"]
    for name in ("steps/generator/b2", "steps/joint/b2", "bf16_vs_fp32/discriminator", "loader"):
        assert figures(sections[name]), sections[name]
    assert sections["steps/joint/b2"]["images_per_s"] > 0 and sections["loader"]["steps"] >= 1
    assert sections["compile"] == {"skipped": "--no-compile"}
    # The derived figures come from what was measured: no discriminator step, so no projection.
    assert set(sections["allreduce"]["phases"]) == {"generator", "joint"}
    assert sections["projection"] == {"skipped": "needs every phase timed at the recipe's batch"}
    table = output.with_suffix(".txt").read_text()
    assert "discriminator b2: FAILED: InjectedFailure: injected by --fail-section (steps/discriminator/b2)" in table
    assert "FAILED: InjectedFailure: injected by --fail-section (checkpoint)" in table


@pytest.mark.slow  # a fresh interpreter, stopped by its own deadline
def test_the_budget_is_a_hard_deadline_and_what_was_measured_stays(tmp_path):
    output = tmp_path / "check.json"
    started = time.monotonic()
    result = check("--budget-s", "4", "--output", str(output))
    assert result.returncode == 1, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["status"]["stopped"] == "stopped at the --budget-s deadline (4 s)" and not data["status"]["complete"]
    assert data["meta"]["wall_s"] < 4 + 3  # the deadline plus the last write
    assert figures(data["sections"]["device"])
    stopped = [n for n, e in data["sections"].items() if e.get("failed") == data["status"]["stopped"]]
    assert len(stopped) <= 1  # the section the deadline interrupted, if one was running
    assert time.monotonic() - started < 60


@pytest.mark.slow  # a fresh interpreter, stopped by SIGTERM after its first step section
def test_sigterm_writes_what_was_measured_then_exits(tmp_path):
    output = tmp_path / "check.json"
    process = subprocess.Popen([sys.executable, SCRIPT, "--smoke", "--device", "cpu", "--no-compile",
                                "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            with_steps = output.exists() and "steps/generator/b2" in json.loads(output.read_text() or "{}").get(
                "sections", {})
            if with_steps:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["status"]["stopped"] == "stopped by SIGTERM"
    assert data["sections"]["steps/generator/b2"]["images_per_s"] > 0
    assert "stopped by SIGTERM: the figures below are those measured before" in output.with_suffix(".txt").read_text()


def test_projection_takes_the_fastest_variant_and_adds_communication_and_checkpoints():
    step = {"generator": 2.0, "discriminator": 0.5, "joint": 3.0}
    sections = {**{f"steps/{p}/b12": {"step_s_median": s, "gradient_mib": 100.0} for p, s in step.items()},
                "compile/generator": {"step_s_median": 1.0}, "compile/joint": {"failed": "RuntimeError: x"},
                "checkpoint": {"save_s": 10.0, "every_steps": 1000}}
    sections["allreduce"] = gpu_check.allreduce_figures(sections, 12, gbps=100.0)
    comm = ring_allreduce_bytes(100 * 2**20, 8) / 100e9
    assert sections["allreduce"]["phases"]["joint"]["seconds_at_assumed_8"] == pytest.approx(comm)
    assert sections["allreduce"]["phases"]["joint"]["gbps_to_hide_8"] == pytest.approx(1.75 * 100 * 2**20 / 3.0 / 1e9)
    out = gpu_check.projection_figures(sections, 12, gbps=100.0)
    assert out["variant"] == {"generator": "compiled", "discriminator": "eager", "joint": "eager"}
    one = (90_000 * 1.0 + 10_000 * 0.5 + 400_000 * 3.0 + 500 * 10.0) / 3600
    assert out["devices"]["1"]["hours"] == pytest.approx(one)
    assert out["devices"]["8, unit=iterations"]["hours"] == pytest.approx(one + 500_000 * comm / 3600)
    samples = out["devices"]["8, unit=samples"]
    assert samples["steps_per_device"] == {"generator": 11_250, "discriminator": 1_250, "joint": 50_000}
    assert samples["checkpoints"] == 62 and samples["communication_hours"] == pytest.approx(62_500 * comm / 3600)


def test_schedule_hours_counts_no_communication_on_one_device():
    out = schedule_hours({"a": 1.0}, {"a": 3600}, devices=1, comm_s={"a": 5.0})
    assert out["hours"] == pytest.approx(1.0) and out["communication_hours"] == 0


def test_busy_time_counts_overlapping_kernels_once_and_the_allreduce_they_hide():
    intervals = [(0, 4_000, "conv"), (2_000, 6_000, "gemm"),  # two streams: busy 0-6 us
                 (5_000, 9_000, "ncclDevKernel_AllReduce_Sum_f32"),  # 1 us of it under gemm
                 (20_000, 21_000, "Memcpy HtoD")]
    out = busy_time(intervals)
    assert out["busy_s"] == pytest.approx(10e-6) and out["allreduce_s"] == pytest.approx(4e-6)
    assert out["allreduce_overlapped_s"] == pytest.approx(1e-6)


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "error: --steps and --large-batch must be >= 1"),
                                           (["--set", "model.image_size=7"], "error: model.image_size:"),
                                           (["--output", "/proc/check.json"], "error: --output /proc/check.json")])
def test_bad_arguments_are_one_line_errors(capsys, args, message):
    assert gpu_check.main(["--smoke", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and "\n" not in error


def test_a_compile_child_still_running_at_the_deadline_is_killed_and_its_written_figures_kept(tmp_path, monkeypatch):
    """The child writes the joint figures, then hangs (as a long inductor compile would): at the deadline
    its whole process group goes, the joint figures stay, the other phases say why they have none."""
    hang = ("import json, pathlib, sys, time; request = json.loads(pathlib.Path(sys.argv[1]).read_text()); "
            "pathlib.Path(request['output']).write_text(json.dumps({'compile/joint': {'images_per_s': 30.0}})); "
            "time.sleep(120)")
    monkeypatch.setattr(gpu_check, "child_command", lambda request: [sys.executable, "-c", hang, str(request)])
    options = gpu_check.Options(smoke=True, **gpu_check.SMOKE)
    guard = gpu_check.Guard(options, lambda: None, deadline=time.time() + 6)
    fake = type("FakeCheck", (), {"options": options, "device": "cpu", "url": "unused", "ddp": False, "batch": 2})()
    store = {"steps/joint/b2": {"images_per_s": 20.0}}
    started = time.monotonic()
    summary = gpu_check.compile_variants(fake, guard, store, tmp_path)
    assert time.monotonic() - started < 6 + 3
    assert summary["child"] == "killed at the --budget-s deadline"
    assert store["compile/joint"] == {"images_per_s": 30.0, "speedup_vs_eager": 1.5}
    for phase in ("generator", "discriminator"):
        assert store[f"compile/{phase}"] == {"failed": "compile child: no figures (killed at the --budget-s deadline)"}
