"""Building blocks of generated source: identifiers, literals, and what the levels of
one generated function share (:class:`Unit`).

Only einc's own identifiers and integer literals are made here; a pattern's axis
names never reach the source (generic code's error messages are data, see
:meth:`Unit.check`).
"""

from __future__ import annotations

import builtins
import keyword
from collections.abc import Sequence

from ._runtime import HELPERS

__all__ = ["FUNCTION_NAME", "CONSTANT_FUNCTION_NAME", "MODULE_NAME", "TENSORS_CHECK", "EMPTY_LIST", "Group", "Unit",
           "ints", "singles"]

FUNCTION_NAME = "einc_fn"
CONSTANT_FUNCTION_NAME = "einc_constants"
MODULE_NAME = "EincModule"
TENSORS_CHECK = "einc_tensors"

Group = tuple[str, ...]
"""One tensor dimension as the axes merged into it (``()`` is a size-1 dimension)."""

EMPTY_LIST = "torch.jit.annotate(List[int], [])"


def ints(values: Sequence[int]) -> str:
    """A list literal of ints (TorchScript needs the empty one annotated)."""
    if not values:
        return EMPTY_LIST
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def singles(axes: Sequence[str]) -> list[Group]:
    """One dimension per axis."""
    return [(a,) for a in axes]


class _Namespace:
    """Fresh identifiers that shadow no keyword, builtin or global of the generated module."""

    _reserved = (
        frozenset(keyword.kwlist)
        | frozenset(dir(builtins))
        | {"torch", "List", "Tuple", "EincError", FUNCTION_NAME, CONSTANT_FUNCTION_NAME, MODULE_NAME, TENSORS_CHECK}
    )

    def __init__(self) -> None:
        self._used: set[str] = set()
        self._counts: dict[str, int] = {}

    def create(self, base: str) -> str:
        while True:
            n = self._counts.get(base, 0)
            self._counts[base] = n + 1
            name = f"{base}{n}"
            if name not in self._reserved and name not in self._used:
                self._used.add(name)
                return name


class Unit:
    """What the levels of one generated function share: names, helpers, kernels, checks."""

    def __init__(self, generic: bool, safe: bool, context: str, part: bool = False, dropout: float = 0.0) -> None:
        self.generic = generic
        self.safe = safe
        self.dropout = dropout
        """Dropout probability of every softmax's weights (``Options.dropout``)."""
        self.part = part
        """A part of a normalizer's axis: rows all -inf in it normalize to zeros, not NaN."""
        """No in-place writes, no branches on data: torch.func transforms (vmap, jvp) run it."""
        self.context = context.replace("{", "{{").replace("}", "}}")
        self.names = _Namespace()
        self.helpers: dict[str, None] = {}
        self.kernels: list[str] = []
        self.rewrites: list[str] = []
        self.size_vars: dict[str, str] = {}
        """Generic code: the variable holding each axis size, set by the prologue."""
        self.literal: dict[str, int] = {}
        """Sizes fixed in the source: keyword sizes (and anonymous axes)."""
        self.ellipsis: str | None = None
        """Generic code: the variable holding the dimensions ``...`` stands for (``List[int]``)."""
        self.dtype: str | None = None
        """Generic code: the variable holding the operands' common dtype."""
        self.targets: dict[tuple[bool, bool], str] = {}
        """Generic code: the variable holding the dtype levels compute in, per (half floats
        widen, integers widen)."""
        self.messages: list[str] = []
        self.messages_var = self.names.create("m") if generic else ""

    def helper(self, name: str) -> str:
        for dependency in HELPERS[name][1]:
            self.helper(dependency)
        self.helpers[name] = None
        return name

    def assign(self, lines: list[str], expr: str, base: str) -> str:
        """``name = expr`` appended to ``lines``; the fresh name."""
        name = self.names.create(base)
        lines.append(f"    {name} = {expr}")
        return name

    def size(self, axis: str) -> str:
        """Generic code: the size of ``axis``, a literal or the variable holding it."""
        if axis in self.literal:
            return str(int(self.literal[axis]))
        return self.size_vars[axis]

    def check(self, lines: list[str], condition: str, message: str, *values: str) -> None:
        """Generic code: raise ``EincError(message)`` (``{}`` filled by ``values``) where ``condition`` holds."""
        index = len(self.messages)
        self.messages.append(f"{self.context}: {message}")
        formatted = f"{self.messages_var}[{index}].format({', '.join(values)})" if values else \
            f"{self.messages_var}[{index}]"
        lines += [f"    if {condition}:", f"        raise EincError({formatted})"]
