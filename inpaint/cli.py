"""Shared command-line pieces: a parser whose errors are one line, and checked number types.

Every entry point (``jobs/*.py``, ``python -m inpaint fill``) reports a mistake as exactly one
``error: ...`` line on stderr and exit code 2, whether argparse or the job itself finds it.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage dump: ``error: MESSAGE`` on stderr, exit code 2 (``--help`` unchanged)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {' '.join(str(message).split())}\n")


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _number(kind: type, text: str) -> float:
    try:
        value = kind(text)
    except (TypeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_type(kind: type = float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite ``kind`` (int or float) with ``low <= value <= high``.

    ``low_open`` makes the lower bound strict (``value > low``).
    """

    def parse(text: str) -> float:
        value = _number(kind, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            parts = []
            if low is not None:
                parts.append(f"{'>' if low_open else '>='} {_show(low)}")
            if high is not None:
                parts.append(f"<= {_show(high)}")
            raise argparse.ArgumentTypeError(f"must be {' and '.join(parts)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number_type(int, low=1)
non_negative_int = number_type(int, low=0)
seed_int = number_type(int, low=0, high=2**32 - 1)
positive_float = number_type(float, low=0, low_open=True)
non_negative_float = number_type(float, low=0)
fraction = number_type(float, low=0, high=1)
