"""Multi-node Ray on this machine: a node lost mid-phase, an elastic run that shrinks and grows,
`ray job stop` + the same `ray job submit`, and a restarted head, all with runs in moto S3.

One cluster for the module (see cluster/local_cluster.py): a head without CPUs (the job drivers and
Ray Train's controller run there) and three worker nodes of one CPU each, so every training
worker sits on a node of its own. Jobs are submitted with `ray job submit` to the head; data,
checkpoints, TensorBoard and the sample-key records (``--set log.sample_keys=true``, see
cluster/sample_keys.py) live in the moto S3 server, so a worker on any node restores from there.

The fixed world size runs (2 workers, steps counted in iterations) are compared with one
uninterrupted reference run of the same command: weights bit for bit, and the samples each rank
trained on at each step.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.conftest import fresh_bucket
from cluster.local_cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EVERY = 4  # checkpoint interval of the fixed runs
# --verbose: Ray's prefixes and every rank's "rank R of W on node N" line, which these tests read.
FIXED = ("--recipe", "debug", "--workers", "2", "--no-evaluate", "--max-failures", "3", "--verbose",
         "--set", f"checkpoint.every_steps={EVERY}", "--set", "schedule.joint_steps=16",  # 8 + 4 + 16 = 28 steps
         "--set", "log.sample_keys=true", "--set", "log.every_steps=1")
FIXED_STEPS = 28
BATCH = 4  # the debug recipe's per-worker batch


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bucket(s3_server):
    with fresh_bucket("test-mn") as url:  # one bucket for the module's runs
        yield url


@pytest.fixture(scope="module")
def data(bucket):
    from inpaint.data import pack_dataset

    url = f"{bucket}/datasets/sample"
    pack_dataset("sample", None, url, progress=False)
    return url


def start(cluster: LocalCluster, nodes: int = 3) -> LocalCluster:
    cluster.start_head(cpus=0)
    for _ in range(nodes):
        cluster.add_node(cpus=1)
    return cluster


# After a node loss, Ray Train's elastic policy may first ask for the old size (its view of the cluster is
# refreshed every 20 s) and then waits this long for the placement before retrying smaller (60 s by default).
START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def cluster(s3_server):
    # os.environ now points every process at the moto server (AWS_ENDPOINT_URL and credentials).
    with LocalCluster(env={**os.environ, **START_TIMEOUT}) as running:
        yield start(running)


def args_for(name: str, data: str, bucket: str, *extra: str) -> list[str]:
    return ["--data", data, "--storage", f"{bucket}/runs", "--name", name, *FIXED, *extra]


@pytest.fixture(scope="module")
def reference(cluster, data, bucket):
    """The fixed-size run without any interruption: its final checkpoint and its sample-key history."""
    sid = cluster.submit(args_for("reference", data, bucket), "reference")
    status, text = cluster.wait_end(sid, 600)
    assert status == "SUCCEEDED", text[-4000:]
    assert f"run reference: step {FIXED_STEPS}, phase done" in text
    return run_state(bucket, "reference")


# ---------------------------------------------------------------- reading a run
def run_root(bucket: str, name: str) -> str:
    return f"{bucket}/runs/{name}"


def complete_checkpoints(bucket: str, name: str) -> list[int]:
    """Steps of the run's checkpoints whose meta.json (written last) is there."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = run_root(bucket, name)[5:]
    if not fs.exists(root):
        return []  # the job has not written anything yet
    # Names only: a resume that found one unloadable (an upload the node loss cut short) renamed it
    # checkpoint_X.unloadable, meta.json and all; it is no checkpoint of the run any more.
    names = {path: re.fullmatch(r"checkpoint_(\d{9})", path.rsplit("/", 1)[1]) for path in fs.ls(root)}
    return sorted(int(found.group(1)) for path, found in names.items()
                  if found and fs.exists(f"{path}/meta.json"))


def wait_for_checkpoint(bucket: str, name: str, step: int, timeout: float) -> None:
    """Return as soon as the run has a complete checkpoint at ``step`` or later (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while not any(found >= step for found in complete_checkpoints(bucket, name)):
        assert time.monotonic() < deadline, f"no checkpoint at step {step} of {name} after {timeout} s"
        time.sleep(0.1)


def final_weights(bucket: str, name: str, step: int) -> dict:
    import s3fs
    from safetensors.torch import load

    fs = s3fs.S3FileSystem()
    folder = f"{run_root(bucket, name)[5:]}/checkpoint_{step:09d}"
    # generator_ema: the averaged generator (the debug recipe keeps one) must resume bit for bit too
    return {f"{net}.{key}": value for net in ("generator", "discriminator", "generator_ema")
            for key, value in load(fs.cat_file(f"{folder}/{net}.safetensors")).items()}


def sample_keys_records(bucket: str, name: str) -> list[dict]:
    from cluster import sample_keys

    return sample_keys.read_all(run_root(bucket, name))


def history_of(records: list[dict]) -> dict[int, list[dict]]:
    from cluster import sample_keys

    return sample_keys.history(records)


def world_sizes(history: dict[int, list[dict]]) -> list[int]:
    """The world size of each stretch of consecutive steps trained at one size."""
    sizes: list[int] = []
    for step in sorted(history):
        world = history[step][0]["world_size"]
        if not sizes or sizes[-1] != world:
            sizes.append(world)
    return sizes


def run_state(bucket: str, name: str) -> dict:
    records = sample_keys_records(bucket, name)
    steps = complete_checkpoints(bucket, name)
    return {"records": records, "history": history_of(records), "final": steps[-1],
            "weights": final_weights(bucket, name, steps[-1])}


def placements(text: str) -> list[tuple[int, int, int, str]]:
    """(pid, rank, world size, Ray node id) of every "rank R of W on node N" line, in log order."""
    return [(int(pid), int(rank), int(world), node) for pid, rank, world, node in
            re.findall(r"pid=(\d+)[^)]*\).*? rank (\d+) of (\d+) on node ([0-9a-f]+)", text)]


def resumed_steps(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed from \S+: step (\d+)", text)]


def assert_same_weights(got: dict, expected: dict) -> None:
    import torch

    assert got.keys() == expected.keys()
    different = [key for key in got if not torch.equal(got[key], expected[key])]
    assert not different, f"{len(different)} of {len(got)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def attempts(records: list[dict]) -> dict[int, list[int]]:
    """Attempt -> the sorted steps it trained (as recorded)."""
    found: dict[int, set[int]] = {}
    for record in records:
        found.setdefault(record["attempt"], set()).add(record["step"])
    return {attempt: sorted(steps) for attempt, steps in sorted(found.items())}


def check_history(history: dict[int, list[dict]], data: str, schedule, total_steps: int | None = None) -> dict:
    """What the final model learnt from, step by step, checked against the schedule and the epoch.

    Every step from 1 on is there, trained by every rank of its group on a full per-worker batch;
    samples seen grow by world size x batch; each step trained in the phase the schedule gives for
    where it started; and within an epoch no sample was consumed twice and, once the epoch is
    over, none was skipped except fewer than one global batch (the remainder that cannot fill a
    batch on every rank). Returns {epoch: (consumed, skipped, world sizes)}.
    """
    from inpaint.data import split_keys

    steps = sorted(history)
    assert steps == list(range(1, steps[-1] + 1)), f"steps missing from the history: {steps}"
    if total_steps is not None:
        assert steps[-1] == total_steps
    samples = 0
    epochs: dict[int, list] = {}
    for step in steps:
        records = history[step]
        world = records[0]["world_size"]
        assert [r["rank"] for r in records] == list(range(world)), f"step {step}: ranks {records}"
        assert {r["world_size"] for r in records} == {world}
        assert all(len(r["keys"]) == BATCH for r in records), f"step {step}: the per-worker batch is {BATCH}"
        expected_phase = schedule.phase_at(step - 1, samples).value
        assert {r["phase"] for r in records} == {expected_phase}, (step, samples, records[0]["phase"])
        samples += world * BATCH
        assert {r["samples_seen"] for r in records} == {samples}, f"step {step}"
        assert len({r["epoch"] for r in records}) == 1
        entry = epochs.setdefault(records[0]["epoch"], [[], []])
        entry[0].extend(key for r in records for key in r["keys"])
        entry[1].append(world)
    split = set(split_keys(data, "train"))
    summary = {}
    for epoch, (keys, worlds) in sorted(epochs.items()):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        assert not repeated, f"epoch {epoch}: samples consumed twice: {repeated}"
        assert set(keys) <= split
        skipped = split - set(keys)
        if epoch < max(epochs):  # a finished epoch
            assert len(skipped) < worlds[-1] * BATCH, f"epoch {epoch}: {len(skipped)} samples skipped"
        summary[epoch] = (len(keys), len(skipped), worlds)
    return summary


def fixed_schedule():
    from inpaint import recipes
    from inpaint.config import apply_overrides
    from inpaint.phases import PhaseSchedule

    overrides = [FIXED[i + 1] for i, item in enumerate(FIXED) if item == "--set"]
    return PhaseSchedule(apply_overrides(recipes.get("debug"), overrides).schedule)


# ---------------------------------------------------------------- tests
def test_reference_run_spreads_its_workers_over_nodes_and_keeps_the_schedule(cluster, reference, data):
    history = reference["history"]
    check_history(history, data, fixed_schedule(), FIXED_STEPS)
    assert len(attempts(reference["records"])) == 1
    boundaries = [step for step in history if history[step][0]["phase"] != history.get(step + 1, history[step])[0]["phase"]]
    assert boundaries == [8, 12]  # generator 8 steps, discriminator 4, joint 16: in steps, at world size 2


def test_node_loss_mid_phase_resumes_on_the_nodes_left_with_the_uninterrupted_weights(cluster, reference, data, bucket):
    sid = cluster.submit(args_for("node-loss", data, bucket), "node-loss")
    text = cluster.wait_for(sid, lambda t: "checkpoint checkpoint_000000016 reported" in t, 400)  # joint phase
    group = {rank: (pid, node) for pid, rank, world, node in placements(text)}
    assert sorted(group) == [0, 1], text[-3000:]
    homes = {rank: cluster.node_of(pid) for rank, (pid, _) in group.items()}
    assert None not in homes.values() and homes[0] is not homes[1], "the two workers share a node"
    assert not any(node.head for node in homes.values())
    lost_node_id = group[1][1]
    killed = cluster.kill_node(homes[1])  # rank 1's node: raylet, agents and the worker, all at once
    assert killed >= 3

    status, text = cluster.wait_end(sid, 600)
    assert status == "SUCCEEDED", text[-5000:]
    assert f"run node-loss: step {FIXED_STEPS}, phase done" in text
    resumed = resumed_steps(text)
    assert resumed and resumed[-1] >= 16, resumed  # from the newest checkpoint, at most one interval back
    after = [(rank, node) for _, rank, _, node in placements(text)[len(group):]]
    assert sorted(rank for rank, _ in after[-2:]) == [0, 1]
    new_nodes = {node for _, node in after[-2:]}
    assert lost_node_id not in new_nodes and len(new_nodes) == 2  # restarted on the two nodes left

    state = run_state(bucket, "node-loss")
    assert_same_weights(state["weights"], reference["weights"])
    check_history(state["history"], data, fixed_schedule(), FIXED_STEPS)
    assert {s: [r["keys"] for r in rs] for s, rs in state["history"].items()} == \
           {s: [r["keys"] for r in rs] for s, rs in reference["history"].items()}
    runs = attempts(state["records"])
    assert len(runs) == 2 and list(runs.values())[1][0] == resumed[-1] + 1
    # TensorBoard in S3: one event file per rank-0 process, the restarted group's beside the first one.
    import s3fs

    events = [p for p in s3fs.S3FileSystem().find(f"{run_root(bucket, 'node-loss')[5:]}/tensorboard")
              if "events.out.tfevents" in p]
    assert len(events) >= 2, events
    cluster.add_node(cpus=1)  # the module's cluster has three worker nodes again


def test_ray_job_stop_and_the_same_submit_resume_and_so_does_a_restarted_head(cluster, reference, data, bucket):
    args = args_for("restarted", data, bucket)
    first = cluster.submit(args, "restarted-1")
    wait_for_checkpoint(bucket, "restarted", 8, 400)
    stop = cluster.job("stop", first, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert cluster.wait_end(first, 120)[0] == "STOPPED"
    stopped_at = cluster.wait_until_stable(lambda: complete_checkpoints(bucket, "restarted"))
    newest = stopped_at[-1]
    assert 8 <= newest <= FIXED_STEPS - 2 * EVERY, f"the first job stopped at {newest}, too late for the test"

    cluster.submit(args, "restarted-2")  # the same command
    # Watched in S3, not in the job's logs: those lag by seconds, in which a debug run can finish.
    wait_for_checkpoint(bucket, "restarted", newest + EVERY, 400)
    cluster.stop()  # the whole cluster, head included: every process gone, the storage kept
    start(cluster)
    third = cluster.submit(args, "restarted-3")
    status, text = cluster.wait_end(third, 600)
    assert status == "SUCCEEDED", text[-5000:]
    assert f"run restarted: step {FIXED_STEPS}, phase done" in text
    (resumed,) = resumed_steps(text)
    assert newest + EVERY <= resumed < FIXED_STEPS, f"resumed at {resumed}: the second job was not stopped mid-run"

    state = run_state(bucket, "restarted")
    assert_same_weights(state["weights"], reference["weights"])
    check_history(state["history"], data, fixed_schedule(), FIXED_STEPS)
    runs = list(attempts(state["records"]).values())
    assert len(runs) == 3
    # No repeated work: each attempt starts right after the newest checkpoint the previous one left.
    assert runs[1][0] == newest + 1 and runs[2][0] == resumed + 1


# The elastic run counts phases in samples (the way to run an elastic job, see k8s/README.md): the
# generator phase ends at 48 x 4 = 192 samples seen and the discriminator phase at 240 whatever the
# world size; the joint phase is long enough that the test, not the schedule, ends the run.
ELASTIC_SETS = ("schedule.unit=samples", "schedule.reference_batch=4", "schedule.generator_steps=48",
                "schedule.discriminator_steps=12", "schedule.joint_steps=100000", "checkpoint.every_steps=3",
                "log.sample_keys=true", "log.every_steps=1")


def elastic_schedule():
    from inpaint import recipes
    from inpaint.config import apply_overrides
    from inpaint.phases import PhaseSchedule

    return PhaseSchedule(apply_overrides(recipes.get("debug"), list(ELASTIC_SETS)).schedule)


def test_elastic_run_shrinks_on_node_loss_and_grows_on_a_new_node_keeping_the_data_position_and_the_phases(
        cluster, data, bucket):
    assert len(cluster.worker_nodes) == 3
    args = ["--recipe", "debug", "--data", data, "--storage", f"{bucket}/runs", "--name", "elastic",
            "--workers", "1-3", "--resize-interval", "5", "--no-evaluate", "--max-failures", "3", "--verbose"]
    for item in ELASTIC_SETS:
        args += ["--set", item]
    sid = cluster.submit(args, "elastic")

    def group_of(text: str, world: int) -> dict[int, int] | None:
        """Rank -> pid of the latest complete group of ``world`` workers in ``text``, once it resumed or trained."""
        group = {rank: pid for pid, rank, size, _ in placements(text) if size == world}
        return group if sorted(group) == list(range(world)) else None

    # The first group may be smaller if Ray Train's view of the cluster is a tick behind; it grows to 3.
    text = cluster.wait_for(sid, lambda t: group_of(t, 3) is not None and
                            t.rfind("checkpoint checkpoint_") > t.rfind(" of 3 on node ") > 0, 400)
    group = group_of(text, 3)
    homes = {rank: cluster.node_of(pid) for rank, pid in group.items()}
    assert None not in homes.values() and len({id(node) for node in homes.values()}) == 3  # one per node
    mark = len(text)
    cluster.kill_node(homes[2])

    # Shrink: the group restarts with the two workers the cluster has left ...
    text = cluster.wait_for(sid, lambda t: group_of(t[mark:], 2) is not None and resumed_steps(t[mark:]), 400)
    shrunk_from = resumed_steps(text[mark:])[0]
    mark = len(text)
    cluster.add_node(cpus=1)
    # ... and grows back to three once Ray Train sees the new node (its check runs every --resize-interval).
    text = cluster.wait_for(sid, lambda t: group_of(t[mark:], 3) is not None and resumed_steps(t[mark:]), 400)
    grown_from = resumed_steps(text[mark:])[0]
    assert grown_from >= shrunk_from
    # > 1 epoch past the regrowth. Any checkpoint that far: one resumed from a phase-boundary checkpoint
    # (a step that is no multiple of checkpoint.every_steps) never writes grown_from + 12 itself.
    cluster.wait_for(sid, lambda t: max(map(int, re.findall(r"checkpoint checkpoint_(\d{9}) reported", t)),
                                        default=0) >= grown_from + 12, 400)
    stop = cluster.job("stop", sid, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr

    records = sample_keys_records(bucket, "elastic")
    # What the final checkpoint learnt from: the stop can land between the ranks' key flushes of a
    # checkpoint that was never reported, leaving a last step with only some ranks' records.
    final = complete_checkpoints(bucket, "elastic")[-1]
    history = {step: ranks for step, ranks in history_of(records).items() if step <= final}
    worlds = world_sizes(history)
    assert worlds[-3:] == [3, 2, 3], worlds  # the world sizes the final history was trained at, in turn
    epochs = check_history(history, data, elastic_schedule())
    resized = [epoch for epoch, (_, _, sizes) in epochs.items() if len(set(sizes)) > 1 and epoch < max(epochs)]
    assert resized, f"no finished epoch had a resize in it: {epochs}"
    # Samples, not steps: each phase ends at the first step that reaches its boundary in samples seen.
    ends = {}
    for step, step_records in history.items():
        ends[step_records[0]["phase"]] = step_records[0]["samples_seen"]
    generator_end = ends["generator"]
    assert 192 <= generator_end < 192 + 12 and 240 <= ends["discriminator"] < 240 + 12, ends
