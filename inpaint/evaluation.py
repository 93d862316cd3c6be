"""The evaluation protocol, its figures, and the files an evaluation leaves behind.

The paper's protocol: ``count`` test images (128) drawn with a fixed seed, each completed with
a centred hole of 1/4 and of 1/3 of the image area and with a random rectangle. Image ``i``
of the drawn set gets the same random hole in every evaluation with the same seed, so figures
are comparable across checkpoints and runs. Completions are quantized to uint8 before scoring
(as a saved PNG would be), and figures are computed per image with :mod:`inpaint.metrics`:
PSNR and SSIM over the whole image (the paper's numbers), PSNR over the hole, L1 over the
whole image and over the hole; each is reported as mean, population standard deviation and count.

A model is scored twice on the same images and holes: its raw completion (``metrics``) and the
completion users get from ``fill``, post-processed as GLCIC does (``metrics_postprocessed``:
:func:`inpaint.inference.poisson_blend`). Classical baselines are scored once.

Everything here runs in one process on local folders; ``cluster/evaluator.py`` spreads
:func:`evaluate_samples` over Ray workers and moves the files to and from storage.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from inpaint import metrics
from inpaint.masks import EVALUATION_MASK_KINDS, evaluation_masks, hole_bbox
from inpaint.tensorboard import grid, png_bytes, show_hole

FORMAT_VERSION = 1
METRICS = ("psnr", "ssim", "hole_psnr", "l1", "hole_l1")
POST = "post_"  # per-image columns of the post-processed completion: post_psnr, post_hole_psnr, ...
MAX_PSNR_DB = 100.0  # identical images have infinite PSNR; cap so means and JSON stay finite
GRID_IMAGES = 16  # the first images of the drawn set, the same ones in every evaluation
GRID_KIND = "center_1/4"
METRICS_FILE, REPORT_FILE, GRID_FILE, PER_IMAGE_FILE = "metrics.json", "report.md", "grid.png", "per_image.csv"

# The paper's CelebA figures at 160x160 (GLCIC's as the paper reports them), for the report.
PAPER_CELEBA = (("GLCIC (Iizuka et al. 2017), as reported by the paper", 30.18, 0.80),
                ("SE-ResNet + contextual loss (the paper)", 36.90, 0.92))

# (uint8 images (B, 3, S, S), masks (B, 1, S, S) with 1 = known) -> completed uint8 images.
Completer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sample = tuple[int, str, torch.Tensor]  # (position in the drawn set, key, uint8 (3, S, S))
# (uint8 images, masks, uint8 completions) -> post-processed uint8 completions.
Postprocessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Protocol:
    """Which images and holes an evaluation uses; equal protocols give comparable figures."""

    data: str
    split: str
    seed: int
    count: int  # images evaluated (the whole split when that was asked for)
    image_size: int
    local_size: int
    kinds: tuple[str, ...] = EVALUATION_MASK_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kinds": list(self.kinds)}

    def masks(self, kind: str, positions: list[int]) -> torch.Tensor:
        """Holes (B, 1, S, S), 1 = known, for images at these positions of the drawn set."""
        if kind != "random":
            return evaluation_masks(kind, len(positions), self.image_size, self.local_size)[0]
        # One seed per position: a worker evaluating any slice draws the holes a single process would.
        return torch.cat([evaluation_masks(kind, 1, self.image_size, self.local_size,
                                           seed=_hole_seed(self.seed, position))[0] for position in positions])


def _hole_seed(seed: int, position: int) -> int:
    """A 32-bit seed per (protocol seed, position): torch's generator keeps only the low 32 bits."""
    return int.from_bytes(hashlib.blake2b(f"eval-hole:{seed}:{position}".encode(), digest_size=4).digest(), "little")


def same_protocol(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two metrics.json protocols drew the same images and holes (the data URL may be spelt differently)."""
    return all(a.get(name) == b.get(name) for name in ("split", "seed", "count", "image_size", "local_size", "kinds"))


def draw_positions(split_size: int, count: int | None, seed: int) -> list[int]:
    """Sorted indices into the split of the images to evaluate: ``count`` drawn by ``seed``, or all."""
    if count is None or count >= split_size:
        return list(range(split_size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(split_size, generator=generator)[:count].tolist())


@dataclass
class Scores:
    """Per-image figures (one row per image and hole kind) and the grid images of one part.

    A grid row is (masked, completed, original), or for a post-processed model (masked, raw,
    post-processed, biharmonic, original)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def merge(self, other: "Scores") -> "Scores":
        return Scores(self.rows + other.rows, {**self.grid, **other.grid})


def score(completed: torch.Tensor, original: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every figure of METRICS per image (B,) from uint8 completions and originals."""
    pred, target = completed.double() / 255, original.double() / 255
    return {
        "psnr": metrics.psnr(pred, target).clamp(max=MAX_PSNR_DB),
        "ssim": metrics.ssim(pred, target),
        "hole_psnr": metrics.hole_psnr(pred, target, masks).clamp(max=MAX_PSNR_DB),
        "l1": metrics.l1(pred, target),
        "hole_l1": metrics.hole_l1(pred, target, masks),
    }


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_samples(complete: Completer, samples: Iterable[Sample], protocol: Protocol, *,
                     batch_size: int = 16, progress: Callable[[int], None] | None = None,
                     postprocess: Postprocessor | None = None) -> Scores:
    """Complete and score every sample with every hole kind of the protocol.

    With ``postprocess`` every completion is also post-processed and scored (``post_*`` columns),
    and the grid shows biharmonic inpainting of the same holes beside the two.
    """
    from inpaint.baselines import biharmonic

    scores = Scores()
    for batch in _batches(samples, batch_size):
        positions = [position for position, _, _ in batch]
        images = torch.stack([image for _, _, image in batch])
        for kind in protocol.kinds:
            masks = protocol.masks(kind, positions)
            completed = complete(images, masks).cpu()
            figures = {name: values.tolist() for name, values in score(completed, images, masks).items()}
            post = None
            if postprocess is not None:
                post = postprocess(images, masks, completed).cpu()
                figures.update({POST + name: values.tolist() for name, values in score(post, images, masks).items()})
            for i, (position, key, _) in enumerate(batch):
                top, left, bottom, right = hole_bbox(masks[i])
                scores.rows.append({"kind": kind, "position": position, "key": key,
                                    "hole": f"{top},{left},{bottom - top},{right - left}",
                                    **{name: values[i] for name, values in figures.items()}})
                if kind == GRID_KIND and position < GRID_IMAGES:
                    masked = show_hole(images[i], masks[i])
                    if post is None:
                        scores.grid[position] = (masked, completed[i], images[i])
                    else:
                        reference = biharmonic(images[i].permute(1, 2, 0).numpy(), masks[i, 0].numpy() < 0.5)
                        scores.grid[position] = (masked, completed[i], post[i],
                                                 torch.from_numpy(reference).permute(2, 0, 1), images[i])
        if progress is not None:
            progress(len(batch))
    return scores


def baseline_completer(fill: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Completer:
    """A batch completer around a per-image classical method (see :mod:`inpaint.baselines`)."""

    def complete(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        filled = [fill(image.permute(1, 2, 0).numpy(), mask[0].numpy() < 0.5) for image, mask in zip(images, masks)]
        return torch.from_numpy(np.stack(filled)).permute(0, 3, 1, 2)

    return complete


def summarize(rows: list[dict[str, Any]], kinds: Iterable[str],
              prefix: str = "") -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {metric: {mean, std, count}}} over the per-image rows (at least one per kind); ``prefix``
    POST summarises the post-processed columns."""
    summary = {}
    for kind in kinds:
        selected = [row for row in rows if row["kind"] == kind]
        summary[kind] = {}
        for name in METRICS:
            values = np.array([row[prefix + name] for row in selected], dtype=np.float64)
            summary[kind][name] = {"mean": float(values.mean()), "std": float(values.std()),
                                   "count": int(len(values))}
    return summary


def metrics_document(subject: dict[str, Any], protocol: Protocol, scores: Scores, *, elapsed_s: float,
                     workers: int) -> dict[str, Any]:
    """The content of metrics.json: what was evaluated, how, and every figure (raw and post-processed)."""
    from inpaint.inference import POSTPROCESSING

    post = bool(scores.rows) and POST + METRICS[0] in scores.rows[0]
    return {
        "format": FORMAT_VERSION,
        "checkpoint": None, "baseline": None, "step": None, "phase": None, "config_digest": None,
        **subject,
        "protocol": protocol.to_dict(),
        "metrics": summarize(scores.rows, protocol.kinds),
        "metrics_postprocessed": summarize(scores.rows, protocol.kinds, POST) if post else None,
        "postprocessing": POSTPROCESSING if post else None,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(elapsed_s, 3),
        "images_per_s": round(protocol.count / elapsed_s, 3) if elapsed_s > 0 else None,
        "workers": workers,
    }


def _label(document: dict[str, Any]) -> str:
    if document.get("baseline"):
        return f"baseline {document['baseline']}"
    return f"step {document.get('step')}" + (", raw weights" if document.get("weights") == "raw" else "")


def _fmt(summary: dict[str, float], digits: int) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _model_label(document: dict[str, Any]) -> str:
    weights = {"ema": "averaged", "raw": "raw weights"}.get(document.get("weights"))
    return f"model{f' ({weights})' if weights else ''}, step {document.get('step')}"


def method_rows(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(row label, {kind: {metric: summary}}) per method: a model gives its raw and its post-processed
    row, a classical baseline one."""
    rows = []
    for document in documents:
        if document.get("baseline"):
            rows.append((f"{document['baseline']} (classical)", document.get("metrics", {})))
            continue
        rows.append((f"{_model_label(document)}, raw", document.get("metrics", {})))
        if document.get("metrics_postprocessed"):
            rows.append((f"{_model_label(document)}, post-processed", document["metrics_postprocessed"]))
    return rows


def comparison_table(documents: list[dict[str, Any]], metric: str = "hole_psnr", digits: int = 2) -> list[str]:
    """Markdown rows: one per method (models first, raw and post-processed), one column per hole kind of the
    first document, ``metric`` means."""
    kinds = documents[0]["protocol"]["kinds"]
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for label, figures in method_rows(documents):
        cells = [f"{figures[kind][metric]['mean']:.{digits}f}" if kind in figures else "-" for kind in kinds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def best_methods(documents: list[dict[str, Any]], metric: str = "hole_psnr") -> str:
    """One sentence: which method has the highest ``metric`` on which holes (ties go to the first listed)."""
    kinds = documents[0]["protocol"]["kinds"]
    rows = method_rows(documents)
    winners: dict[str, list[str]] = {}
    for kind in kinds:
        scored = [(figures[kind][metric]["mean"], -order, label) for order, (label, figures) in enumerate(rows)
                  if kind in figures]
        if scored:
            winners.setdefault(max(scored)[2], []).append(kind)
    parts = [f"{label.removesuffix(' (classical)')} on {', '.join(found)}" for label, found in winners.items()]
    name = {"hole_psnr": "hole PSNR", "psnr": "PSNR", "ssim": "SSIM"}.get(metric, metric)
    return f"Best {name}: " + "; ".join(parts) + "."


def beside_classical(document: dict[str, Any], previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``document`` then the classical baselines among ``previous`` evaluated under the same protocol."""
    protocol = document["protocol"]
    found = {entry["baseline"]: entry for entry in previous
             if entry.get("baseline") and same_protocol(entry.get("protocol", {}), protocol)}
    return [document, *(found[name] for name in sorted(found))]


def render_report(document: dict[str, Any], previous: list[dict[str, Any]]) -> str:
    """report.md: the figures, the paper's beside them, and the run's earlier evaluations."""
    protocol = document["protocol"]
    kinds = protocol["kinds"]
    if document.get("baseline"):
        title = f"Evaluation of the {document['baseline']} baseline"
        origin = f"classical method `{document['baseline']}` (no network)"
    else:
        title = f"Evaluation at step {document['step']} ({document['phase']} phase)"
        origin = f"checkpoint `{document['checkpoint']}` · recipe {document.get('recipe')} · " \
                 f"config {document['config_digest']}"
    post = document.get("metrics_postprocessed")
    lines = [f"# {title}", "", origin, "",
             f"{protocol['count']} images of split `{protocol['split']}` of `{protocol['data']}`, drawn with seed "
             f"{protocol['seed']}, centre-cropped to {protocol['image_size']} px; holes: {', '.join(kinds)} "
             "(center_1/4, center_1/3: a centred square of 1/4 or 1/3 of the image area; center_side_1/4, "
             "center_side_1/3: of 1/4 or 1/3 of its side; random: a rectangle with sides 1/4 to 1/2 of the image, "
             "fixed per image by the seed). Completions are quantized to 8 bits before scoring.", ""]
    if post:
        lines += [f"Weights: {document.get('weights') or 'raw'}. Each completion is scored as the network gives "
                  f"it (raw) and post-processed as GLCIC does and `fill` does by default: "
                  f"{document.get('postprocessing')}.", ""]
    header = ["| holes | PSNR (dB) | SSIM | hole PSNR (dB) | L1 | hole L1 | images |", "|---|---|---|---|---|---|---|"]
    for caption, figures in ((("Raw:" if post else None), document["metrics"]), ("Post-processed:", post)):
        if figures is None:
            continue
        lines += ([caption, ""] if caption else []) + header
        for kind in kinds:
            m = figures[kind]
            lines.append(f"| {kind} | {_fmt(m['psnr'], 2)} | {_fmt(m['ssim'], 3)} | {_fmt(m['hole_psnr'], 2)} | "
                         f"{_fmt(m['l1'], 4)} | {_fmt(m['hole_l1'], 4)} | {m['psnr']['count']} |")
        lines.append("")
    if document.get("untrained_holes"):
        lines += ["", f"**Warning:** training drew no hole as large as {', '.join(document['untrained_holes'])} "
                  "(mask.max_side); figures for those kinds measure extrapolation.", ""]
    compared = beside_classical(document, previous)
    if not document.get("baseline") and len(compared) > 1:
        lines += ["", "## Beside classical methods (same images and holes)", "",
                  "Hole PSNR (dB), over the hole pixels only: what the model adds over filling the hole "
                  "with the known pixels' mean colour, OpenCV's Telea and scikit-image's biharmonic inpainting.", ""]
        lines += comparison_table(compared)
        lines += ["", best_methods(compared)]
        lines += ["", "Whole-image SSIM:", ""] + comparison_table(compared, "ssim", 3)
    lines += ["", "## Beside the paper", "",
              "The paper reports CelebA at 160x160 (hole setting: paper, protocol as stated there); "
              "other data, image sizes or holes make the rows below only roughly comparable. The paper's "
              "\"hole of 1/4 and 1/3 of the image\" may mean the area or the side. Since whole-image PSNR = hole "
              "PSNR + 10 log10(1 / hole fraction), its 36.90 dB with a 1/4-area hole would need 30.9 dB over the "
              "hole, with a 1/4-side hole (1/16 of the area) 24.9 dB: the side reading is the more plausible.", "",
              "| method | PSNR (dB) | SSIM |", "|---|---|---|"]
    lines += [f"| {name} | {psnr:.2f} | {ssim:.2f} |" for name, psnr, ssim in PAPER_CELEBA]
    lines += [f"| this evaluation, {kind} | {document['metrics'][kind]['psnr']['mean']:.2f} | "
              f"{document['metrics'][kind]['ssim']['mean']:.2f} |" for kind in kinds]
    comparable = [entry for entry in previous if same_protocol(entry.get("protocol", {}), protocol)]
    lines += ["", "## Other evaluations in this folder (same protocol)", ""]
    if len(comparable) < len(previous):
        lines += [f"{len(previous) - len(comparable)} evaluation(s) with another protocol are left out.", ""]
    history = sorted([document, *comparable], key=lambda d: (d.get("baseline") is not None, d.get("step") or 0,
                                                           d.get("baseline") or ""))
    lines += ["| evaluated | phase | " + " | ".join(f"{kind} PSNR / SSIM" for kind in kinds) + " |",
              "|---|---|" + "---|" * len(kinds)]
    for entry in history:
        cells = [f"{entry['metrics'][kind]['psnr']['mean']:.2f} / {entry['metrics'][kind]['ssim']['mean']:.3f}"
                 if kind in entry.get("metrics", {}) else "-" for kind in kinds]
        marker = " (this)" if entry is document else ""
        lines.append(f"| {_label(entry)}{marker} | {entry.get('phase') or '-'} | " + " | ".join(cells) + " |")
    columns = "masked | raw | post-processed | biharmonic | original" if post else "masked | completed | original"
    lines += ["", f"## The first {GRID_IMAGES} images, {GRID_KIND} hole", "",
              f"![{columns}]({GRID_FILE})", ""]
    return "\n".join(lines)


def grid_image(scores: Scores) -> torch.Tensor:
    """uint8 (3, H, W) grid, one row per image: masked | completed | original, or for a post-processed
    model masked | raw | post-processed | biharmonic | original."""
    return grid([scores.grid[position] for position in sorted(scores.grid)])


def write_outputs(directory: str | Path, document: dict[str, Any], scores: Scores,
                  previous: list[dict[str, Any]]) -> None:
    """report.md, grid.png and per_image.csv into ``directory``; metrics.json (the completion mark) is the caller's."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(render_report(document, previous))
    if scores.grid:
        (out / GRID_FILE).write_bytes(png_bytes(grid_image(scores)))
    with open(out / PER_IMAGE_FILE, "w", newline="") as f:
        post = [POST + name for name in METRICS] if scores.rows and POST + METRICS[0] in scores.rows[0] else []
        writer = csv.DictWriter(f, fieldnames=["kind", "position", "key", "hole", *METRICS, *post])
        writer.writeheader()
        writer.writerows(sorted(scores.rows, key=lambda row: (row["kind"], row["position"])))


def metrics_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True)
