"""Evaluation claims are renewed while their holder works (issue 13): a live claim is never taken over.

With ``--claim-timeout`` shorter than one evaluation, a second watcher used to find the first
one's claim "stale" and evaluate the same checkpoint again. The holder now rewrites its CLAIM
every claim_timeout/4 seconds until it is done, so only a crashed holder's claim goes stale.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


from cluster import evaluator as cev
from cluster import watcher
from inpaint import run_folder
from tests.corruptions import NEW, OLD

TIMEOUT_S = 1.0  # far shorter than the slowed evaluation below


def test_a_renewed_claim_is_never_stale_and_a_stopped_one_goes_stale(tmp_path):
    folder = str(tmp_path / "evaluations" / OLD)
    assert watcher.claim(folder, "a", timeout_s=TIMEOUT_S)
    heartbeat = watcher.ClaimHeartbeat(folder, "a", TIMEOUT_S)
    with heartbeat:
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while time.monotonic() < deadline:
            assert not watcher.claim(folder, "b", timeout_s=TIMEOUT_S, settle_s=0.0)
            time.sleep(TIMEOUT_S / 5)
        assert heartbeat.renewals >= 4
    assert json.loads((Path(folder) / run_folder.CLAIM).read_text())["owner"] == "a"
    time.sleep(TIMEOUT_S * 1.5)  # stopped: the claim is a crashed holder's now
    assert watcher.claim(folder, "b", timeout_s=TIMEOUT_S, settle_s=0.0)


def test_a_heartbeat_does_not_overwrite_a_claim_someone_else_took(tmp_path):
    folder = str(tmp_path / "evaluations" / OLD)
    assert watcher.claim(folder, "a", timeout_s=TIMEOUT_S)
    with watcher.ClaimHeartbeat(folder, "a", TIMEOUT_S) as heartbeat:
        (Path(folder) / run_folder.CLAIM).write_text(json.dumps({"owner": "b"}))  # b took over (a was frozen)
        time.sleep(TIMEOUT_S)
        assert heartbeat.lost
    assert json.loads((Path(folder) / run_folder.CLAIM).read_text())["owner"] == "b"


def test_a_released_claim_is_not_recreated_by_its_heartbeat(tmp_path):
    folder = str(tmp_path / "evaluations" / OLD)
    assert watcher.claim(folder, "a", timeout_s=0.04)
    heartbeat = watcher.ClaimHeartbeat(folder, "a", 0.04)  # renews every 10 ms
    with heartbeat:
        time.sleep(0.1)
        heartbeat.stop()
        watcher.release(folder)
        time.sleep(0.1)
    assert not (Path(folder) / run_folder.CLAIM).exists()


def test_two_watchers_with_a_short_claim_timeout_evaluate_each_checkpoint_once(run, monkeypatch):
    evaluate = cev.evaluate_subject
    calls, lock = [], threading.Lock()

    def slow_evaluate(subject, request, output):
        name = subject.info["checkpoint"].rstrip("/").rsplit("/", 1)[-1]
        with lock:
            calls.append(name)
        if name == OLD:
            time.sleep(5 * TIMEOUT_S)  # much longer than the claim timeout: the other watcher keeps polling
        return evaluate(subject, request, output)

    monkeypatch.setattr(watcher, "evaluate_subject", slow_evaluate)
    start = threading.Barrier(2)
    summaries, errors = {}, []

    def watch_as(owner: str) -> None:
        start.wait()
        try:
            summaries[owner] = watcher.watch(str(run), cev.EvaluationRequest(num_images=2, device="cpu"),
                                             interval=0.2, max_polls=30, claim_timeout_s=TIMEOUT_S, settle_s=0.0,
                                             owner=owner)
        except BaseException as exc:  # noqa: BLE001  (reported below, not lost in the thread)
            errors.append(exc)

    threads = [threading.Thread(target=watch_as, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(calls) == [OLD, NEW], calls  # none twice, none missed
    assert sorted(summaries["a"].evaluated + summaries["b"].evaluated) == [OLD, NEW]
    for name in (OLD, NEW):
        assert (run / "evaluations" / name / "metrics.json").is_file()
        assert not list((run / "evaluations" / name).glob(f"{run_folder.CLAIM}.takeover-*"))  # nobody took over


def test_a_claim_in_s3_is_renewed_too(s3_bucket):
    timeout_s = 3.0  # S3 keeps LastModified to the second: a claim's age reads up to 1 s high
    folder = f"{s3_bucket}/run/evaluations/{OLD}"
    assert watcher.claim(folder, "a", timeout_s=timeout_s, settle_s=0.0)
    with watcher.ClaimHeartbeat(folder, "a", timeout_s) as heartbeat:
        deadline = time.monotonic() + 2 * timeout_s
        while time.monotonic() < deadline:
            assert not watcher.claim(folder, "b", timeout_s=timeout_s, settle_s=0.0)
            time.sleep(0.5)
        assert heartbeat.renewals >= 4 and not heartbeat.lost
    time.sleep(timeout_s * 1.5)
    assert watcher.claim(folder, "b", timeout_s=timeout_s, settle_s=0.0)
