"""What a person sees while a run trains or a model serves: the run, not Ray's internals.

Rank 0 logs one progress line per logging interval (phase, step / total, losses, images/s, an
ETA for the run) and the checkpoint events; every rank logs its warnings. Those lines carry
:data:`MARK`, and the driver prints them bare, without Ray's ``(RayTrainWorker pid=...)``
prefix. Ray's own messages are held to warning level (Ray Train's ``LoggingConfig``), and the
C++ core's log lines (``core_worker.cc ... PreemptionWatcher`` and the like, which Ray also
keeps in its session logs) are dropped; ``--verbose`` shows everything as Ray prints it.
Serving is the same: a replica says which checkpoint it serves, when it follows to another, and
one line per fill request; Serve's controller, proxy and access log speak at warning level.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

MARK = "[inpaint] "
# A glog line of Ray's C++ core: "[2026-12-04 22:03:53,282 E 9446 9475] core_worker.cc:2465: ..."
_CORE_LINE = re.compile(r"^\s*\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] [\w/.-]+\.(cc|h):\d+:")


def ray_train_log_level(verbose: bool) -> str:
    """Ray Train's own console level (``RunConfig(logging_config=...)``): its INFO lines only with --verbose."""
    return "INFO" if verbose else "WARNING"


def configure_worker(rank: int, verbose: bool = False) -> None:
    """Our loggers in a training worker: rank 0 says what happens, the others only what goes wrong."""
    _mark_our_lines(MARK if rank == 0 else MARK + f"rank {rank}: ",
                    logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    if not verbose:
        # Ray Train's worker logs some INFO lines through loggers named after files, not ray.train
        # ("Reporting training result N: TrainingReport(...)" on every rank): they go to the root
        # logger, which Ray sets up at INFO. Warnings still pass.
        logging.getLogger().setLevel(logging.WARNING)


def configure_replica() -> None:
    """Our loggers in a serving replica: the model it serves, each switch, one line per fill request."""
    _mark_our_lines(MARK, logging.INFO)


def serve_logging_config(verbose: bool) -> dict[str, Any] | None:
    """Ray Serve's own logging (controller, proxy, replicas; ``serve.start`` / ``serve.run``): warnings
    only, and no access log of its own (the replica logs each fill itself); None keeps Serve's default."""
    if verbose:
        return None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's "Started Serve ..." lines
    return {"log_level": "WARNING", "enable_access_log": False}


def _mark_our_lines(prefix: str, level: int) -> None:
    """The "inpaint" loggers print to stdout with :data:`MARK`, so the driver shows them bare."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger = logging.getLogger("inpaint")
    for old in [h for h in logger.handlers if getattr(h, "_inpaint_console", False)]:
        logger.removeHandler(old)
    handler._inpaint_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # Ray's root handler would print each line a second time


def keep_line(line: str, verbose: bool) -> bool:
    """Whether a line a Ray process printed reaches the console (our marked lines print bare elsewhere)."""
    return verbose or not _CORE_LINE.match(line)


def install_driver_filter(verbose: bool) -> None:
    """Print the workers' output the way this module says, in place of Ray's own printer.

    Ray hands each batch of lines a worker printed to the handlers of its stdstream dispatcher;
    ours prints our marked lines bare and passes the rest (less the core's log lines) to Ray's
    printer, so warnings and tracebacks still arrive with the process that printed them.
    """
    if verbose:
        return
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if "ray_print_logs" not in [name for name, _ in getattr(dispatcher, "handlers", ())]:
        return  # log_to_driver is off, or this Ray prints elsewhere: leave it be

    def handler(data: dict[str, Any]) -> None:
        ours, theirs = [], []
        for line in data.get("lines", ()):
            if MARK in line:
                ours.append(line.split(MARK, 1)[1])
            elif keep_line(line, verbose):
                theirs.append(line)
        for line in ours:
            print(line, flush=True)
        if theirs:
            ray_worker.print_to_stdstream({**data, "lines": theirs}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)


def duration(seconds: float) -> str:
    """``1h02m``, ``4m10s``, ``9s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ThroughputMeter:
    """Images, data wait and step time over the current logging window (torchtitan's metrics processor, small).

    The loop adds each step's times (:meth:`data`, :meth:`step`); :meth:`window` returns the
    window's ``perf/`` and ``time/`` scalars and starts the next one. A ``torch.cuda.synchronize``
    after every step would stall the host until the GPU drains, so the next batch's copy and kernel
    launches could not overlap the step's compute: the host times what it spends in each step, and
    once per window waits for the GPU to finish what is still queued and counts that wait as step
    time. On CPU the sync is free and the figures are what they always were.
    """

    def __init__(self, device: "torch.device", world_size: int = 1, *, clock: Callable[[], float] = time.perf_counter,
                 synchronize: Callable[[], None] | None = None):
        import torch

        self.world_size = world_size
        self.clock = clock
        if synchronize is None:
            synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.synchronize = synchronize
        self._reset()

    def _reset(self) -> None:
        self.start = self.clock()
        self.data_s = self.step_s = 0.0
        self.steps = self.images = 0

    def data(self, seconds: float) -> None:
        self.data_s += seconds

    def step(self, seconds: float, images: int) -> None:
        self.step_s += seconds
        self.steps += 1
        self.images += images

    def window(self) -> dict[str, float]:
        """The window's scalars (this worker's per-step averages; images/s of the whole group too)."""
        before = self.clock()
        self.synchronize()  # the one wait per window: the GPU's queued work belongs to the steps
        end = self.clock()
        steps = max(1, self.steps)
        elapsed = max(end - self.start, 1e-9)
        scalars = {
            "perf/images_per_s": self.images * self.world_size / elapsed,
            "perf/images_per_s_per_worker": self.images / elapsed,
            "perf/steps_per_s": self.steps / elapsed,
            "time/data(s)": self.data_s / steps,
            "time/step(s)": (self.step_s + end - before) / steps,
        }
        self._reset()
        return scalars


def progress_line(step: int, total: int, phase: str, losses: dict[str, float], scalars: dict[str, float],
                  steps_left: int) -> str:
    """``step 40/2500 (2%) generator | g_rec=0.123 g_total=0.13 | 180 img/s | ETA 4m10s``."""
    rate = scalars.get("perf/steps_per_s", 0.0)
    eta = duration(steps_left / rate) if rate > 0 else "?"
    parts = " ".join(f"{name.rsplit('/', 1)[-1]}={value:.4g}" for name, value in losses.items())
    percent = 100.0 * step / total if total else 100.0
    return (f"step {step}/{total} ({percent:.0f}%) {phase} | {parts} | "
            f"{scalars.get('perf/images_per_s', 0.0):.1f} img/s | ETA {eta}")
