"""Training produces an inpainter: a short quickstart run fills a held-out photo's hole with structure.

Not a quality figure (those are in benchmarks/quality.py): only that a few hundred steps of the
embedded default's networks already give a hole that follows the photo, where an untrained or
broken generator gives a flat box (the symptom of issue 11), and that the post-processing users
get by default (GLCIC's Poisson blending) improves on the raw fill on held-out tiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from inpaint import recipes
from inpaint.__main__ import main
from inpaint.config import ScheduleConfig
from inpaint.data import iter_split
from inpaint.data.loader import make_train_loader
from inpaint.trainer import Trainer

STEPS = 400


def hole_psnr(filled: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    error = (filled[hole].astype(np.float64) - original[hole]) ** 2
    return float(10 * np.log10(255.0 ** 2 / error.mean()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dataset):
    """(checkpoint of a short generator-phase run of the quickstart networks, untrained checkpoint)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = recipes.get("quickstart")
    # A constant rate: the recipe's warm-up and cosine span its 2000-step generator phase, and squeezed
    # into 400 steps they would decay the rate 5x sooner than the quick start does.
    config = config.replace(data=dataclasses.replace(config.data, url=sample_dataset),
                            optim=dataclasses.replace(config.optim, warmup_steps=0, decay="constant"),
                            schedule=ScheduleConfig(generator_steps=STEPS, discriminator_steps=0, joint_steps=0,
                                                    reference_batch=config.data.batch_size))
    folder = tmp_path_factory.mktemp("learns")
    trainer = Trainer(config, device="cpu")
    untrained = trainer.save(folder / "untrained" / "checkpoint_000000000")
    loader = make_train_loader(config.data, config.model, config.mask)
    while not trainer.done:
        for batch in loader:
            trainer.train_step(batch)
            if trainer.done:
                break
    return trainer.save(folder / "trained" / f"checkpoint_{STEPS:09d}"), untrained


def fill(checkpoint, image: np.ndarray, hole: np.ndarray, folder, *flags: str) -> np.ndarray:
    Image.fromarray(image).save(folder / "photo.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(folder / "mask.png")
    assert main(["fill", "--checkpoint", str(checkpoint), "--image", str(folder / "photo.png"),
                 "--mask", str(folder / "mask.png"), "--output", str(folder / "filled.png"), "--device", "cpu",
                 *flags]) == 0
    return np.asarray(Image.open(folder / "filled.png").convert("RGB"))


@pytest.mark.slow
def test_a_short_run_fills_held_out_holes_with_structure_not_a_flat_box(trained, sample_dataset, tmp_path):
    checkpoint, untrained = trained
    size = 64
    tiles = [image.permute(1, 2, 0).numpy() for _, image in iter_split(sample_dataset, "test", size)]
    hole = np.zeros((size, size), dtype=bool)
    hole[20:44, 20:44] = True  # a centred 24 px square: 1/7 of the image
    gains, grey_gains, spreads, untrained_gains = [], [], [], []
    for tile in tiles:
        mean_colour = np.rint(tile[~hole].astype(np.float64).mean(axis=0))  # the best flat fill
        flat_psnr = hole_psnr(np.broadcast_to(mean_colour, tile.shape), tile, hole)
        grey_psnr = hole_psnr(np.full_like(tile, 128), tile, hole)  # the flat box issue 11 saw
        # The network's own fill from its trained weights: after 400 fast-moving steps the average lags them.
        filled = fill(checkpoint, tile, hole, tmp_path, "--no-blend", "--weights", "raw")
        assert np.array_equal(filled[~hole], tile[~hole])
        gains.append(hole_psnr(filled, tile, hole) - flat_psnr)
        grey_gains.append(hole_psnr(filled, tile, hole) - grey_psnr)
        spreads.append(filled[hole].astype(np.float64).std(axis=0).mean())
        untrained_gains.append(hole_psnr(fill(untrained, tile, hole, tmp_path, "--no-blend", "--weights", "raw"), tile,
                                         hole) - flat_psnr)
    report = f"gains {np.round(gains, 1)} grey {np.round(grey_gains, 1)} spreads {np.round(spreads, 1)} " \
             f"untrained {np.round(untrained_gains, 1)}"
    # The hole varies (a flat box has spread 0), is far closer to the photo than a grey box, and on
    # the median tile about as close as the best flat colour (400 steps: the benchmark shows more);
    # the untrained generator is far worse than that.
    assert np.median(spreads) > 2.0, report
    assert np.median(grey_gains) > 3.0, report
    assert np.median(gains) > -1.5, report
    assert np.median(untrained_gains) < np.median(gains) - 3.0, report


@pytest.mark.slow
def test_post_processing_beats_the_raw_fill_on_held_out_tiles(trained, sample_dataset):
    """The evaluation protocol's area holes (what the quick start's table reports), raw against post-processed."""
    from inpaint import evaluation as ev
    from inpaint.inference import Inpainter, postprocess

    checkpoint, _ = trained
    inpainter = Inpainter.from_checkpoint(str(checkpoint), device="cpu", weights="raw")
    samples = [(position, key, image) for position, (key, image) in enumerate(iter_split(sample_dataset, "test", 64))]
    protocol = ev.Protocol(data=sample_dataset, split="test", seed=0, count=len(samples), image_size=64,
                           local_size=40, kinds=("center_1/4", "center_1/3"))
    scores = ev.evaluate_samples(inpainter.complete, samples, protocol, postprocess=postprocess)
    raw, post = ev.summarize(scores.rows, protocol.kinds), ev.summarize(scores.rows, protocol.kinds, ev.POST)
    for kind in protocol.kinds:
        gains = [row[ev.POST + "hole_psnr"] - row["hole_psnr"] for row in scores.rows if row["kind"] == kind]
        report = f"{kind}: raw {raw[kind]['hole_psnr']['mean']:.2f} dB, post-processed " \
                 f"{post[kind]['hole_psnr']['mean']:.2f} dB, gains {np.round(gains, 1)}"
        assert post[kind]["hole_psnr"]["mean"] > raw[kind]["hole_psnr"]["mean"] + 0.5, report
        assert np.mean(np.array(gains) > 0) > 0.5, report  # on most tiles, not through one outlier
