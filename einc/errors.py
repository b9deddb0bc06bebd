"""The one exception type of einc, and helpers that format its messages."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["EincError", "PatternError", "caret", "at", "format_shape", "size_hint"]


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


class MemoryLimitError(EincError):
    """A plan over the memory limit: :mod:`einc.slicing` may run it in slices instead."""


class PatternError(EincError):
    """A rule of the pattern language broken (raised by :mod:`einc.ir`).

    ``subject`` says what broke it, so the parser can put a caret under it:
    ``("axis", name)`` an axis of the list being built, ``("input", i, name)`` an axis
    of input ``i``, ``("output", name)``, ``("scale", k)`` the ``k``-th factor,
    ``("op",)`` the operation, ``()`` the whole pattern.
    """

    def __init__(self, message: str, subject: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.subject = subject


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


def format_shape(shape: Sequence[int]) -> str:
    """A shape as einc's messages and reports write it: ``2x8x64``, ``()`` for a scalar.

    >>> format_shape((2, 8, 64)), format_shape(())
    ('2x8x64', '()')
    """
    return "x".join(map(str, shape)) or "()"


def size_hint(axis: str, example: int | str = 4) -> str:
    """How to give ``axis`` a size, for messages: by keyword, or on the command line."""
    return f"{axis}={example} as a keyword (--size {axis}={example} on the command line)"
