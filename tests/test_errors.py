"""The one wording helper: every error a person reads is one line."""

from __future__ import annotations

from inpaint.errors import one_line

REMOTE = """ray.exceptions.RayTaskError(ValueError): ray::ServeController.deploy()
Traceback (most recent call last):
  File "/x/serve.py", line 10, in deploy
    raise ValueError("checkpoint does not load")
    ^^^^^^^^^^^^^^^^^^^^
ValueError: checkpoint does not load
"""


def test_messages_are_collapsed_to_one_line_and_cut_at_the_limit():
    assert one_line(OSError("no space\n  left   on device")) == "no space left on device"
    assert one_line(ValueError("x" * 500)) == "x" * 300
    assert one_line("a\tb", 1) == "a"


def test_an_empty_message_names_the_type_and_typed_puts_the_type_first():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(PermissionError("denied"), typed=True) == "PermissionError: denied"
    assert one_line(TimeoutError(), typed=True) == "TimeoutError"


def test_a_remote_error_is_worded_by_its_cause_not_its_traceback():
    assert one_line(RuntimeError(REMOTE), remote=True) == "ValueError: checkpoint does not load"
