"""Joining a Ray cluster, or starting a local one: shared by training and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_ray(verbose: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it), or start a local Ray.

    Ray's own messages reach the console at warning level, and the workers' output through
    :mod:`cluster.console`; ``verbose`` shows everything as Ray prints it.
    """
    import logging

    import ray

    from cluster.console import install_driver_filter

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Workers import the project from this checkout even when it is not pip-installed.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                           os.environ.get("PYTHONPATH")]))}}
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **quiet)
        install_driver_filter(verbose)
        return
    # The local default starts its own Ray even when another one runs on this machine (a second checkout,
    # a test): plain ray.init() would join the instance that the latest `ray start` recorded, and Ray
    # Train's helper actors (PlacementGroupCleaner) find the state API by looking at the machine, which
    # with several instances fails ("Found multiple active Ray instances") or finds the wrong one. So:
    # address="local", and the dashboard (the state API) on a port chosen here, named to every worker.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             runtime_env=runtime_env, log_to_driver=True, **quiet)
    install_driver_filter(verbose)
