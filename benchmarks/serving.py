"""Serving speed: requests/s and p50/p99 latency of the Serve app, next to one `python -m inpaint fill`.

    python benchmarks/serving.py                          # quickstart-sized model, 1 replica x 2 CPUs
    python benchmarks/serving.py --replicas 2 --cpus 1 --seconds 3

A bounded load generator on 127.0.0.1: C client threads (1, 4, 16) each send one request, wait for
the answer, and send the next, for --seconds per cell, with 64, 160 and 512 px images whose hole is
the centred half of the side (so the network sees the whole image, as the page's first fill does).
The model is the quickstart recipe's network with fresh weights (the cost of a fill does not depend
on what the weights learnt), saved in seconds. A 503 (queue full) counts as refused, not as served.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = (64, 160, 512)
CLIENTS = (1, 4, 16)


def make_checkpoint(folder: Path) -> Path:
    from inpaint import recipes
    from inpaint.trainer import Trainer

    config = recipes.get("quickstart")
    Trainer(config, device="cpu").save(folder / "checkpoint_000000000")
    (folder / "config.json").write_text(config.to_json())
    return folder / "checkpoint_000000000"


def request_body(size: int) -> tuple[bytes, bytes]:
    import io

    import numpy as np
    from PIL import Image

    def png(array) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:size // 4 + size // 2, size // 4:size // 4 + size // 2] = 255
    return png(image), png(mask)


def load(base: str, body: tuple[bytes, bytes], clients: int, seconds: float) -> dict[str, float]:
    import requests

    latencies: list[float] = []
    refused = [0]
    deadline = time.perf_counter() + seconds

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                reply = session.post(f"{base}/v1/inpaint", files={"image": body[0], "mask": body[1]},
                                     data={"blend": "false"}, timeout=300)
                if reply.status_code == 503:
                    refused[0] += 1
                    time.sleep(0.05)
                    continue
                reply.raise_for_status()
                latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
            "n": len(latencies), "refused": refused[0]}


def cli_fill_s(checkpoint: Path, body: tuple[bytes, bytes], folder: Path, gpu: bool) -> float:
    """Wall time of one `python -m inpaint fill` on the same image: process start, load, fill, write."""
    (folder / "image.png").write_bytes(body[0])
    (folder / "mask.png").write_bytes(body[1])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "inpaint", "fill", "--checkpoint", str(checkpoint), "--image",
                    str(folder / "image.png"), "--mask", str(folder / "mask.png"), "--output",
                    str(folder / "out.png"), "--device", "cuda" if gpu else "cpu"], check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per cell (default: 4)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) per replica (default: 2)")
    parser.add_argument("--concurrency", type=int, default=1, help="fills at once per replica (default: 1)")
    parser.add_argument("--batch", type=int, default=1, help="@serve.batch size; >1 needs --concurrency >= it")
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica (its defaults: batch 8, concurrency 8)")
    args = parser.parse_args()

    import socket

    import ray

    from benchmarks.machine import load_average
    from cluster.serve_runtime import start_app, stop_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "run")
        bodies = {size: request_body(size) for size in SIZES}
        cli = {size: cli_fill_s(checkpoint, bodies[size], tmp, args.gpu) for size in SIZES}
        print(f"# {args.replicas} replica(s) x {args.cpus} CPU(s), concurrency {args.concurrency}, batch {args.batch}, "
              f"{'GPU, ' if args.gpu else ''}"
              f"{args.seconds:g} s per cell, load average {load_average()}")
        print("| image | clients | requests/s | p50 ms | p99 ms | served | refused (503) | one `inpaint fill` call, s |")
        print("|---|---|---|---|---|---|---|---|")
        with socket.socket() as probe:  # a free port, not Serve's 8000
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        options = {"concurrency": args.concurrency, "batch": args.batch} if not args.gpu else {}
        base = start_app(str(checkpoint), port=port, replicas=args.replicas, cpus=args.cpus, gpu=args.gpu,
                         queue=32, log_requests=False, **options)  # no console line per request under load
        try:
            for size in SIZES:
                load(base, bodies[size], 1, 1.0)  # warm-up: first calls pay allocator and oneDNN set-up
                for clients in CLIENTS:
                    cell = load(base, bodies[size], clients, args.seconds)
                    print(f"| {size} px | {clients} | {cell['rps']:.1f} | {cell['p50']:.0f} | {cell['p99']:.0f} | "
                          f"{cell['n']} | {cell['refused']} | {cli[size]:.2f} |", flush=True)
        finally:
            stop_app()
            ray.shutdown()


if __name__ == "__main__":
    main()
