"""The averaged generator (model.ema_decay) and the per-phase learning-rate schedule (optim.*)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from inpaint import checkpoint as ckpt
from inpaint.config import ConfigError, OptimConfig, ScheduleConfig
from inpaint.ema import GeneratorEMA
from inpaint.inference import Inpainter
from inpaint.phases import Phase, PhaseSchedule, lr_factor
from inpaint.trainer import Trainer
from tests.test_trainer import debug_config, synthetic_batch


# ------------------------------------------------------------------ EMA
def test_ema_moves_one_minus_decay_towards_the_weights_and_copies_batchnorm_statistics():
    network = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(1.0)
    ema = GeneratorEMA(network, decay=0.75)
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(3.0)
    network.train()(torch.randn(8, 2))  # new running statistics
    ema.update(network)
    for averaged in ema.module.parameters():  # 0.75 * 1 + 0.25 * 3
        assert torch.equal(averaged, torch.full_like(averaged, 1.5))
    ema.update(network)  # 0.75 * 1.5 + 0.25 * 3
    assert all(torch.equal(p, torch.full_like(p, 1.875)) for p in ema.module.parameters())
    bn, own = ema.module[1], network[1]
    assert torch.equal(bn.running_mean, own.running_mean) and torch.equal(bn.running_var, own.running_var)
    assert int(bn.num_batches_tracked) == int(own.num_batches_tracked) == 1
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_decay_must_be_below_one():
    with pytest.raises(ConfigError, match="model.ema_decay"):
        debug_config("model.ema_decay=1")


def test_the_trainer_averages_after_generator_steps_only():
    config = debug_config("schedule.generator_steps=2", "schedule.discriminator_steps=2", "schedule.joint_steps=1")
    trainer = Trainer(config, device="cpu")
    assert trainer.ema is not None and trainer.ema.decay == 0.9
    averaged = lambda: [p.clone() for p in trainer.ema.module.parameters()]  # noqa: E731
    history = [averaged()]
    for index in range(5):
        before = [p.detach().clone() for p in trainer.generator.parameters()]
        trainer.train_step(synthetic_batch(config, index))
        history.append(averaged())
        if trainer.schedule.phase_at(index, 0) is not Phase.DISCRIMINATOR:
            expected = [torch.lerp(old, new.detach(), 0.1)
                        for old, new in zip(history[-2], trainer.generator.parameters())]
            assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(history[-1], expected))
            assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))
        else:
            assert all(torch.equal(a, b) for a, b in zip(history[-2], history[-1]))


def test_ema_off_saves_no_average(tmp_path):
    trainer = Trainer(debug_config("model.ema_decay=0"), device="cpu")
    assert trainer.ema is None
    trainer.save(tmp_path / "c")
    assert ckpt.EMA_FILE not in json.loads((tmp_path / "c" / ckpt.META_FILE).read_text())["files"]


# ------------------------------------------------------------------ exact resume
def test_resume_continues_the_average_and_the_schedule_bit_for_bit(tmp_path):
    config = debug_config("schedule.generator_steps=4", "schedule.discriminator_steps=2", "schedule.joint_steps=5",
                          "optim.warmup_steps=2", "optim.decay=linear", "optim.min_lr_ratio=0.2")
    batches = [synthetic_batch(config, i) for i in range(11)]
    straight = Trainer(config, device="cpu")
    rates = []
    for batch in batches:
        rates.append((straight.g_optimizer.param_groups[0]["lr"], straight.d_optimizer.param_groups[0]["lr"]))
        straight.train_step(batch)

    first = Trainer(config, device="cpu")
    for batch in batches[:5]:
        first.train_step(batch)
    first.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / ckpt.META_FILE).read_text())
    assert ckpt.EMA_FILE in meta["files"] and len(meta["files"][ckpt.EMA_FILE]["sha256"]) == 64
    torch.manual_seed(999)
    resumed = Trainer(config, device="cpu")
    resumed.load(tmp_path / "ckpt")
    for batch, rate in zip(batches[5:], rates[5:]):
        assert (resumed.g_optimizer.param_groups[0]["lr"], resumed.d_optimizer.param_groups[0]["lr"]) == rate
        resumed.train_step(batch)
    for name, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), name
    for name, value in straight.generator.state_dict().items():
        assert torch.equal(value, resumed.generator.state_dict()[name]), name
    # and the average is not the trained generator: it lags it
    assert any(not torch.equal(a, b) for a, b in zip(straight.ema.module.parameters(), straight.generator.parameters()))


# ------------------------------------------------------------------ checkpoints without an average
def test_inference_picks_the_average_or_the_raw_weights_and_old_checkpoints_fall_back(tmp_path, caplog):
    config = debug_config()
    trainer = Trainer(config, device="cpu")
    for index in range(3):
        trainer.train_step(synthetic_batch(config, index))
    trainer.save(tmp_path / "new")
    ema = Inpainter.from_checkpoint(str(tmp_path / "new"))
    raw = Inpainter.from_checkpoint(str(tmp_path / "new"), weights="raw")
    assert ema.meta["weights"] == "ema" and raw.meta["weights"] == "raw"
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(ema.generator.state_dict()[name], value)
    for name, value in trainer.generator.state_dict().items():
        assert torch.equal(raw.generator.state_dict()[name], value)

    old = Trainer(debug_config("model.ema_decay=0"), device="cpu")  # a checkpoint from before the average
    old.save(tmp_path / "old")
    with caplog.at_level(logging.INFO):
        fallback = Inpainter.from_checkpoint(str(tmp_path / "old"))
    assert fallback.meta["weights"] == "raw" and "no averaged generator" in caplog.text
    resumed = Trainer(config, device="cpu")  # and training with an average resumes from it
    with caplog.at_level(logging.INFO):
        resumed.load(tmp_path / "old")
    for name, value in old.generator.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[name], value)


# ------------------------------------------------------------------ learning-rate schedule
@pytest.mark.parametrize("decay, done, expected", [
    ("constant", 0, 0.25), ("constant", 3, 1.0), ("constant", 4, 1.0), ("constant", 99, 1.0),
    ("linear", 0, 0.25), ("linear", 4, 1.0), ("linear", 52, 0.1 + 0.9 * 0.5), ("linear", 100, 0.1),
    ("cosine", 4, 1.0), ("cosine", 52, 0.1 + 0.9 * 0.5), ("cosine", 28, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 100, 0.1),
])
def test_lr_factor_warms_up_then_decays_to_the_floor(decay, done, expected):
    optim = OptimConfig(warmup_steps=4, decay=decay, min_lr_ratio=0.1)
    assert lr_factor(optim, done, 100) == pytest.approx(expected)


def test_each_phase_runs_its_own_schedule_counted_like_its_length():
    optim = OptimConfig(warmup_steps=2, decay="linear", min_lr_ratio=0.0)
    steps = PhaseSchedule(ScheduleConfig(generator_steps=10, discriminator_steps=4, joint_steps=6))
    assert steps.progress(0, 0) == (Phase.GENERATOR, 0, 10)
    assert steps.progress(11, 0) == (Phase.DISCRIMINATOR, 1, 4)
    assert steps.progress(14, 0) == (Phase.JOINT, 0, 6)
    assert steps.progress(20, 0) == (Phase.DONE, 0, 0)
    assert lr_factor(optim, *steps.progress(14, 0)[1:]) == 0.5  # the joint phase warms up again
    samples = PhaseSchedule(ScheduleConfig(generator_steps=10, discriminator_steps=4, joint_steps=6,
                                           unit="samples", reference_batch=8))
    assert samples.progress(3, 12 * 8 + 4) == (Phase.DISCRIMINATOR, 2.5, 4)


def test_the_trainer_sets_the_scheduled_rates_and_the_paper_recipes_keep_them_constant():
    from inpaint import recipes

    config = debug_config("schedule.generator_steps=6", "schedule.discriminator_steps=0", "schedule.joint_steps=2",
                          "optim.warmup_steps=2", "optim.decay=cosine", "optim.min_lr_ratio=0.5")
    trainer = Trainer(config, device="cpu")
    seen = []
    while not trainer.done:
        seen.append(trainer.g_optimizer.param_groups[0]["lr"] / config.optim.g_lr)
        trainer.train_step(synthetic_batch(config, trainer.step))
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75,
                                  0.5 + 0.25 * (1 + math.cos(3 * math.pi / 4)), 0.5, 1.0])
    for name in ("celeba", "lfw", "glcic"):
        optim = recipes.get(name).optim
        assert (optim.warmup_steps, optim.decay) == (0, "constant"), name
        assert recipes.get(name).model.ema_decay > 0
    with pytest.raises(ConfigError, match="optim.decay"):
        debug_config("optim.decay=step")
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        debug_config("optim.min_lr_ratio=2")
