"""A Ray cluster of several nodes on this machine, for the multi-node tests and benchmarks/node_loss.py.

Each node is its own ``ray start`` (its own raylet, object store and agents) with ``--num-cpus``
of its own and its own ``--temp-dir``: the node's raylet and log monitor name that folder on
their command line and every other process of the node (agents, workers) descends from its
raylet, which is how :meth:`LocalCluster.kill_node` finds all of them and removes the node at once (SIGKILL to every
process, as a lost VM or spot instance would), and how :meth:`LocalCluster.stop` stops only what
this cluster started, never another Ray on the machine.

The head has no CPUs by default, so training workers can only run on the worker nodes (one per
node with ``--num-cpus 1``); the job's driver (the entrypoint of ``ray job submit``) and Ray
Train's controller need none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "jobs" / "train.py")
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command_lines() -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def _parents() -> dict[int, int]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is gone, only not yet reaped by its parent


@dataclass
class Node:
    name: str
    temp_dir: str
    cpus: int
    head: bool = False

    def processes(self) -> list[int]:
        """Pids of every live process of this node: those naming its folder on their command line
        (raylet, log monitor; on the head GCS and dashboard too) and all their descendants (agents,
        workers, the job's driver)."""
        lines, parents = _command_lines(), _parents()
        found = {pid for pid, cmdline in lines.items() if self.temp_dir in cmdline}
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in found} - found
            found |= children
            grew = bool(children)
        return sorted(found)

    def kill(self) -> int:
        """SIGKILL every process of the node at once; returns how many there were."""
        victims = self.processes()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
            time.sleep(0.1)
        return len(victims)


@dataclass
class LocalCluster:
    """Head plus worker nodes started with ``ray start``; use as a context manager."""

    env: dict = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0
    _roots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {k: v for k, v in (self.env or os.environ).items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "disabled"  # throwaway nodes on 127.0.0.1
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env["RAY_DEDUP_LOGS"] = "0"  # the tests read the workers' log lines, one per rank
        # Worker processes import the project from this checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.env = env

    # ------------------------------------------------------------ lifecycle
    def _temp_dir(self, name: str) -> str:
        root = tempfile.mkdtemp(prefix=f"mn{name}", dir="/tmp")  # unix socket paths must stay short
        self._roots.append(root)
        return root

    def _ray_start(self, node: Node, *args: str) -> None:
        result = subprocess.run([RAY_CLI, "start", "--node-ip-address=127.0.0.1", f"--num-cpus={node.cpus}",
                                 f"--temp-dir={node.temp_dir}", "--disable-usage-stats",
                                 # Every node's dashboard agent would bind 52365 by default: one per machine.
                                 f"--dashboard-agent-listen-port={free_port()}", *args],
                                capture_output=True, text=True, env=self.env, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"ray start for {node.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        self.nodes.append(node)

    def start_head(self, cpus: int = 0) -> Node:
        if not self.port:
            self.port, self.dashboard_port = free_port(), free_port()
        node = Node("head", self._temp_dir("h"), cpus, head=True)
        self._ray_start(node, "--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                        "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        f"--ray-client-server-port={free_port()}")
        return node

    def add_node(self, cpus: int = 1) -> Node:
        node = Node(f"w{len(self.worker_nodes) + 1}", self._temp_dir("w"), cpus)
        self._ray_start(node, f"--address=127.0.0.1:{self.port}")
        return node

    @property
    def head(self) -> Node:
        return next(node for node in self.nodes if node.head)

    @property
    def worker_nodes(self) -> list[Node]:
        return [node for node in self.nodes if not node.head]

    def node_of(self, pid: int) -> Node | None:
        """The node a process (a training worker, by the pid in its log lines) runs on."""
        return next((node for node in self.nodes if pid in node.processes()), None)

    def kill_node(self, node: Node) -> int:
        count = node.kill()
        self.nodes.remove(node)
        return count

    def stop(self) -> None:
        """SIGKILL every process of every node this cluster started (as `ray stop --force`, for these only)."""
        for node in list(self.nodes):
            node.kill()
        self.nodes.clear()
        for root in self._roots:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ jobs
    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def job(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY_CLI, "job", *args, f"--address={self.address}"], capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=REPO)

    def submit(self, train_args: list[str], submission_id: str, timeout: float = 180) -> str:
        """``ray job submit --no-wait`` of jobs/train.py; retries while the job agent comes up."""
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                [RAY_CLI, "job", "submit", f"--address={self.address}", f"--submission-id={submission_id}",
                 "--no-wait", "--", sys.executable, TRAIN, *train_args],
                capture_output=True, text=True, env=self.env, timeout=120, cwd=REPO)
            output = result.stdout + result.stderr
            if result.returncode == 0:
                return submission_id
            if "No available agent" not in output or time.monotonic() > deadline:
                raise RuntimeError(f"ray job submit failed:\n{output[-3000:]}")
            time.sleep(2)

    @property
    def client(self):
        """A JobSubmissionClient on the head: polling logs through it costs far less CPU than the CLI."""
        if getattr(self, "_client", None) is None or self._client_address != self.address:
            from ray.job_submission import JobSubmissionClient

            self._client, self._client_address = JobSubmissionClient(self.address), self.address
        return self._client

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def status(self, submission_id: str) -> str:
        return str(self.client.get_job_status(submission_id).value)

    def wait_for(self, submission_id: str, predicate, timeout: float, poll: float = 2.0) -> str:
        """Poll the job's logs until ``predicate(logs)`` holds; returns the logs (raises on timeout or end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.logs(submission_id)
            if predicate(text):
                return text
            if self.status(submission_id) in ("SUCCEEDED", "FAILED", "STOPPED"):
                text = self.logs(submission_id)
                if predicate(text):
                    return text
                raise AssertionError(f"job {submission_id} ended first:\n{text[-4000:]}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting on job {submission_id}:\n{self.logs(submission_id)[-4000:]}")

    @staticmethod
    def wait_until_stable(read, settle: float = 5.0, timeout: float = 120.0):
        """``read()`` once it returned the same value for ``settle`` seconds (e.g. files a stopped job left)."""
        deadline = time.monotonic() + timeout
        value, since = read(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(1)
            latest = read()
            if latest != value:
                value, since = latest, time.monotonic()
            elif time.monotonic() - since >= settle:
                return value
        raise AssertionError(f"still changing after {timeout} s: {value}")

    def wait_end(self, submission_id: str, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, self.logs(submission_id)
            time.sleep(2)
        raise AssertionError(f"job {submission_id} still running:\n{self.logs(submission_id)[-4000:]}")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
