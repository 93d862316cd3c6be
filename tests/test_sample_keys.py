"""The sample-key debug hook (cluster/sample_keys.py): what it writes, and which records count."""

from __future__ import annotations

from cluster.sample_keys import SampleKeyLog, history, read_all


def batch(*keys: str, epoch: int = 0) -> dict:
    return {"key": list(keys), "epoch": epoch}


def test_records_round_trip_through_the_run_folder_and_flush_only_what_is_new(tmp_path):
    run = str(tmp_path / "run")
    log = SampleKeyLog(run, attempt=5, rank=1, world_size=2)
    log.add(1, 8, "generator", batch("a", "b"))
    log.add(2, 16, "generator", batch("c", "d"))
    log.flush(2)
    log.flush(3)  # nothing new: no file
    records = read_all(run)
    assert [(r["step"], r["keys"], r["attempt"], r["rank"], r["world_size"], r["samples_seen"]) for r in records] == [
        (1, ["a", "b"], 5, 1, 2, 8), (2, ["c", "d"], 5, 1, 2, 16)]
    assert len(list((tmp_path / "run" / "sample_keys" / "attempt-5").iterdir())) == 1


def test_history_keeps_for_each_step_the_latest_attempt_that_trained_it(tmp_path):
    run = str(tmp_path / "run")
    # Attempt 1 (2 ranks) trained steps 1-3 but only its checkpoint at step 2 survived; attempt 2 (1 rank)
    # resumed from step 2 and trained step 3 again, on other samples.
    for rank in (0, 1):
        first = SampleKeyLog(run, attempt=1, rank=rank, world_size=2)
        for step in (1, 2, 3):
            first.add(step, step * 8, "generator", batch(f"s{step}r{rank}"))
        first.flush(3)
    second = SampleKeyLog(run, attempt=2, rank=0, world_size=1)
    second.add(3, 20, "generator", batch("x"))
    second.add(4, 24, "generator", batch("y"))
    second.flush(4)
    kept = history(read_all(run))
    assert {step: [(r["attempt"], r["rank"], r["keys"]) for r in records] for step, records in kept.items()} == {
        1: [(1, 0, ["s1r0"]), (1, 1, ["s1r1"])],
        2: [(1, 0, ["s2r0"]), (1, 1, ["s2r1"])],
        3: [(2, 0, ["x"])],
        4: [(2, 0, ["y"])],
    }
