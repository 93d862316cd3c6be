"""jobs/train.py end to end with a real local Ray: S3 storage, phases in TensorBoard, worker kill,
re-run after the end, `ray job submit`, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "jobs" / "train.py")
# The `ray` CLI of the interpreter running the tests, whether or not its environment is activated.
RAY_CLI = str(Path(sys.executable).with_name("ray"))
PHASE_TAGS = ("loss/generator/g_rec", "loss/generator/g_cx", "loss/discriminator/d_bce", "loss/joint/g_adv",
              "loss/joint/d_bce")


def run_train(*args: str, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    # The tiny debug recipe unless the test names another (argparse keeps the last --recipe).
    return subprocess.run([sys.executable, TRAIN, "--recipe", "debug", *args], capture_output=True, text=True,
                          timeout=timeout,
                          env=env or os.environ.copy(), cwd=REPO)


def checkpoint_names(fs, root: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root) if p.rsplit("/", 1)[-1].startswith("checkpoint_0"))


def event_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["images"])
    return tags


def _damage_one_sample(url: str) -> str:
    """Overwrite the first sample of the first training shard at ``url`` with zeros; returns its key."""
    import fsspec

    from inpaint.data import load_index
    from inpaint.data.shards import parse_shard

    index = load_index(url)
    shard_url = index.shard_url(index.split("train").shards[0])
    with fsspec.open(shard_url, "rb") as f:
        data = bytearray(f.read())
    sample = parse_shard(bytes(data)).samples[0]
    data[sample.offset:sample.offset + sample.size] = bytes(sample.size)  # not an image any more
    with fsspec.open(shard_url, "wb") as f:
        f.write(bytes(data))
    return sample.key


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_train_all_phases_from_s3_to_s3_and_a_rerun_does_no_work(s3_bucket, tmp_path):
    import s3fs

    from inpaint.data import pack_dataset

    pack_dataset("sample", None, f"{s3_bucket}/datasets/sample", progress=False)
    damaged = _damage_one_sample(f"{s3_bucket}/datasets/sample")
    args = ("--data", f"{s3_bucket}/datasets/sample", "--storage", f"{s3_bucket}/runs", "--name", "s3run",
            "--workers", "2")
    first = run_train(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "run s3run: step 20, phase done" in first.stdout
    # The console tells the run, not Ray's internals (cluster/console.py): rank 0's progress lines
    # without Ray's prefixes, no per-rank TrainingReport dumps, no core log lines.
    console = first.stdout + first.stderr
    assert "TrainingReport(" not in console and "(RayTrainWorker" not in console, console[-3000:]
    assert not re.search(r"\] [\w/.-]+\.cc:\d+:", console), console[-3000:]
    assert re.search(r"^step 20/20 \(100%\) joint \| .*g_adv=.* img/s \| ETA \S+$", first.stdout, re.M), first.stdout
    assert re.search(r"^checkpoint checkpoint_000000020 reported \(step 20, phase done\)$", first.stdout, re.M)

    fs = s3fs.S3FileSystem()
    run_root = f"{s3_bucket[5:]}/runs/s3run"
    names = checkpoint_names(fs, run_root)
    assert names and names[-1] == "checkpoint_000000020"
    assert len(names) <= 2  # the debug recipe keeps the last 2
    meta = json.loads(fs.cat(f"{run_root}/{names[-1]}/meta.json"))
    assert meta["phase"] == "done" and meta["world_size"] == 2 and meta["samples_seen"] == 20 * 2 * 4
    assert json.loads(fs.cat(f"{run_root}/config.json"))["recipe"] == "debug"
    fs.get(f"{run_root}/tensorboard/", str(tmp_path / "tb"), recursive=True)
    tags = event_tags(tmp_path / "tb")
    assert set(PHASE_TAGS) <= tags, sorted(tags)
    assert {"perf/images_per_s", "time/data(s)", "schedule/phase", "images/masked|completed|original",
            "data/skipped_samples"} <= tags
    assert fs.ls(f"{run_root}/samples")
    # The damaged sample, whichever rank read it, is in the run's files and in the checkpoint's data state.
    assert json.loads(fs.cat(f"{run_root}/skipped_samples.json"))["keys"] == [damaged]
    fs.get(f"{run_root}/{names[-1]}/trainer.pt", str(tmp_path / "trainer.pt"))
    assert torch.load(tmp_path / "trainer.pt", weights_only=True)["data"]["skipped"] == [damaged]

    second = run_train(*args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already finished its schedule at step 20" in second.stdout + second.stderr
    assert "run s3run: step 20, phase done" in second.stdout  # from the run folder: no new checkpoint
    assert checkpoint_names(fs, run_root) == names


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_of_a_worker_resumes_from_the_last_checkpoint(sample_dataset, tmp_path):
    log_path = tmp_path / "train.log"
    storage = tmp_path / "runs"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, TRAIN, "--recipe", "debug", "--data", sample_dataset, "--storage", str(storage),
             "--name", "killed", "--verbose",  # Ray's own lines name each rank's pid: the victim's
             "--workers", "2", "--max-failures", "2", "--set", "schedule.joint_steps=60",
             "--set", "checkpoint.every_steps=4"],
            stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        victim = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and victim is None:
            time.sleep(1)
            text = log_path.read_text()
            if "checkpoint checkpoint_000000008 reported" in text:
                ranks = dict(re.findall(r"pid=(\d+)\) world_rank=(\d)", text))
                victim = int(next(pid for pid, rank in ranks.items() if rank == "1"))
        assert victim is not None, log_path.read_text()[-3000:]
        os.kill(victim, signal.SIGKILL)
        assert process.wait(timeout=400) == 0, log_path.read_text()[-5000:]
    finally:
        if process.poll() is None:
            process.kill()
    text = log_path.read_text()
    resumed = [int(step) for step in re.findall(r"resumed from \S+: step (\d+)", text)]
    assert resumed and resumed[0] >= 8  # lost at most one checkpoint interval
    assert "run killed: step 72, phase done" in text
    meta = json.loads((storage / "killed" / "checkpoint_000000072" / "meta.json").read_text())
    assert meta["phase"] == "done" and "generator_ema.safetensors" in meta["files"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_against_a_head_on_localhost(sample_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths must stay short
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway head on 127.0.0.1; the token would need distributing
    port, dashboard = _free_port(), _free_port()
    start = subprocess.run([RAY_CLI, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        for _ in range(30):  # the job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(
                [RAY_CLI, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--",
                 sys.executable, TRAIN, "--recipe", "debug", "--data", sample_dataset, "--storage", str(tmp_path / "runs"),
                 "--name", "submitted", "--workers", "1"],
                capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout.lower()
        assert "run submitted: step 20, phase done" in submit.stdout
    finally:
        stop_cluster(env["RAY_TMPDIR"])


def stop_cluster(temp_dir: str) -> None:
    """Stop only the head this test started (`ray stop` would kill every Ray on the machine).

    Every process of that head names its temp dir on its command line; SIGKILL as
    `ray stop --force` does, since gcs_server outlives a SIGTERM.
    """
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)


@pytest.mark.ray
@pytest.mark.slow
def test_local_default_starts_its_own_ray_beside_another_one_without_a_traceback(sample_dataset, tmp_path):
    # Another Ray on the machine, started the way a second checkout or a test would, whose session file
    # sits in the temp dir that train.py uses too: plain ray.init() would join it (1 CPU, too small),
    # and Ray Train's PlacementGroupCleaner used to fail on "Found multiple active Ray instances".
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ro", dir="/tmp")  # unix socket paths must stay short
    env["RAY_AUTH_MODE"] = "disabled"
    start = subprocess.run([RAY_CLI, "start", "--head", f"--port={_free_port()}", "--num-cpus=1",
                            f"--dashboard-port={_free_port()}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        result = run_train("--recipe", "debug", "--data", sample_dataset, "--storage", str(tmp_path / "runs"),
                           "--name", "beside", timeout=900, env=env)
    finally:
        stop_cluster(env["RAY_TMPDIR"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run beside: step 20, phase done" in result.stdout
    assert "Traceback" not in output, output[-4000:]
    assert "Found multiple active Ray instances" not in output, output[-4000:]


@pytest.mark.parametrize("args,message", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--set", "optim.nope=1"], "optim.nope: unknown field"),
    (["--workers", "0"], "--workers: expected N or MIN-MAX"),
    (["--workers", "3-2"], "--workers: expected N or MIN-MAX"),
    (["--set", "loss.vgg_weights=/nonexistent/vgg16.pth"], "VGG16 weights file not found"),
])
def test_mistakes_in_the_request_are_one_line_errors_with_exit_code_2(args, message, sample_dataset, tmp_path):
    result = run_train("--data", sample_dataset, "--storage", str(tmp_path), *args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unreadable_data_and_unwritable_storage_are_one_line_errors(sample_dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [
        (["--data", str(tmp_path / "missing"), "--storage", str(tmp_path)], "missing"),
        (["--data", str(empty), "--storage", str(tmp_path)], "empty"),
        (["--data", sample_dataset, "--storage", "/proc/version/runs"], "not reachable"),
    ]:
        result = run_train(*args, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_can_place_fails_fast(sample_dataset, tmp_path):
    # "Fast" means before any training: one error line and no checkpoint, not a wall-clock bound. 8 workers:
    # more than a 2-core machine places, few enough that the built-in sample gives each one a batch.
    result = run_train("--data", sample_dataset, "--storage", str(tmp_path), "--workers", "8", timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot place 8 worker(s)" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("checkpoint_0*")), "it trained before failing"
