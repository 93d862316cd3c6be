"""Image sources as their publishers ship them, each listed with a split per image.

- ``celeba``: ``img_align_celeba/*.jpg`` (or ``img_align_celeba.zip``), also under ``Img/``, with
  ``list_eval_partition.txt`` (also under ``Eval/``). Splits ``official`` (0 train, 1 valid,
  2 test) or ``paper`` (the first 120,000 images by name train, the rest test).
- ``lfw``: ``lfw/<Person>/<Person>_0001.jpg`` (any ``lfw*`` folder, the folder itself, or
  ``lfw.tgz`` / ``lfw-deepfunneled.tgz``). Split ``official``: by ``peopleDevTrain.txt`` /
  ``peopleDevTest.txt`` when present, else seeded by person (~10,000 of LFW's 13,233 images
  train) so no person is in both; ``person`` forces the seeded split.
- ``folder``: every image under a folder, a seeded ``random`` split with ``test_fraction``.
- ``sample``: 96 px tiles of real photographs that installed packages ship (no download):
  scikit-image's and matplotlib's, faces first (see :func:`sample_photo`). Each photo is cut
  into a grid of disjoint tiles and a seeded share of each photo's tiles is held out as
  ``test``, so no test pixel is in any training tile; training takes random crops of the
  training tiles, new each epoch.

Nothing here decodes images: the packer checks every image and reports the unreadable ones. A
seeded split is drawn again over the images that decode (:meth:`SourceListing.without`), so an
unreadable file never takes a place in the test split.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import random
import re
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from inpaint.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLIT_METHODS = {"celeba": ("official", "paper"), "lfw": ("official", "person"),
                 "folder": ("random",), "sample": ("random",)}
CELEBA_PARTITIONS = {"0": "train", "1": "valid", "2": "test"}
PAPER_CELEBA_TRAIN = 120_000
LFW_TRAIN_SHARE = 10_000 / 13_233  # the paper's ~10,000 training images of LFW's 13,233
# Real photographs that the dependencies ship, with the shorter side (px) each is stored at. Faces
# matter most for this project (CelebA, LFW), so the two colour portraits get the most tiles:
# scikit-image's astronaut (Eileen Collins) and matplotlib's Grace Hopper; the cameraman is grey.
SAMPLE_SIDES = {"astronaut": 384, "grace_hopper": 384, "camera": 288, "chelsea": 288, "coffee": 288,
                "rocket": 288, "stereo_motorcycle": 288, "immunohistochemistry": 288, "hubble_deep_field": 288,
                "retina": 288}
SAMPLE_PHOTOS = tuple(SAMPLE_SIDES)
SAMPLE_TILE = 96  # px: room for fresh random crops of up to 96 px (64 px in the quickstart) every epoch
SAMPLE_TEST_FRACTION = 0.2  # of each photo's tiles
_KEY_MAX = 90  # ustar names hold 100 bytes, and the key gets ".json" appended


@dataclass(frozen=True)
class SourceImage:
    """One image to pack: ``name`` as the user knows it, its sample ``key``, split and bytes."""

    name: str
    key: str
    split: str
    read: Callable[[], bytes] = field(repr=False, compare=False)


@dataclass
class SourceListing:
    images: list[SourceImage]
    skipped: list[tuple[str, str]]  # (name, reason): listed images that cannot be packed
    split_method: str
    # For seeded splits: the split labels of the given images, drawn over those images only.
    draw_splits: Callable[[list[SourceImage]], list[str]] | None = field(default=None, repr=False)

    def without(self, unreadable: set[str]) -> list[SourceImage]:
        """The images but the ``unreadable`` names; a seeded split is drawn again over those left.

        Drawing over every listed file and then dropping the ones that do not decode could empty
        a split (a folder of 10 images whose one test image is damaged packs no test split).
        """
        kept = [image for image in self.images if image.name not in unreadable]
        if self.draw_splits is None or not unreadable:
            return kept
        return [dataclasses.replace(image, split=label) for image, label in zip(kept, self.draw_splits(kept))]


def _key(stem: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension) and at most _KEY_MAX bytes."""
    key = re.sub(r"[^A-Za-z0-9_\-/]", "_", stem).strip("/") or "_"
    if len(key) > _KEY_MAX:
        key = f"{key[:_KEY_MAX - 17]}-{hashlib.sha1(stem.encode()).hexdigest()[:16]}"
    return key


def _unique_keys(stems: list[str]) -> list[str]:
    """Keys for stems in order; a collision (``a.jpg`` and ``a.png``) gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    keys = []
    for stem in stems:
        key = _key(stem)
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return keys


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _seeded_shuffle(items: list, seed: int, salt: str) -> list:
    items = list(items)
    random.Random(f"{seed}:{salt}").shuffle(items)
    return items


def _need_dir(source: str | Path | None, kind: str) -> Path:
    if source is None or str(source) == "":
        raise DataError(f"--dataset {kind} needs --source PATH")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"source {path} does not exist")
    return path


# ---------------------------------------------------------------- CelebA

def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _celeba_images(root: Path, stack: contextlib.ExitStack) -> dict[str, Callable[[], bytes]]:
    """file name -> reader, from img_align_celeba/ or img_align_celeba.zip."""
    folder = _first_existing(root / "img_align_celeba", root / "Img" / "img_align_celeba")
    if folder is not None and folder.is_dir():
        return {p.name: p.read_bytes for p in sorted(folder.iterdir()) if _is_image(p)}
    archive = _first_existing(root / "img_align_celeba.zip", root / "Img" / "img_align_celeba.zip")
    if archive is None:
        raise DataError(f"{root}: not a CelebA folder (no img_align_celeba/ or img_align_celeba.zip, "
                        "also looked under Img/)")
    try:
        zipped = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: cannot read the zip ({exc})") from None
    return {Path(info.filename).name: functools.partial(zipped.read, info.filename)
            for info in zipped.infolist() if not info.is_dir() and _is_image(Path(info.filename))}


def _celeba_partition(root: Path) -> dict[str, str]:
    path = _first_existing(root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    if path is None:
        raise DataError(f"{root}: no list_eval_partition.txt (also looked under Eval/); it gives the official "
                        "split (use --split paper to split without it)")
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in CELEBA_PARTITIONS:
            raise DataError(f"{path}:{number}: expected 'NAME.jpg 0|1|2', got {line.strip()!r}")
        partition[fields[0]] = CELEBA_PARTITIONS[fields[1]]
    return partition


def _celeba(root: Path, split: str, stack: contextlib.ExitStack) -> SourceListing:
    images = _celeba_images(root, stack)
    if not images:
        raise DataError(f"{root}: no images in img_align_celeba")
    names = sorted(images)
    skipped = []
    if split == "paper":
        splits = {name: "train" if i < PAPER_CELEBA_TRAIN else "test" for i, name in enumerate(names)}
        method = f"paper (first {PAPER_CELEBA_TRAIN:,} images by name train, the rest test)"
    else:
        partition = _celeba_partition(root)
        splits = {name: partition[name] for name in names if name in partition}
        skipped += [(f"img_align_celeba/{n}", "not in list_eval_partition.txt") for n in names if n not in partition]
        skipped += [(f"img_align_celeba/{n}", "listed in list_eval_partition.txt but missing")
                    for n in sorted(set(partition) - set(images))]
        method = "official (list_eval_partition.txt)"
    kept = [n for n in names if n in splits]
    keys = _unique_keys([Path(n).stem for n in kept])
    return SourceListing([SourceImage(f"img_align_celeba/{n}", k, splits[n], images[n]) for n, k in zip(kept, keys)],
                         skipped, method)


# ---------------------------------------------------------------- LFW

def _holds_people(folder: Path) -> bool:
    """LFW's layout: person folders holding <Person>_0001.jpg."""
    return folder.is_dir() and any((d / f"{d.name}_0001.jpg").is_file() for d in folder.iterdir() if d.is_dir())


def _extract_tgz(archive: Path, stack: contextlib.ExitStack) -> Path:
    target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inpaint-lfw-")))
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in (".jpg", ".txt"):
                    tar.extract(member, target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive ({exc})") from None
    return target


def _lfw_folders(source: Path, stack: contextlib.ExitStack) -> tuple[Path, list[Path]]:
    """The folder of person folders, and the folders that may hold peopleDevTrain/Test.txt."""
    if source.is_file():
        if not source.name.endswith((".tgz", ".tar.gz", ".tar")):
            raise DataError(f"{source}: not an LFW archive (expected lfw.tgz or lfw-deepfunneled.tgz)")
        extracted = _extract_tgz(source, stack)
        try:
            people_root, dirs = _lfw_folders(extracted, stack)
        except DataError:
            raise DataError(f"{source}: no LFW layout (lfw*/<Person>/<Person>_0001.jpg) in this archive") from None
        return people_root, [*dirs, source.parent]
    if _holds_people(source):
        return source, [source, source.parent]
    for candidate in sorted(source.glob("lfw*")):
        if _holds_people(candidate):
            return candidate, [source, candidate]
    for candidate in sorted(source.glob("lfw*.tgz")):
        return _lfw_folders(candidate, stack)
    raise DataError(f"{source}: not an LFW folder (no lfw*/<Person>/<Person>_0001.jpg and no lfw*.tgz)")


def _read_people(path: Path) -> set[str]:
    """Names in a peopleDev*.txt: a count line, then 'Name<TAB>images' lines."""
    return {fields[0] for fields in (line.split() for line in path.read_text().splitlines()) if len(fields) == 2}


def _lfw(source: Path, split: str, seed: int, stack: contextlib.ExitStack) -> SourceListing:
    people_root, extra_dirs = _lfw_folders(source, stack)
    people = {d.name: sorted(p for p in d.iterdir() if _is_image(p))
              for d in sorted(people_root.iterdir()) if d.is_dir()}
    lists = {name: _first_existing(*(d / f"people{name}.txt" for d in extra_dirs)) for name in ("DevTrain", "DevTest")}
    skipped = []
    if split == "official" and all(lists.values()):
        train, test = _read_people(lists["DevTrain"]), _read_people(lists["DevTest"])
        assignment = {p: "train" if p in train else "test" for p in people if p in train or p in test}
        skipped = [(f"{people_root.name}/{p}/{f.name}", "person in neither peopleDevTrain.txt nor peopleDevTest.txt")
                   for p in people if p not in assignment for f in people[p]]
        method = "official (peopleDevTrain.txt / peopleDevTest.txt)"
    else:
        assignment = _person_split(collections.Counter({p: len(files) for p, files in people.items()}), seed)
        method = f"by person, seeded (seed {seed}; ~{LFW_TRAIN_SHARE:.0%} of the images train)"
    files = [(p, f) for p in sorted(assignment) for f in people[p]]
    keys = _unique_keys([f.stem for _, f in files])
    images = [SourceImage(f"{people_root.name}/{p}/{f.name}", k, assignment[p], f.read_bytes)
              for (p, f), k in zip(files, keys)]
    person_of = {image.name: p for image, (p, _) in zip(images, files)}

    def draw(kept: list[SourceImage]) -> list[str]:
        split = _person_split(collections.Counter(person_of[image.name] for image in kept), seed)
        return [split[person_of[image.name]] for image in kept]
    return SourceListing(images, skipped, method, None if method.startswith("official") else draw)


def _person_split(images_per_person: dict[str, int], seed: int) -> dict[str, str]:
    """Seeded person -> split: people in a shuffled order train until ~LFW_TRAIN_SHARE of the images do."""
    target, seen, assignment = round(sum(images_per_person.values()) * LFW_TRAIN_SHARE), 0, {}
    for person in _seeded_shuffle(sorted(images_per_person), seed, "lfw"):
        assignment[person] = "train" if seen < target else "test"
        seen += images_per_person[person]
    return assignment


# ---------------------------------------------------------------- any folder, built-in sample

def _random_split(count: int, seed: int, test_fraction: float, salt: str) -> list[str]:
    """Seeded train/test labels; both splits get an image whenever there are two."""
    tests = min(count - 1, max(1, round(count * test_fraction))) if count > 1 else 0
    labels = ["test"] * tests + ["train"] * (count - tests)
    return _seeded_shuffle(labels, seed, salt)


def _folder(root: Path, seed: int, test_fraction: float) -> SourceListing:
    if not root.is_dir():
        raise DataError(f"source {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    relative = [p.relative_to(root).as_posix() for p in files]
    keys = _unique_keys([r.rsplit(".", 1)[0] for r in relative])
    splits = _random_split(len(files), seed, test_fraction, "folder")
    images = [SourceImage(r, k, s, p.read_bytes) for r, k, s, p in zip(relative, keys, splits, files)]
    return SourceListing(images, [], f"random, seeded (seed {seed}, test fraction {test_fraction})",
                         lambda kept: _random_split(len(kept), seed, test_fraction, "folder"))


def sample_photo(name: str) -> np.ndarray:
    """An RGB uint8 (H, W, 3) photograph that an installed package ships (no download)."""
    if name == "grace_hopper":
        from matplotlib import cbook

        from PIL import Image

        with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data  # slow to import; only the sample dataset needs it

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def sample_tiles(photo: str) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of the disjoint SAMPLE_TILE px tiles on a grid over one scaled photo."""
    from PIL import Image

    image = Image.fromarray(sample_photo(photo))
    scale = SAMPLE_SIDES[photo] / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    tiles = []
    for row in range(image.height // SAMPLE_TILE):
        for col in range(image.width // SAMPLE_TILE):
            box = (col * SAMPLE_TILE, row * SAMPLE_TILE, (col + 1) * SAMPLE_TILE, (row + 1) * SAMPLE_TILE)
            buffer = io.BytesIO()
            image.crop(box).save(buffer, "JPEG", quality=95)
            tiles.append((f"{photo}/r{row}c{col}.jpg", buffer.getvalue()))
    return tiles


def _sample(seed: int, test_fraction: float) -> SourceListing:
    images = []
    for photo in SAMPLE_PHOTOS:
        tiles = sample_tiles(photo)
        # Per photo, so every photo is in both splits; tiles are disjoint, so no test pixel is trained on.
        splits = _random_split(len(tiles), seed, test_fraction, f"sample:{photo}")
        images += [SourceImage(name, _key(name.rsplit(".", 1)[0].replace("/", "-")), split,
                               functools.partial(bytes, data))
                   for (name, data), split in zip(tiles, splits)]
    return SourceListing(images, [], f"disjoint {SAMPLE_TILE} px tiles, a seeded {test_fraction:.0%} of each "
                                     f"photo's tiles test (seed {seed})")


@contextlib.contextmanager
def open_source(kind: str, source: str | Path | None, split: str | None = None, seed: int = 0,
                test_fraction: float | None = None) -> Iterator[SourceListing]:
    """The images of a source with their splits; temporary extractions last until exit.

    ``test_fraction`` (folder and sample) defaults to 0.1 for folders, SAMPLE_TEST_FRACTION for the sample.
    """
    if kind not in SPLIT_METHODS:
        raise DataError(f"unknown dataset {kind!r} (known: {', '.join(SPLIT_METHODS)})")
    split = split or SPLIT_METHODS[kind][0]
    if split not in SPLIT_METHODS[kind]:
        raise DataError(f"--split {split!r} does not apply to {kind} (choose from: {', '.join(SPLIT_METHODS[kind])})")
    if test_fraction is None:
        test_fraction = SAMPLE_TEST_FRACTION if kind == "sample" else 0.1
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    with contextlib.ExitStack() as stack:
        if kind == "sample":
            yield _sample(seed, test_fraction)
        elif kind == "folder":
            yield _folder(_need_dir(source, kind), seed, test_fraction)
        elif kind == "celeba":
            root = _need_dir(source, kind)
            if not root.is_dir():
                raise DataError(f"source {root} is not a folder (expected the CelebA folder)")
            yield _celeba(root, split, stack)
        else:
            yield _lfw(_need_dir(source, kind), split, seed, stack)
