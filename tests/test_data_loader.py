"""The streaming loader: disjoint equal shares per rank and worker, per-epoch shuffles, exact resume,
damaged data skipped without desynchronising ranks; and the evaluation reader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from inpaint.config import DataConfig, MaskConfig, ModelConfig
from inpaint.data import DataError, iter_split, load_index, make_train_loader, pack_dataset, split_keys
from inpaint.data.plan import Structure, epoch_order, rank_shares, remaining_after
from inpaint.data.shards import parse_shard

MODEL = ModelConfig(image_size=16, local_size=8)
MASK = MaskConfig()
TRAIN = 40  # images in the train split of the `dataset` fixture


def _pack(root: Path, photos: dict, shard_size: int) -> str:
    """50 small JPEGs (24x20, one 12x10 to exercise upscaling) from real photos, 40 train / 10 test."""
    rng = np.random.default_rng(3)
    source = root / "src"
    source.mkdir(parents=True, exist_ok=True)
    for i in range(50):
        photo = list(photos.values())[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 80)
        size = (10, 12) if i == 0 else (20, 24)
        Image.fromarray(photo[top:top + 96, left:left + 80]).resize(size).save(source / f"img{i:02d}.jpg")
    url = str(root / f"shards-{shard_size}")
    pack_dataset("folder", source, url, shard_size=shard_size, test_fraction=0.2, seed=1, progress=False)
    return url


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos) -> str:
    return _pack(tmp_path_factory.mktemp("loader"), photos, shard_size=7)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, photos) -> str:
    return _pack(tmp_path_factory.mktemp("loader1"), photos, shard_size=1000)


def _loader(url: str, rank: int = 0, world: int = 1, workers: int = 0, batch: int = 3, seed: int = 0,
            storage_options: dict | None = None):
    data = DataConfig(url=url, batch_size=batch, num_workers=workers, seed=seed)
    return make_train_loader(data, MODEL, MASK, rank=rank, world_size=world, storage_options=storage_options)


def _take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def _epoch(loader, epoch: int = 0) -> list[dict]:
    """The batches of one epoch, found by reading until the next epoch starts."""
    batches = []
    for batch in loader:
        if batch["epoch"] != epoch:
            return batches
        batches.append(batch)
    raise AssertionError("unreachable: the loader is endless")


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and x["epoch"] == y["epoch"] and torch.equal(x["image"], y["image"])
        and torch.equal(x["mask"], y["mask"]) and torch.equal(x["box"], y["box"]) for x, y in zip(a, b))


def test_a_batch_has_the_contracted_fields(dataset):
    batch = next(iter(_loader(dataset, batch=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 1, 16, 16) and batch["mask"].dtype == torch.uint8
    assert set(batch["mask"].unique().tolist()) == {0, 1}
    assert batch["box"].shape == (4, 2) and batch["box"].dtype == torch.int64
    assert len(batch["key"]) == 4 and batch["epoch"] == 0
    assert batch["image"].float().std() > 5  # real pixels, not padding


def test_crops_are_windows_of_the_source_and_do_not_depend_on_the_worker(dataset):
    def by_key(batches):
        return {key: (b["image"][i], b["mask"][i], b["box"][i]) for b in batches for i, key in enumerate(b["key"])}

    in_process = by_key(_take(iter(_loader(dataset, batch=4)), TRAIN // 4))
    in_workers = by_key(_take(iter(_loader(dataset, workers=2, batch=4)), TRAIN // 4))
    assert in_process.keys() == in_workers.keys()
    assert all(all(torch.equal(x, y) for x, y in zip(in_process[k], in_workers[k])) for k in in_process)
    for key in sorted(set(in_process) - {"img00"})[:5]:  # img00 is scaled up, so not a plain window
        source = decode_jpeg(torch.from_numpy(np.fromfile(Path(dataset).parent / "src" / f"{key}.jpg", np.uint8)))
        crop = in_process[key][0]
        windows = [(top, left) for top in range(source.shape[1] - 15) for left in range(source.shape[2] - 15)
                   if torch.equal(source[:, top:top + 16, left:left + 16], crop)]
        assert len(windows) >= 1, f"{key}: the crop is not a window of its image"


@pytest.mark.parametrize("workers, pin", [(1, False), (2, False), (1, True)])
def test_batches_kept_from_workers_stay_intact_while_their_buffers_are_reused(dataset, workers, pin):
    """Workers fill a few reusable shared buffers in turn; the loader hands out copies, so batches
    kept by the caller (image grids, tests) never change under it, epochs after."""
    def by_key(batches):
        return {(b["epoch"], key): (b["image"][i], b["mask"][i], b["box"][i])
                for b in batches for i, key in enumerate(b["key"])}

    count = 3 * TRAIN // 4  # one and a half epochs of batch 2: each worker's ring goes round many times
    data = DataConfig(url=dataset, batch_size=2, num_workers=workers, seed=0)
    kept = _take(iter(make_train_loader(data, MODEL, MASK, pin_memory=pin)), count)
    expected = by_key(_take(iter(_loader(dataset, batch=2)), TRAIN))  # two epochs in-process: crops and
    got = by_key(kept)  # masks depend on (seed, epoch, sample) only
    assert len(got) == 2 * count and got.keys() <= expected.keys()
    assert all(all(torch.equal(x, y) for x, y in zip(got[k], expected[k])) for k in got)
    storages = {b["image"].untyped_storage().data_ptr() for b in kept}
    assert len(storages) == count  # every batch in memory of its own
    assert kept[0]["image"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("world, workers, shards", [
    (1, 0, "many"), (2, 0, "many"), (3, 0, "many"), (1, 2, "many"), (2, 2, "many"), (3, 2, "many"),
    (3, 0, "one"), (3, 2, "one"),
])
def test_ranks_get_equal_batch_counts_and_disjoint_shares_covering_the_split(dataset, one_shard, world, workers,
                                                                           shards):
    url = dataset if shards == "many" else one_shard
    loaders = [_loader(url, rank, world, workers) for rank in range(world)]
    epochs = [_epoch(loader) for loader in loaders]
    expected_batches = TRAIN // (world * 3)
    assert [len(e) for e in epochs] == [expected_batches] * world == [l.batches_per_epoch for l in loaders]
    seen = [key for e in epochs for key in _keys(e)]
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    # The remainder that does not fill a batch on every rank is left out: fewer than world x batch.
    assert set(seen) <= set(split_keys(url, "train"))
    assert TRAIN - len(seen) == TRAIN % (world * 3)


def test_each_epoch_has_a_new_order_reproducible_from_seed_and_epoch(dataset):
    first, again = (_take(iter(_loader(dataset, batch=4)), 20) for _ in range(2))
    assert _same_batches(first, again)
    epoch0, epoch1 = _keys(first[:10]), _keys(first[10:])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    other_seed = _keys(_take(iter(_loader(dataset, batch=4, seed=5)), 10))
    assert other_seed != epoch0
    masks = torch.cat([b["mask"] for b in first[:10]])
    assert not all(torch.equal(masks[0], m) for m in masks[1:]), "every sample got the same mask"


@pytest.mark.parametrize("workers, consumed", [(0, 4), (2, 3)])
def test_a_mid_epoch_resume_continues_exactly(dataset, workers, consumed):
    reference = _take(iter(_loader(dataset, workers=workers)), 20)  # 13 batches per epoch: crosses into epoch 1

    interrupted = _loader(dataset, workers=workers)
    before = _take(iter(interrupted), consumed)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["epoch"] == 0 and state["batches"] == consumed

    resumed = _loader(dataset, workers=workers)
    resumed.load_state_dict(state)
    after = _take(iter(resumed), 20 - consumed)
    assert _same_batches(before + after, reference)


def test_worker_processes_live_across_epochs_and_later_epochs_follow_the_plan(dataset):
    import multiprocessing

    # 13 batches an epoch over 2 workers: epoch 1 starts on worker 1, epoch 2 on worker 0.
    loader = _loader(dataset, workers=2)
    stream = iter(loader)
    first = _take(stream, 1)
    workers = {child.pid for child in multiprocessing.active_children()}
    rest = _take(stream, 2 * 13 + 1)
    assert [b["epoch"] for b in first + rest] == [0] * 13 + [1] * 13 + [2] * 2
    assert {child.pid for child in multiprocessing.active_children()} == workers and len(workers) == 2, \
        "the DataLoader's workers were respawned at an epoch boundary"
    # Each later epoch is the batch sequence a loader started at that epoch makes.
    for epoch in (1, 2):
        fresh = _loader(dataset, workers=2)
        fresh.load_state_dict({**loader.state_dict(), "epoch": epoch, "batches": 0,
                               "stages": [{"world_size": 1, "num_workers": 2, "batch_size": 3, "batches": 0}]})
        want = _take(iter(fresh), 13 if epoch == 1 else 2)
        got = (first + rest)[13 * epoch:13 * epoch + len(want)]
        assert _same_batches(got, want)


def test_resume_across_a_new_world_size_and_worker_count_repeats_and_skips_nothing(dataset):
    old = [_loader(dataset, rank, world=2) for rank in range(2)]
    iterators = [iter(loader) for loader in old]
    consumed = [key for it in iterators for key in _keys(_take(it, 2))]
    state = old[0].state_dict()
    assert state == old[1].state_dict(), "ranks disagree on the position"

    new = [_loader(dataset, rank, world=3, workers=2, batch=2) for rank in range(3)]
    for loader in new:
        loader.load_state_dict(state)
    rest = [_epoch(loader) for loader in new]
    assert len({len(batches) for batches in rest}) == 1, "ranks got different batch counts after the change"
    later = [key for batches in rest for key in _keys(batches)]
    assert not set(later) & set(consumed) and len(later) == len(set(later))
    left_out = set(split_keys(dataset, "train")) - set(consumed) - set(later)
    assert len(left_out) < 3 * 2, "more left out than the new remainder"


def _damage(url: str, target: Path) -> tuple[str, int]:
    """A copy of the dataset with one undecodable JPEG and one shard cut in half.

    Returns the damaged key and the number of samples the cut shard lost.
    """
    shutil.copytree(url, target)
    index = load_index(str(target))
    first, second = index.split("train").shards[:2]
    path = target / first.name
    data = bytearray(path.read_bytes())
    sample = parse_shard(bytes(data)).samples[0]
    half = sample.size // 2
    data[sample.offset + half:sample.offset + sample.size] = bytes(sample.size - half)  # a truncated JPEG
    path.write_bytes(bytes(data))
    cut = target / second.name
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    return sample.key, second.samples - len(parse_shard(cut.read_bytes()).samples)


def test_a_corrupt_jpeg_and_a_truncated_shard_are_reported_and_replaced(dataset, tmp_path, caplog):
    damaged_key, cut_samples = _damage(dataset, tmp_path / "damaged")
    assert cut_samples > 0
    caplog.set_level(logging.WARNING, logger="inpaint.data")
    loaders = [_loader(str(tmp_path / "damaged"), rank, world=2, batch=4) for rank in range(2)]
    epochs = [_take(iter(loader), TRAIN // 8) for loader in loaders]
    assert all(batch["epoch"] == 0 for batch in epochs[0] + epochs[1]), "damage desynchronised the ranks"
    seen = _keys(epochs[0] + epochs[1])
    assert damaged_key not in seen
    lost = sum(loader.skipped for loader in loaders)
    assert lost == 1 + cut_samples  # no remainder with 2 x 4: every sample is planned
    assert len(set(seen)) == len(seen) - lost, "each lost sample is replaced by one duplicate"
    assert f"skipped sample {damaged_key}" in caplog.text and "truncated" in caplog.text


def test_loader_streams_from_s3_with_worker_processes(dataset, s3_bucket):
    import fsspec

    fsspec.filesystem("s3").put(dataset, f"{s3_bucket[5:]}/ds", recursive=True)
    remote = _epoch(_loader(f"{s3_bucket}/ds", workers=2, batch=4))
    local = _epoch(_loader(dataset, workers=2, batch=4))
    assert _same_batches(remote, local)


def test_iter_split_is_deterministic_centre_cropped_and_filterable(dataset):
    items = list(iter_split(dataset, "test", 16))
    assert [key for key, _ in items] == split_keys(dataset, "test")
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.uint8 for _, image in items)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(items, iter_split(dataset, "test", 16)))
    rng = np.random.default_rng(0)
    chosen = set(rng.choice(split_keys(dataset, "test"), 4, replace=False))
    assert {key for key, _ in iter_split(dataset, "test", 16, keys=chosen)} == chosen
    assert len(list(iter_split(dataset, "test", 16, limit=3))) == 3
    # img00 is 12x10: covered (scaled up) to the 16 px crop rather than rejected.
    assert any(image.shape == (3, 16, 16) for key, image in iter_split(dataset, "train", 16) if key == "img00")


def test_iter_split_centre_crop_matches_the_middle_of_the_image(tmp_path, photos):
    source = tmp_path / "src"
    source.mkdir()
    image = photos["astronaut"][100:124, 200:228]  # 24 x 28
    for i in range(2):
        Image.fromarray(image).save(source / f"im{i}.png")
    pack_dataset("folder", source, str(tmp_path / "ds"), progress=False, test_fraction=0.5)
    key, crop = next(iter_split(str(tmp_path / "ds"), "test", 16))
    assert torch.equal(crop, torch.from_numpy(image[4:20, 6:22]).permute(2, 0, 1))


def test_user_errors_are_data_errors_with_one_line(dataset, tmp_path):
    cases = [
        (lambda: load_index(str(tmp_path / "nothing")), "no index.json"),
        (lambda: load_index(""), "no dataset URL"),
        (lambda: split_keys(dataset, "valid"), "no split 'valid' \\(splits: test, train\\)"),
        (lambda: _loader(dataset, world=8, batch=8), "fewer than one batch on every rank"),
        (lambda: list(iter_split(dataset, "test", 16, keys=["nope"])), "not in split 'test'"),
        (lambda: _loader(dataset).load_state_dict({"epoch": 1}), "loader state is malformed"),
    ]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    cases.append((lambda: load_index(str(tmp_path / "bad")), "not valid JSON"))
    for action, message in cases:
        with pytest.raises(DataError, match=message) as error:
            action()
        assert "\n" not in str(error.value)


def test_a_state_from_other_data_restarts_at_the_next_epoch(dataset, caplog):
    loader = _loader(dataset)
    _take(iter(loader), 2)
    state = {**loader.state_dict(), "seed": 99}
    resumed = _loader(dataset)
    resumed.load_state_dict(state)
    assert next(iter(resumed))["epoch"] == 1
    assert "data or seed changed" in caplog.text


@pytest.mark.parametrize("samples, world, workers, batch, steps", [
    (40, 2, 1, 3, [(Structure(3, 2, 2), 2), (Structure(1, 3, 5), 1)]),
    (101, 3, 4, 2, [(Structure(2, 1, 7), 3)]),
    (7, 1, 2, 1, [(Structure(1, 2, 1), 5)]),
])
def test_plan_replay_across_structures_uses_each_sample_at_most_once(samples, world, workers, batch, steps):
    sizes = [samples // 4] * 3 + [samples - 3 * (samples // 4)]
    order = epoch_order(sizes, seed=0, epoch=2)
    assert sorted(order.tolist()) == list(range(samples))
    stages, used = [], []
    for structure, batches in steps:
        remaining = remaining_after(order, stages)
        taken = set(remaining.tolist()) - set(remaining_after(order, [*stages, (structure, batches)]).tolist())
        assert len(taken) == structure.world_size * batches * structure.batch_size
        # The same-structure resume path skips exactly what the replay says was consumed.
        skipped = {int(i) for rank in range(structure.world_size)
                   for share in rank_shares(remaining, structure, rank, batches)
                   for i in share.samples[:share.done * structure.batch_size]}
        assert skipped == taken
        used += taken
        stages.append((structure, batches))
    final = Structure(world, workers, batch)
    remaining = remaining_after(order, stages)
    shares = [rank_shares(remaining, final, rank, 0) for rank in range(world)]
    assert len({sum(len(s.samples) for s in rank) for rank in shares}) == 1, "ranks got different amounts"
    used += [int(i) for rank in shares for share in rank for i in share.samples]
    assert len(used) == len(set(used))
    assert samples - len(used) < world * batch


def test_parse_shard_matches_tarfile_and_stops_at_any_damaged_header(dataset):
    import io
    import tarfile

    path = next(Path(dataset).glob("train-*.tar"))
    data = path.read_bytes()
    parsed = parse_shard(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    images = [m for m in members if not m.name.endswith(".json")]
    assert parsed.error is None
    assert [(f"{s.key}.{s.ext}", s.offset, s.size) for s in parsed.samples] == [
        (m.name, m.offset_data, m.size) for m in images]
    rng = np.random.default_rng(0)
    for header in [m.offset for m in members]:
        damaged = bytearray(data)
        damaged[header + int(rng.integers(0, 500))] ^= 0x5A
        result = parse_shard(bytes(damaged))
        assert result.error is not None and "damaged" in result.error
        assert all(s.offset < header for s in result.samples)  # nothing at or after the bad header
    # The buffer may be larger than the shard (a reused one): only `size` bytes count.
    assert parse_shard(data + bytes(4096), len(data)) == parsed


def test_sample_draws_depend_on_seed_epoch_and_sample_only():
    from inpaint.data.loader import SampleDraws

    whole = SampleDraws.of_samples(3, 1, np.arange(10))
    part = SampleDraws.of_samples(3, 1, np.array([7, 2]))
    assert (part[0].crop, part[0].mask_uniforms, part[0].mask_seed) == (
        whole[7].crop, whole[7].mask_uniforms, whole[7].mask_seed)
    assert part[1].crop == whole[2].crop
    assert SampleDraws.of_samples(3, 2, np.arange(1))[0].crop != whole[0].crop
    assert SampleDraws.of_samples(4, 1, np.arange(1))[0].crop != whole[0].crop
    many = np.array([d.mask_uniforms for d in SampleDraws.of_samples(0, 0, np.arange(20000))])
    assert many.min() >= 0 and many.max() < 1 and abs(many.mean() - 0.5) < 0.01


def test_the_decode_operator_matches_torchvision_decode_jpeg(dataset):
    from inpaint.data.reading import decode

    path = next(Path(dataset).glob("train-*.tar"))
    data = path.read_bytes()
    sample = parse_shard(data).samples[0]
    jpeg = torch.frombuffer(bytearray(data[sample.offset:sample.offset + sample.size]), dtype=torch.uint8)
    expected = decode_jpeg(jpeg)
    assert torch.equal(decode(jpeg, True), expected) and torch.equal(decode(jpeg), expected)
    with pytest.raises(ValueError):
        decode(jpeg[:40].clone())
