"""Starting and stopping the Serve app on a local Ray (or the cluster in RAY_ADDRESS): jobs/serve.py and tests."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from typing import Callable

from cluster.console import serve_logging_config
from cluster.ray_runtime import ensure_ray
from cluster.serve import ServeOptions, build_app, with_gpu_defaults
from inpaint.errors import one_line

APP_NAME = "inpaint"
log = logging.getLogger("inpaint.serve")


class ServeError(RuntimeError):
    """The app could not start (a checkpoint that does not load, a port in use); the message is one line."""


def check_port_free(host: str, port: int) -> None:
    """A local proxy that cannot bind its port does not fail: Serve retries it forever. So look first."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


def start_app(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, gpu: bool = False, replicas: int = 1,
              verbose: bool = False, **options) -> str:
    """Deploy the app and wait until it answers; returns its base URL (``http://host:port``).

    The console shows our replicas' lines (:mod:`cluster.console`); ``verbose``: Ray's and Serve's too."""
    import os

    from ray import serve

    if not os.environ.get("RAY_ADDRESS"):
        check_port_free(host, port)
    ensure_ray(verbose)
    if gpu:
        options = with_gpu_defaults(options)
    app = build_app(ServeOptions(checkpoint=checkpoint, **options), replicas=replicas, gpu=gpu)
    try:
        quiet = serve_logging_config(verbose)
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    except Exception as exc:  # a replica's constructor failed, or the proxy could not bind
        raise ServeError(f"the app did not start: {one_line(exc, 500, remote=True)}") from None
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + 60
    while True:  # serve.run returns when replicas are up; the proxy may need a moment more
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
                if reply.status == 200:
                    return base
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the app started but {base}/healthz does not answer")
        time.sleep(0.25)


def stop_app() -> None:
    """Delete this app; its replicas finish the requests they hold.

    Only ours: on a cluster this driver joined (RAY_ADDRESS), other Serve apps keep running; when
    none is left, Serve itself stops too, so that the next start listens on its own --host/--port
    (a running Serve keeps its first HTTP options). A local Ray goes with ``ray.shutdown()`` after
    this; ``serve.shutdown()`` there would have the raylet report Serve's own controller task as
    failed on every clean exit (Ray 2.60).
    """
    import os

    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
        if os.environ.get("RAY_ADDRESS") and not serve.status().applications:
            serve.shutdown()
    except RayServeException:  # Serve never started (start_app failed before it): nothing to stop
        pass


def serve_forever(checkpoint: str, *, stop: threading.Event, announce: Callable[[str], None] = print,
                  host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until ``stop`` is set (Ctrl-C), then shut Serve and the local Ray down cleanly."""
    import ray

    try:
        base = start_app(checkpoint, host=host, port=port, **options)
        announce(f"serving {checkpoint}: open {base}/ (API docs: {base}/docs); Ctrl-C stops")
        stop.wait()
        announce("stopping")
    finally:
        if ray.is_initialized():
            try:
                stop_app()
            finally:
                ray.shutdown()
