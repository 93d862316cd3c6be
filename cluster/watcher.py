"""``evaluate.py --watch``: evaluate every checkpoint of a run once, however many watchers poll it.

``watch`` evaluates every checkpoint of a run that has no metrics.json yet, oldest first (Ray's
retention deletes the oldest), and with an interval keeps polling until the latest checkpoint's
phase is ``done``. Concurrent watchers never evaluate one checkpoint twice: each first creates
``evaluations/<name>/CLAIM`` exclusively (:func:`inpaint.storage.create_exclusive`: ``O_EXCL``
locally, ``If-None-Match: *`` on S3); on S3 the claim is also re-read after a pause, for stores
that ignore the condition. The holder rewrites its claim every ``claim_timeout_s / 4`` while it
evaluates (:class:`ClaimHeartbeat`), so a claim not written for ``claim_timeout_s`` is a crashed
evaluator's, however long one evaluation takes; it is taken over by whoever first creates the
takeover marker named after that claim. A checkpoint that verifies but cannot be loaded gets an
``UNLOADABLE`` marker and is never retried. One evaluation is :mod:`cluster.evaluator`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.evaluator import EvaluationError, EvaluationRequest, evaluate_subject, load_subject
from inpaint import checkpoint as ckpt
from inpaint import evaluation as ev
from inpaint import storage
from inpaint.config import Config
from inpaint.errors import one_line
from inpaint.run_folder import CLAIM, CONFIG, UNLOADABLE, RunPaths, complete_checkpoints

log = logging.getLogger("inpaint.evaluate")

CLAIM_TIMEOUT_S = 600.0  # renewed every 150 s while held; a crashed pass's claims are free by the next
                         # CronJob tick (30 min): see k8s/base/evaluate-cronjob.yaml
CLAIM_SETTLE_S = 2.0


# ------------------------------------------------------------------ claims
def _claim_record(owner: str) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "claimed_at": time.time()}).encode()


def _holder(claim_url: str) -> str | None:
    document = storage.read_json(claim_url)
    return document.get("owner") if isinstance(document, dict) else None


def claim(folder: str, owner: str, *, timeout_s: float = CLAIM_TIMEOUT_S, settle_s: float = CLAIM_SETTLE_S) -> bool:
    """Whether ``owner`` now holds the claim on an evaluation folder (see the module doc)."""
    storage.makedirs(folder)
    claim_url = storage.join(folder, CLAIM)
    record = _claim_record(owner)
    if not storage.create_exclusive(claim_url, record):
        try:
            held = storage.read_bytes(claim_url)
            age = time.time() - storage.modified(claim_url)
        except storage.MissingObject:
            return False  # released just now; the next poll may take it
        if age < timeout_s:
            return False
        # Everyone who saw this stale claim races for one marker named after it; one wins.
        marker = f"{claim_url}.takeover-{hashlib.sha256(held).hexdigest()[:16]}"
        if not storage.create_exclusive(marker, record):
            return False
        log.warning("taking over %s, stale for %.0f s (%s)", claim_url, age, held.decode(errors="replace"))
        storage.write_bytes(claim_url, record)
    if storage.is_remote(folder):
        time.sleep(settle_s)  # a store that ignored If-None-Match keeps the last writer: check it is us
        if _holder(claim_url) != owner:
            return False
    return True


def release(folder: str) -> None:
    """Drop a claim so that a later poll can evaluate the folder's checkpoint again."""
    storage.remove(storage.join(folder, CLAIM))


def clear_claims(folder: str) -> None:
    """Remove the claim and every takeover marker once the folder's metrics.json (or UNLOADABLE)
    says it is done: they only matter while an evaluation runs, and must not be left behind."""
    for url in storage.list_files(folder):
        if storage.name(url) == CLAIM or storage.name(url).startswith(f"{CLAIM}.takeover-"):
            storage.remove(url)


class ClaimHeartbeat:
    """Renews a held claim every ``timeout_s / 4`` seconds from a background thread, until stopped.

    A claim is stale when its CLAIM file has not been written for ``timeout_s``; rewriting it while
    the evaluation runs means only a holder that died (or froze for a whole timeout) loses it, however
    long one evaluation takes. A renewal first re-reads the claim: one that another owner took over
    is left alone (``lost``). ``stop`` waits for a renewal in flight, so a release after it is final.
    Use as a context manager (stops on exit) around the work done under the claim.
    """

    def __init__(self, folder: str, owner: str, timeout_s: float):
        self.folder, self.owner = folder, owner
        self.every_s = max(timeout_s / 4, 0.001)
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"claim-heartbeat-{storage.name(folder)}",
                                        daemon=True)

    def __enter__(self) -> "ClaimHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:  # no renewal is half done once this returns
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    if not self._renew():
                        return
                except Exception as exc:  # a store hiccup: the next beat tries again, well within the timeout
                    log.warning("could not renew the claim on %s (%s)", self.folder, one_line(exc, typed=True))

    def _renew(self) -> bool:
        claim_url = storage.join(self.folder, CLAIM)
        holder = _holder(claim_url)
        if holder != self.owner:
            self.lost = True
            log.warning("the claim on %s is no longer ours (held by %s); stopped renewing it", self.folder, holder)
            return False
        storage.write_bytes(claim_url, _claim_record(self.owner))
        self.renewals += 1
        return True


# ------------------------------------------------------------------ watch
@dataclass
class WatchSummary:
    evaluated: list[str] = field(default_factory=list)  # checkpoint names, in order
    skipped: list[str] = field(default_factory=list)  # deleted before they could be evaluated
    unloadable: list[str] = field(default_factory=list)  # verified but could not be loaded; marked, not retried
    polls: int = 0
    finished: bool = False

    def describe(self) -> str:
        state = "run finished" if self.finished else "run not finished"
        return (f"watch: {state} after {self.polls} poll(s); evaluated {len(self.evaluated)} checkpoint(s)"
                + (f": {', '.join(self.evaluated)}" if self.evaluated else "")
                + (f"; skipped {len(self.skipped)} deleted: {', '.join(self.skipped)}" if self.skipped else "")
                + (f"; skipped {len(self.unloadable)} unloadable: {', '.join(self.unloadable)}"
                   if self.unloadable else ""))


def run_data_url(run_url: str) -> str:
    """data.url of the run's config.json, for a watcher given no --data."""
    try:
        document = storage.read_json(storage.join(run_url, CONFIG))
    except storage.StorageError as exc:  # no credentials, unreachable endpoint, no such bucket
        raise storage.StorageError(f"{run_url}: cannot be read ({exc})") from None
    if document is None:
        raise EvaluationError(f"{run_url}: no {CONFIG} to take the data URL from; pass --data")
    url = Config.from_dict(document).data.url
    if not url:
        raise EvaluationError(f"{run_url}/{CONFIG} names no data.url; pass --data")
    return url


def _list_checkpoints(run_url: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        checkpoints = complete_checkpoints(run_url)
    except storage.StorageError as exc:  # unreachable storage, bad credentials
        raise storage.StorageError(f"{run_url}: cannot be listed ({exc})") from None
    if not checkpoints:
        log.info("no checkpoint under %s yet", run_url)
    return checkpoints


def _done(folder: str) -> bool:
    return storage.exists(storage.join(folder, ev.METRICS_FILE)) or storage.exists(storage.join(folder, UNLOADABLE))


def _evaluate_claimed(checkpoint_url: str, folder: str, request: EvaluationRequest, summary: WatchSummary,
                      heartbeat: ClaimHeartbeat) -> None:
    """Evaluate a claimed checkpoint; a deleted one is skipped, an incomplete one released for later.

    ``heartbeat`` renews the claim meanwhile; it is stopped before any release, so that a renewal
    cannot recreate a released CLAIM.
    """
    name = storage.name(checkpoint_url)

    def release_claim() -> None:
        heartbeat.stop()
        release(folder)

    if _done(folder):  # finished by another watcher between our listing and our claim
        heartbeat.stop()
        clear_claims(folder)
        return
    try:
        subject = load_subject(checkpoint_url)
    except ckpt.UnloadableCheckpoint as exc:
        log.warning("skipping %s: %s", name, exc)
        storage.write_text(storage.join(folder, UNLOADABLE), f"{exc}\n")
        heartbeat.stop()
        clear_claims(folder)
        summary.unloadable.append(name)
        return
    except (ckpt.CheckpointError, storage.StorageError) as exc:
        if storage.exists(storage.join(checkpoint_url, ckpt.META_FILE)):
            log.warning("%s is not complete yet (%s); will retry on the next poll", name, exc)
            release_claim()
        else:
            log.warning("%s was deleted (checkpoint retention?) before it could be evaluated; skipped", name)
            summary.skipped.append(name)
        return
    try:
        result = evaluate_subject(subject, replace(request, output=folder), folder)
    except BaseException:
        release_claim()  # let a later poll, or another watcher, try again
        raise
    heartbeat.stop()
    clear_claims(folder)  # metrics.json marks it evaluated now
    log.info("%s", result.describe())
    summary.evaluated.append(name)


def watch(run_url: str, request: EvaluationRequest, *, interval: float | None = None, max_polls: int | None = None,
          claim_timeout_s: float = CLAIM_TIMEOUT_S, settle_s: float = CLAIM_SETTLE_S,
          owner: str | None = None) -> WatchSummary:
    """Evaluate each not yet evaluated checkpoint of a run; with ``interval``, poll until the run is done."""
    run = RunPaths.of(storage.normalize(run_url))
    if not request.data:
        request = replace(request, data=run_data_url(run.url))
    owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    summary = WatchSummary()
    while True:
        summary.polls += 1
        checkpoints = _list_checkpoints(run.url)
        for checkpoint_url, _ in checkpoints:
            folder = run.evaluation(storage.name(checkpoint_url))
            if _done(folder):
                continue
            if not claim(folder, owner, timeout_s=claim_timeout_s, settle_s=settle_s):
                log.info("%s is claimed by another evaluator; leaving it", storage.name(checkpoint_url))
                continue
            with ClaimHeartbeat(folder, owner, claim_timeout_s) as heartbeat:
                _evaluate_claimed(checkpoint_url, folder, request, summary, heartbeat)
        summary.finished = bool(checkpoints) and checkpoints[-1][1].get("phase") == "done"
        if interval is None or summary.finished or (max_polls is not None and summary.polls >= max_polls):
            return summary
        log.info("waiting %.0f s for new checkpoints of %s", interval, run.url)
        time.sleep(interval)
