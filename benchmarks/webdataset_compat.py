"""Our shards through webdataset: its read and write rates beside our reader's and packer's, same shards.

    python benchmarks/webdataset_compat.py                   # 2,000 CelebA-sized JPEGs, shards of 250
    python benchmarks/webdataset_compat.py --images 4000 --repeats 9

Makes 178x218 JPEGs (CelebA's size, ``benchmarks.loader_throughput.make_jpegs``), packs them with
``pack_dataset`` into local shards, and checks first that every reader yields the train split's
samples in the index's order. Then, in --repeats interleaved rounds (a slow spell on a shared
machine lands on all of them), it times:

- reading the raw samples: our shard reader's pieces (the whole shard in one read +
  ``parse_shard``, the image bytes sliced out) against ``webdataset.WebDataset(urls, shardshuffle=False)``;
- reading decoded images (uint8 (3, S, S) centre crops): ``iter_split`` (what evaluation uses:
  torchvision's JPEG decoder, the next shard read in a background thread) against the WebDataset
  pipeline with its own decoder (``.decode("torchrgb8")``, PIL) and with ours
  (``inpaint.data.reading.decode`` in ``.map_dict``);
- writing the same samples (bytes and metadata in memory) as shards of --shard-size: our
  ``write_shard`` against ``webdataset.TarWriter`` (one per shard) and ``webdataset.ShardWriter``.

Rates are samples per CPU-second of this process (all its threads; torch threads = 1), the
median of the rounds, and wall-clock samples/s beside them; "of ours" is the median of the
per-round ratios to our reader or writer. The shards sit in the page cache after the first round,
so reading measures the readers, not the disk. Last, whether ``TarWriter`` given our fixed
metadata (no owner, mtime 0, sorted JSON) writes byte-identical shards.

Needs webdataset, a test dependency (``pip install -e ".[test]"``); the README's Design notes say
why it is not a runtime one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from benchmarks.loader_throughput import CELEBA_SIZE, make_jpegs  # noqa: E402
from inpaint.data import iter_split, load_index, pack_dataset  # noqa: E402
from inpaint.data.reading import center_crop, cover, decode  # noqa: E402
from inpaint.data.shards import parse_shard, write_shard  # noqa: E402
from inpaint.hardware import describe_cpu_line  # noqa: E402

Sample = tuple[str, str, bytes, dict]  # key, image extension, image bytes, metadata: write_shard's input


# ----------------------------------------------------------------------------- readers
def read_shard(url: str) -> bytes:
    """A local shard's bytes in one read, as our loader reads a whole shard (one GET in object storage)."""
    return Path(url).read_bytes()


def ours_raw(urls: list[str]) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) from each shard read whole and its tar headers parsed (our loader's way)."""
    for url in urls:
        data = read_shard(url)
        for sample in parse_shard(data).samples:
            yield sample.key, data[sample.offset:sample.offset + sample.size]


def webdataset_raw(urls: list[str]) -> Iterator[tuple[str, bytes]]:
    for sample in wds.WebDataset(urls, shardshuffle=False):
        yield sample["__key__"], sample["jpg"]


def ours_images(url: str, size: int) -> Iterator[tuple[str, torch.Tensor]]:
    yield from iter_split(url, "train", size)


def _crop(image: torch.Tensor, size: int) -> torch.Tensor:
    return center_crop(cover(image, size), size).contiguous()  # what iter_split yields


def webdataset_pil(urls: list[str], size: int) -> Iterator[tuple[str, torch.Tensor]]:
    for key, image in wds.WebDataset(urls, shardshuffle=False).decode("torchrgb8").to_tuple("__key__", "jpg"):
        yield key, _crop(image, size)


def our_decoder(data: bytes) -> torch.Tensor:
    """inpaint's decoder (torchvision's decode_jpeg operator; PIL for what it lacks) on a bytes object."""
    return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def webdataset_ours(urls: list[str], size: int) -> Iterator[tuple[str, torch.Tensor]]:
    pipeline = wds.WebDataset(urls, shardshuffle=False).map_dict(jpg=our_decoder).to_tuple("__key__", "jpg")
    for key, image in pipeline:
        yield key, _crop(image, size)


# ----------------------------------------------------------------------------- writers
def ours_write(chunks: list[list[Sample]], folder: Path) -> None:
    for number, chunk in enumerate(chunks):
        with open(folder / f"ours-{number:06d}.tar", "wb") as f:
            write_shard(f, chunk)


def tarwriter_write(chunks: list[list[Sample]], folder: Path) -> None:
    for number, chunk in enumerate(chunks):
        with wds.TarWriter(str(folder / f"tarwriter-{number:06d}.tar")) as writer:
            for key, ext, data, meta in chunk:
                writer.write({"__key__": key, ext: data, "json": meta})


def shardwriter_write(chunks: list[list[Sample]], folder: Path) -> None:
    writer = wds.ShardWriter(str(folder / "shardwriter-%06d.tar"), maxcount=len(chunks[0]), verbose=0)
    try:
        for chunk in chunks:
            for key, ext, data, meta in chunk:
                writer.write({"__key__": key, ext: data, "json": meta})
    finally:
        writer.close()


def tarwriter_identical(chunk: list[Sample], shard: bytes) -> bool:
    """Whether TarWriter, given our fixed metadata, writes exactly the bytes our packer wrote."""
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, user="", group="", mtime=0, encoder=False)
    for key, ext, data, meta in chunk:
        writer.write({"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
    writer.close()
    return buffer.getvalue() == shard


# ----------------------------------------------------------------------------- timing
def drain(iterator: Iterator) -> int:
    count = 0
    for _ in iterator:
        count += 1
    return count


def time_rounds(actions: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per action, (samples per CPU-second, samples per wall second) of each round; actions interleaved."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            cpu, wall = time.process_time(), time.perf_counter()
            samples = action()
            rates[name].append((samples / (time.process_time() - cpu), samples / (time.perf_counter() - wall)))
    return rates


def print_table(title: str, rates: dict[str, list[tuple[float, float]]], reference: str) -> dict[str, dict]:
    """Print medians and the per-round ratio to ``reference``; return them."""
    print(title)
    out = {}
    for name, rounds in rates.items():
        cpu = statistics.median(r[0] for r in rounds)
        wall = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[0] / ref[0] for r, ref in zip(rounds, rates[reference]))
        out[name] = {"per_cpu_s": cpu, "per_wall_s": wall, "of_ours": ratio}
        print(f"  {name:<58} {cpu:9,.0f} /CPU-s  {wall:9,.0f} /s  {ratio:5.0%} of ours")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.images < 20 or args.shard_size < 1 or args.repeats < 1 or args.image_size < 1:
        parser.error("need --images >= 20 and --shard-size, --repeats, --image-size >= 1")
    torch.set_num_threads(1)
    load_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="webdataset-compat-") as tmp:
        source, url, written = Path(tmp) / "jpegs", str(Path(tmp) / "shards"), Path(tmp) / "written"
        source.mkdir()
        written.mkdir()
        make_jpegs(source, args.images)
        pack_dataset("folder", source, url, shard_size=args.shard_size, test_fraction=0.01, progress=False)
        index = load_index(url)
        shards = index.split("train").shards
        urls = [index.shard_url(shard) for shard in shards]
        keys = index.keys("train")
        size = args.image_size

        readers = {"ours_raw": lambda: ours_raw(urls), "webdataset_raw": lambda: webdataset_raw(urls),
                   "ours_images": lambda: ours_images(url, size), "webdataset_pil": lambda: webdataset_pil(urls, size),
                   "webdataset_ours": lambda: webdataset_ours(urls, size)}
        reference = {key: image for key, image in ours_images(url, size)}
        for name, reader in readers.items():  # correctness first: same samples, same order, same pixels
            pairs = list(reader())
            assert [key for key, _ in pairs] == keys, f"{name}: other samples or another order"
            if name == "webdataset_ours":
                assert all(torch.equal(image, reference[key]) for key, image in pairs), name

        # The samples as our packer holds them (bytes + metadata), cut into the same shards.
        chunks: list[list[Sample]] = []
        for shard, shard_url in zip(shards, urls):
            members = {sample["__key__"]: sample for sample in wds.WebDataset([shard_url], shardshuffle=False)}
            chunks.append([(key, "jpg", members[key]["jpg"], json.loads(members[key]["json"])) for key in shard.keys])
        identical = all(tarwriter_identical(chunk, read_shard(shard_url)) for chunk, shard_url in zip(chunks, urls))
        megabytes = sum(len(data) for chunk in chunks for _, _, data, _ in chunk) / 1e6

        def counted(write: Callable[[list[list[Sample]], Path], None]) -> Callable[[], int]:
            def action() -> int:
                write(chunks, written)
                return len(keys)
            return action

        read_rates = time_rounds({
            "ours: whole shard + parse_shard, image bytes": lambda: drain(ours_raw(urls)),
            "webdataset.WebDataset, raw samples (jpg + json bytes)": lambda: drain(webdataset_raw(urls)),
        }, args.repeats)
        image_rates = time_rounds({
            "ours: iter_split (torchvision decode_jpeg, centre crop)": lambda: drain(ours_images(url, size)),
            "WebDataset .decode('torchrgb8') (PIL), centre crop": lambda: drain(webdataset_pil(urls, size)),
            "WebDataset .map_dict(jpg=our decoder), centre crop": lambda: drain(webdataset_ours(urls, size)),
        }, args.repeats)
        write_rates = time_rounds({
            "ours: write_shard, a file per shard": counted(ours_write),
            "webdataset.TarWriter, a file per shard": counted(tarwriter_write),
            "webdataset.ShardWriter(maxcount=shard size)": counted(shardwriter_write),
        }, args.repeats)

    command = "python benchmarks/webdataset_compat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command.strip()}")
    print(f"CPU: {describe_cpu_line()}; Python {platform.python_version()}, torch {torch.__version__}, "
          f"webdataset {wds.__version__}, 1 torch thread")
    print(f"{len(keys)} train samples, {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} JPEGs ({megabytes / len(keys) * 1e3:.1f} kB "
          f"mean, {megabytes:.1f} MB), {len(shards)} shards of ~{args.shard_size}, crops of {size} px; medians of "
          f"{args.repeats} interleaved rounds; every reader yields the same samples in the index's order")
    results = {
        "read_raw": print_table("read, raw samples (samples/s):", read_rates,
                                "ours: whole shard + parse_shard, image bytes"),
        "read_images": print_table("read and decode to uint8 crops (samples/s):", image_rates,
                                   "ours: iter_split (torchvision decode_jpeg, centre crop)"),
        "write": print_table(f"write the same samples as shards ({megabytes:.1f} MB a pass; samples/s):", write_rates,
                             "ours: write_shard, a file per shard"),
        "tarwriter_byte_identical": identical,
    }
    print(f"TarWriter(user='', group='', mtime=0, encoder=False) with sorted JSON writes byte-identical shards: "
          f"{'yes' if identical else 'no'}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {[round(v, 2) for v in os.getloadavg()]}, "
          f"{time.perf_counter() - started:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
