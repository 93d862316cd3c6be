"""Checkpoints as plain directories: save to and load from a local folder, nothing else.

Layout of one checkpoint directory::

    generator.safetensors       generator weights (all inference needs)
    generator_ema.safetensors   the generator's moving average (model.ema_decay > 0), what inference uses
    discriminator.safetensors   context discriminator weights
    trainer.pt                  optimizers, step, samples seen, RNG, data position
    config.json                 the resolved config the run was trained with
    meta.json                   step, phase, config digest, file sizes and sha256 -- written LAST

``meta.json`` is the completion marker: a directory without it, or whose files do not
match the sizes and digests it records, is incomplete and is never resumed from.
Everything loads without unpickling code: safetensors for weights and
``torch.load(weights_only=True)`` for the trainer state, so a checkpoint from someone else
cannot run code on load.

Finding a run folder's checkpoints is :mod:`inpaint.run_folder`'s (it owns the run layout);
moving folders between storage and Ray is the caller's business (``cluster/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from inpaint import __version__
from inpaint.config import Config, ConfigError
from inpaint.errors import one_line

META_FILE = "meta.json"
CONFIG_FILE = "config.json"
GENERATOR_FILE = "generator.safetensors"
EMA_FILE = "generator_ema.safetensors"  # absent from checkpoints trained without model.ema_decay
DISCRIMINATOR_FILE = "discriminator.safetensors"
TRAINER_FILE = "trainer.pt"
FORMAT_VERSION = 1
INFERENCE_FILES = (GENERATOR_FILE, CONFIG_FILE)



class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or from an incompatible format."""


class UnloadableCheckpoint(CheckpointError):
    """A checkpoint whose files match its meta.json but that cannot be loaded (truncated weights
    rehashed, a config edited to another model, a meta.json of the wrong shape). Unlike an
    incomplete one it will not get better by waiting: skip it and use an older checkpoint."""


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, loaded into memory (tensors on CPU)."""

    config: Config
    meta: dict[str, Any]
    generator: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor] | None
    trainer: dict[str, Any] | None
    generator_ema: dict[str, torch.Tensor] | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage (channels_last weights are).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    config: Config,
    generator: dict[str, torch.Tensor],
    discriminator: dict[str, torch.Tensor] | None,
    trainer: dict[str, Any] | None,
    meta: dict[str, Any],
    generator_ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed); ``meta.json`` goes last."""
    for label, state in (("generator", generator), ("discriminator", discriminator or {})):
        for key, value in state.items():
            # One pass over the weights per checkpoint: NaN weights would be resumed from and evaluated.
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"not saving a checkpoint at step {meta.get('step')}: "
                                      f"{label} weight {key} is not finite")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # a rewrite is incomplete until its new meta lands
    save_file(_contiguous_cpu(generator), str(out / GENERATOR_FILE))
    files = [GENERATOR_FILE]
    if generator_ema is not None:
        save_file(_contiguous_cpu(generator_ema), str(out / EMA_FILE))
        files.append(EMA_FILE)
    if discriminator is not None:
        save_file(_contiguous_cpu(discriminator), str(out / DISCRIMINATOR_FILE))
        files.append(DISCRIMINATOR_FILE)
    if trainer is not None:
        torch.save(trainer, out / TRAINER_FILE)
        files.append(TRAINER_FILE)
    _write_json(out / CONFIG_FILE, config.to_dict())
    files.append(CONFIG_FILE)
    full_meta = {
        **meta,
        "format": FORMAT_VERSION,
        "inpaint_version": __version__,
        "recipe": config.recipe,
        "config_digest": config.digest(),
        "saved_at": time.time(),
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)} for name in files},
    }
    _write_json(out / META_FILE, full_meta)
    return out


def check_meta_shape(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` if it is a meta.json document of the right shape, else UnloadableCheckpoint."""
    if not isinstance(meta, dict):
        raise UnloadableCheckpoint(f"{where}: {META_FILE} is a {type(meta).__name__}, not an object")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise UnloadableCheckpoint(f"{where}: {META_FILE} 'files' is not a map of name -> {{bytes, sha256}}")
    if not isinstance(meta.get("step", 0), int) or isinstance(meta.get("step"), bool):
        raise UnloadableCheckpoint(f"{where}: {META_FILE} 'step' is not an integer")
    return meta


META_LIMIT = 16 << 20  # a meta.json is a few KiB; a huge one is not ours


def _own_file(directory: str | os.PathLike, name: str) -> None:
    """CheckpointError unless ``directory/name`` is missing or a regular file inside ``directory``.

    A name with a folder in it, a link that leads out of the folder, or a FIFO (which would block
    whoever opens it) is refused before anything reads it.
    """
    root = os.path.realpath(directory)
    path = os.path.join(directory, name)
    if os.path.dirname(os.path.normpath(name)) or not os.path.lexists(path):
        if os.path.dirname(os.path.normpath(name)):
            raise UnloadableCheckpoint(f"{directory}: {META_FILE} lists {name!r}, which is not a file name")
        return
    if os.path.dirname(os.path.realpath(path)) != root:
        raise UnloadableCheckpoint(f"{path}: a link out of its checkpoint folder; refusing to read it")
    if not os.path.isfile(path):
        raise UnloadableCheckpoint(f"{path}: not a regular file; refusing to read it")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    _own_file(directory, META_FILE)
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {META_FILE})")
    if path.stat().st_size > META_LIMIT:
        raise UnloadableCheckpoint(f"{path}: larger than a {META_FILE} can be ({path.stat().st_size} bytes)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({one_line(exc)})") from None
    return check_meta_shape(meta, str(directory))


def verify_checkpoint(directory: str | os.PathLike, *, checksums: bool = True,
                      files: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Return the meta of a complete checkpoint, or raise CheckpointError saying what is wrong.

    ``files`` limits the check to the files a caller will read (inference needs only the
    generator and config, ~5% of a paper-size checkpoint); by default every recorded file.
    """
    meta = read_meta(directory)
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    recorded = meta.get("files", {})
    for name in files if files is not None else tuple(recorded):
        expected = recorded.get(name)
        path = Path(directory) / name
        _own_file(directory, name)
        if expected is None or not path.is_file():
            raise CheckpointError(f"{directory}: incomplete checkpoint, {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{directory}: incomplete checkpoint, {name} has the wrong size")
        try:
            digest = _sha256(path) if checksums else None
        except OSError as exc:  # not readable by this user, an I/O error
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror or one_line(exc)})") from None
        if checksums and digest != expected["sha256"]:
            raise CheckpointError(f"{directory}: corrupt checkpoint, {name} fails its sha256")
    return meta


def inference_files(meta: dict[str, Any]) -> tuple[str, ...]:
    """What inference reads of a checkpoint with this meta.json: INFERENCE_FILES and the average, if any."""
    return (*INFERENCE_FILES, *((EMA_FILE,) if EMA_FILE in meta.get("files", {}) else ()))


def load_checkpoint(directory: str | os.PathLike, *, weights_only: bool = False) -> CheckpointContents:
    """Load a verified checkpoint; ``weights_only`` reads (and needs) only the generator(s) and config."""
    meta = verify_checkpoint(directory, files=inference_files(read_meta(directory)) if weights_only else None)
    root = Path(directory)
    # From here on the files are the ones meta.json records: a failure is UnloadableCheckpoint.
    try:
        config = Config.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    except (OSError, ConfigError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnloadableCheckpoint(f"{root / CONFIG_FILE}: invalid config ({one_line(exc)})") from None

    def weights(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(root / name))
        except Exception as exc:  # SafetensorError (truncated, garbage), OSError
            raise UnloadableCheckpoint(f"{root / name}: unreadable weights ({one_line(exc)})") from None

    generator = weights(GENERATOR_FILE)
    generator_ema = weights(EMA_FILE) if EMA_FILE in meta.get("files", {}) else None
    discriminator = trainer = None
    if not weights_only:
        if (root / DISCRIMINATOR_FILE).is_file():
            discriminator = weights(DISCRIMINATOR_FILE)
        if (root / TRAINER_FILE).is_file():
            try:
                trainer = torch.load(root / TRAINER_FILE, map_location="cpu", weights_only=True)
            except Exception as exc:  # an unpickling refusal is a corrupt or hostile file
                raise UnloadableCheckpoint(f"{root / TRAINER_FILE}: cannot be loaded safely "
                                           f"({one_line(exc)})") from None
            if not isinstance(trainer, dict):
                raise UnloadableCheckpoint(f"{root / TRAINER_FILE}: not a trainer state")
    return CheckpointContents(config=config, meta=meta, generator=generator,
                              discriminator=discriminator, trainer=trainer, generator_ema=generator_ema)
