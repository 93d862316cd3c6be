"""A debug and test hook: which training samples each rank consumed at each step, in the run's storage.

Off by default. ``--set log.sample_keys=true`` makes every rank of every attempt (each start or
restart of the worker group) write, at each checkpoint report and just before it, the steps it
trained since its previous report:

    RUN/sample_keys/attempt-<A>/rank-<R>-of-<W>-to-<STEP>.json
    [{"step": 9, "epoch": 0, "samples_seen": 72, "phase": "discriminator", "keys": ["...", ...],
      "time": 1796230000.1}, ...]

(``samples_seen`` after the step, ``phase`` the step trained in, ``time`` when it ended.)

``A`` is rank 0's wall-clock start time in nanoseconds (broadcast to the group), so attempts sort
by start. Steps of an attempt that no checkpoint kept are trained again by the next attempt;
:func:`history` keeps, for each step, the records of the latest attempt that trained it: what the
final model actually learnt from. The files are written through the run's storage (local or
s3://), from whichever node a rank runs on, so a test or a user can check after node losses and
resizes that no sample of an epoch was consumed twice and none was skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from inpaint import storage
from inpaint.run_folder import RunPaths, parse_sample_key_file


def attempt_id() -> int:
    return time.time_ns()


@dataclass
class SampleKeyLog:
    """One rank's records since its last flush; ``flush`` writes them as one file."""

    run_url: str
    attempt: int
    rank: int
    world_size: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: int, samples_seen: int, phase: str, batch: dict[str, Any]) -> None:
        self.records.append({"step": int(step), "epoch": int(batch.get("epoch", 0)), "samples_seen": int(samples_seen),
                             "phase": phase, "keys": [str(key) for key in batch["key"]], "time": time.time()})

    def flush(self, step: int) -> None:
        if not self.records:
            return
        url = RunPaths.of(self.run_url).sample_key_file(self.attempt, self.rank, self.world_size, step)
        storage.write_bytes(url, json.dumps(self.records).encode())
        self.records = []


def read_all(run_url: str) -> list[dict[str, Any]]:
    """Every record written for the run, each with its ``attempt``, ``rank`` and ``world_size``."""
    found = []
    for path in storage.list_files(RunPaths.of(run_url).sample_keys):
        parsed = parse_sample_key_file(path)
        if parsed is None:
            continue
        attempt, rank, world_size = parsed
        for record in json.loads(storage.read_bytes(path)):
            found.append({**record, "attempt": attempt, "rank": rank, "world_size": world_size})
    return found


def history(records: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Step -> the records (one per rank, by rank) of the latest attempt that trained that step."""
    by_step: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).setdefault(record["attempt"], []).append(record)
    return {step: sorted(attempts[max(attempts)], key=lambda r: r["rank"])
            for step, attempts in sorted(by_step.items())}
