"""Rank-0 TensorBoard writer that lives next to the run's checkpoints, local or in S3.

Event files are written to a local folder and mirrored to the run's storage on every flush:
appending to an S3 object is not possible, and a local file that only syncs when asked keeps
the training step free of network calls.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from inpaint import storage
from inpaint.run_folder import RunPaths


class RunWriter:
    """Scalars, image grids and sample PNGs for one run; call ``sync`` to publish them."""

    def __init__(self, run: RunPaths, *, sync_every_s: float = 30.0):
        self.run = run
        self.remote = storage.is_remote(run.tensorboard)
        self.local_dir = Path(tempfile.mkdtemp(prefix="inpaint-tb-")) if self.remote else Path(run.tensorboard)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.local_dir), flush_secs=10)
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._skipped_written: list[str] | None = None

    def skipped_samples(self, keys: list[str], step: int) -> None:
        """The count of samples lost to damage as ``data/skipped_samples``; their keys in the run's
        ``skipped_samples.json`` (rewritten when the list grows; absent while nothing was lost)."""
        self.writer.add_scalar("data/skipped_samples", len(keys), step)
        if keys and keys != self._skipped_written:
            storage.write_text(self.run.skipped_samples, json.dumps({"step": step, "count": len(keys), "keys": keys},
                                                                    indent=1) + "\n")
            self._skipped_written = list(keys)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)
        if time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def image_grid(self, masked: torch.Tensor, completed: torch.Tensor, original: torch.Tensor, step: int) -> str:
        """Rows of (masked | completed | original); also saved as samples/step_XXXXXXXX.png."""
        triplets = torch.stack([masked, completed, original], dim=1).flatten(0, 1).float().clamp(0, 1).cpu()
        grid = make_grid(triplets, nrow=3, padding=2)
        self.writer.add_image("images/masked|completed|original", grid, step)
        target = self.run.sample(step)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "grid.png"
            save_image(grid, png)
            storage.put_file(png, target)
        return target

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local_dir, self.run.tensorboard)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.writer.close()
