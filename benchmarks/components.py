"""Parts with benchmarks of their own, run in this one: the contextual loss vs a port, the loader in workers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.vocabulary import Options
from inpaint.data import load_index, pack_dataset


def contextual_vs_port(options: Options, device: torch.device) -> dict[str, Any]:
    """Our contextual loss, fwd + bwd, against S-aiueo32's port (and our reference): time and peak
    memory, interleaved, memory in fresh subprocesses (``benchmarks.contextual_loss``)."""
    from benchmarks import contextual_loss as cx

    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return {"skipped": "CPU peak memory is read from Linux's /proc/self/clear_refs, absent here"}
    batch, channels, size, _ = options.contextual
    args = cx.parse_args(["--device", device.type, "--batch", str(batch), "--channels", str(channels),
                          "--size", str(size), "--repeats", str(max(3, options.steps)),
                          "--threads", str(torch.get_num_threads())])
    return cx.measure(args)


def loader_in_workers(options: Options) -> dict[str, Any]:
    """The training loader with ``loader_workers`` processes against in-process, per worker core."""
    if not options.loader_workers:
        return {"skipped": "--loader-workers 0"}
    from benchmarks.loader_throughput import make_jpegs, worker_ratios
    from inpaint.config import MaskConfig
    from inpaint.masks import MaskSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DataLoader worker runs
    try:
        with tempfile.TemporaryDirectory(prefix="inpaint-loader-") as tmp:
            source, url = Path(tmp) / "jpegs", str(Path(tmp) / "shards")
            source.mkdir()
            make_jpegs(source, options.loader_images)
            pack_dataset("folder", source, url, shard_size=max(8, options.loader_images // 12), test_fraction=0.01,
                         progress=False)
            batch = 32
            train = sum(1 for _ in load_index(url).keys("train"))
            batches = train // (batch * options.loader_workers) * options.loader_workers
            sampler = MaskSampler(MaskConfig(), 160, 96)
            out = worker_ratios(url, batches, batch, 160, sampler, options.loader_workers, max(2, options.steps))
    finally:
        torch.set_num_threads(threads)
    out.update(batch=batch, image_size=160, target_ratio=0.8)
    return out
