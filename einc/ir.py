"""The intermediate representation of a parsed pattern.

Small frozen, slotted dataclasses holding tuples, so a parsed pattern is hashable and
can key caches.  Construction validates everything codegen will later rely on: axis
names are identifiers (or einc's own ellipsis axes), operations are known, the output
names each axis once.  Nothing else from a pattern string ever reaches generated code.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

from .errors import EincError

__all__ = [
    "ELLIPSIS",
    "MERGED_ELLIPSIS",
    "anonymous_axis",
    "anonymous_size",
    "spell_axis",
    "NORMALIZERS",
    "REDUCERS",
    "OPS",
    "SCALED_OPS",
    "AxisList",
    "Factor",
    "Pattern",
    "ellipsis_axis",
]

ELLIPSIS = "..."
"""Marks the ellipsis dimensions in an :class:`AxisList` (``dims`` entry ``("...",)``)."""

MERGED_ELLIPSIS = "(...)"
"""Marks the ellipsis inside a composition, ``(...)`` or ``(b ...)``: its dimensions
merge into that one (einops allows it in an output only)."""

REDUCERS = ("sum", "mean", "max", "min", "prod", "logsumexp")
NORMALIZERS = ("softmax", "log_softmax")
OPS = REDUCERS + NORMALIZERS

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ELLIPSIS_AXIS = re.compile(r"\.\.\.[0-9]+\Z")
_ANONYMOUS_AXIS = re.compile(r"([0-9]+)#[0-9]+\Z")


def ellipsis_axis(position: int) -> str:
    """Name of the axis at ``position`` (0 = leftmost) of the broadcast ellipsis.

    The dots make it impossible to spell in a pattern, so it never collides with a
    user's axis.
    """
    return f"{ELLIPSIS}{position}"


def anonymous_axis(size: int, occurrence: int) -> str:
    """Name of an anonymous axis (a number such as ``2`` in ``(h 2)``, as in einops).

    Each occurrence is its own axis (``occurrence`` numbers them across the pattern):
    anonymous axes of an input are always reduced, those of the output always new.
    The ``#`` makes the name impossible to spell in a pattern.
    """
    return f"{size}#{occurrence}"


def anonymous_size(name: str) -> int | None:
    """The size of an anonymous axis, ``None`` for any other axis."""
    match = _ANONYMOUS_AXIS.match(name)
    return int(match.group(1)) if match else None


def spell_axis(axis: str) -> str:
    """How an axis is written in a pattern: an anonymous axis by its size."""
    size = anonymous_size(axis)
    return axis if size is None else str(size)


def _check_axis(name: str) -> None:
    if not isinstance(name, str) or not (
        _NAME.match(name) or _ELLIPSIS_AXIS.match(name) or _ANONYMOUS_AXIS.match(name)
    ):
        raise EincError(f"invalid axis name {name!r}")
    if keyword.iskeyword(name):
        # Keywords are harmless (names never reach generated code) but almost surely
        # a mistake in a pattern; einops rejects them too.
        raise EincError(f"axis name {name!r} is a Python keyword")


@dataclass(frozen=True, slots=True)
class AxisList:
    """The axes of one operand (or of the output), one entry per tensor dimension.

    Each entry of ``dims`` lists the axes composed into that dimension, row-major as
    in einops: ``("h", "d")`` is ``(h d)``, ``("i",)`` a plain axis, ``()`` a unit
    dimension (``1`` or ``()``), and ``(ELLIPSIS,)`` the ellipsis.
    """

    dims: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dims, tuple) or not all(isinstance(d, tuple) for d in self.dims):
            raise EincError("AxisList.dims must be a tuple of tuples")
        ellipses = 0
        for dim in self.dims:
            if ELLIPSIS in dim and dim != (ELLIPSIS,):
                raise EincError(f"write the ellipsis inside a composition as MERGED_ELLIPSIS, not in {dim!r}")
            ellipses += dim.count(ELLIPSIS) + dim.count(MERGED_ELLIPSIS)
            for name in dim:
                if name not in (ELLIPSIS, MERGED_ELLIPSIS):
                    _check_axis(name)
            if len(set(dim)) != len(dim):
                raise EincError(f"axis repeated inside one composition {dim!r}")
        if ellipses > 1:
            raise EincError("an axis list may hold at most one ellipsis")

    @property
    def has_ellipsis(self) -> bool:
        return any(ELLIPSIS in dim or MERGED_ELLIPSIS in dim for dim in self.dims)

    @property
    def ellipsis_merged(self) -> bool:
        """Whether the ellipsis is inside a composition: ``(...)``, ``(b ...)``."""
        return any(MERGED_ELLIPSIS in dim for dim in self.dims)

    @property
    def axes(self) -> tuple[str, ...]:
        """Named axes in order of appearance, repeats included, ellipsis excluded."""
        return tuple(a for dim in self.dims for a in dim if a not in (ELLIPSIS, MERGED_ELLIPSIS))

    def render(self, compact: bool, bracketed: frozenset[str] = frozenset()) -> str:
        """Spell the axis list; dimensions made of ``bracketed`` axes get ``[...]``."""
        parts = []
        for dim in self.dims:
            if dim == (ELLIPSIS,):
                text = ELLIPSIS
            elif len(dim) == 1 and dim[0] != MERGED_ELLIPSIS:
                text = spell_axis(dim[0])
            elif not dim:
                text = "1"
            else:
                text = "(" + " ".join(ELLIPSIS if a == MERGED_ELLIPSIS else spell_axis(a) for a in dim) + ")"
            if dim and set(dim) <= bracketed:
                text = f"[{text}]"
            parts.append(text)
        return ("" if compact else " ").join(parts)


SCALED_OPS = (None, "sum", "mean") + NORMALIZERS
"""Operations a scale may follow: it multiplies a sum of products (the logits of a
normalizer); in the other semirings it would have no single meaning."""


@dataclass(frozen=True, slots=True)
class Factor:
    """One factor of a scale: ``* 2`` is ``Factor(False, 2)``, ``/ sqrt(d)`` is
    ``Factor(True, "d", sqrt=True)``.  Values are positive ints or axis names."""

    divide: bool
    value: int | str
    sqrt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, str)):
            raise EincError(f"a scale factor is an int or an axis name, not {self.value!r}")
        if isinstance(self.value, int) and not 0 < self.value < 2**63:
            raise EincError(f"a scale factor must be a positive int below 2**63, not {self.value}")
        if isinstance(self.value, str):
            _check_axis(self.value)

    def render(self) -> str:
        value = f"sqrt({self.value})" if self.sqrt else str(self.value)
        return f"{'/' if self.divide else '*'} {value}"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A whole parsed pattern: ``op(inputs -> output) * scale``.

    ``op`` is ``None`` for a plain contraction (sum of products), else one of
    :data:`OPS`.  ``normalized`` lists the bracketed output axes of a normalizer.
    An input is an :class:`AxisList` or a nested :class:`Pattern` (an operation whose
    result is the operand, with that pattern's output axes).  ``scale`` multiplies the
    contraction before the operation applies.
    """

    inputs: tuple[AxisList | Pattern, ...]
    output: AxisList
    op: str | None = None
    normalized: tuple[str, ...] = ()
    compact: bool = False
    scale: tuple[Factor, ...] = ()

    def __post_init__(self) -> None:
        if not self.inputs:
            raise EincError("a pattern needs at least one operand")
        for operand in self.inputs:
            if isinstance(operand, Pattern):
                if operand.op is None:
                    raise EincError("a nested operand must be an operation such as softmax(...)")
            elif not isinstance(operand, AxisList):
                raise EincError(f"an operand is an AxisList or a nested Pattern, not {operand!r}")
        if self.op is not None and self.op not in OPS:
            raise EincError(f"unknown operation {self.op!r}; expected one of {', '.join(OPS)}")
        out = self.output.axes
        if len(set(out)) != len(out):
            raise EincError("an axis is repeated in the output")
        if self.output.has_ellipsis and not any(a.has_ellipsis for a in self.operands):
            raise EincError("the output has '...' but no input has")
        if self.scale and self.op not in SCALED_OPS:
            raise EincError(
                f"a scale applies to sums of products and the logits of softmax/log_softmax, not to {self.op}(...)"
            )
        for factor in self.scale:
            if not isinstance(factor, Factor):
                raise EincError(f"a scale is a tuple of Factor, not {factor!r}")
            if isinstance(factor.value, str) and factor.value not in self.input_axes | set(out):
                raise EincError(f"scale factor axis {factor.value!r} is not an axis of the contraction")
        for name in self.normalized:
            _check_axis(name)
            if name not in out:
                raise EincError(f"normalized axis {name!r} is not in the output")
        if (self.op in NORMALIZERS) != bool(self.normalized):
            raise EincError(
                "softmax/log_softmax need bracketed output axes, and only they take them"
            )
        if self.op == "prod" and len(self.inputs) > 1:
            raise EincError("prod takes one operand only")

    @property
    def operands(self) -> tuple[AxisList, ...]:
        """The axis list of each input: a nested pattern's is its output."""
        return tuple(x.output if isinstance(x, Pattern) else x for x in self.inputs)

    @property
    def nested(self) -> bool:
        return any(isinstance(x, Pattern) for x in self.inputs)

    @property
    def leaves(self) -> int:
        """How many tensors the pattern takes (nested operands count their own)."""
        return sum(x.leaves if isinstance(x, Pattern) else 1 for x in self.inputs)

    @property
    def all_axes(self) -> frozenset[str]:
        """Every axis named anywhere in the pattern, nested operations included."""
        axes = self.input_axes | set(self.output.axes)
        for operand in self.inputs:
            if isinstance(operand, Pattern):
                axes |= operand.all_axes
        return frozenset(axes)

    @property
    def input_axes(self) -> frozenset[str]:
        return frozenset(a for operand in self.operands for a in operand.axes)

    @property
    def new_axes(self) -> tuple[str, ...]:
        """Output axes that no input has: broadcast, their sizes come by keyword."""
        have = self.input_axes
        return tuple(a for a in self.output.axes if a not in have)

    def render(self) -> str:
        """The canonical spelling of this pattern (spaces normalised, brackets kept)."""
        sep = "," if self.compact else ", "
        arrow = "->" if self.compact else " -> "
        out = self.output.render(self.compact, frozenset(self.normalized))
        inputs = (x.render() if isinstance(x, Pattern) else x.render(self.compact) for x in self.inputs)
        body = sep.join(inputs) + arrow + out + "".join(" " + f.render() for f in self.scale)
        return body if self.op is None else f"{self.op}({body})"
