"""Evaluation: the protocol's figures, its outputs, baselines, the Ray path, and --watch with claims."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cluster import evaluator as cev
from cluster import watcher
from inpaint import run_folder
from inpaint import evaluation as ev
from inpaint.baselines import BaselineError, biharmonic, telea
from inpaint.masks import evaluation_masks
from jobs import evaluate as job

IMAGES = 12


def request(**overrides) -> cev.EvaluationRequest:
    return cev.EvaluationRequest(**{"num_images": IMAGES, "device": "cpu", **overrides})


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / ev.PER_IMAGE_FILE) as f:
        return list(csv.DictReader(f))


def grid_tiles(folder: Path, size: int, row: int, columns: int = 5) -> list[np.ndarray]:
    """uint8 (S, S, 3) tiles of one grid row (make_grid: 2 px padding): a model's masked | raw |
    post-processed | biharmonic | original, a baseline's masked | completed | original."""
    grid = np.asarray(Image.open(folder / ev.GRID_FILE))
    top = 2 + row * (size + 2)
    return [grid[top:top + size, 2 + col * (size + 2):2 + col * (size + 2) + size] for col in range(columns)]


# ------------------------------------------------------------------ protocol
def test_draw_positions_is_seeded_sorted_and_all_means_all():
    drawn = ev.draw_positions(100, 10, seed=3)
    assert drawn == ev.draw_positions(100, 10, seed=3) == sorted(drawn)
    assert len(set(drawn)) == 10 and drawn != ev.draw_positions(100, 10, seed=4)
    assert ev.draw_positions(7, None, seed=0) == ev.draw_positions(7, 128, seed=0) == list(range(7))


def test_random_holes_depend_on_position_only_so_any_slice_matches_a_single_process():
    protocol = ev.Protocol("data", "test", seed=5, count=10, image_size=32, local_size=16)
    whole = protocol.masks("random", list(range(10)))
    assert torch.equal(protocol.masks("random", [3, 4, 5]), whole[3:6])
    assert not torch.equal(whole[0], whole[1])
    other_seed = ev.Protocol("data", "test", seed=6, count=10, image_size=32, local_size=16)
    assert not torch.equal(other_seed.masks("random", [0]), whole[:1])
    centre = protocol.masks("center_1/4", [0, 7])
    assert torch.equal(centre[1], evaluation_masks("center_1/4", 1, 32, 16)[0][0])


# ------------------------------------------------------------------ one evaluation
def test_evaluation_writes_every_output_with_figures_that_scikit_image_reproduces(run):
    result = cev.evaluate_checkpoint(str(run), request())
    folder = run / "evaluations" / "checkpoint_000000004"
    assert result.output == str(folder)
    document = json.loads((folder / ev.METRICS_FILE).read_text())
    assert document["checkpoint"] == str(run / "checkpoint_000000004") and document["baseline"] is None
    assert document["step"] == 4 and document["phase"] == "generator" and len(document["config_digest"]) == 12
    assert document["protocol"]["seed"] == 0 and document["protocol"]["count"] == IMAGES
    assert document["protocol"]["kinds"] == ["center_1/4", "center_1/3", "center_side_1/4", "center_side_1/3",
                                            "random"]

    assert document["weights"] == "ema" and "seamlessClone" in document["postprocessing"]
    rows = read_rows(folder)
    for kind in document["protocol"]["kinds"]:
        mine = [row for row in rows if row["kind"] == kind]
        for key, prefix in (("metrics", ""), ("metrics_postprocessed", ev.POST)):
            for name in ev.METRICS:
                values = np.array([float(row[prefix + name]) for row in mine])
                assert document[key][kind][name]["count"] == IMAGES
                assert document[key][kind][name]["mean"] == pytest.approx(values.mean(), rel=1e-9)
                assert document[key][kind][name]["std"] == pytest.approx(values.std(), rel=1e-9)
        # the same images and holes, two different completions
        assert document["metrics"][kind]["hole_psnr"] != document["metrics_postprocessed"][kind]["hole_psnr"]

    hole = evaluation_masks("center_1/4", 1, 32, 16)[0][0, 0].numpy() < 0.5
    centre_rows = sorted((row for row in rows if row["kind"] == "center_1/4"), key=lambda r: int(r["position"]))
    for row in range(3):
        masked, completed, blended, reference, original = grid_tiles(folder, 32, row)
        assert (masked[hole] == 255).all() and np.array_equal(masked[~hole], original[~hole])
        for tile in (completed, blended, reference):
            assert np.array_equal(tile[~hole], original[~hole])  # known pixels are never changed
        assert np.array_equal(reference, biharmonic(np.where(hole[..., None], 0, original).astype(np.uint8), hole))
        expected = centre_rows[row]
        for tile, prefix in ((completed, ""), (blended, ev.POST)):
            assert peak_signal_noise_ratio(original, tile, data_range=255) == pytest.approx(
                float(expected[prefix + "psnr"]), abs=1e-6)
            assert structural_similarity(original, tile, data_range=255, channel_axis=-1, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False) == pytest.approx(
                float(expected[prefix + "ssim"]), abs=1e-6)

    report = (folder / ev.REPORT_FILE).read_text()
    assert "30.18" in report and "36.90" in report and "step 4 (this)" in report
    assert "Post-processed:" in report and "masked | raw | post-processed | biharmonic | original" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "eval"))
    events.Reload()
    scalar = events.Scalars("eval/center_1/4/psnr")[0]
    assert scalar.step == 4
    assert scalar.value == pytest.approx(document["metrics"]["center_1/4"]["psnr"]["mean"], rel=1e-5)
    events = EventAccumulator(str(run / "tensorboard" / "eval-postprocessed"))
    events.Reload()
    scalar = events.Scalars("eval/center_1/4/hole_psnr")[0]
    assert scalar.step == 4
    assert scalar.value == pytest.approx(document["metrics_postprocessed"]["center_1/4"]["hole_psnr"]["mean"],
                                         rel=1e-5)


def test_two_checkpoints_get_the_same_images_and_holes_and_the_report_compares_them(run):
    cev.evaluate_checkpoint(str(run / "checkpoint_000000002"), request())
    cev.evaluate_checkpoint(str(run / "checkpoint_000000004"), request())
    first, second = (read_rows(run / "evaluations" / f"checkpoint_00000000{s}") for s in (2, 4))
    assert [(r["kind"], r["key"], r["hole"]) for r in first] == [(r["kind"], r["key"], r["hole"]) for r in second]
    assert [r["psnr"] for r in first] != [r["psnr"] for r in second]  # different weights, same holes

    cev.evaluate_checkpoint(str(run), request(seed=1, output=str(run / "evaluations" / "seed1")))
    reseeded = read_rows(run / "evaluations" / "seed1")
    random_holes = [[r["hole"] for r in rows if r["kind"] == "random"] for rows in (reseeded, second)]
    assert random_holes[0] != random_holes[1]

    report = (run / "evaluations" / "checkpoint_000000004" / ev.REPORT_FILE).read_text()
    assert "| step 2 | generator |" in report and "| step 4 (this) |" in report


@pytest.mark.ray
@pytest.mark.slow
def test_ray_path_gives_the_same_figures_as_one_process(run):
    import ray

    single = cev.evaluate_checkpoint(str(run), request(output=str(run / "single")))
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    try:
        spread = cev.evaluate_checkpoint(str(run), request(workers=2, ray_min_images=0, output=str(run / "ray")))
    finally:
        ray.shutdown()
    assert spread.document["workers"] == 2 and single.document["workers"] == 1
    for kind, figures in single.document["metrics"].items():
        for name, summary in figures.items():
            assert spread.document["metrics"][kind][name]["mean"] == pytest.approx(summary["mean"], rel=1e-6)
    assert read_rows(run / "single") == read_rows(run / "ray")
    assert (run / "ray" / ev.GRID_FILE).read_bytes() == (run / "single" / ev.GRID_FILE).read_bytes()


# ------------------------------------------------------------------ baselines
def smooth_image(size: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return np.stack([2 * x + 20, 3 * y + 10, x + y + 40], -1).astype(np.uint8)


@pytest.mark.parametrize("method, tolerance", [(biharmonic, 1.0), (telea, 6.0)])
def test_baselines_fill_a_smooth_image_closely_and_keep_known_pixels(method, tolerance):
    image = smooth_image()
    hole = np.zeros(image.shape[:2], dtype=bool)
    hole[16:30, 12:34] = True
    damaged = image.copy()
    damaged[hole] = 0
    filled = method(damaged, hole)
    assert np.array_equal(filled[~hole], image[~hole])
    assert np.abs(filled[hole].astype(int) - image[hole]).mean() < tolerance  # vs ~60 for the black hole


def test_baseline_evaluation_says_baseline_instead_of_checkpoint(run):
    result = cev.evaluate_baseline("biharmonic", request(num_images=4), checkpoint=str(run))
    folder = run / "evaluations" / "baseline-biharmonic"
    assert result.output == str(folder)
    document = json.loads((folder / ev.METRICS_FILE).read_text())
    assert document["baseline"] == "biharmonic" and document["checkpoint"] is None and document["step"] is None
    assert document["metrics"]["center_1/4"]["psnr"]["count"] == 4
    assert "biharmonic baseline" in (folder / ev.REPORT_FILE).read_text()


def test_mean_fill_paints_the_hole_with_the_known_pixels_mean_colour():
    from inpaint.baselines import mean

    image = smooth_image()
    hole = np.zeros(image.shape[:2], dtype=bool)
    hole[10:20, 5:25] = True
    filled = mean(image, hole)
    assert np.array_equal(filled[~hole], image[~hole])
    expected = np.rint(image[~hole].astype(np.float64).mean(axis=0)).astype(np.uint8)
    assert (filled[hole] == expected).all() and not (expected == 0).all()


def test_final_comparison_puts_the_model_beside_every_baseline_and_reuses_them(run):
    comparison = cev.compare_with_baselines(str(run), request(num_images=4))
    names = [result.document["baseline"] for result in comparison.baselines]
    assert names == ["mean", "telea", "biharmonic"] and not comparison.skipped
    assert comparison.model.document["step"] == 4
    table = comparison.describe()
    for row in ("model (averaged), step 4, raw", "model (averaged), step 4, post-processed", "mean (classical)",
                "telea (classical)", "biharmonic (classical)"):
        assert f"| {row} |" in table
    assert "Best hole PSNR: " in table
    report = (run / "evaluations" / "checkpoint_000000004" / ev.REPORT_FILE).read_text()
    assert "## Beside classical methods" in report and "| biharmonic (classical) |" in report
    assert "| model (averaged), step 4, post-processed |" in report and "Best hole PSNR: " in report
    for name in names:
        assert list((run / "tensorboard" / f"eval-baseline-{name}").glob("events.out.tfevents.*"))
    # the same protocol again: the baselines' figures are reused, not recomputed
    stamp = (run / "evaluations" / "baseline-mean" / ev.METRICS_FILE).stat().st_mtime_ns
    again = cev.compare_with_baselines(str(run), request(num_images=4))
    assert (run / "evaluations" / "baseline-mean" / ev.METRICS_FILE).stat().st_mtime_ns == stamp
    assert again.baselines[0].document["metrics"] == comparison.baselines[0].document["metrics"]
    # another protocol (more images) is evaluated afresh
    cev.compare_with_baselines(str(run), request(num_images=6))
    assert json.loads((run / "evaluations" / "baseline-mean" / ev.METRICS_FILE).read_text())[
        "protocol"]["count"] == 6


def test_evaluating_holes_larger_than_training_drew_is_flagged(run):
    result = cev.evaluate_checkpoint(str(run), request(num_images=2))  # debug: holes up to 0.45 of the side
    assert "center_1/3" in result.document["untrained_holes"]
    assert "Warning:" in (Path(result.output) / ev.REPORT_FILE).read_text()


def test_telea_without_opencv_is_a_clear_error(monkeypatch, run, capsys):
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(BaselineError, match="pip install opencv-python-headless"):
        telea(smooth_image(), np.ones((48, 48), dtype=bool))
    assert job.main(["--baseline", "telea", "--checkpoint", str(run)]) == 2
    assert "pip install" in capsys.readouterr().err


# ------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "{tmp}/nowhere"], "no such checkpoint"),
    (["--checkpoint", "{run}", "--data", "{tmp}/no-data"], "index.json"),
    (["--checkpoint", "{run}", "--split", "validation"], "no split 'validation'"),
    (["--baseline", "biharmonic"], "needs --output"),
])
def test_cli_user_errors_exit_2_with_one_line(extra, message, run, tmp_path, capsys):
    argv = [arg.format(tmp=tmp_path, run=run) for arg in extra]
    assert job.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def _document(label: str, figures: dict[str, float], post: dict[str, float] | None = None) -> dict:
    kinds = list(figures)
    summary = lambda values: {k: {"hole_psnr": {"mean": v, "std": 0.0, "count": 1}} for k, v in values.items()}  # noqa: E731
    base = {"protocol": {"kinds": kinds}, "metrics": summary(figures)}
    if label.startswith("model"):
        return {**base, "step": 7, "weights": "ema", "metrics_postprocessed": summary(post) if post else None}
    return {**base, "baseline": label}


def test_the_sentence_under_the_table_names_the_best_method_per_hole_kind_from_the_figures():
    documents = [_document("model", {"a": 20.0, "b": 25.0, "c": 21.0}, {"a": 24.0, "b": 26.0, "c": 20.0}),
                 _document("mean", {"a": 19.0, "b": 18.0, "c": 18.0}),
                 _document("biharmonic", {"a": 23.0, "b": 25.5, "c": 22.0})]
    assert ev.best_methods(documents) == ("Best hole PSNR: model (averaged), step 7, post-processed on a, b; "
                                          "biharmonic on c.")
    documents[2]["metrics"]["b"]["hole_psnr"]["mean"] = 30.0
    assert ev.best_methods(documents).endswith("post-processed on a; biharmonic on b, c.")
    rows = ev.comparison_table(documents)
    assert rows[2].startswith("| model (averaged), step 7, raw | 20.00 | 25.00 | 21.00 |")
    assert rows[3].startswith("| model (averaged), step 7, post-processed | 24.00 | 26.00 | 20.00 |")


def test_raw_weights_are_evaluated_into_their_own_folder(run):
    averaged = cev.evaluate_checkpoint(str(run), request(num_images=2))
    raw = cev.evaluate_checkpoint(str(run), request(num_images=2, weights="raw"))
    assert averaged.document["weights"] == "ema" and raw.document["weights"] == "raw"
    assert raw.output == str(run / "evaluations" / "checkpoint_000000004-raw")
    assert averaged.document["metrics"] != raw.document["metrics"]
    with pytest.raises(cev.EvaluationError, match="weights"):
        request(weights="last")


def test_cli_rejects_a_bad_image_count():
    with pytest.raises(SystemExit) as exit_info:
        job.build_parser().parse_args(["--checkpoint", "x", "--num-images", "0"])
    assert exit_info.value.code == 2
    assert job.build_parser().parse_args(["--checkpoint", "x", "--num-images", "all"]).num_images is None


# ------------------------------------------------------------------ watch and claims
def evaluated_folders(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "evaluations").glob(f"*/{ev.METRICS_FILE}"))


def test_watch_evaluates_each_checkpoint_once_then_skips_them(run, capsys):
    assert job.main(["--watch", str(run), "--num-images", "4", "--device", "cpu"]) == 0
    assert "evaluated 2 checkpoint(s)" in capsys.readouterr().out
    assert evaluated_folders(run) == ["checkpoint_000000002", "checkpoint_000000004"]
    stamp = (run / "evaluations" / "checkpoint_000000002" / ev.METRICS_FILE).stat().st_mtime_ns
    summary = watcher.watch(str(run), request(num_images=4))
    assert summary.evaluated == [] and summary.polls == 1
    assert (run / "evaluations" / "checkpoint_000000002" / ev.METRICS_FILE).stat().st_mtime_ns == stamp


def test_two_watchers_at_once_evaluate_each_checkpoint_exactly_once(run, monkeypatch):
    evaluate = cev.evaluate_subject

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)  # both watchers are surely inside the loop at once
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(watcher, "evaluate_subject", slow_evaluate)
    start = threading.Barrier(2)
    summaries = {}

    def watch_as(owner: str) -> None:
        start.wait()
        summaries[owner] = watcher.watch(str(run), request(num_images=4), owner=owner)

    threads = [threading.Thread(target=watch_as, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = summaries["a"].evaluated + summaries["b"].evaluated
    assert sorted(names) == ["checkpoint_000000002", "checkpoint_000000004"]  # none twice, none missed
    assert len(summaries["a"].evaluated) == len(summaries["b"].evaluated) == 1  # each found the other's claim
    assert evaluated_folders(run) == sorted(names)


def test_watch_skips_a_checkpoint_deleted_after_listing(run, monkeypatch):
    listed = run_folder.complete_checkpoints

    def list_then_retention(run_url):
        found = listed(run_url)
        shutil.rmtree(found[0][0])  # Ray's retention removes the oldest while the watcher works
        return found

    monkeypatch.setattr(watcher, "complete_checkpoints", list_then_retention)
    summary = watcher.watch(str(run), request(num_images=4))
    assert summary.skipped == ["checkpoint_000000002"] and summary.evaluated == ["checkpoint_000000004"]


def test_watch_polls_until_the_latest_checkpoint_is_done(run):
    summary = watcher.watch(str(run), request(num_images=4), interval=0.01, max_polls=3)
    assert summary.polls == 3 and not summary.finished and len(summary.evaluated) == 2

    done = run / "checkpoint_000000006"
    shutil.copytree(run / "checkpoint_000000004", done)
    meta = json.loads((done / "meta.json").read_text())
    (done / "meta.json").write_text(json.dumps({**meta, "step": 6, "phase": "done"}))
    summary = watcher.watch(str(run), request(num_images=4), interval=3600, max_polls=10)
    assert summary.finished and summary.polls == 1 and summary.evaluated == ["checkpoint_000000006"]


def test_claims_are_exclusive_and_a_stale_one_is_taken_over_once(tmp_path):
    folder = str(tmp_path / "evaluations" / "checkpoint_000000001")
    assert watcher.claim(folder, "a")
    assert not watcher.claim(folder, "b")
    old = time.time() - 3 * 3600
    os.utime(Path(folder) / run_folder.CLAIM, (old, old))
    assert watcher.claim(folder, "c", timeout_s=3600)
    assert json.loads((Path(folder) / run_folder.CLAIM).read_text())["owner"] == "c"
    os.utime(Path(folder) / run_folder.CLAIM, (old, old))
    marker_count = len(list(Path(folder).glob("CLAIM.takeover-*")))
    assert watcher.claim(folder, "d", timeout_s=3600)
    assert len(list(Path(folder).glob("CLAIM.takeover-*"))) == marker_count + 1


def test_two_takers_of_one_stale_claim_cannot_both_win(tmp_path):
    folder = str(tmp_path / "ckpt")
    assert watcher.claim(folder, "crashed")
    old = time.time() - 3 * 3600
    os.utime(Path(folder) / run_folder.CLAIM, (old, old))
    stale = (Path(folder) / run_folder.CLAIM).read_bytes()
    assert watcher.claim(folder, "first", timeout_s=3600)
    # A second taker that read the same stale claim races for the same marker and loses.
    (Path(folder) / run_folder.CLAIM).write_bytes(stale)
    os.utime(Path(folder) / run_folder.CLAIM, (old, old))
    assert not watcher.claim(folder, "second", timeout_s=3600)


# ------------------------------------------------------------------ S3
def test_evaluate_and_watch_a_run_in_s3(run, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    remote = f"{s3_bucket}/runs/debug"
    fs.put(str(run) + "/", remote.removeprefix("s3://"), recursive=True)
    result = cev.evaluate_checkpoint(remote, request(num_images=4))
    assert result.output == f"{remote}/evaluations/checkpoint_000000004"
    document = json.loads(fs.cat_file(f"{result.output}/{ev.METRICS_FILE}"))
    assert document["checkpoint"] == f"{remote}/checkpoint_000000004" and document["step"] == 4
    assert fs.exists(f"{result.output}/{ev.GRID_FILE}") and fs.exists(f"{result.output}/{ev.REPORT_FILE}")
    assert fs.ls(f"{remote}/tensorboard/eval")

    summary = watcher.watch(remote, request(num_images=4), settle_s=0.0)
    assert summary.evaluated == ["checkpoint_000000002"]  # the latest was evaluated above
    assert not fs.exists(f"{remote}/evaluations/checkpoint_000000002/{run_folder.CLAIM}")  # cleared once evaluated (issue 25)
    assert watcher.watch(remote, request(num_images=4), settle_s=0.0).evaluated == []  # metrics.json marks it done
