"""Classical inpainting baselines, to show what the network buys over a diffusion-style fill.

Both take a uint8 ``(H, W, 3)`` image and a bool ``(H, W)`` hole (True = fill) and return a
uint8 image whose known pixels are the input's, bit for bit.

- ``mean``: every hole pixel set to the mean colour of the image's known pixels: the floor
  that any method must clear.
- ``telea``: Telea's fast-marching method (OpenCV's ``cv2.inpaint``; OpenCV is a runtime
  dependency, also used by the post-processing in :func:`inpaint.inference.poisson_blend`).
- ``biharmonic``: scikit-image's ``inpaint_biharmonic``, always available; ~0.05 s for a
  centre hole in a 160x160 image on one CPU core here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

TELEA_RADIUS = 3  # px; OpenCV's documented example value, and what GLCIC-style comparisons use


class BaselineError(RuntimeError):
    """A baseline that cannot run here (e.g. its optional dependency is missing)."""


def require_cv2():
    """The cv2 module, or a BaselineError saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise BaselineError("OpenCV is not installed (a dependency of inpaint since fill post-processes "
                            "with it); install it with: pip install opencv-python-headless") from None
    return cv2


def _check(image: np.ndarray, hole: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if hole.shape != image.shape[:2]:
        raise ValueError(f"hole must be (H, W) = {image.shape[:2]}, got {hole.shape}")


def _keep_known(image: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> np.ndarray:
    return np.where(hole[..., None], filled, image)


def mean(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The hole filled with the mean colour of the known pixels (mid-grey when nothing is known)."""
    _check(image, hole)
    known = image[~hole]
    colour = np.rint(known.mean(axis=0)) if len(known) else np.full(3, 128.0)
    return _keep_known(image, np.broadcast_to(colour.astype(np.uint8), image.shape), hole)


def telea(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Telea (2004) fast-marching inpainting, radius TELEA_RADIUS."""
    _check(image, hole)
    cv2 = require_cv2()
    filled = cv2.inpaint(np.ascontiguousarray(image), hole.astype(np.uint8) * 255, TELEA_RADIUS,
                         cv2.INPAINT_TELEA)
    return _keep_known(image, filled, hole)


def biharmonic(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Biharmonic-equation inpainting (scikit-image), rounded back to uint8."""
    _check(image, hole)
    from skimage.restoration import inpaint_biharmonic

    filled = inpaint_biharmonic(image, hole.astype(bool), channel_axis=-1)  # float in [0, 1]
    filled = np.clip(np.rint(filled * 255), 0, 255).astype(np.uint8)
    return _keep_known(image, filled, hole)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"mean": mean, "telea": telea,
                                                                         "biharmonic": biharmonic}


def get(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The named baseline, checked to be runnable here."""
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    if name == "telea":
        require_cv2()
    return BASELINES[name]
