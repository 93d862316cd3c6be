"""Every numeric config field is finite and in range at config time (issue 13), however it arrives."""

from __future__ import annotations

import dataclasses
import json

import pytest

from inpaint import recipes
from inpaint.config import RANGES, Config, ConfigError, OptimConfig, apply_overrides


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=inf", r"^data.batch_size: expected an integer, got 'inf'$"),
    ("data.batch_size=nan", r"^data.batch_size: expected an integer, got 'nan'$"),
    ("data.batch_size=-inf", r"^data.batch_size: expected an integer"),
    ("data.batch_size=1e9", r"^data.batch_size: must be in \[1, 65536\]"),
    ("schedule.joint_steps=1e400", r"^schedule.joint_steps: expected an integer"),
    ("schedule.joint_steps=1e30", r"^schedule.joint_steps: .*out of range"),
    ("runtime.seed=1e30", r"^runtime.seed: .*out of range"),
    ("runtime.seed=-1", r"^runtime.seed: must be in \[0, 4294967295\]"),
    ("data.seed=4294967296", r"^data.seed: must be in"),
    ("optim.g_lr=inf", r"^optim.g_lr: expected a finite number, got 'inf'$"),
    ("optim.d_lr=nan", r"^optim.d_lr: expected a finite number"),
    ("optim.g_lr=1e400", r"^optim.g_lr: expected a finite number"),
    ("optim.g_lr=5", r"^optim.g_lr: must be in \[0, 1\]"),
    ("optim.beta1=nan", r"^optim.beta1: expected a finite number"),
    ("loss.adv_weight=inf", r"^loss.adv_weight: expected a finite number"),
    ("loss.cx_band_width=1e-400", r"^loss.cx_band_width: must be > 0"),
    ("mask.min_side=nan", r"^mask.min_side: expected a finite number"),
    ("model.gen_width=1e6", r"^model.gen_width: must be in \[1, 1024\]"),
    ("model.image_size=99999984", r"^model.image_size: must be in"),
    ("model.dilations=2,1e400", r"^model.dilations: expected an integer"),
    ("model.dilations=2,100000", r"^model.dilations: must be in"),
    ("checkpoint.every_steps=0.5", r"^checkpoint.every_steps: expected an integer"),
    ("log.image_count=100000", r"^log.image_count: must be in"),
    ("data.num_workers=1e5", r"^data.num_workers: must be in"),
    ("data.batch_size=", r"^data.batch_size: expected an integer"),
])
def test_bad_numbers_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(recipes.get("celeba"), [override])
    assert "\n" not in str(info.value)


def test_ordinary_numbers_still_parse():
    cfg = apply_overrides(recipes.get("celeba"), ["data.batch_size=1e3", "schedule.joint_steps=1_000",
                                                  "optim.g_lr=1e-4", "runtime.seed=4294967295"])
    assert (cfg.data.batch_size, cfg.schedule.joint_steps, cfg.optim.g_lr) == (1000, 1000, 1e-4)


def test_every_recipe_is_within_the_ranges():
    for name in recipes.names():
        recipes.get(name)  # validated on construction


def test_ranges_name_real_fields():
    fields = {f"{section.name}.{item.name}" for section in dataclasses.fields(Config) if section.name != "recipe"
              for item in dataclasses.fields(section.default_factory())}
    assert set(RANGES) <= fields


@pytest.mark.parametrize("text", ["Infinity", "NaN", "1e400"])
def test_saved_configs_with_non_finite_numbers_are_rejected(text):
    raw = recipes.get("debug").to_json().replace('"g_lr": 0.0002', f'"g_lr": {text}')
    with pytest.raises(ConfigError, match="optim.g_lr"):
        Config.from_dict(json.loads(raw))


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="optim.g_lr"):
        Config(optim=OptimConfig(g_lr=float("inf")))
    with pytest.raises(ConfigError, match="optim.g_lr"):
        Config(optim=OptimConfig(g_lr=float("nan")))
