"""The GPU training path's mechanisms, checked on CPU (issue 21): no device sync per step, static
compile, DDP wrapped before compile, the bf16 gradient-compression hook, time-based checkpoints,
the CUDA-only defaults (cuDNN autotuning, the contextual loss's chunk, native bf16)."""

from __future__ import annotations

import gc
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from inpaint import hardware
from inpaint.config import ConfigError
from inpaint.distributed import CheckpointCadence, prepare_for_training
from inpaint.trainer import Trainer, contextual_chunk
from tests.test_trainer import debug_config, synthetic_batch


# ---------------------------------------------------------------------------------------------
# Timing without a sync per step


def test_the_meter_syncs_once_per_window_and_counts_the_wait_as_step_time():
    from cluster.console import ThroughputMeter

    now = [0.0]
    syncs = []

    def synchronize():
        syncs.append(now[0])
        now[0] += 3.0  # the GPU still had 3 s of queued work

    clock = ThroughputMeter(torch.device("cpu"), clock=lambda: now[0], synchronize=synchronize)
    for _ in range(4):
        clock.data(0.5)
        clock.step(1.0, images=8)
        now[0] += 1.5
    assert syncs == []  # steps never wait for the device
    figures = clock.window()
    assert len(syncs) == 1
    assert figures["time/data(s)"] == pytest.approx(0.5)
    assert figures["time/step(s)"] == pytest.approx((4 * 1.0 + 3.0) / 4)
    assert figures["perf/images_per_s"] == pytest.approx(32 / 9.0)  # 6 s of steps + the 3 s drain
    clock.step(1.0, images=8)
    assert clock.window()["time/step(s)"] == pytest.approx(1.0 + 3.0) and len(syncs) == 2


def test_a_cuda_meter_synchronizes_its_device(monkeypatch):
    from cluster.console import ThroughputMeter

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    clock = ThroughputMeter(torch.device("cuda", 3))
    clock.step(0.1, images=1)
    assert calls == []
    clock.window()
    assert calls == [torch.device("cuda", 3)]


# ---------------------------------------------------------------------------------------------
# Time-based checkpoints


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_checkpoint_cadence_by_the_clock_is_decided_on_check_steps_only():
    clock, asked = FakeClock(), []

    def broadcast(flag: bool) -> bool:  # rank 0's decision; counted to show other steps cost nothing
        asked.append(flag)
        return flag

    cadence = CheckpointCadence(0, every_minutes=15, check_every=50, clock=clock, broadcast=broadcast)
    due = []
    for step in range(1, 1001):
        clock.now += 10.0  # 10 s a step: 15 minutes every 90 steps, seen at the next multiple of 50
        if cadence.due(step):
            due.append(step)
            cadence.taken()
    assert due == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert len(asked) == 20  # one broadcast per check step, none on the 980 others


def test_steps_and_minutes_both_trigger_and_a_taken_checkpoint_restarts_the_interval():
    clock = FakeClock()
    cadence = CheckpointCadence(7, every_minutes=1, check_every=5, clock=clock, broadcast=lambda flag: flag)
    due = []
    for step in range(1, 31):
        clock.now += 10.0
        if cadence.due(step):
            due.append(step)
            cadence.taken()
    # 7 and 14 by steps; 20 by time (60 s since 14's at 14*10=140 s -> 200 s); 21, 28 by steps; 25 is 40 s after 21
    assert due == [7, 14, 20, 21, 28]
    off = CheckpointCadence(0, every_minutes=0, check_every=1, clock=clock, broadcast=lambda flag: True)
    assert not any(off.due(step) for step in range(1, 100))


def test_checkpoint_fields_take_zero_as_off_and_reject_negatives():
    assert debug_config("checkpoint.every_steps=0", "checkpoint.every_minutes=15").checkpoint.every_minutes == 15
    with pytest.raises(ConfigError, match=r"^checkpoint.every_minutes: must be >= 0"):
        debug_config("checkpoint.every_minutes=-1")
    from inpaint import recipes

    for name in ("celeba", "lfw"):
        assert recipes.get(name).checkpoint.every_minutes == 15 and recipes.get(name).checkpoint.every_steps == 0


# ---------------------------------------------------------------------------------------------
# CUDA-only defaults, read on CPU


def test_cx_chunk_auto_is_the_batch_on_cuda_and_one_on_cpu():
    config = debug_config()
    assert config.loss.cx_chunk == 0
    assert Trainer(config, device="cpu").cx_chunk == 1
    assert Trainer(debug_config("loss.cx_chunk=3"), device="cpu").cx_chunk == 3
    assert contextual_chunk(0, 12, torch.device("cuda", 0)) == 12
    assert contextual_chunk(0, 12, torch.device("cpu")) == 1
    assert contextual_chunk(2, 12, torch.device("cuda")) == 2


def test_a_cuda_trainer_turns_on_cudnn_autotuning(monkeypatch):
    # A CUDA device without a GPU: everything but the device setup is stubbed out by failing right after it.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr("inpaint.trainer.default_bf16", lambda device: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        Trainer(debug_config(), device="cuda")
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="stop"):
        Trainer(debug_config(), device="cpu")
    assert torch.backends.cudnn.benchmark is False


def test_native_bf16_asks_the_device_in_use_without_emulation(monkeypatch):
    asked = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            asked.append(("device", self.index))

        def __exit__(self, *exc):
            return False

    def supported(including_emulation=True):
        asked.append(("including_emulation", including_emulation))
        return asked[-2] == ("device", 1)  # only GPU 1 is an Ampere-or-later one here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert hardware.native_bf16("cuda:1") is True
    assert asked == [("device", 1), ("including_emulation", False)]
    assert hardware.native_bf16("cuda:0") is False


# ---------------------------------------------------------------------------------------------
# Static compile


def _recording_backend(graphs: list[list[str]]):
    """A torch.compile backend that runs eagerly and records each graph's symbolic inputs."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        symbolic = []
        for node in gm.graph.nodes:
            value = node.meta.get("example_value") if node.op == "placeholder" else None
            if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor)
                                                   and any(isinstance(d, torch.SymInt) for d in value.shape)):
                symbolic.append(node.name)
        graphs.append(symbolic)
        return gm.forward

    return backend


@pytest.mark.slow
def test_compile_is_static_the_frozen_pass_compiles_once_and_steady_steps_compile_nothing():
    torch._dynamo.reset()
    config = debug_config("runtime.compile=true", "runtime.bf16=false", "schedule.generator_steps=1",
                          "schedule.discriminator_steps=1", "schedule.joint_steps=3")
    trainer = Trainer(config, device="cpu")
    graphs: list[list[str]] = []
    trainer.compile(backend=_recording_backend(graphs))
    new = []
    for index in range(5):
        before = len(graphs)
        trainer.train_step(synthetic_batch(config, index))
        new.append(len(graphs) - before)
    # Torch's default (dynamic=None) recompiles the discriminator at batch B, after its 2B step, with a
    # symbolic batch size (a placeholder such as s34); static, that graph has concrete sizes only.
    assert all(not symbolic for symbolic in graphs), graphs
    assert new[2] >= 1 and new[3:] == [0, 0]  # the first joint step compiles the B-batch pass; then nothing


# ---------------------------------------------------------------------------------------------
# DDP: wrap, comm hook, compile, in two gloo processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def _gloo_worker(rank: int, world: int, port: int, measure, out: str) -> None:
    """One rank: join a gloo group, run measure(rank, world, out), leave the group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        measure(rank, world, out)
    finally:
        # The DDP modules measure() made must be gone before the group: torn down at interpreter exit,
        # after destroy_process_group, they aborted the process ("terminate called without an active
        # exception") in 5 of 30 runs of the comm test.
        gc.collect()
        dist.destroy_process_group()


def _comm_measure(rank: int, world: int, out: str) -> None:
    results = {}
    # One phase per network, so that the other network's weights (updated by the first step) play no part.
    phases = {"generator": "schedule.generator_steps=1", "discriminator": "schedule.discriminator_steps=1"}
    for name, phase in phases.items():
        overrides = ("runtime.bf16=false", "schedule.generator_steps=0", "schedule.discriminator_steps=0",
                     "schedule.joint_steps=0", phase)
        batch = synthetic_batch(debug_config(*overrides), 100 + rank)  # each rank its own data
        # The reference: each rank's own gradients, averaged by hand in fp32.
        local = Trainer(debug_config(*overrides), device="cpu", world_size=world, rank=rank)
        local.train_step(batch)
        want = _grads(getattr(local, name))
        dist.all_reduce(want)
        want /= world
        for comm in ("fp32", "bf16"):
            trainer = Trainer(debug_config(*overrides, f"runtime.ddp_comm={comm}"), device="cpu",
                              world_size=world, rank=rank)
            prepare_for_training(trainer, "cpu", world)
            hooks = [len(getattr(trainer, net)._comm_hooks) for net in phases]
            trainer.train_step(batch)
            got = _grads(getattr(trainer, name))
            results[f"{comm}/{name}"] = {
                "hooks": hooks, "max_abs": float((got - want).abs().max()),
                "relative": float((got - want).norm() / want.norm()),
                "cosine": float(torch.nn.functional.cosine_similarity(got, want, dim=0))}
    # The time-based cadence: rank 1's clock runs 10x fast, but rank 0 decides for both.
    clock = FakeClock()
    cadence = CheckpointCadence(0, every_minutes=1, check_every=3, clock=clock)
    due = []
    for step in range(1, 40):
        clock.now += 5.0 * (10 if rank == 1 else 1)
        if cadence.due(step):
            due.append(step)
            cadence.taken()
    results["due"] = due
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    else:
        Path(out + f".{rank}").write_text(json.dumps({"due": due}))


@pytest.mark.slow
def test_ddp_comm_fp32_equals_the_plain_average_and_bf16_is_close(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "comm.json")
    mp.spawn(_gloo_worker, args=(2, _free_port(), _comm_measure, out), nprocs=2, join=True)
    results = json.loads(Path(out).read_text())
    for name in ("generator", "discriminator"):
        fp32, bf16 = results[f"fp32/{name}"], results[f"bf16/{name}"]
        assert fp32["hooks"] == [0, 0] and bf16["hooks"] == [1, 1]
        assert fp32["relative"] < 1e-5, fp32  # DDP divides before summing, the reference after: rounding only
        # bf16 keeps 8 significant bits: each gradient rounds by up to 2^-9 relative (0.2%) on the wire.
        assert bf16["relative"] < 1e-2 and bf16["cosine"] > 0.9999, bf16
        assert bf16["relative"] > 1e-5, "bf16 communication should not be exact: is the hook running?"
    # Rank 0's clock: 1 minute every 12 steps, seen at the next multiple of 3; rank 1 agrees although
    # its own clock would have said yes at every check.
    assert results["due"] == [12, 24, 36]
    assert json.loads(Path(out + ".1").read_text())["due"] == results["due"]


def _compile_measure(rank: int, world: int, out: str) -> None:
    from torch._dynamo.backends.distributed import DDPOptimizer

    split = []
    original = DDPOptimizer.compile_fn

    def counting(self, gm, example_inputs):
        split.append(len(list(gm.graph.nodes)))
        return original(self, gm, example_inputs)

    DDPOptimizer.compile_fn = counting
    config = debug_config("runtime.compile=true", "runtime.bf16=false", "schedule.generator_steps=1",
                          "schedule.discriminator_steps=1", "schedule.joint_steps=2")
    trainer = Trainer(config, device="cpu", world_size=world, rank=rank)
    prepare_for_training(trainer, "cpu", world, backend="aot_eager")
    optimized = torch._dynamo.eval_frame.OptimizedModule
    layout = {
        "discriminator": [type(trainer.discriminator).__name__, type(trainer.discriminator._orig_mod).__name__],
        "adversarial": [type(trainer.adversarial_discriminator).__name__,
                        type(trainer.adversarial_discriminator._orig_mod).__name__],
        "generator_compiled_ddp": isinstance(trainer.generator, optimized)
        and isinstance(trainer.generator._orig_mod, torch.nn.parallel.DistributedDataParallel),
    }
    for index in range(4):
        trainer.train_step(synthetic_batch(config, 10 * index + rank))
    weights = torch.cat([p.detach().reshape(-1) for p in trainer.discriminator.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        Path(out).write_text(json.dumps({"layout": layout, "ddp_optimizer_graphs": len(split),
                                         "ranks_agree": bool(torch.equal(gathered[0], gathered[1])),
                                         "step": trainer.step}))


@pytest.mark.slow
def test_prepare_compiles_the_ddp_wrapped_networks_and_the_bare_discriminator_for_the_frozen_pass(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "compile.json")
    mp.spawn(_gloo_worker, args=(2, _free_port(), _compile_measure, out), nprocs=2, join=True)
    results = json.loads(Path(out).read_text())
    assert results["layout"]["discriminator"] == ["OptimizedModule", "DistributedDataParallel"]
    assert results["layout"]["adversarial"] == ["OptimizedModule", results["layout"]["adversarial"][1]]
    assert results["layout"]["adversarial"][1] != "DistributedDataParallel"
    assert results["layout"]["generator_compiled_ddp"]
    # Dynamo handed the DDP-wrapped graphs to its DDP optimizer, which splits them at bucket boundaries.
    assert results["ddp_optimizer_graphs"] >= 2
    assert results["ranks_agree"] and results["step"] == 4


# ---------------------------------------------------------------------------------------------
# The training loop itself, in this process with Ray Train's calls stood in for


@pytest.mark.slow
def test_the_loop_times_by_window_checkpoints_by_the_clock_and_uploads_in_the_background(
        monkeypatch, sample_dataset, tmp_path):
    import functools
    import shutil
    import threading
    import types

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    import cluster.train_loop as loop
    from inpaint import recipes

    reports, windows, uploading = [], [], []

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, **options):
        assert options == {"checkpoint_upload_mode": CheckpointUploadMode.ASYNC,
                           "delete_local_checkpoint_after_upload": True}
        # The directory must outlive report(): Ray uploads it from a background thread, then deletes it.
        assert checkpoint is not None and (Path(checkpoint.path) / "meta.json").is_file()
        # One upload in flight at most: the previous checkpoint was uploaded (deleted) before this one.
        assert not any(Path(path).exists() for path in uploading)
        reports.append(metrics["step"])
        uploading.append(checkpoint.path)
        threading.Timer(1.0, shutil.rmtree, (checkpoint.path,)).start()  # a slow store: 1 s an upload

    class CountingClock(loop.ThroughputMeter):
        def window(self):
            windows.append(None)
            return super().window()

    minute = [0.0]

    def fake_time() -> float:  # a minute passes between any two readings of the checkpoint clock
        minute[0] += 60.0
        return minute[0]

    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a device sync in the loop"))
    monkeypatch.setattr(loop, "ThroughputMeter", CountingClock)
    monkeypatch.setattr(loop, "CheckpointCadence", functools.partial(CheckpointCadence, clock=fake_time))
    config = recipes.get("debug")  # 8 + 4 + 8 steps, logging every 2
    config = config.replace(data=type(config.data)(**{**vars(config.data), "url": sample_dataset}),
                            checkpoint=type(config.checkpoint)(every_steps=0, every_minutes=1.5, keep_last=2))
    loop.train_loop_per_worker({"config": config.to_dict(), "storage": str(tmp_path), "name": "run"})
    # Every clock check sees 1 minute (< 1.5) after a checkpoint and 2 minutes at the next check: so
    # checkpoints every 4 steps; 8, 12 and 20 are also phase boundaries and the end.
    assert reports == [4, 8, 12, 16, 20]
    assert len(windows) == 10  # one timing window (and so one device sync on GPU) per logging step
