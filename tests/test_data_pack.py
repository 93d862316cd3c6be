"""Packing CelebA-, LFW- and folder-layout sources built from real photographs into shards."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from inpaint.data import DataError, load_index, pack_dataset, parse_storage_options, split_keys
from inpaint.storage import StorageError
from inpaint.data import pack, sources
from inpaint.data.shards import parse_shard
from inpaint.data.sources import SAMPLE_PHOTOS, SAMPLE_SIDES, SAMPLE_TILE, open_source, sample_photo, sample_tiles

REPO = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("make_shards", REPO / "jobs" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_shards)


def _jpeg(photos: dict, rng: np.random.Generator, height: int = 22, width: int = 18) -> bytes:
    """A small JPEG cut from a random place of a random photo (CelebA's 218x178 aspect)."""
    photo = photos[sorted(photos)[rng.integers(len(photos))]]
    top, left = rng.integers(0, photo.shape[0] - 4 * height), rng.integers(0, photo.shape[1] - 4 * width)
    crop = Image.fromarray(photo[top:top + 4 * height, left:left + 4 * width]).resize((width, height))
    buffer = io.BytesIO()
    crop.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _celeba(root: Path, photos: dict, count: int = 30) -> dict[str, str]:
    """An official-layout CelebA; returns the expected split of each readable image."""
    rng = np.random.default_rng(0)
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    partition = {name: "012"[0 if i < count * 0.6 else 1 if i < count * 0.8 else 2] for i, name in enumerate(names)}
    for name in names:
        (folder / name).write_bytes(_jpeg(photos, rng))
    (folder / names[4]).write_bytes(_truncated((folder / names[4]).read_bytes()))  # corrupt
    partition_lines = [f"{name} {partition[name]}" for name in names if name != names[7]]  # unlisted
    partition_lines.append("999999.jpg 0")  # listed but missing
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    splits = {"0": "train", "1": "valid", "2": "test"}
    return {name[:-4]: splits[partition[name]] for name in names if name not in (names[4], names[7])}


def _lfw(root: Path, photos: dict, with_lists: bool) -> dict[str, list[str]]:
    """An official-layout LFW (lfw/<Person>/<Person>_000k.jpg); returns keys by person."""
    rng = np.random.default_rng(1)
    people = {f"Person_{chr(65 + i)}": 1 + i % 4 for i in range(10)}
    keys = {}
    for person, count in people.items():
        (root / "lfw" / person).mkdir(parents=True)
        keys[person] = [f"{person}_{k:04d}" for k in range(1, count + 1)]
        for key in keys[person]:
            (root / "lfw" / person / f"{key}.jpg").write_bytes(_jpeg(photos, rng, 25, 25))
    if with_lists:
        train, test = sorted(people)[:7], sorted(people)[7:]
        for name, group in (("peopleDevTrain.txt", train), ("peopleDevTest.txt", test)):
            (root / name).write_text(f"{len(group)}\n" + "".join(f"{p}\t{people[p]}\n" for p in group))
    return keys


def _shard_members(url: str, index) -> dict[str, dict[str, bytes]]:
    """Every shard member by key, read back with Python's tarfile (an independent reader)."""
    members: dict[str, dict[str, bytes]] = {}
    for split in index.splits.values():
        for shard in split.shards:
            with fsspec.open(index.shard_url(shard), "rb") as f, tarfile.open(fileobj=f) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    assert ext not in members.setdefault(key, {}), f"{member.name} twice"
                    members[key][ext] = tar.extractfile(member).read()
    return members


def _check_index(url: str) -> dict[str, list[str]]:
    """Assert the index matches the shards (counts, sizes, checksums, keys, balance); keys by split."""
    index = load_index(url)
    keys_by_split = {}
    for name, split in index.splits.items():
        sizes = [shard.samples for shard in split.shards]
        assert max(sizes) - min(sizes) <= 1, f"{name} shards unbalanced: {sizes}"
        for shard in split.shards:
            data = fsspec.open(index.shard_url(shard), "rb").open().read()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
            parsed = parse_shard(data)
            assert parsed.error is None and [s.key for s in parsed.samples] == list(shard.keys)
        keys_by_split[name] = index.keys(name)
    every = [key for keys in keys_by_split.values() for key in keys]
    assert len(every) == len(set(every)), "a key is in two places"
    return keys_by_split


@pytest.mark.parametrize("zipped, to_s3", [(False, False), pytest.param(True, True, marks=pytest.mark.s3)])
def test_celeba_official_split_keeps_bytes_and_reports_bad_files(tmp_path, photos, zipped, to_s3, request):
    expected = _celeba(tmp_path / "celeba", photos)
    if zipped:
        with zipfile.ZipFile(tmp_path / "celeba" / "img_align_celeba.zip", "w") as archive:
            for path in sorted((tmp_path / "celeba" / "img_align_celeba").iterdir()):
                archive.write(path, f"img_align_celeba/{path.name}")
        shutil.rmtree(tmp_path / "celeba" / "img_align_celeba")
    out = f"{request.getfixturevalue('s3_bucket')}/celeba" if to_s3 else str(tmp_path / "out")
    summary = pack_dataset("celeba", tmp_path / "celeba", out, shard_size=4, progress=False)

    keys = _check_index(out)
    assert {split: sorted(k) for split, k in keys.items()} == {
        split: sorted(k for k, s in expected.items() if s == split) for split in ("train", "valid", "test")}
    assert summary.samples == {split: len(k) for split, k in keys.items()}
    skipped = dict(summary.skipped)
    assert sorted(skipped) == ["img_align_celeba/000005.jpg", "img_align_celeba/000008.jpg",
                               "img_align_celeba/999999.jpg"]
    assert skipped["img_align_celeba/000005.jpg"].startswith("unreadable image")
    assert skipped["img_align_celeba/000008.jpg"] == "not in list_eval_partition.txt"
    assert skipped["img_align_celeba/999999.jpg"] == "listed in list_eval_partition.txt but missing"
    assert len(load_index(out).meta["skipped"]) == 3

    members = _shard_members(out, load_index(out))
    source = tmp_path / "celeba" / "img_align_celeba"
    for key, split in expected.items():
        if not zipped:
            assert members[key]["jpg"] == (source / f"{key}.jpg").read_bytes(), "bytes were re-encoded"
        assert json.loads(members[key]["json"]) == {"source": f"img_align_celeba/{key}.jpg", "split": split,
                                                    "width": 18, "height": 22}


def test_celeba_paper_split_takes_the_first_images_by_name(tmp_path, photos, monkeypatch):
    expected = _celeba(tmp_path / "celeba", photos)
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()  # the paper split does not need it
    monkeypatch.setattr(sources, "PAPER_CELEBA_TRAIN", 20)
    out = str(tmp_path / "out")
    pack_dataset("celeba", tmp_path / "celeba", out, split="paper", progress=False)
    names = sorted(f"{i:06d}" for i in range(1, 31))
    keys = _check_index(out)
    assert sorted(keys["train"]) == [n for n in names[:20] if n != "000005"]
    assert sorted(keys["test"]) == names[20:]
    assert "000008" in keys["train"] and "000008" not in expected  # no partition file, so it counts


def test_lfw_official_lists_split_by_person_into_s3(tmp_path, photos, s3_bucket):
    people = _lfw(tmp_path / "lfw-src", photos, with_lists=True)
    url = f"{s3_bucket}/lfw"
    summary = pack_dataset("lfw", tmp_path / "lfw-src", url, shard_size=3, progress=False)
    keys = _check_index(url)
    train_people = sorted(people)[:7]
    assert sorted(keys["train"]) == sorted(k for p in train_people for k in people[p])
    assert sorted(keys["test"]) == sorted(k for p in people if p not in train_people for k in people[p])
    assert summary.split_method.startswith("official")


def test_lfw_tgz_without_lists_splits_by_person_with_the_seed(tmp_path, photos):
    people = _lfw(tmp_path / "src", photos, with_lists=False)
    with tarfile.open(tmp_path / "lfw.tgz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "lfw", "lfw")
    person_of = {key: person for person, keys in people.items() for key in keys}
    splits = {}
    for run, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"out{run}"
        pack_dataset("lfw", tmp_path / "lfw.tgz", str(out), seed=seed, progress=False)
        keys = _check_index(str(out))
        train_people = {person_of[k] for k in keys["train"]}
        assert not train_people & {person_of[k] for k in keys["test"]}, "a person is in both splits"
        assert len(keys["train"]) + len(keys["test"]) == len(person_of)
        splits.setdefault(seed, []).append(sorted(keys["train"]))
    assert splits[0][0] == splits[0][1], "same seed, different split"
    assert splits[0][0] != splits[1][0], "the seed does not change the split"


def _folder(root: Path, photos: dict) -> list[str]:
    rng = np.random.default_rng(2)
    keys = []
    for i in range(12):
        sub = root / ("a" if i % 2 else "b.c")
        sub.mkdir(parents=True, exist_ok=True)
        data = _jpeg(photos, rng)
        if i % 3 == 0:  # a PNG too: stored as PNG, not converted
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buffer, "PNG")
            (sub / f"img.{i}.png").write_bytes(buffer.getvalue())
        else:
            (sub / f"img.{i}.jpg").write_bytes(data)
        keys.append(f"{sub.name.replace('.', '_')}/img_{i}")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return keys


def test_folder_packs_identically_to_s3_and_to_a_local_folder(tmp_path, photos, s3_bucket):
    keys = _folder(tmp_path / "photos", photos)
    local, remote = str(tmp_path / "out"), f"{s3_bucket}/photos"
    summaries = [pack_dataset("folder", tmp_path / "photos", url, shard_size=4, test_fraction=0.25, progress=False)
                 for url in (local, remote)]
    assert [s.skipped for s in summaries] == [[("a/broken.jpg", summaries[0].skipped[0][1])]] * 2
    assert _check_index(local) == _check_index(remote)
    assert sorted(k for split in _check_index(local).values() for k in split) == sorted(keys)
    assert len(_check_index(local)["test"]) == 3  # 3 of the 12 that decode: the broken file takes no place
    assert {split: [s.sha256 for s in info.shards] for split, info in load_index(local).splits.items()} == \
        {split: [s.sha256 for s in info.shards] for split, info in load_index(remote).splits.items()}
    assert "png" in _shard_members(local, load_index(local))["a/img_3"]


@pytest.mark.parametrize("kind", ["folder", "lfw"])
def test_a_seeded_split_is_drawn_over_the_images_that_decode(tmp_path, photos, kind):
    """Damaged files never take test places: with any seed, both splits get images that decode."""
    rng = np.random.default_rng(3)
    source = tmp_path / "src"
    if kind == "folder":  # 2 of 6 decode
        source.mkdir()
        for i in range(6):
            (source / f"{i}.jpg").write_bytes(_jpeg(photos, rng) if i in (1, 4) else b"not a jpeg")
    else:  # 3 people of 8 have a readable photo
        for i in range(8):
            (source / "lfw" / f"P_{i}").mkdir(parents=True)
            (source / "lfw" / f"P_{i}" / f"P_{i}_0001.jpg").write_bytes(_jpeg(photos, rng) if i in (0, 3, 6) else b"x")
    for seed in range(8):
        out = tmp_path / f"out{seed}"
        summary = pack_dataset(kind, source, str(out), seed=seed, progress=False, **(
            {"test_fraction": 0.5} if kind == "folder" else {}))
        assert len(summary.skipped) == (4 if kind == "folder" else 5)
        keys = _check_index(str(out))
        assert keys.get("train") and keys.get("test"), f"seed {seed}: {keys}"


def test_rerun_refuses_a_finished_output_and_resumes_an_interrupted_one(tmp_path, photos):
    _folder(tmp_path / "photos", photos)
    out = tmp_path / "out"
    first = pack_dataset("folder", tmp_path / "photos", str(out), shard_size=2, progress=False)
    before = load_index(str(out))
    with pytest.raises(DataError, match="already holds a packed dataset"):
        pack_dataset("folder", tmp_path / "photos", str(out), shard_size=2, progress=False)

    # An interrupted run: no index, one shard missing, one half-written under its final name.
    (out / "index.json").unlink()
    (out / "train-000001.tar").unlink()
    shard = out / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    second = pack_dataset("folder", tmp_path / "photos", str(out), shard_size=2, progress=False)
    assert second.reused_shards == sum(first.shards.values()) - 2
    assert load_index(str(out)).splits == before.splits


def test_a_failure_mid_shard_never_leaves_a_shard_that_looks_complete(tmp_path, photos, monkeypatch, s3_bucket):
    _folder(tmp_path / "photos", photos)
    real_meta, calls = pack._meta, []

    def failing_meta(checked):
        calls.append(checked)
        if len(calls) == 6:  # the second sample of the second shard
            raise OSError("disk pulled")
        return real_meta(checked)

    monkeypatch.setattr(pack, "_meta", failing_meta)
    for url in (str(tmp_path / "out"), f"{s3_bucket}/out"):
        calls.clear()
        with pytest.raises(DataError, match="disk pulled"):  # one line naming the shard, not a traceback
            pack_dataset("folder", tmp_path / "photos", url, shard_size=4, progress=False)
        fs, path = fsspec.core.url_to_fs(url)
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(path)) == ["train-000000.tar"]


def test_sample_dataset_is_real_photos_split_by_disjoint_tiles(tmp_path):
    summary = pack_dataset("sample", None, str(tmp_path / "sample"), progress=False)
    keys = _check_index(str(tmp_path / "sample"))
    assert summary.samples["train"] >= 80 and summary.samples["test"] >= 15
    assert summary.shards["train"] > 3
    members = _shard_members(str(tmp_path / "sample"), load_index(str(tmp_path / "sample")))
    image = np.asarray(Image.open(io.BytesIO(members[keys["test"][0]]["jpg"])))
    # Stored larger than the quickstart's 64 px crops, so each epoch crops anew.
    assert image.shape == (SAMPLE_TILE, SAMPLE_TILE, 3) and image.std() > 5  # a real photo, not a flat fill
    assert split_keys(str(tmp_path / "sample"), "test") == keys["test"]
    # Every photo, both faces included, is in both splits.
    photos = {split: {json.loads(members[k]["json"])["source"].split("/")[0] for k in ks} for split, ks in keys.items()}
    assert photos["train"] == photos["test"] == set(SAMPLE_PHOTOS)
    assert {"astronaut", "grace_hopper"} <= photos["test"]


def test_sample_split_shares_no_pixel_between_train_and_test():
    """Tiles of one photo are cells of one grid: a test tile's pixels are in no training tile."""
    for photo in SAMPLE_PHOTOS:
        cells = {}
        with open_source("sample", None) as listing:
            for image in listing.images:
                name, cell = image.name.split("/")
                if name == photo:
                    row, col = (int(x) for x in cell.removesuffix(".jpg").lstrip("r").split("c"))
                    cells[(row, col)] = image.split
        assert len(cells) >= 9 and {"train", "test"} == set(cells.values())
        # Cells of one grid at SAMPLE_TILE pitch never overlap; each position is one tile, in one split.
        boxes = {split: [(r * SAMPLE_TILE, c * SAMPLE_TILE) for (r, c), s in cells.items() if s == split]
                 for split in ("train", "test")}
        for top, left in boxes["test"]:
            for t, l in boxes["train"]:
                assert abs(top - t) >= SAMPLE_TILE or abs(left - l) >= SAMPLE_TILE


def test_sample_tiles_are_disjoint_crops_of_the_scaled_photo():
    from PIL import Image as PILImage

    tiles = dict(sample_tiles("astronaut"))
    photo = PILImage.fromarray(sample_photo("astronaut"))
    scale = SAMPLE_SIDES["astronaut"] / min(photo.size)
    scaled = np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)),
                                     PILImage.Resampling.LANCZOS)).astype(np.int16)
    tile = np.asarray(Image.open(io.BytesIO(tiles["astronaut/r1c2.jpg"]))).astype(np.int16)
    region = scaled[SAMPLE_TILE:2 * SAMPLE_TILE, 2 * SAMPLE_TILE:3 * SAMPLE_TILE]
    assert np.abs(tile - region).mean() < 3  # the same pixels, up to JPEG


def test_sample_photos_include_the_shipped_faces_in_colour():
    for name in ("astronaut", "grace_hopper", "camera"):
        image = sample_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 300


def test_webdataset_reads_the_shards_as_they_are(sample_dataset):
    import webdataset as wds

    index = load_index(sample_dataset)
    urls = [index.shard_url(shard) for shard in index.split("train").shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == index.keys("train")
    assert all(json.loads(s["json"])["split"] == "train" and s["jpg"][:2] == b"\xff\xd8" for s in samples)


def test_storage_options_parse_nested_and_typed_values():
    assert parse_storage_options(["endpoint_url=http://minio:9000", "anon=true", "client_kwargs.region_name=eu",
                                  "config_kwargs.retries={\"max_attempts\": 3}"]) == {
        "endpoint_url": "http://minio:9000", "anon": True, "client_kwargs": {"region_name": "eu"},
        "config_kwargs": {"retries": {"max_attempts": 3}}}
    with pytest.raises(StorageError, match="expected key=value"):
        parse_storage_options(["endpoint_url"])


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "celeba", "--source", "/no/such/dir", "--output", "OUT"], "error: source /no/such/dir does not exist"),
    (["--dataset", "celeba", "--source", "SRC", "--output", "OUT"], "error: SRC: not a CelebA folder"),
    (["--dataset", "lfw", "--source", "SRC", "--output", "OUT"], "error: SRC: not an LFW folder"),
    (["--dataset", "folder", "--output", "OUT"], "error: --dataset folder needs --source PATH"),
    (["--dataset", "imagenet", "--output", "OUT"], "error: argument --dataset: invalid choice: 'imagenet'"),
    (["--dataset", "celeba", "--source", "SRC", "--split", "person", "--output", "OUT"],
     "error: --split 'person' does not apply to celeba"),
    (["--dataset", "sample", "--output", "DONE"], "error: DONE already holds a packed dataset"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message, sample_dataset):
    (tmp_path / "src").mkdir()
    replace = {"SRC": str(tmp_path / "src"), "OUT": str(tmp_path / "out"), "DONE": sample_dataset}
    argv = [replace.get(arg, arg) for arg in argv]
    message = message.replace("SRC", replace["SRC"]).replace("DONE", replace["DONE"])
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(make_shards.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(message) and err.count("\n") == 1, err


def test_unreachable_storage_is_one_clear_error(s3_server):
    options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(DataError, match=r"^cannot reach s3://bucket/x: .*127\.0\.0\.1:9") as error:
        pack_dataset("sample", None, "s3://bucket/x", storage_options=options, progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # a fresh interpreter importing torch: 3-7 s here
def test_cli_packs_the_sample_dataset_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "make_shards.py"), "--dataset", "sample",
                             "--output", str(tmp_path / "sample"), "--quiet"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "packed sample into" in result.stdout and "train" in result.stdout
    assert load_index(str(tmp_path / "sample")).split_size("train") > 0


@pytest.mark.parametrize("to_s3", [False, pytest.param(True, marks=pytest.mark.s3)])
def test_read_into_reuses_a_buffer_that_fits_and_never_truncates(tmp_path, s3_bucket, to_s3):
    from inpaint.storage import MissingObject, read_into

    url = f"{s3_bucket}/blob" if to_s3 else str(tmp_path / "blob")
    payload = bytes(range(256)) * 40
    with fsspec.open(url, "wb") as file:
        file.write(payload)
    roomy = bytearray(len(payload) + 100)
    buffer, size = read_into(url, roomy)
    assert buffer is roomy and size == len(payload) and bytes(buffer[:size]) == payload
    small = bytearray(10)
    buffer, size = read_into(url, small)
    assert buffer is not small and bytes(buffer[:size]) == payload
    with pytest.raises(MissingObject, match="not found"):
        read_into(url + "-missing", roomy)
