"""Stopping our Serve app on a cluster shared with other apps (jobs/serve.py under RAY_ADDRESS).

Its own module: it needs a Ray of its own, and tests/test_serve.py keeps one Serve app running
for the whole module.
"""

from __future__ import annotations

import pytest

from tests.serve_harness import running_app


@pytest.mark.slow
@pytest.mark.ray
def test_stopping_the_app_leaves_other_serve_apps_on_a_shared_cluster(template_run, monkeypatch):
    """On a cluster jobs/serve.py joined, Ctrl-C must take down our app only, not everybody's Serve;
    the last app out stops Serve, so that the next start listens on its own --host and --port."""
    import ray
    import requests
    from ray import serve

    from cluster.serve_runtime import APP_NAME, stop_app

    @serve.deployment
    class Other:
        def __call__(self, request) -> str:
            return "still here"

    with running_app(str(template_run)) as base:
        serve.run(Other.bind(), name="other", route_prefix="/other")
        stop_app()
        applications = serve.status().applications
        assert APP_NAME not in applications and applications["other"].status == "RUNNING"
        assert requests.get(f"{base}/other", timeout=30).text == "still here"
        monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # as if joined
        serve.delete("other")
        serve.run(Other.bind(), name=APP_NAME, route_prefix="/")  # ours again, alone
        stop_app()
        controllers = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                       if "CONTROLLER" in actor["name"].upper()]
        assert controllers == [], controllers
        stop_app()  # nothing left to stop: quiet, not a RayServeException
