"""The one helper every user-facing error message uses."""

from __future__ import annotations


def one_line(error: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """An exception as one line of at most `limit` characters of text (its type when it has
    none), prefixed with the type's name when `with_type`."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if with_type else text
