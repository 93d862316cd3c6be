"""How every error reaches a person: one line (the one wording helper of the project)."""

from __future__ import annotations

# Lines of a Python traceback that a remote error (Ray's) carries inside its message.
_TRACEBACK_LINES = ("File ", "Traceback", "^", "~")


def one_line(error: BaseException | str, limit: int = 300, *, typed: bool = False, remote: bool = False) -> str:
    """``error``'s message on one line: whitespace collapsed, at most ``limit`` characters, the
    type's name when it has no message.

    ``typed`` puts the type first (``OSError: ...``: how storage failures are worded, where the
    type says more than the message). ``remote`` keeps only the last line that is not part of a
    traceback: a Ray error carries the whole remote traceback, and its last line is the cause.
    """
    text = str(error)
    if remote:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(_TRACEBACK_LINES)]
        text = (useful or lines or [""])[-1]
    text = " ".join(text.split())
    if isinstance(error, BaseException):
        name = type(error).__name__
        text = f"{name}: {text}" if typed and text else text or name
    return text[:limit]
