"""The one TensorBoard writer, the one image grid and the one way a hole is drawn, for training and evaluation.

TensorBoard folders live in the run (``RUN/tensorboard/``, local or in S3). Event files are
written to a local folder and mirrored to the run's storage on :meth:`EventWriter.sync`:
appending to an S3 object is not possible, and a local file that only syncs when asked keeps
the training step free of network calls. Training holds one :class:`RunWriter` on rank 0;
an evaluation writes its scalars through :func:`write_scalars` into a folder beside it.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from inpaint import storage
from inpaint.run_folder import RunPaths

HOLE = "white"  # how every grid shows the hole of a masked input: what a person paints in the page and masks


def show_hole(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` with its hole (mask < 0.5; mask 1 = known) painted white: 255 for uint8, 1.0 for float."""
    white = 255 if image.dtype == torch.uint8 else 1.0
    return torch.where(mask >= 0.5, image, torch.full_like(image, white))


def grid(rows: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """uint8 (3, H, W): one row per image, its tiles side by side (uint8 0-255 or float 0-1), white padding."""
    from torchvision.utils import make_grid

    tiles = [tile.float().div(255) if tile.dtype == torch.uint8 else tile.float().clamp(0, 1)
             for row in rows for tile in row]
    picture = make_grid(torch.stack([tile.cpu() for tile in tiles]), nrow=len(rows[0]), padding=2, pad_value=1.0)
    return picture.mul(255).round().to(torch.uint8)


def png_bytes(picture: torch.Tensor) -> bytes:
    """A uint8 (3, H, W) picture as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class EventWriter:
    """TensorBoard events for one folder URL: written locally, mirrored on :meth:`sync` when remote."""

    def __init__(self, url: str, *, sync_every_s: float = 30.0, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.url = url
        self.remote = storage.is_remote(url)
        self.local_dir = Path(tempfile.mkdtemp(prefix="inpaint-tb-")) if self.remote else Path(url)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.local_dir), flush_secs=flush_secs)
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)
        if time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def image(self, tag: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step)

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local_dir, self.url)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.writer.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_scalars(url: str, values: dict[str, float], step: int) -> None:
    """Scalars at one step into the TensorBoard folder at ``url`` (an evaluation's, beside training's)."""
    with EventWriter(url) as writer:
        writer.scalars(values, step)


class RunWriter(EventWriter):
    """Training's writer (rank 0): scalars, image grids (also saved as RUN/samples/step_*.png) and the
    run's skipped-samples record."""

    GRID_TAG = "images/masked|completed|original"

    def __init__(self, run: RunPaths, *, sync_every_s: float = 30.0):
        super().__init__(run.tensorboard, sync_every_s=sync_every_s)
        self.run = run
        self._skipped_written: list[str] | None = None

    def skipped_samples(self, keys: list[str], step: int) -> None:
        """The count of samples lost to damage as ``data/skipped_samples``; their keys in the run's
        ``skipped_samples.json`` (rewritten when the list grows; absent while nothing was lost)."""
        self.writer.add_scalar("data/skipped_samples", len(keys), step)
        if keys and keys != self._skipped_written:
            storage.write_text(self.run.skipped_samples, json.dumps({"step": step, "count": len(keys), "keys": keys},
                                                                    indent=1) + "\n")
            self._skipped_written = list(keys)

    def image_grid(self, masked: torch.Tensor, completed: torch.Tensor, original: torch.Tensor, step: int) -> str:
        """Rows of (masked | completed | original); also saved as samples/step_XXXXXXXX.png."""
        picture = grid(list(zip(masked, completed, original)))
        self.image(self.GRID_TAG, picture, step)
        target = self.run.sample(step)
        storage.write_bytes(target, png_bytes(picture))
        return target


def eval_scalars(document: dict[str, Any], key: str = "metrics") -> dict[str, float]:
    """``eval/<kind>/<metric>`` means of ``document[key]`` (``metrics`` or ``metrics_postprocessed``): the
    same tags in every folder, so TensorBoard draws the raw model, the post-processed model and each
    baseline as runs of one chart."""
    return {f"eval/{kind}/{name}": summary["mean"] for kind, figures in document[key].items()
            for name, summary in figures.items()}
