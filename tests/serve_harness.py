"""A real Serve app on a local Ray for tests: ``with running_app(checkpoint_url) as base_url: ...``.

One app per module is the intended use (starting Ray and Serve costs ~15 s on 2 cores). The HTTP
port is a free one, never Serve's default 8000, so parallel checkouts do not collide.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoint_url: str, **options) -> Iterator[str]:
    """Start the app (options: ServeOptions fields, ``replicas``) and yield its base URL; Ray is shut down after."""
    import ray

    from cluster.serve_runtime import start_app, stop_app

    started_ray = not ray.is_initialized()
    try:
        yield start_app(str(checkpoint_url), port=free_port(), **options)
    finally:
        with contextlib.suppress(Exception):
            stop_app()
        if started_ray:
            ray.shutdown()


def debug_checkpoint(folder: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """A run folder with debug-recipe checkpoints at ``steps`` (a second or so each, no data, no Ray)."""
    import torch

    from inpaint import recipes
    from inpaint.masks import MaskSampler
    from inpaint.trainer import Trainer

    torch.manual_seed(0)
    config = recipes.get("debug")
    trainer = Trainer(config, device="cpu")
    sampler = MaskSampler(config.mask, config.model.image_size, config.model.local_size)
    generator = torch.Generator().manual_seed(0)
    size = config.model.image_size
    for _ in range(max(steps)):
        masks, boxes = sampler.batch(2, generator)
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
        trainer.train_step({"image": images, "mask": masks, "box": boxes})
        if trainer.step in steps:
            trainer.save(folder / f"checkpoint_{trainer.step:09d}")
    (folder / "config.json").write_text(config.to_json())
    return folder


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
