"""Configs: the recipes hold the paper's settings, overrides and saved configs are checked on
construction, and every numeric field is finite and in range however it arrives (one-line errors)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from inpaint import recipes
from inpaint.config import RANGES, Config, ConfigError, OptimConfig, apply_overrides


def test_paper_recipes_hold_the_papers_settings():
    celeba, lfw = recipes.get("celeba"), recipes.get("lfw")
    for cfg in (celeba, lfw):
        assert (cfg.model.image_size, cfg.model.local_size) == (160, 96)
        assert (cfg.schedule.generator_steps, cfg.schedule.discriminator_steps, cfg.schedule.joint_steps) == (
            90_000, 10_000, 400_000)
        assert cfg.loss.adv_weight == 0.0004 and cfg.loss.cx_weight == 0.004
        assert cfg.model.block == "se_res" and cfg.model.disc_width == 64 and cfg.model.fc_features == 1024
    assert celeba.data.batch_size == 12 and lfw.data.batch_size == 16


def test_glcic_recipe_is_glcics_networks_and_optimizer_in_our_system():
    glcic, celeba = recipes.get("glcic"), recipes.get("celeba")
    assert glcic.model.block == "conv" and glcic.loss.cx_weight == 0
    assert glcic.model.arch == "glcic" and glcic.model.disc_tail_stride == 2
    assert (glcic.optim.name, glcic.optim.g_lr, glcic.optim.d_lr) == ("adadelta", 1.0, 1.0)
    assert glcic.schedule == celeba.schedule and glcic.loss.adv_weight == celeba.loss.adv_weight
    assert glcic.data == celeba.data and glcic.mask == celeba.mask


def test_paper_recipes_read_the_discriminator_tail_as_stride_one_with_adam():
    for name in ("celeba", "lfw"):
        cfg = recipes.get(name)
        assert (cfg.model.arch, cfg.model.disc_tail_stride, cfg.optim.name) == ("paper", 1, "adam")
    assert apply_overrides(recipes.get("celeba"), ["model.disc_tail_stride=2"]).model.disc_tail_stride == 2


def test_recipes_are_fresh_objects():
    a = recipes.get("debug")
    a.data.batch_size = 99
    assert recipes.get("debug").data.batch_size != 99


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*celeba"):
        recipes.get("nope")


def test_round_trip_through_json():
    cfg = apply_overrides(recipes.get("debug"), ["model.dilations=1,3", "runtime.bf16=true"])
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.model.dilations == (1, 3) and again.runtime.bf16 is True


@pytest.mark.parametrize("override,message", [
    ("optim.g_lr=-1", r"^optim.g_lr: must be > 0"),
    ("optim.g_lr=fast", r"^optim.g_lr: expected a number"),
    ("model.image_size=100", r"^model.image_size: must be a multiple of 16"),
    ("model.block=dense", r"^model.block: must be one of se_res, res, conv"),
    ("data.batch_size=0", r"^data.batch_size: must be >= 1"),
    ("model.nope=1", r"^model.nope: unknown field"),
    ("nosection.x=1", r"^nosection.x: unknown section"),
    ("optim", r"expected section.field=value"),
    ("runtime.bf16=maybe", r"^runtime.bf16: expected true or false"),
    ("loss.cx_layers=relu9_9", r"^loss.cx_layers: must be one of"),
    ("mask.max_side=0.9", r"^mask.max_side: .*does not fit"),
    ("model.disc_tail_stride=3", r"^model.disc_tail_stride: must be 1 or 2"),
    ("model.arch=vgg", r"^model.arch: must be one of paper, glcic, glcic_places2"),
    ("model.arch=glcic", r"^model.block: arch=glcic builds plain convolutions"),
    ("optim.name=sgd", r"^optim.name: must be one of adam, adadelta"),
    # numbers: finite and in range however they are written (issue 13)
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
def test_bad_overrides_give_one_line_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(recipes.get("celeba"), [override])
    assert "\n" not in str(info.value)


def test_glcic_arch_needs_stride_two_tails():
    with pytest.raises(ConfigError, match=r"^model.disc_tail_stride: arch=glcic strides 2"):
        apply_overrides(recipes.get("glcic"), ["model.disc_tail_stride=1"])


def test_configs_saved_before_arch_and_optimizer_fields_load_as_the_paper_with_adam():
    data = recipes.get("celeba").to_dict()
    del data["model"]["arch"], data["model"]["disc_tail_stride"], data["optim"]["name"]
    cfg = Config.from_dict(data)
    assert (cfg.model.arch, cfg.model.disc_tail_stride, cfg.optim.name) == ("paper", 1, "adam")


def test_unknown_field_in_a_saved_config_is_rejected():
    data = recipes.get("debug").to_dict()
    data["optim"]["momentum"] = 0.9
    with pytest.raises(ConfigError, match="optim.momentum: unknown field"):
        Config.from_dict(data)


def test_digest_ignores_paths_and_logging_but_not_the_model():
    base = recipes.get("celeba")
    assert apply_overrides(base, ["data.url=s3://x/y", "log.every_steps=7"]).digest() == base.digest()
    assert apply_overrides(base, ["model.gen_width=32"]).digest() != base.digest()
    assert apply_overrides(base, ["data.batch_size=4"]).digest() != base.digest()  # a resume may not change it


@pytest.mark.parametrize("name", ["celeba", "lfw", "quickstart"])
def test_training_recipes_draw_holes_as_large_as_every_evaluated_hole(name):
    from inpaint.masks import EVALUATION_MASK_KINDS, uncovered_evaluation_holes

    config = recipes.get(name)
    assert uncovered_evaluation_holes(config.mask, config.model.image_size, config.model.local_size) == []
    # and the check can fail: a recipe drawing only small holes leaves the large kinds uncovered
    small = type(config.mask)(min_side=0.1, max_side=0.3)
    uncovered = uncovered_evaluation_holes(small, config.model.image_size, config.model.local_size)
    assert "center_1/3" in uncovered and "center_1/4" in uncovered and set(uncovered) <= set(EVALUATION_MASK_KINDS)


def test_quickstart_is_the_papers_networks_small_and_debug_stays_tiny():
    quick, debug = recipes.get("quickstart"), recipes.get("debug")
    assert quick.model.block == "se_res" and quick.model.arch == "paper"
    assert quick.model.image_size == 64 and quick.schedule.generator_steps > 0
    assert quick.schedule.discriminator_steps > 0 and quick.schedule.joint_steps > 0
    assert debug.model.image_size == 32 and debug.schedule.total_steps <= 32


# ------------------------------------------------------------------ numeric ranges
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
