"""The single-process Trainer: phases, gradient isolation, exact resume, GPU switches on CPU."""

import pytest
import torch

from inpaint import recipes
from inpaint.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from inpaint.config import apply_overrides
from inpaint.masks import MaskSampler
from inpaint.phases import Phase
from inpaint.trainer import Trainer


def debug_config(*overrides):
    return apply_overrides(recipes.get("debug"), list(overrides))


def synthetic_batch(config, index, batch_size=None):
    """A deterministic batch: smooth random images and recipe-sized holes, seeded by index."""
    n = batch_size or config.data.batch_size
    size = config.model.image_size
    generator = torch.Generator().manual_seed(1000 + index)
    low = torch.rand(n, 3, size // 4, size // 4, generator=generator)
    image = (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 255).to(torch.uint8)
    sampler = MaskSampler(config.mask, size, config.model.local_size)
    mask, box = sampler.batch(n, generator)
    return {"image": image, "mask": mask, "box": box}


class Position:
    """A stand-in for the training loader's position: what a checkpoint carries for the data."""

    def __init__(self, state=None, refuse=False):
        self.state, self.refuse = state, refuse

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        if self.refuse:
            raise ValueError("not this dataset's position")
        self.state = dict(state)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_each_phase_trains_only_its_networks():
    config = debug_config("schedule.generator_steps=1", "schedule.discriminator_steps=1", "schedule.joint_steps=1")
    trainer = Trainer(config, device="cpu")
    expected = [(Phase.GENERATOR, True, False), (Phase.DISCRIMINATOR, False, True), (Phase.JOINT, True, True)]
    for index, (phase, generator_trains, discriminator_trains) in enumerate(expected):
        assert trainer.phase is phase
        g_before, d_before = params(trainer.generator), params(trainer.discriminator)
        metrics = trainer.train_step(synthetic_batch(config, index))
        assert changed(g_before, trainer.generator) is generator_trains
        assert changed(d_before, trainer.discriminator) is discriminator_trains
        assert all(torch.isfinite(v) for v in metrics.values())
        assert all(f"/{phase.value}/" in key for key in metrics)
    assert trainer.done
    with pytest.raises(RuntimeError, match="schedule is complete"):
        trainer.train_step(synthetic_batch(config, 9))


def test_generator_phase_logs_reconstruction_and_contextual_terms_joint_adds_adversarial():
    config = debug_config("schedule.generator_steps=1", "schedule.discriminator_steps=0", "schedule.joint_steps=1")
    trainer = Trainer(config, device="cpu")
    first = trainer.train_step(synthetic_batch(config, 0))
    assert {"loss/generator/g_rec", "loss/generator/g_cx", "loss/generator/g_total"} <= set(first)
    assert "loss/generator/g_adv" not in first
    second = trainer.train_step(synthetic_batch(config, 1))
    assert {"loss/joint/g_adv", "loss/joint/d_bce", "disc/joint/d_prob_real"} <= set(second)


def test_no_gradient_leaks_between_the_networks_in_a_joint_step():
    config = debug_config("schedule.generator_steps=0", "schedule.discriminator_steps=0", "schedule.joint_steps=1")
    trainer = Trainer(config, device="cpu")
    grads_per_network = {"generator": 0, "discriminator": 0}
    hooks = []
    for name in grads_per_network:
        for parameter in getattr(trainer, name).parameters():
            def count(grad, name=name):
                grads_per_network[name] += 1
            hooks.append(parameter.register_hook(count))
    trainer.train_step(synthetic_batch(config, 0))
    # Each parameter receives exactly one gradient: from its own network's step, never the other's.
    assert grads_per_network["generator"] == len(list(trainer.generator.parameters()))
    assert grads_per_network["discriminator"] == len(list(trainer.discriminator.parameters()))
    assert all(p.requires_grad for p in trainer.discriminator.parameters())


def test_discriminator_sees_the_composite_not_the_raw_prediction(monkeypatch):
    config = debug_config("schedule.generator_steps=0", "schedule.discriminator_steps=1", "schedule.joint_steps=0")
    trainer = Trainer(config, device="cpu")
    batch = synthetic_batch(config, 0)
    seen = {}
    original_forward = trainer.discriminator.forward

    def spy(images, patches):
        seen["images"] = images.detach().clone()
        return original_forward(images, patches)

    monkeypatch.setattr(trainer.discriminator, "forward", spy)
    trainer.train_step(batch)
    real = batch["image"].float() / 255
    fake = seen["images"][len(real):]
    known = batch["mask"].expand_as(real).bool()
    assert torch.equal(fake[known], real[known])  # known pixels come from the input, untouched
    assert torch.equal(seen["images"][: len(real)], real)


GLCIC_SETTINGS = ("model.arch=glcic", "model.block=conv", "model.disc_tail_stride=2", "optim.name=adadelta",
                  "optim.g_lr=1", "optim.d_lr=1")


# In fp32: under CPU bf16 autocast the debug-sized glcic local discriminator's last conv (a 1x1 input)
# now and then gets a NaN weight gradient from torch 2.14's CPU kernels (seen 1 run in 3 on an
# avx512_bf16 EPYC), which the trainer then skips as a non-finite step: that is about bf16, not resume.
@pytest.mark.parametrize("settings", [(), (*GLCIC_SETTINGS, "runtime.bf16=false")], ids=["paper-adam", "glcic-adadelta"])
def test_save_load_continue_matches_an_uninterrupted_run(tmp_path, settings):
    config = debug_config("schedule.generator_steps=3", "schedule.discriminator_steps=2", "schedule.joint_steps=4",
                          *settings)
    batches = [synthetic_batch(config, i) for i in range(9)]

    straight = Trainer(config, device="cpu")
    expected = [{k: float(v) for k, v in straight.train_step(b).items()} for b in batches]

    first = Trainer(config, device="cpu")
    for b in batches[:4]:
        first.train_step(b)
    first.save(tmp_path / "ckpt", data=Position({"epoch": 0, "batches": 4}))
    assert verify_checkpoint(tmp_path / "ckpt")["step"] == 4  # complete, every file at its recorded sha256
    torch.manual_seed(12345)  # a fresh process would have other RNG state; the checkpoint must restore it

    resumed, position = Trainer(config, device="cpu"), Position()
    meta = resumed.load(tmp_path / "ckpt", data=position)
    assert meta["step"] == 4 and meta["phase"] == "discriminator"
    assert position.state == {"epoch": 0, "batches": 4}  # the loader's position, kept by the loader
    got = [{k: float(v) for k, v in resumed.train_step(b).items()} for b in batches[4:]]
    assert got == expected[4:]


def test_optim_name_picks_the_optimizer_of_both_networks():
    adam, adadelta = Trainer(debug_config(), device="cpu"), Trainer(debug_config(*GLCIC_SETTINGS), device="cpu")
    assert all(isinstance(o, torch.optim.Adam) for o in (adam.g_optimizer, adam.d_optimizer))
    assert all(isinstance(o, torch.optim.Adadelta) and o.defaults["lr"] == 1.0
               for o in (adadelta.g_optimizer, adadelta.d_optimizer))


def test_checkpoint_files_load_without_unpickling_code_and_tampering_is_detected(tmp_path):
    config = debug_config()
    trainer = Trainer(config, device="cpu")
    trainer.train_step(synthetic_batch(config, 0))
    trainer.save(tmp_path / "ckpt")
    contents = load_checkpoint(tmp_path / "ckpt")
    assert contents.config == config and contents.meta["step"] == 1
    with open(tmp_path / "ckpt" / "generator.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "meta.json").unlink()
    with pytest.raises(CheckpointError):
        verify_checkpoint(tmp_path / "ckpt")


def test_bf16_autocast_and_channels_last_switch_on_for_cpu():
    config = debug_config("runtime.bf16=true", "runtime.channels_last=true", "schedule.generator_steps=1",
                          "schedule.discriminator_steps=0", "schedule.joint_steps=1")
    trainer = Trainer(config, device="cpu")
    assert trainer.bf16 and trainer.channels_last
    conv = next(m for m in trainer.generator.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for i in range(2):
        metrics = trainer.train_step(synthetic_batch(config, i))
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("native", [False, True])
def test_gpu_switches_follow_the_cpus_native_bf16(monkeypatch, native):
    monkeypatch.setattr("inpaint.hardware.cpu_native_bf16", lambda: native)
    trainer = Trainer(debug_config(), device="cpu")
    assert trainer.bf16 is native and trainer.channels_last is native
    pinned = Trainer(debug_config("runtime.bf16=false", "runtime.channels_last=false"), device="cpu")
    assert not pinned.bf16 and not pinned.channels_last


@pytest.mark.parametrize("mode, passes", [("train", 2), ("eval", 1), ("mixed", 2)])
def test_adv_disc_bn_says_whether_the_adversarial_pass_moves_the_discriminators_batchnorm(mode, passes):
    config = debug_config("schedule.generator_steps=0", "schedule.discriminator_steps=0", "schedule.joint_steps=1",
                          f"loss.adv_disc_bn={mode}")
    trainer = Trainer(config, device="cpu")
    norms = [m for m in trainer.discriminator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    trainer.train_step(synthetic_batch(config, 0))
    # one pass in the discriminator's own step, plus one in the generator's unless it reads running stats
    assert {int(m.num_batches_tracked) for m in norms} == {passes}
    assert trainer.discriminator.training


def test_adv_disc_bn_rejects_unknown_modes():
    with pytest.raises(Exception, match="adv_disc_bn"):
        debug_config("loss.adv_disc_bn=frozen")


def test_a_data_position_that_does_not_load_leaves_the_trainer_as_it_was(tmp_path):
    from inpaint.checkpoint import UnloadableCheckpoint

    config = debug_config()
    first = Trainer(config, device="cpu")
    first.train_step(synthetic_batch(config, 0))
    first.save(tmp_path / "ckpt", data=Position({"epoch": 3}))
    fresh = Trainer(config, device="cpu")
    before = params(fresh.generator)
    with pytest.raises(UnloadableCheckpoint, match="data position"):
        fresh.load(tmp_path / "ckpt", data=Position(refuse=True))
    assert fresh.step == 0 and not changed(before, fresh.generator)
    assert fresh.load(tmp_path / "ckpt")["step"] == 1  # without a loader to restore, the position is ignored


@pytest.mark.slow
def test_runtime_compile_trains_the_same_networks_and_saves_plain_weights(tmp_path):
    # fp32 on every CPU: under bf16 autocast (the default where the CPU has native bf16) compiled and
    # eager kernels round differently, ~3e-3 relative after three steps, which says nothing about compile.
    config = debug_config("runtime.compile=true", "runtime.bf16=false", "schedule.generator_steps=1",
                          "schedule.discriminator_steps=1", "schedule.joint_steps=1")
    batches = [synthetic_batch(config, i) for i in range(3)]
    eager = Trainer(config, device="cpu")
    expected = [{k: float(v) for k, v in eager.train_step(b).items()} for b in batches]
    compiled = Trainer(config, device="cpu")
    compiled.compile()
    assert isinstance(compiled.generator, torch._dynamo.eval_frame.OptimizedModule)
    got = [{k: float(v) for k, v in compiled.train_step(b).items()} for b in batches]
    for mine, theirs in zip(got, expected):
        assert mine.keys() == theirs.keys() and mine == pytest.approx(theirs, rel=1e-3, abs=1e-5)
    compiled.save(tmp_path / "ckpt")  # the networks' own names, not _orig_mod.*: loads into an eager trainer
    assert Trainer(config, device="cpu").load(tmp_path / "ckpt")["step"] == 3
