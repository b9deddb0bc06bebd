"""The one exception type of einc, and helpers that format its messages."""

from __future__ import annotations

__all__ = ["EincError", "size_hint"]


class EincError(ValueError):
    """Raised for every user error: a malformed pattern, mismatched shapes, bad options.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working.

    >>> import einc
    >>> try:
    ...     einc.compile("ij,jk->ik)")
    ... except einc.EincError as err:
    ...     print(str(err).splitlines()[0])
    unexpected ')' (expected the end of the pattern):
    """


_ONE_COLUMN = str.maketrans({c: " " for c in "\t\n\r\v\f"})


def caret(pattern: str, start: int, end: int | None = None) -> str:
    """The pattern on one line and ``^`` marks under ``pattern[start:end]`` on the next."""
    start = max(0, min(start, len(pattern)))
    width = 1 if end is None else max(1, end - start)
    # Tabs and newlines would shift the caret off its column: show each as one space.
    shown = pattern.translate(_ONE_COLUMN)
    return f"    {shown}\n    {' ' * start}{'^' * width}"


def at(pattern: str, start: int, end: int | None, message: str) -> EincError:
    """An :class:`EincError` with ``message`` followed by the pattern and a caret."""
    return EincError(f"{message}:\n{caret(pattern, start, end)}")


def size_hint(axis: str, example: int | str = 4) -> str:
    """How to give ``axis`` a size, for messages: by keyword, or on the command line."""
    return f"{axis}={example} as a keyword (--size {axis}={example} on the command line)"
