"""The project's own errors, and the one helper every user-facing error message uses.

An `MpbatchError` is expected: bad input, a bad setting, an output made with other settings,
a full disk. The CLI prints it as one line and exits 2. Anything else is a bug (ours, torch's,
a driver's): the CLI keeps its traceback, so that there is something to report.
"""

from __future__ import annotations


class MpbatchError(Exception):
    """An expected, user-facing error; its message is one line naming the file and the reason."""


class SettingsError(MpbatchError, ValueError):
    """An option or setting that cannot be used (a ValueError, for callers of the library)."""


def one_line(error: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """An exception as one line of at most `limit` characters of text (its type when it has
    none), prefixed with the type's name when `with_type`."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if with_type else text
