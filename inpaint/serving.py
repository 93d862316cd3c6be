"""One inpainting request, without any web framework or Ray: what the HTTP app (cluster/serve.py) wraps.

    service = InpaintService(Inpainter.from_checkpoint(url), checkpoint_url=url)
    body, content_type = service.answer(image_bytes, mask_bytes, blend=True, output_format="png")

Every refusal is a :class:`RequestError` with an HTTP status and a one-line message, so the app
turns it into ``{"error": ...}`` without knowing why. The fill is :meth:`Inpainter.fill_array`:
the same context window around the hole as ``python -m inpaint fill``, so a hole in a 24 MP
photo costs what its window costs.

:class:`CheckpointFollower` finds the checkpoint a replica should serve next (``--follow``):
the newest loadable one of a run, or the best evaluated one. Swapping it in is the caller's:
:class:`ModelSlot` holds the current model and switches it with one reference assignment, so a
request in flight finishes on the model it started with.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
from PIL import Image

from inpaint import storage
from inpaint.checkpoint import META_FILE, CheckpointError
from inpaint.errors import one_line
from inpaint.images import UnreadableImage, open_image
from inpaint.inference import Inpainter, InpaintError, hole_array, image_array
from inpaint.run_folder import complete_checkpoints, run_of_checkpoint

log = logging.getLogger("inpaint.serve")

FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
JPEG_QUALITY = 95
FIELDS = ("image", "mask", "blend", "format")  # a request's fields; any other is refused
UNREADABLE_STATUS = {"too_large": 413, "not_image": 415, "unsupported": 415}  # any other kind: 400
FOLLOW_MODES = ("newest", "best")
BEST_METRIC = "hole_psnr"  # --follow best: the highest mean over the evaluation's hole kinds


class RequestError(Exception):
    """A request the service refuses: ``status`` (an HTTP code) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = one_line(message, 1000)


def decode_image(data: bytes, what: str, mode: str) -> Image.Image:
    """The uploaded ``what`` ("image" or "mask") in ``mode`` (:func:`inpaint.images.open_image`).

    Not an image, or pixels without an agreed range, is 415; a truncated or damaged one 400; one
    over PIL's decompression-bomb limit (89 MP) 413, refused from its header before decoding.
    """
    if not data:
        raise RequestError(400, f"{what} is empty")
    try:
        return open_image(data, mode)
    except UnreadableImage as exc:
        raise RequestError(UNREADABLE_STATUS.get(exc.kind, 400), f"{what}: {exc}") from None


def encode_image(array: np.ndarray, output_format: str) -> tuple[bytes, str]:
    """PNG (lossless: known pixels come back bit for bit) or JPEG bytes, and their content type."""
    buffer = io.BytesIO()
    if output_format == "png":
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # level 6 costs 3x the time for ~10%
    else:
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), FORMATS[output_format]


def parse_format(value: Any) -> str:
    text = str(value).strip().lower()
    text = "jpeg" if text == "jpg" else text
    if text not in FORMATS:
        raise RequestError(422, f"format must be one of {', '.join(FORMATS)}, got {value!r}")
    return text


def parse_blend(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise RequestError(422, f"blend must be true or false, got {value!r}")


def check_fields(names: list[str] | set[str]) -> None:
    """Unknown fields are refused (a typo such as ``blnd`` must not be silently ignored); image and mask required."""
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; a request has {', '.join(FIELDS)}")
    missing = [name for name in ("image", "mask") if name not in names]
    if missing:
        raise RequestError(422, f"missing field(s) {', '.join(missing)}")


def evaluation_figures(checkpoint_url: str) -> dict[str, Any] | None:
    """{hole kind: {metric: mean}} of the checkpoint's evaluation (RUN/evaluations/<name>/metrics.json), or None."""
    try:
        document = storage.read_json(storage.join(run_of_checkpoint(checkpoint_url).evaluation(
            storage.name(checkpoint_url)), "metrics.json"))
    except storage.StorageError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("metrics"), dict):
        return None
    return {kind: {name: round(value["mean"], 4) for name, value in figures.items()
                   if isinstance(value, dict) and "mean" in value}
            for kind, figures in document["metrics"].items() if isinstance(figures, dict)}


def best_score(figures: dict[str, Any] | None) -> float | None:
    """The mean of BEST_METRIC over the hole kinds: what ``--follow best`` maximises."""
    values = [kind[BEST_METRIC] for kind in (figures or {}).values() if BEST_METRIC in kind]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class LoadedModel:
    """A model and where it came from; replaced whole, never changed in place."""

    inpainter: Inpainter
    checkpoint_url: str

    def info(self) -> dict[str, Any]:
        config, meta = self.inpainter.config, self.inpainter.meta
        return {"checkpoint": self.checkpoint_url, "step": meta.get("step"), "phase": meta.get("phase"),
                "recipe": config.recipe, "image_size": config.model.image_size,
                "arch": config.model.arch, "device": str(self.inpainter.device),
                "max_pixels": self.inpainter.max_pixels, "evaluation": evaluation_figures(self.checkpoint_url)}


def load_model(url: str, device: str = "cpu", max_pixels: int | None = None) -> LoadedModel:
    """The model of a checkpoint, or of a run folder's newest loadable checkpoint (as ``fill`` picks it).

    Raises CheckpointError (verification, loading, unreadable storage) or InpaintError (a bad device).
    """
    from inpaint.inference import MAX_FILL_PIXELS, _device, load_generator_model
    from inpaint.run_folder import first_loadable

    _device(device)
    try:
        checkpoint, (generator, contents) = first_loadable(url, load_generator_model)
    except storage.StorageError as exc:  # unreachable storage, bad credentials, no such bucket
        raise CheckpointError(f"{url}: cannot read the checkpoint ({exc})") from None
    inpainter = Inpainter(generator, contents.config, device=device, meta=contents.meta,
                          max_pixels=max_pixels or MAX_FILL_PIXELS)
    return LoadedModel(inpainter, checkpoint)


class ModelSlot:
    """The model a replica serves now. ``current`` is read once per request; ``swap`` replaces it whole."""

    def __init__(self, model: LoadedModel):
        self._model = model
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel:
        return self._model

    def swap(self, model: LoadedModel) -> LoadedModel:
        """Serve ``model`` from now on; requests already running keep the one they read. Returns the old one."""
        with self._lock:
            old, self._model = self._model, model
        return old


class Answer(NamedTuple):
    data: bytes
    content_type: str
    checkpoint_url: str  # the model that answered: a follow swap may land while the request runs


class InpaintService:
    """Answers one request: decode, validate, fill, encode. Thread-safe (the generator only reads its weights)."""

    def __init__(self, slot: ModelSlot):
        self.slot = slot

    def answer(self, image: bytes, mask: bytes, *, blend: Any = True, output_format: Any = "png") -> Answer:
        """The encoded completion, its content type and the checkpoint that made it; or a RequestError."""
        output_format, blend = parse_format(output_format), parse_blend(blend)
        pixels = image_array(decode_image(image, "image", "RGB"))
        mask_image = decode_image(mask, "mask", "L")
        model = self.slot.current  # one model for the whole request, even if a swap happens meanwhile
        try:
            hole = hole_array(mask_image, pixels.shape[:2])
            filled = model.inpainter.fill_array(pixels, hole, blend=blend)
        except InpaintError as exc:  # mask of another size, empty or full mask, window over max_pixels
            raise RequestError(422, str(exc)) from None
        return Answer(*encode_image(filled, output_format), model.checkpoint_url)

    def model_info(self) -> dict[str, Any]:
        return self.slot.current.info()


class CheckpointFollower:
    """Which checkpoint of a run to serve next: the newest loadable one, or (``best``) the best evaluated one.

    ``poll()`` returns a newly loaded model when there is one to move to, else None. A checkpoint
    that fails to verify or load is logged and skipped, never served; it is tried again at the next
    polls (a checkpoint still being uploaded file by file can show its meta.json before its weights)
    and given up after ``attempts`` failures.
    """

    def __init__(self, run_url: str, mode: str, current_url: str, *,
                 load: Callable[[str], LoadedModel] | None = None, attempts: int = 3):
        if mode not in FOLLOW_MODES:
            raise ValueError(f"follow mode must be one of {FOLLOW_MODES}, got {mode!r}")
        self.run_url, self.mode, self.current_url = run_url, mode, current_url
        self.load = load or load_model
        self.rejected: set[str] = set()
        self.failures: dict[str, int] = {}
        self.attempts = attempts
        self._current_score = best_score(evaluation_figures(current_url)) if mode == "best" else None

    def candidates(self) -> list[str]:
        """Checkpoints better than the one served, best first."""
        found = [url for url, _ in complete_checkpoints(self.run_url) if url not in self.rejected]
        if self.mode == "newest":
            names = [storage.name(url) for url in found]
            current = storage.name(self.current_url)
            return [url for url, name in sorted(zip(found, names), key=lambda p: p[1], reverse=True) if name > current]
        scored = [(best_score(evaluation_figures(url)), url) for url in found]
        floor = self._current_score if self._current_score is not None else float("-inf")
        return [url for score, url in sorted((s, u) for s, u in scored if s is not None and s > floor)[::-1]
                if url != self.current_url]

    def poll(self) -> LoadedModel | None:
        try:
            candidates = self.candidates()
        except storage.StorageError as exc:  # the store is down for a moment: keep serving, try next poll
            log.warning("follow: cannot list %s (%s)", self.run_url, exc)
            return None
        for url in candidates:
            try:
                model = self.load(url)
            except CheckpointError as exc:
                self.failures[url] = self.failures.get(url, 0) + 1
                final = self.failures[url] >= self.attempts
                log.warning("follow: skipping %s (%s): %s", storage.name(url),
                            "given up" if final else f"failure {self.failures[url]} of {self.attempts}", exc)
                if final:
                    self.rejected.add(url)
                continue
            except storage.StorageError as exc:
                log.warning("follow: cannot read %s (%s); will retry", storage.name(url), exc)
                return None
            self.current_url = url
            if self.mode == "best":
                self._current_score = best_score(evaluation_figures(url))
            return model
        return None


def run_folder_of(url: str) -> str:
    """The run folder of a checkpoint URL, or the URL itself when it is a run folder."""
    return run_of_checkpoint(url).url if storage.isfile(storage.join(url, META_FILE)) else url


__all__ = ["Answer", "RequestError", "InpaintService", "ModelSlot", "LoadedModel", "CheckpointFollower", "load_model",
           "decode_image", "encode_image", "FORMATS", "FIELDS", "FOLLOW_MODES"]
