"""Nothing lost when the disk fills, the user presses Ctrl-C or a file is hostile (issue 25).

Each case reproduces one finding and checks the guarantee the README's "Reliability" section
states: one ``error:`` line and exit 2 (or, for fallbacks and resumes, exit 0 and a log line
saying what was skipped), no traceback, no existing file changed except those the command
exists to write, nothing outside the run or output folder touched, no half-written file.

Disk-full cases use a 5 MB tmpfs (skipped where it cannot be mounted, e.g. without root) and a
filesystem stub that runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inpaint import checkpoint as ckpt
from inpaint import run_folder, storage
from tests.cli_harness import REPO, run_cli, train_debug_run, tree_digest


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dataset) -> Path:
    """A run with two checkpoints and a config, an image, a mask, the packed sample dataset."""
    root = tmp_path_factory.mktemp("reliability")
    train_debug_run(root / "runs" / "r", sample_dataset)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "in.png")
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((10, 20), (10, 30)))).save(root / "mask.png")
    shutil.copytree(sample_dataset, root / "packed")
    return root


def copy_run(world: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    shutil.copytree(world / "runs" / "r", run)
    return run


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 5 MB tmpfs: a disk that fills. Skipped where mounting is not allowed."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:100]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path, leave: int = 0) -> None:
    """Fill ``mount`` up to ``leave`` free bytes."""
    with open(mount / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    if leave:
        with open(mount / "ballast", "r+b") as f:
            f.truncate(max(0, (mount / "ballast").stat().st_size - leave))


def one_line(outcome, match: str | None = None) -> str:
    return outcome.assert_one_line_error(match)


# ------------------------------------------------------------------ 1. atomic writes
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def stub_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if "w" in mode and ".partial-" in str(path) else file

    monkeypatch.setattr("builtins.open", stub_open)
    with pytest.raises(storage.StorageError, match="No space left"):
        storage.write_text(str(target), "new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_fill_on_a_full_disk_keeps_the_existing_output(world, small_disk):
    output = small_disk / "filled.png"
    shutil.copy(world / "in.png", output)
    before = output.read_bytes()
    fill_disk(small_disk, leave=200)
    outcome = run_cli("fill", "--checkpoint", str(world / "runs" / "r"), "--image", str(world / "in.png"),
                      "--mask", str(world / "mask.png"), "--output", str(output))
    one_line(outcome, "No space left|filled.png")
    assert output.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "filled.png"]


def test_fill_replaces_a_planted_link_instead_of_writing_through_it(world, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    output = tmp_path / "out" / "filled.png"
    output.parent.mkdir()
    output.symlink_to(victim)
    outcome = run_cli("fill", "--checkpoint", str(world / "runs" / "r"), "--image", str(world / "in.png"),
                      "--mask", str(world / "mask.png"), "--output", str(output))
    assert outcome.code == 0, outcome.stderr
    assert victim.read_text() == "not yours"
    assert not output.is_symlink() and Image.open(output).size == (50, 40)


def test_a_checkpoint_whose_marker_arrived_before_a_truncated_file_is_never_listed(world, tmp_path, caplog):
    # What a copy that does not keep the write order leaves when the disk fills: meta.json in place,
    # a file it lists cut short.
    run = copy_run(world, tmp_path)
    newest = run / "checkpoint_000000004"
    data = (newest / ckpt.TRAINER_FILE).read_bytes()
    (newest / ckpt.TRAINER_FILE).write_bytes(data[: len(data) // 2])
    listed = [storage.name(url) for url, _ in run_folder.complete_checkpoints(str(run))]
    assert listed == ["checkpoint_000000002"]
    assert "checkpoint_000000004: incomplete" in caplog.text
    outcome = run_cli("fill", "--checkpoint", str(run), "--image", str(world / "in.png"), "--mask",
                      str(world / "mask.png"), "--output", str(tmp_path / "o.png"))
    assert outcome.code == 0, outcome.stderr


def test_a_save_that_fails_leaves_no_marker_even_over_an_older_checkpoint(world, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint_000000004"
    shutil.copytree(world / "runs" / "r" / "checkpoint_000000004", folder)  # a rewrite of a complete one
    contents = ckpt.load_checkpoint(folder)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(folder, config=contents.config, generator=contents.generator,
                             discriminator=contents.discriminator, trainer=contents.trainer, meta=contents.meta)
    assert not (folder / ckpt.META_FILE).exists()
    assert run_folder.complete_checkpoints(str(tmp_path)) == []


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from inpaint import recipes

    config = recipes.get("debug")
    weights = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ckpt.CheckpointError, match="generator weight w is not finite"):
        ckpt.save_checkpoint(tmp_path / "c", config=config, generator=weights, discriminator=None, trainer=None,
                             meta={"step": 3})
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ 2. make_shards: Ctrl-C and full disk
_SLOW_PACK = """
import runpy, signal, sys, time
# Ctrl-C as a terminal delivers it: a parent started in the background by a non-interactive shell
# (nohup ... &) passes SIGINT down ignored, and the pack would then finish instead of stopping.
signal.signal(signal.SIGINT, signal.default_int_handler)
import inpaint.data.pack as pack
write = pack.write_shard
def slow(f, samples):
    out = write(f, samples)
    time.sleep(0.3)
    return out
pack.write_shard = slow
sys.argv = ["make_shards.py", *sys.argv[1:]]
runpy.run_path("jobs/make_shards.py", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_in_make_shards_leaves_no_index_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "packed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["--dataset", "sample", "--shard-size", "8", "--output", str(out), "--quiet"]
    process = subprocess.Popen([sys.executable, "-c", _SLOW_PACK, *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and len(list(out.glob("*.tar"))) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "rerun the same command" in stderr
    assert not (out / "index.json").exists()
    assert not [p for p in out.iterdir() if "partial" in p.name]
    again = subprocess.run([sys.executable, "jobs/make_shards.py", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and (out / "index.json").is_file()


def test_make_shards_on_a_full_disk_is_one_line_and_leaves_no_index(small_disk):
    fill_disk(small_disk, leave=100_000)
    out = small_disk / "packed"
    one_line(run_cli("make_shards", "--dataset", "sample", "--output", str(out), "--quiet"), "No space left")
    assert not (out / "index.json").exists()
    assert not [p for p in out.iterdir() if "partial" in p.name]


# ------------------------------------------------------------------ 3, 8, 9. one line, naming the flag or field
@pytest.mark.parametrize("cli, argv, match", [
    ("evaluate", ["--checkpoint", "{w}/runs/r", "--output", ""], "--output"),
    ("evaluate", ["--checkpoint", "{w}/runs/r", "--output", "  "], "--output"),
    ("evaluate", ["--checkpoint", "", "--data", "{w}/packed"], "--checkpoint"),
    ("evaluate", ["--checkpoint", "{w}/runs/r", "--data", ""], "--data"),
    ("evaluate", ["--checkpoint", "{w}/runs/r", "--split", ""], "--split"),
    ("evaluate", ["--watch", ""], "--watch"),
    ("fill", ["--checkpoint", "{w}/runs/r", "--image", "{w}/in.png", "--mask", "{w}/mask.png", "--output", ""],
     "--output"),
    ("fill", ["--checkpoint", "", "--image", "{w}/in.png", "--box", "1,1,4,4", "--output", "{w}/o.png"],
     "--checkpoint"),
    ("make_shards", ["--dataset", "sample", "--output", ""], "--output"),
    ("make_shards", ["--dataset", "sample", "--output", "{w}/new", "--split", ""], "--split"),
    ("make_shards", ["--dataset", "folder", "--source", "", "--output", "{w}/new"], "--source"),
    ("make_shards", ["--dataset", "sample", "--source", "{w}/packed", "--output", "{w}/new"], "--source"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "", "--name", "x"], "--storage"),
    ("train", ["--recipe", "debug", "--data", "", "--storage", "{w}/runs", "--name", "x"], "--data"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", ""], "--name"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", ".."], "--name"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "."], "--name"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "a/b"], "--name"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "ftp://host/runs", "--name", "x"],
     "--storage ftp://"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "memory://runs", "--name", "x"],
     "--storage memory://"),
    ("train", ["--recipe", "debug", "--data", "memory://data", "--storage", "{w}/runs", "--name", "x"],
     "--data memory://"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--max-failures", "1e30"], "--max-failures"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--max-failures", "99999999"], "--max-failures"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.url=s3://elsewhere/data"], "data.url"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.eval_split=nope"], "data.eval_split"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.eval_split="], "data.eval_split"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.train_split="], "data.train_split"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.train_split=valid"], "data.train_split"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "data.train_split=test"], "data.train_split"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "mask.max_side=-1"], "mask.max_side"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "mask.max_side=0"], "mask.max_side"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "mask.max_side=1e30"], "mask.max_side"),
    ("train", ["--recipe", "debug", "--data", "{w}/packed", "--storage", "{w}/runs", "--name", "x",
               "--set", "optim.max_nonfinite_steps=0"], "optim.max_nonfinite_steps"),
])
def test_a_mistake_is_one_line_naming_the_flag_or_field(world, cli, argv, match):
    argv = [arg.replace("{w}", str(world)) for arg in argv]
    before = tree_digest(world), sorted(str(p) for p in world.rglob("*"))
    one_line(run_cli(cli, *argv), match)
    assert (tree_digest(world), sorted(str(p) for p in world.rglob("*"))) == before
    assert not (world.parent / "config.json").exists()


@pytest.mark.parametrize("content", ["image", "text", "pickle", "safetensors"])
def test_vgg_weights_that_are_not_vgg16_name_the_field(world, tmp_path, content):
    import pickle

    from safetensors.torch import save_file

    path = tmp_path / {"image": "w.png", "text": "w.txt", "pickle": "w.pth", "safetensors": "w.safetensors"}[content]
    if content == "image":
        shutil.copy(world / "in.png", path)
    elif content == "text":
        path.write_text("hello")
    elif content == "pickle":  # a pickle that would run code if loaded unsafely
        path.write_bytes(pickle.dumps(os.system))
    else:
        save_file({"0.weight": torch.zeros(2, 2)}, str(path))
    one_line(run_cli("train", "--recipe", "debug", "--data", str(world / "packed"), "--storage", str(tmp_path / "runs"),
                     "--name", "x", "--set", "loss.cx_weight=0.004", "--set", f"loss.vgg_weights={path}"),
             "loss.vgg_weights")


def test_a_dataset_whose_shards_are_all_garbage_is_one_line(world, tmp_path):
    data = tmp_path / "garbage"
    shutil.copytree(world / "packed", data)
    for shard in data.glob("*.tar"):
        shard.write_bytes(os.urandom(shard.stat().st_size))
    one_line(run_cli("train", "--recipe", "debug", "--data", str(data), "--storage", str(tmp_path / "runs"),
                     "--name", "x"), "data|shard")
    one_line(run_cli("evaluate", "--checkpoint", str(world / "runs" / "r"), "--data", str(data), "--num-images", "4",
                     "--output", str(tmp_path / "ev")))
    assert not (tmp_path / "runs" / "x" / "config.json").exists()


# ------------------------------------------------------------------ 5. links, FIFOs, unreadable files
def test_a_planted_link_in_the_run_folder_is_replaced_not_written_through(world, tmp_path):
    run = copy_run(world, tmp_path)
    victim = tmp_path / "victim.md"
    victim.write_text("outside the run")
    folder = run / "evaluations" / "checkpoint_000000004"
    folder.mkdir(parents=True)
    (folder / "report.md").symlink_to(victim)
    outcome = run_cli("evaluate", "--checkpoint", str(run), "--data", str(world / "packed"), "--num-images", "4")
    assert outcome.code == 0, outcome.stderr
    assert victim.read_text() == "outside the run"
    assert not (folder / "report.md").is_symlink() and (folder / "metrics.json").is_file()


@pytest.mark.parametrize("planted", ["evaluations", "evaluations/checkpoint_000000004"])
def test_a_planted_folder_link_in_the_run_is_refused_in_one_line(world, tmp_path, planted):
    run = copy_run(world, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / planted).parent.mkdir(parents=True, exist_ok=True)
    (run / planted).symlink_to(outside, target_is_directory=True)
    one_line(run_cli("evaluate", "--checkpoint", str(run), "--data", str(world / "packed"), "--num-images", "4"),
             "symbolic link")
    assert list(outside.iterdir()) == []


def test_a_checkpoint_file_linked_out_of_its_folder_is_not_read(world, tmp_path, caplog):
    run = copy_run(world, tmp_path)
    newest = run / "checkpoint_000000004"
    outside = tmp_path / "outside.safetensors"
    shutil.move(newest / ckpt.GENERATOR_FILE, outside)
    (newest / ckpt.GENERATOR_FILE).symlink_to(outside)
    with pytest.raises(ckpt.CheckpointError, match="link out of its checkpoint folder"):
        ckpt.load_checkpoint(newest)
    outcome = run_cli("fill", "--checkpoint", str(run), "--image", str(world / "in.png"), "--mask",
                      str(world / "mask.png"), "--output", str(tmp_path / "o.png"))
    assert outcome.code == 0 and "skipping checkpoint_000000004" in outcome.stderr + caplog.text


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_a_fifo_named_meta_json_does_not_hang(world, tmp_path, where):
    run = copy_run(world, tmp_path)
    for checkpoint in run.glob("checkpoint_*"):
        (checkpoint / ckpt.META_FILE).unlink()
        os.mkfifo(checkpoint / ckpt.META_FILE)
    target = run if where == "run" else run / "checkpoint_000000004"
    started = time.monotonic()
    one_line(run_cli("fill", "--checkpoint", str(target), "--image", str(world / "in.png"), "--mask",
                     str(world / "mask.png"), "--output", str(tmp_path / "o.png")))
    one_line(run_cli("evaluate", "--checkpoint", str(target), "--data", str(world / "packed"),
                     "--output", str(tmp_path / "ev")))
    assert time.monotonic() - started < 60
    assert not (tmp_path / "o.png").exists()


def test_a_huge_meta_json_is_refused_before_it_is_read(world, tmp_path):
    run = copy_run(world, tmp_path)
    with open(run / "checkpoint_000000004" / ckpt.META_FILE, "r+b") as f:
        f.truncate(storage.JSON_LIMIT + 1)
    with pytest.raises(storage.StorageError, match="refusing to read"):
        storage.read_json(str(run / "checkpoint_000000004" / ckpt.META_FILE))
    assert [storage.name(u) for u, _ in run_folder.complete_checkpoints(str(run))] == ["checkpoint_000000002"]


def _as_nobody(argv: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    runner = shutil.which("setpriv")
    if os.geteuid() != 0 or runner is None:
        return None
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"}
    return subprocess.run([runner, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *argv],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("unreadable", ["generator", "meta", "config"])
def test_files_unreadable_to_the_user_are_one_line(world, tmp_path, unreadable):
    base = Path(f"/tmp/inpaint-nobody-{uuid.uuid4().hex[:8]}")  # tmp_path's parents are not nobody's
    try:
        shutil.copytree(world / "runs" / "r", base / "r")
        shutil.copy(world / "in.png", base / "in.png")
        shutil.copy(world / "mask.png", base / "mask.png")
        shutil.copytree(world / "packed", base / "packed")
        os.chmod(base, 0o777)
        for path in base.rglob("*"):
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
        name = {"generator": ckpt.GENERATOR_FILE, "meta": ckpt.META_FILE, "config": ckpt.CONFIG_FILE}[unreadable]
        for checkpoint in (base / "r").glob("checkpoint_*"):
            os.chmod(checkpoint / name, 0)
        for argv in (["-m", "inpaint", "fill", "--checkpoint", str(base / "r"), "--image", str(base / "in.png"),
                      "--mask", str(base / "mask.png"), "--output", str(base / "o.png")],
                     [str(REPO / "jobs" / "evaluate.py"), "--checkpoint", str(base / "r" / "checkpoint_000000004"),
                      "--data", str(base / "packed"), "--num-images", "4", "--output", str(base / "ev")]):
            done = _as_nobody(argv, base)
            if done is None:
                pytest.skip("needs root and setpriv to run as an unprivileged user")
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ 4. resume past an unloadable checkpoint
def test_an_unloadable_newest_checkpoint_is_moved_aside_before_training_past_it(world, tmp_path, caplog):
    from cluster import restore
    from inpaint import recipes
    from inpaint.trainer import Trainer

    run = copy_run(world, tmp_path)
    newest = run / "checkpoint_000000004"
    import hashlib

    data = b"not safetensors"  # recorded in meta.json: it verifies, but does not load
    (newest / ckpt.GENERATOR_FILE).write_bytes(data)
    meta = json.loads((newest / ckpt.META_FILE).read_text())
    meta["files"][ckpt.GENERATOR_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / ckpt.META_FILE).write_text(json.dumps(meta))
    before = tree_digest(newest)
    trainer = Trainer(recipes.get("debug"), device="cpu")
    choice, _ = restore.load_newest_checkpoint(trainer, run_folder.RunPaths.of(str(run)), None)
    assert storage.name(choice) == "checkpoint_000000002"
    aside = run / "checkpoint_000000004.unloadable"
    assert aside.is_dir() and [p.name for p in newest.iterdir()] == [run_folder.MOVED]
    assert "unreadable weights" in (aside / run_folder.REASON).read_text()
    assert {k.replace(str(newest), str(aside)): v for k, v in before.items()}.items() <= tree_digest(aside).items()
    assert "moved it aside" in caplog.text
    assert [storage.name(u) for u, _ in run_folder.complete_checkpoints(str(run))] == ["checkpoint_000000002"]


def test_a_checkpoint_cut_short_by_a_full_disk_is_moved_aside_at_the_next_resume(world, tmp_path, caplog):
    from cluster import restore
    from inpaint import recipes
    from inpaint.trainer import Trainer

    run = copy_run(world, tmp_path)
    trainer_file = run / "checkpoint_000000004" / ckpt.TRAINER_FILE
    trainer_file.write_bytes(trainer_file.read_bytes()[:1000])
    trainer = Trainer(recipes.get("debug"), device="cpu")
    choice, _ = restore.load_newest_checkpoint(trainer, run_folder.RunPaths.of(str(run)), None)
    assert storage.name(choice) == "checkpoint_000000002"
    aside = run / "checkpoint_000000004.unloadable"
    assert aside.is_dir() and "trainer.pt of the wrong size" in (aside / run_folder.REASON).read_text()
    assert "moved" in caplog.text and "aside to" in caplog.text


# ------------------------------------------------------------------ 6. non-finite training
def _batch(config, generator):
    from inpaint.masks import MaskSampler

    masks, boxes = MaskSampler(config.mask, config.model.image_size, config.model.local_size).batch(4, generator)
    return {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "mask": masks, "box": boxes}


@pytest.mark.parametrize("optimizer, device", [
    ("adam", "cpu"), ("adadelta", "cpu"),
    pytest.param("adam", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_a_non_finite_loss_skips_the_step_and_several_in_a_row_name_the_term(monkeypatch, optimizer, device):
    import dataclasses

    import inpaint.trainer as trainer_module
    from inpaint import recipes
    from inpaint.trainer import Trainer

    config = recipes.get("debug")
    config = config.replace(optim=dataclasses.replace(config.optim, name=optimizer, max_nonfinite_steps=3))
    trainer = Trainer(config, device=device)
    generator = torch.Generator().manual_seed(0)
    trainer.train_step(_batch(config, generator))
    weights = {k: v.clone() for k, v in trainer.generator.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.g_optimizer.state.items()}
    real = trainer_module.reconstruction_loss
    monkeypatch.setattr(trainer_module, "reconstruction_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    for _ in range(2):
        trainer.train_step(_batch(config, generator))
    assert all(torch.equal(weights[k], v) for k, v in trainer.generator.named_parameters())
    assert all(torch.equal(state[id(p)][k], v) for p, s in trainer.g_optimizer.state.items() for k, v in s.items())
    assert trainer.nonfinite_status() == (2, None)
    trainer.train_step(_batch(config, generator))
    skipped, reason = trainer.nonfinite_status()
    assert skipped == 3 and "3 generator steps in a row" in reason and "loss term g_rec" in reason
    assert "optim.max_nonfinite_steps" in reason and "\n" not in reason
    monkeypatch.setattr(trainer_module, "reconstruction_loss", real)
    trainer.train_step(_batch(config, generator))
    assert any(not torch.equal(weights[k], v) for k, v in trainer.generator.named_parameters())


def test_scattered_non_finite_steps_do_not_stop_training(monkeypatch):
    import dataclasses

    import inpaint.trainer as trainer_module
    from inpaint import recipes
    from inpaint.trainer import Trainer

    config = recipes.get("debug")
    config = config.replace(optim=dataclasses.replace(config.optim, max_nonfinite_steps=2))
    trainer = Trainer(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    real = trainer_module.reconstruction_loss
    for step in range(6):
        bad = step % 2 == 0
        monkeypatch.setattr(trainer_module, "reconstruction_loss",
                            (lambda *a, **k: real(*a, **k) * float("inf")) if bad else real)
        trainer.train_step(_batch(config, generator))
    assert trainer.nonfinite_status() == (3, None)


# ------------------------------------------------------------------ 7. watchers leave no claims
def test_two_watchers_with_short_claim_timeouts_evaluate_once_and_leave_no_claim(world, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from cluster import watcher
    from cluster.evaluator import EvaluationRequest

    run = copy_run(world, tmp_path)
    request = EvaluationRequest(data=str(world / "packed"), num_images=4)
    with ThreadPoolExecutor(2) as pool:
        summaries = list(pool.map(lambda owner: watcher.watch(str(run), request, claim_timeout_s=0.5, settle_s=0,
                                                              owner=owner), ["a", "b"]))
    evaluated = sorted(name for summary in summaries for name in summary.evaluated)
    assert set(evaluated) == {"checkpoint_000000002", "checkpoint_000000004"}
    assert not list((run / "evaluations").rglob("CLAIM*"))
    for name in evaluated:
        assert (run / "evaluations" / name / "metrics.json").is_file()


def test_a_finished_comparison_is_not_re_evaluated(world, tmp_path, caplog):
    import logging

    from cluster import evaluator

    caplog.set_level(logging.INFO)
    run = copy_run(world, tmp_path)
    request = evaluator.EvaluationRequest(data=str(world / "packed"), num_images=4)
    first = evaluator.compare_with_baselines(str(run), request, names=("mean",))
    before = tree_digest(run / "evaluations"), tree_digest(run / "tensorboard")
    again = evaluator.compare_with_baselines(str(run), request, names=("mean",))
    assert (tree_digest(run / "evaluations"), tree_digest(run / "tensorboard")) == before
    assert "nothing re-evaluated" in caplog.text
    assert again.model.output == first.model.output and again.model.document["metrics"] == json.loads(
        json.dumps(first.model.document["metrics"]))
    assert [b.output for b in again.baselines] == [b.output for b in first.baselines]
    # What the user reads says so: not "written" for figures read back.
    assert first.model.headline().startswith("evaluation written to ")
    assert again.model.headline().startswith("evaluation already in ") and not first.model.reused


# ------------------------------------------------------------------ 8. a garbage Ray snapshot
def test_a_garbage_ray_snapshot_is_moved_aside_with_a_log_line(world, tmp_path, caplog):
    from cluster import launch

    run = copy_run(world, tmp_path)
    (run / launch.RAY_SNAPSHOT).write_text("{not json")
    request = launch.TrainRequest.create(recipe="debug", overrides=[], data=str(world / "packed"),
                                         storage=str(run.parent), name="r", workers="1")
    launch._check_ray_snapshot(request)
    assert not (run / launch.RAY_SNAPSHOT).exists()
    assert (run / f"{launch.RAY_SNAPSHOT}.unloadable").read_text() == "{not json"
    assert "Ray cannot load it" in caplog.text


# ------------------------------------------------------------------ with Ray: a full disk and divergence while training
def _train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--recipe", "debug", "--workers", "1",
                           "--no-evaluate", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _every_listed_checkpoint_verifies(run: Path) -> list[str]:
    listed = run_folder.complete_checkpoints(str(run))
    for url, meta in listed:
        # Every file a listed marker stands beside matches it (size and sha256); a file the copy
        # never reached is absent, and the loader that needs it skips the checkpoint.
        present = storage.file_sizes(url)
        ckpt.verify_checkpoint(url, files=tuple(name for name in meta["files"] if name in present))
    return [storage.name(url) for url, _ in listed]


@pytest.mark.ray
@pytest.mark.slow
def test_a_full_disk_while_training_stops_the_run_in_one_line_and_lists_no_partial_checkpoint(sample_dataset,
                                                                                                small_disk):
    done = _train("--data", sample_dataset, "--storage", str(small_disk), "--name", "full", "--max-failures", "0",
                  "--set", "checkpoint.every_steps=2", "--set", "schedule.generator_steps=40")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "No space left" in failed[0], done.stdout[-2000:]
    assert "Traceback" not in done.stdout
    _every_listed_checkpoint_verifies(small_disk / "full")


@pytest.mark.ray
@pytest.mark.slow
def test_training_that_diverges_stops_naming_the_loss_term_and_writes_no_nan_checkpoint(sample_dataset, tmp_path):
    from safetensors.torch import load_file

    done = _train("--data", sample_dataset, "--storage", str(tmp_path), "--name", "nan",
                  "--set", "loss.cx_eps=1e-30", "--set", "optim.max_nonfinite_steps=3", "--set", "log.every_steps=2",
                  "--set", "checkpoint.every_steps=4")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "training diverged" in failed[0] and "g_cx" in failed[0], done.stdout[-2000:]
    assert "skipped for a non-finite loss or gradient" in done.stdout + done.stderr  # rank 0's line (console)
    for name in _every_listed_checkpoint_verifies(tmp_path / "nan"):
        weights = load_file(str(tmp_path / "nan" / name / ckpt.GENERATOR_FILE))
        assert all(bool(torch.isfinite(value).all()) for value in weights.values())
