"""Typed, validated run configuration.

One dataclass per concern, each checked in ``__post_init__`` so that a bad value fails at
construction with a one-line :class:`ConfigError` naming the field. ``Config.to_dict`` /
``Config.from_dict`` round-trip through JSON, and ``apply_overrides`` implements the
``--set section.field=value`` syntax shared by every entry point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line naming the field."""


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def _one_of(value: str, choices: tuple[str, ...], field_name: str) -> None:
    _check(value in choices, field_name, f"must be one of {', '.join(choices)}, got {value!r}")


# Integers beyond this are typos (1e30 steps, seeds, widths); floats must be finite. Every numeric
# field is held to both, on top of its own range, whether it came from --set, JSON or Python.
MAX_INT = 10**12


def _in_range(value: Any, low: float, high: float, field_name: str) -> None:
    """``low <= value <= high`` (and finite), or a one-line error naming the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    bounds = ", ".join(str(b) if isinstance(b, int) else f"{b:g}" for b in (low, high))
    _check(ok and low <= value <= high, field_name, f"must be in [{bounds}], got {value!r}")


# Upper (and lower) bounds beyond each section's own checks: values past these are typos or would
# exhaust memory or numerics long before they did anything useful. Checked by Config.__post_init__.
_SEED_RANGE = (0, 2**32 - 1)
_STEPS_RANGE = (0, 10**10)
RANGES: dict[str, tuple[float, float]] = {
    "model.image_size": (16, 2048), "model.local_size": (8, 2048), "model.gen_width": (1, 1024),
    "model.disc_width": (1, 1024), "model.fc_features": (1, 65536), "model.se_reduction": (1, 1024),
    "model.dilations": (1, 1024),
    "loss.adv_weight": (0, 1e6), "loss.cx_weight": (0, 1e6), "loss.hole_weight": (0, 1e6),
    "loss.cx_band_width": (0, 1e6), "loss.cx_eps": (0, 1), "loss.cx_chunk": (0, 65536),
    "mask.freeform_strokes": (1, 1000),
    "optim.g_lr": (0, 1), "optim.d_lr": (0, 1), "optim.weight_decay": (0, 1), "optim.grad_clip": (0, 1e9),
    "optim.warmup_steps": _STEPS_RANGE, "optim.min_lr_ratio": (0, 1),
    "model.ema_decay": (0, 1),
    "schedule.generator_steps": _STEPS_RANGE, "schedule.discriminator_steps": _STEPS_RANGE,
    "schedule.joint_steps": _STEPS_RANGE, "schedule.reference_batch": (1, 65536),
    "data.batch_size": (1, 65536), "data.num_workers": (0, 256), "data.seed": _SEED_RANGE,
    "runtime.seed": _SEED_RANGE,
    "checkpoint.every_steps": (0, 10**10), "checkpoint.every_minutes": (0, 10**6), "checkpoint.keep_last": (1, 10000),
    "log.every_steps": (1, 10**10), "log.image_every_steps": (1, 10**10), "log.image_count": (1, 256),
}


def _check_numbers(section: Any, prefix: str) -> None:
    """Every int/float field of a section is finite, within +-MAX_INT and within its RANGES entry."""
    for item in dataclasses.fields(section):
        name = f"{prefix}.{item.name}"
        values = getattr(section, item.name)
        for value in values if isinstance(values, tuple) else (values,):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            _check(math.isfinite(value) and abs(value) <= MAX_INT, name,
                   f"must be a finite number within +-{MAX_INT:.0e}, got {value!r}")
            if name in RANGES:
                _in_range(value, *RANGES[name], name)


BLOCK_KINDS = ("se_res", "res", "conv")
# paper: the SE-ResNet paper's networks (``block`` picks their blocks); glcic: Iizuka et al.'s networks
# as GLCIC-PyTorch builds them for CelebA (five 5x5 stride-2 convs in each discriminator);
# glcic_places2: the same with the sixth global conv of Iizuka et al.'s paper (GLCIC-PyTorch's --arc places2).
ARCHS = ("paper", "glcic", "glcic_places2")
OPTIMIZERS = ("adam", "adadelta")
LR_DECAYS = ("constant", "linear", "cosine")
MASK_KINDS = ("random", "center", "freeform", "mixed")
REC_MASKINGS = ("full", "hole", "weighted")
ADV_DISC_BN = ("train", "eval", "mixed")
PHASE_UNITS = ("iterations", "samples")
DEVICES = ("auto", "cpu", "cuda")
DDP_COMMS = ("fp32", "bf16")
VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


@dataclass
class ModelConfig:
    """Network sizes. Defaults are the paper's (160x160 image, 96x96 local patch)."""

    image_size: int = 160
    local_size: int = 96
    gen_width: int = 64  # channels after the generator's first conv; doubled at each downsampling
    disc_width: int = 64  # channels of the global discriminator's first conv
    fc_features: int = 1024  # each discriminator's FC output; the context head sees 2x this
    block: str = "se_res"  # se_res (paper), res (no SE), conv (plain strided conv, GLCIC)
    se_reduction: int = 16
    dilations: tuple[int, ...] = (2, 4, 8, 16)
    arch: str = "paper"  # paper, glcic, glcic_places2 (see ARCHS)
    # Stride of the last two layers of each discriminator. The paper says they keep the channel count
    # and does not state their stride: 1 reads it as keeping the size too (README, "Discriminator
    # stride"); 2 halves the size in every layer, as GLCIC does (arch=glcic* needs 2).
    disc_tail_stride: int = 1
    # Decay of the generator's exponential moving average (an averaged copy used by evaluation and
    # inference); 0 = off. Its half-life is ln 0.5 / ln(decay) generator steps (0.999: 693).
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.ema_decay < 1, "model.ema_decay", f"must be in [0, 1), got {self.ema_decay!r}")
        self.dilations = tuple(int(d) for d in self.dilations)
        _one_of(self.arch, ARCHS, "model.arch")
        _check(self.disc_tail_stride in (1, 2), "model.disc_tail_stride",
               f"must be 1 or 2, got {self.disc_tail_stride!r}")
        if self.arch != "paper":
            _check(self.block == "conv", "model.block",
                   f"arch={self.arch} builds plain convolutions: set model.block=conv, got {self.block!r}")
            _check(self.disc_tail_stride == 2, "model.disc_tail_stride",
                   f"arch={self.arch} strides 2 in every discriminator layer: set 2, got {self.disc_tail_stride}")
        _check(self.image_size >= 16 and self.image_size % 16 == 0, "model.image_size",
               f"must be a multiple of 16 and >= 16, got {self.image_size}")
        _check(self.local_size >= 8 and self.local_size % 8 == 0, "model.local_size",
               f"must be a multiple of 8 and >= 8, got {self.local_size}")
        _check(self.local_size <= self.image_size, "model.local_size",
               f"must not exceed model.image_size ({self.image_size}), got {self.local_size}")
        for name in ("gen_width", "disc_width", "fc_features", "se_reduction"):
            _check(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _one_of(self.block, BLOCK_KINDS, "model.block")
        _check(len(self.dilations) >= 1 and all(d >= 1 for d in self.dilations), "model.dilations",
               f"must be a non-empty list of positive ints, got {list(self.dilations)}")


@dataclass
class LossConfig:
    """Generator loss L_rec + adv_weight * L_adv + cx_weight * L_CX and its parts."""

    adv_weight: float = 0.0004  # lambda1 in the paper
    cx_weight: float = 0.004  # lambda2 in the paper; 0 disables VGG16 entirely (glcic)
    rec_masking: str = "hole"  # hole: mean L2 over hole pixels; full: over the whole raw output; weighted
    hole_weight: float = 1.0  # with rec_masking=weighted: weight of hole pixels vs 1 for known
    cx_band_width: float = 0.5
    cx_eps: float = 1e-5
    cx_layers: tuple[str, ...] = ("relu3_3",)
    # Images per chunk in the contextual loss: bounds its B x N x N memory. 0 (auto): the whole batch on
    # CUDA (one kernel per op instead of a loop per image), 1 on CPU (the least memory; a CPU gains
    # nothing from larger chunks). Memory or speed only: the loss is the same.
    cx_chunk: int = 0
    vgg_weights: str = "imagenet"  # imagenet (torchvision), a local/fsspec path, or random
    # How the discriminator's BatchNorm sees the generator's adversarial pass: "train" (batch
    # statistics of the completed images alone), "eval" (running statistics), "mixed" (real and
    # completed in one batch, as in the discriminator's own step). See README, "Discriminator BatchNorm".
    adv_disc_bn: str = "train"

    def __post_init__(self) -> None:
        self.cx_layers = tuple(str(x) for x in self.cx_layers)
        for name in ("adv_weight", "cx_weight", "hole_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", f"must be >= 0, got {getattr(self, name)}")
        _one_of(self.rec_masking, REC_MASKINGS, "loss.rec_masking")
        _one_of(self.adv_disc_bn, ADV_DISC_BN, "loss.adv_disc_bn")
        _check(self.cx_band_width > 0, "loss.cx_band_width", f"must be > 0, got {self.cx_band_width}")
        _check(self.cx_eps > 0, "loss.cx_eps", f"must be > 0, got {self.cx_eps}")
        _check(self.cx_chunk >= 0, "loss.cx_chunk", f"must be >= 0 (0: auto), got {self.cx_chunk}")
        _check(len(self.cx_layers) >= 1, "loss.cx_layers", "must name at least one VGG16 layer")
        for layer in self.cx_layers:
            _one_of(layer, VGG_LAYERS, "loss.cx_layers")
        _check(bool(self.vgg_weights), "loss.vgg_weights", "must be imagenet, random, or a path/URL")


@dataclass
class MaskConfig:
    """Training holes. Fractions are of the image side (rect) or area (freeform)."""

    kind: str = "random"
    min_side: float = 0.25  # random rect hole side, as a fraction of the image side
    max_side: float = 0.5  # clipped so the hole fits in the local patch
    center_area: float = 0.25  # centre hole area fraction (paper: 1/4 and 1/3)
    freeform_strokes: int = 4
    freeform_max_width: float = 0.1  # stroke width as a fraction of the image side

    def __post_init__(self) -> None:
        _one_of(self.kind, MASK_KINDS, "mask.kind")
        _check(0 < self.max_side <= 1, "mask.max_side", f"must be in (0, 1], got {self.max_side}")
        _check(0 < self.min_side <= self.max_side <= 1, "mask.min_side",
               f"need 0 < min_side <= max_side <= 1, got {self.min_side}, {self.max_side}")
        _check(0 < self.center_area < 1, "mask.center_area", f"must be in (0, 1), got {self.center_area}")
        _check(self.freeform_strokes >= 1, "mask.freeform_strokes", f"must be >= 1, got {self.freeform_strokes}")
        _check(0 < self.freeform_max_width <= 1, "mask.freeform_max_width",
               f"must be in (0, 1], got {self.freeform_max_width}")


@dataclass
class OptimConfig:
    """The optimizer of both networks: Adam (the paper) or Adadelta (GLCIC).

    With ``name=adadelta`` the learning rates scale Adadelta's step (torch's and GLCIC's default is
    1.0), its decay rate is torch's rho = 0.9, and beta1/beta2 are unused.
    """

    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    name: str = "adam"  # adam or adadelta
    # A step whose loss or gradients are not finite is skipped; this many skipped in a row (of one
    # network's steps) stop the run, naming the loss term: training has diverged.
    max_nonfinite_steps: int = 10
    # The learning rate within each phase (inpaint.phases.lr_factor): a linear warm-up over its first
    # warmup_steps (counted like the phase lengths), then constant, or a linear or cosine decay to
    # min_lr_ratio x the rate at the phase's end. Each phase starts its own warm-up and decay.
    warmup_steps: int = 0
    decay: str = "constant"  # constant, linear or cosine
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _one_of(self.name, OPTIMIZERS, "optim.name")
        _check(self.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps",
               f"must be >= 1, got {self.max_nonfinite_steps}")
        _one_of(self.decay, LR_DECAYS, "optim.decay")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        _check(self.g_lr > 0, "optim.g_lr", f"must be > 0, got {self.g_lr}")
        _check(self.d_lr > 0, "optim.d_lr", f"must be > 0, got {self.d_lr}")
        _check(0 <= self.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """The three phases: generator-only, discriminator-only, joint.

    With unit=iterations (default, the paper's) the lengths count optimizer steps whatever the
    world size. With unit=samples they count images seen, as lengths x reference_batch, so 8
    workers reach each boundary in 1/8 of the steps and do the same amount of training.
    """

    generator_steps: int = 90_000
    discriminator_steps: int = 10_000
    joint_steps: int = 400_000
    unit: str = "iterations"
    reference_batch: int = 12  # with unit=samples: images per paper iteration

    def __post_init__(self) -> None:
        for name in ("generator_steps", "discriminator_steps", "joint_steps"):
            _check(getattr(self, name) >= 0, f"schedule.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.generator_steps + self.discriminator_steps + self.joint_steps > 0,
               "schedule.joint_steps", "the three phases cannot all be empty")
        _one_of(self.unit, PHASE_UNITS, "schedule.unit")
        _check(self.reference_batch >= 1, "schedule.reference_batch", f"must be >= 1, got {self.reference_batch}")

    @property
    def total_steps(self) -> int:
        return self.generator_steps + self.discriminator_steps + self.joint_steps


@dataclass
class DataConfig:
    """Where shards come from and how batches are made."""

    url: str = ""  # fsspec URL of a dataset packed by jobs/make_shards.py (its index.json folder)
    train_split: str = "train"
    eval_split: str = "test"
    batch_size: int = 12  # per worker (per GPU)
    num_workers: int = 2  # DataLoader processes per training worker
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for name in ("train_split", "eval_split"):
            _check(bool(getattr(self, name).strip()), f"data.{name}", "must name a split of the dataset, got ''")
        # Training on the held-out images would make every evaluation meaningless.
        _check(self.train_split != self.eval_split, "data.train_split",
               f"must differ from data.eval_split ({self.eval_split!r}): evaluation uses held-out images")


@dataclass
class RuntimeConfig:
    """Device and numerics. bf16 / channels_last default to on where the device computes bf16
    natively: CUDA (Ampere+) or a CPU with AMX / AVX512-BF16 (inpaint.hardware)."""

    device: str = "auto"
    bf16: bool | None = None  # None: on where bf16 is native (CUDA, AMX / AVX512-BF16 CPUs), else off
    channels_last: bool | None = None  # None: as bf16
    compile: bool = False
    seed: int = 0
    # The gradients' dtype on the wire between DDP workers: fp32, or bf16 (torch's bf16_compress_hook:
    # half the bytes, each gradient rounded to bf16 before the average; README, "GPU training").
    ddp_comm: str = "fp32"

    def __post_init__(self) -> None:
        _one_of(self.device, DEVICES, "runtime.device")
        _one_of(self.ddp_comm, DDP_COMMS, "runtime.ddp_comm")


@dataclass
class CheckpointConfig:
    """When to checkpoint: every ``every_steps`` steps and/or every ``every_minutes`` of training
    (0 = off for either), and always at a phase boundary and at the end of the schedule."""

    every_steps: int = 1000
    # Wall-clock minutes between checkpoints, checked on logging steps (log.every_steps) so that the
    # ranks agree on when without a collective per step (inpaint.distributed.CheckpointCadence).
    every_minutes: float = 0.0
    keep_last: int = 3

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0 (0: off), got {self.every_steps}")
        _check(self.every_minutes >= 0, "checkpoint.every_minutes",
               f"must be >= 0 (0: off), got {self.every_minutes}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LogConfig:
    every_steps: int = 50
    image_every_steps: int = 1000
    image_count: int = 8
    # Debug/test hook: every rank writes the keys of the samples it trained on, per step, under
    # RUN/sample_keys/ (see cluster/sample_keys.py); the multi-node tests check them after resizes.
    sample_keys: bool = False

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.image_every_steps >= 1, "log.image_every_steps", f"must be >= 1, got {self.image_every_steps}")
        _check(self.image_count >= 1, "log.image_count", f"must be >= 1, got {self.image_count}")


@dataclass
class Config:
    recipe: str = "celeba"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if dataclasses.is_dataclass(getattr(self, item.name)):
                _check_numbers(getattr(self, item.name), item.name)
        # A hole larger than the local patch could not be seen whole by the local discriminator.
        _check(self.mask.max_side * self.model.image_size <= self.model.local_size, "mask.max_side",
               f"a {self.mask.max_side} x {self.model.image_size} px hole does not fit the "
               f"{self.model.local_size} px local patch; lower mask.max_side or raise model.local_size")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _from_dict(cls, data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def fixed_fields(self) -> dict[str, Any]:
        """Every field a resumed run must keep (see :data:`RESUMABLE`), flattened as ``section.field``."""
        return {name: value for name, value in _flat(self.to_dict()).items() if not resumable(name)}

    def digest(self) -> str:
        """Short hash of :meth:`fixed_fields`: equal digests mean a checkpoint of one resumes as the other."""
        return hashlib.sha256(json.dumps(self.fixed_fields(), sort_keys=True).encode()).hexdigest()[:12]

    def resume_changes(self, new: "Config") -> list[str]:
        """``field: old -> new`` for each field that ``new`` changes and a resumed run may not."""
        before, after = self.fixed_fields(), new.fixed_fields()
        return [f"{name}: {before.get(name)!r} -> {after.get(name)!r}" for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)]

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# The one rule for what a resumed run may change (the launcher refuses anything else before a
# worker starts; Trainer.load warns when a checkpoint differs elsewhere; Config.digest hashes the
# rest). It may change where the same data is read from and how fast, how often it logs and
# checkpoints, the device and its numerics (resuming a CPU run with --gpu; gradient communication
# and the contextual loss's chunking included: memory and speed, the same loss), and the length of
# the last (joint) phase. Anything else (the model, losses, masks, optimizer, the earlier phases, the
# batch size, seeds, splits) would make the checkpoint mean something else, or not load at all.
RESUMABLE: tuple[str, ...] = (
    "data.url", "data.num_workers", "checkpoint.*", "log.*",
    "runtime.device", "runtime.bf16", "runtime.channels_last", "runtime.compile", "runtime.ddp_comm",
    "loss.cx_chunk", "schedule.joint_steps", "optim.max_nonfinite_steps",
)


def resumable(name: str) -> bool:
    """Whether the field ``section.field`` may change when a run resumes (:data:`RESUMABLE`)."""
    return any(name == item or (item.endswith(".*") and name.startswith(item[:-1])) for item in RESUMABLE)


def _flat(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a JSON value or a command-line string into the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a comma-separated list, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], name) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        text = str(value).replace("_", "").strip()
        try:
            number = int(text)
        except ValueError:
            try:
                as_float = float(text)  # "1e3", "2.0"
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
            if not math.isfinite(as_float) or as_float != int(as_float):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            number = int(as_float)
        if abs(number) > MAX_INT:
            raise ConfigError(f"{name}: {value!r} is out of range (|value| <= {MAX_INT:.0e})")
        return number
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.field=value`` strings (``--set``) and re-validate the whole config."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1 and parts[0] == "recipe":
            raise ConfigError("recipe: choose a recipe with --recipe, not --set")
        if len(parts) != 2:
            raise ConfigError(f"{key}: expected section.field (e.g. optim.g_lr), got {key!r}")
        section, name = parts
        if section not in data or not isinstance(data[section], dict):
            sections = [k for k, v in data.items() if isinstance(v, dict)]
            raise ConfigError(f"{key}: unknown section {section!r} (known: {', '.join(sections)})")
        if name not in data[section]:
            raise ConfigError(f"{key}: unknown field (known in {section}: {', '.join(sorted(data[section]))})")
        data[section][name] = raw
    return Config.from_dict(data)
