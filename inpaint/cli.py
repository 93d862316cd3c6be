"""Shared command-line pieces: a parser whose errors are one line, and checked number types.

Every entry point (``jobs/*.py``, ``python -m inpaint fill``) reports a mistake as exactly one
``error: ...`` line on stderr and exit code 2, whether argparse or the job itself finds it.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
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


def path_text(text: str) -> str:
    """An argparse ``type=`` for a path or URL: empty or whitespace-only is refused.

    An empty ``--output ''`` would otherwise read as "not given" and fall back to the default,
    overwriting what the default names.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path or URL, got {text!r}")
    if text != text.strip():
        raise argparse.ArgumentTypeError(f"leading or trailing whitespace in {text!r}")
    return text


path_text.__name__ = "path"


def local_path(text: str) -> Path:
    return Path(path_text(text))


local_path.__name__ = "path"

# One path segment of safe characters: a run name becomes a folder under --storage, so "..", "."
# or "a/b" would put the run outside it or somewhere unexpected.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str) -> str:
    """``name`` if it is a safe run name, else ValueError saying what a run name may be."""
    if not _RUN_NAME.fullmatch(name) or name.endswith("."):
        raise ValueError(f"a run name is one path segment of letters, digits, '.', '_' and '-' "
                         f"starting with a letter or digit (at most 128), got {name!r}")
    return name


def non_empty(text: str) -> str:
    """An argparse ``type=`` for a word that may not be empty (a split name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a name, got {text!r}")
    return text
