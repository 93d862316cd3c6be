"""Node loss on a local multi-node Ray cluster: time from the loss to the first step trained again,
and the steps lost, for a fixed-size and an elastic run (and, for the elastic run, the same for
growing back onto a new node).

    python benchmarks/node_loss.py                 # Ray Train's own timeouts, as a user gets them
    python benchmarks/node_loss.py --start-timeout 20

The cluster is the one the multi-node tests use (cluster/local_cluster.py): a head without CPUs
plus three worker nodes of one CPU each, all on this machine, so every training worker has a node
of its own; the run is the `debug` recipe submitted with `ray job submit`, checkpointing every 4 steps, to a local folder.
A node is removed by SIGKILL to all its processes at once (raylet, agents, the worker on it).

- "loss -> next step": from the kill to the end of the first step the new group trained
  (the sample-key records' clock, ``--set log.sample_keys=true``).
- "steps lost": the highest step the group reached before the loss (rank 0's log; rank 0 is on a
  node that survives) minus the step the new group resumed from: the work done again.
- For the elastic run's growth, "add -> next step" runs from the moment the new node's
  ``ray start`` returned.

Both runs are stopped with ``ray job stop`` once the figures are in.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import sample_keys  # noqa: E402
from cluster.local_cluster import LocalCluster  # noqa: E402

EVERY = 4
COMMON = ["--recipe", "debug", "--no-evaluate", "--max-failures", "3", "--verbose", "--set", f"checkpoint.every_steps={EVERY}",
          "--set", "schedule.joint_steps=100000", "--set", "log.sample_keys=true", "--set", "log.every_steps=1"]


def placements(text: str) -> list[tuple[int, int, int]]:
    return [(int(p), int(r), int(w)) for p, r, w in re.findall(r"pid=(\d+)[^)]*\).*? rank (\d+) of (\d+) on node", text)]


def last_step_of(text: str, pid: int) -> int:
    steps = [int(s) for s in re.findall(rf"pid={pid}[^)]*\)\S* \[inpaint\] step (\d+)/", text)]
    return max(steps) if steps else 0


def resumed(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+: step (\d+)", text)]


def first_step_time(run: str, after_attempt: int) -> tuple[int, float, int]:
    """(attempt, wall time of its first trained step, its world size) of the first attempt after ``after_attempt``."""
    records = [r for r in sample_keys.read_all(run) if r["attempt"] > after_attempt]
    attempt = min(r["attempt"] for r in records)
    mine = [r for r in records if r["attempt"] == attempt]
    return attempt, min(r["time"] for r in mine), mine[0]["world_size"]


def wait_records(run: str, after_attempt: int, timeout: float = 600) -> tuple[int, float, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return first_step_time(run, after_attempt)
        except (ValueError, FileNotFoundError):
            time.sleep(1)
    raise TimeoutError(f"no new attempt recorded steps in {run}")


def current_attempt(run: str) -> int:
    return max(r["attempt"] for r in sample_keys.read_all(run))


def lose_a_node(cluster: LocalCluster, sid: str, run: str, world: int) -> dict:
    """Kill the node of the highest rank once the group has trained past step 2 x EVERY; measure."""
    def ready(t: str) -> bool:  # a whole group of `world` workers that has checkpointed since it started
        ranks = {rank for _, rank, w in placements(t) if w == world}
        return (ranks == set(range(world)) and f"checkpoint checkpoint_{2 * EVERY:09d} reported" in t
                and t.rfind("checkpoint checkpoint_") > t.rfind(f" of {world} on node "))

    # An elastic group may start smaller (Ray Train's view of the cluster lags) and grow first.
    text = cluster.wait_for(sid, ready, 600)
    group = {rank: pid for pid, rank, w in placements(text) if w == world}
    rank0 = group[0]
    victim = cluster.node_of(group[max(group)])
    attempt = current_attempt(run)
    killed_at = time.time()
    cluster.kill_node(victim)
    new_attempt, first, new_world = wait_records(run, attempt)
    text = cluster.logs(sid)
    return {"world": f"{world} -> {new_world}", "to_next_step_s": first - killed_at,
            "steps_lost": last_step_of(text, rank0) - resumed(text)[-1], "resumed_from": resumed(text)[-1],
            "attempt": new_attempt}


def grow(cluster: LocalCluster, sid: str, run: str, after_attempt: int) -> dict:
    cluster.add_node(cpus=1)
    added_at = time.time()
    text = cluster.logs(sid)
    rank0 = [pid for pid, rank, _ in placements(text) if rank == 0][-1]
    new_attempt, first, new_world = wait_records(run, after_attempt)
    text = cluster.logs(sid)
    return {"world": f"2 -> {new_world}", "to_next_step_s": first - added_at,
            "steps_lost": last_step_of(text, rank0) - resumed(text)[-1], "resumed_from": resumed(text)[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-timeout", type=float, default=None,
                        help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S on the cluster (default: Ray's, 60 s)")
    parser.add_argument("--resize-interval", type=float, default=5.0, help="the elastic run's --resize-interval")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.start_timeout is not None:
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(args.start_timeout)
    storage = tempfile.mkdtemp(prefix="node-loss-")
    rows = []
    started = time.monotonic()
    with LocalCluster(env=env) as cluster:
        cluster.start_head(cpus=0)
        for _ in range(3):
            cluster.add_node(cpus=1)
        data = str(Path(__file__).resolve().parent.parent / "data" / "sample")
        if not (Path(data) / "index.json").is_file():
            from inpaint.data import pack_dataset

            pack_dataset("sample", None, data, progress=False)

        run = f"{storage}/fixed"
        sid = cluster.submit(["--data", data, "--storage", storage, "--name", "fixed", "--workers", "2", *COMMON],
                             "fixed")
        rows.append(("fixed --workers 2, node lost", lose_a_node(cluster, sid, run, 2)))
        cluster.job("stop", sid, timeout=120)
        cluster.add_node(cpus=1)
        time.sleep(25)  # Ray Train's view of the cluster is refreshed every 20 s: let it see three nodes again

        run = f"{storage}/elastic"
        sid = cluster.submit(["--data", data, "--storage", storage, "--name", "elastic", "--workers", "1-3",
                              "--resize-interval", str(args.resize_interval), *COMMON], "elastic")
        loss = lose_a_node(cluster, sid, run, 3)
        rows.append(("elastic --workers 1-3, node lost", loss))
        rows.append(("elastic --workers 1-3, node added", grow(cluster, sid, run, loss["attempt"])))
        cluster.job("stop", sid, timeout=120)
    print(f"node loss on a local {3}-node Ray cluster (+ head), debug recipe, checkpoint every {EVERY} steps; "
          f"worker-group start timeout {args.start_timeout or 'Ray default (60 s)'}, "
          f"resize interval {args.resize_interval:g} s; {time.monotonic() - started:.0f} s in all")
    print(f"| {'case':34} | world  | event -> next step (s) | steps lost | resumed from |")
    print(f"|{'-' * 36}|--------|------------------------|------------|--------------|")
    for case, row in rows:
        print(f"| {case:34} | {row['world']:6} | {row['to_next_step_s']:22.1f} | {row['steps_lost']:10d} | "
              f"{row['resumed_from']:12d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
