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

    from ray import serve

    started_ray = not ray.is_initialized()
    # A replica's line per request reaches this process through Ray's log thread, after pytest stopped
    # capturing the test that sent it: it would land in the progress dots. jobs/serve.py's test checks them.
    options.setdefault("log_requests", False)
    try:
        yield start_app(str(checkpoint_url), port=free_port(), **options)
    finally:
        with contextlib.suppress(Exception):
            stop_app()
        if started_ray:
            ray.shutdown()
        else:  # a Ray that outlives this app: the next app's Serve must listen on its own port
            with contextlib.suppress(Exception):
                serve.shutdown()


def debug_checkpoint(folder: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """A run folder with debug-recipe checkpoints at ``steps``, trained at batch 2 (tests/cli_harness.py)."""
    from tests.cli_harness import train_debug_run

    return train_debug_run(folder, save_at=steps, batch_size=2)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
