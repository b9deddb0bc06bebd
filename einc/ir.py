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

from .errors import EincError, PatternError

__all__ = [
    "ELLIPSIS",
    "INT64_LIMIT",
    "MERGED_ELLIPSIS",
    "anonymous_axis",
    "anonymous_size",
    "check_axis",
    "spell_axis",
    "NORMALIZERS",
    "REDUCERS",
    "INDEXERS",
    "OPS",
    "SCALED_OPS",
    "AxisList",
    "Factor",
    "MODIFIERS",
    "Modifier",
    "Pattern",
    "ellipsis_axis",
]

ELLIPSIS = "..."
"""Marks the ellipsis dimensions in an :class:`AxisList` (``dims`` entry ``("...",)``)."""

MERGED_ELLIPSIS = "(...)"
"""Marks the ellipsis inside a composition, ``(...)`` or ``(b ...)``: its dimensions
merge into that one (einops allows it in an output only)."""

INT64_LIMIT = 2**63
"""Sizes, element counts, memory limits and scales of integer tensors stay below it
(what an int64 holds, and a tensor can index)."""

REDUCERS = ("sum", "mean", "max", "min", "prod", "logsumexp")
NORMALIZERS = ("softmax", "log_softmax")
INDEXERS = ("gather",)
"""``gather(data, index... -> output)``: the data's axes the output drops are indexed,
each by one integer tensor (in the order they appear in the data)."""
OPS = REDUCERS + NORMALIZERS + INDEXERS

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ELLIPSIS_AXIS = re.compile(r"\.\.\.[0-9]+\Z")
_ANONYMOUS_AXIS = re.compile(r"([0-9]+)#[0-9]+\Z")


def ellipsis_axis(position: int) -> str:
    """Name of the axis at ``position`` (0 = leftmost) of the broadcast ellipsis.

    The dots make it impossible to spell in a pattern, so it never collides with a
    user's axis.
    """
    return f"{ELLIPSIS}{position}"


def anonymous_size(name: str) -> int | None:
    """The size of an anonymous axis, ``None`` for any other axis."""
    match = _ANONYMOUS_AXIS.match(name)
    return int(match.group(1)) if match else None


def spell_axis(axis: str) -> str:
    """How an axis is written in a pattern: an anonymous axis by its size."""
    size = anonymous_size(axis)
    return axis if size is None else str(size)


def check_axis(name: str) -> None:
    """An axis name is an identifier (not a Python keyword), or one of einc's own."""
    if not isinstance(name, str) or not (
        _NAME.match(name) or _ELLIPSIS_AXIS.match(name) or _ANONYMOUS_AXIS.match(name)
    ):
        raise PatternError(f"invalid axis name {name!r}", ("axis", name))
    if keyword.iskeyword(name):
        # Keywords are harmless (names never reach generated code) but almost surely
        # a mistake in a pattern; einops rejects them too.
        raise PatternError(f"axis name {name!r} is a Python keyword", ("axis", name))


def anonymous_axis(size: int, occurrence: int) -> str:
    """Name of an anonymous axis (a number such as ``2`` in ``(h 2)``, as in einops).

    Each occurrence is its own axis (``occurrence`` numbers them across the pattern):
    anonymous axes of an input are always reduced, those of the output always new.
    The ``#`` makes the name impossible to spell in a pattern.  (``1`` is no axis: it
    is a unit dimension.)
    """
    if size < 1:
        raise PatternError("an anonymous axis needs a positive size", ("factor",))
    return f"{size}#{occurrence}"


@dataclass(frozen=True, slots=True)
class AxisList:
    """The axes of one operand (or of the output), one entry per tensor dimension.

    Each entry of ``dims`` lists the axes composed into that dimension, row-major as
    in einops: ``("h", "d")`` is ``(h d)``, ``("i",)`` a plain axis, ``()`` a unit
    dimension (``1`` or ``()``), ``(ELLIPSIS,)`` the ellipsis and
    ``MERGED_ELLIPSIS`` the ellipsis inside a composition.
    """

    dims: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dims, tuple) or not all(isinstance(d, tuple) for d in self.dims):
            raise EincError("AxisList.dims must be a tuple of tuples")
        ellipses = 0
        for dim in self.dims:
            if ELLIPSIS in dim and dim != (ELLIPSIS,):
                raise EincError(f"the ellipsis inside a composition is MERGED_ELLIPSIS, not in {dim!r}")
            ellipses += dim.count(ELLIPSIS) + dim.count(MERGED_ELLIPSIS)
            for name in dim:
                if name not in (ELLIPSIS, MERGED_ELLIPSIS):
                    check_axis(name)
            for name in dim:
                if dim.count(name) > 1:
                    raise PatternError(f"axis {name!r} appears twice in one composition", ("axis", name))
        if ellipses > 1:
            raise PatternError("'...' may appear once per operand", ("axis", ELLIPSIS))

    @property
    def has_ellipsis(self) -> bool:
        return any(ELLIPSIS in dim or MERGED_ELLIPSIS in dim for dim in self.dims)

    @property
    def ellipsis_merged(self) -> bool:
        """Whether the ellipsis is inside a composition: ``(...)``, ``(b ...)``."""
        return any(MERGED_ELLIPSIS in dim for dim in self.dims)

    def spans(self, ndim: int) -> tuple[tuple[tuple[str, ...], int, int], ...]:
        """(dimension's axes, first tensor dimension, how many) of each entry of ``dims``,
        for a tensor of ``ndim`` dimensions: ``...`` spans what the others leave.

        >>> AxisList((("b",), (ELLIPSIS,), ("c",))).spans(4)
        ((('b',), 0, 1), (('...',), 1, 2), (('c',), 3, 1))
        """
        own = ndim - (len(self.dims) - self.has_ellipsis)
        out, position = [], 0
        for dim in self.dims:
            count = own if dim == (ELLIPSIS,) else 1
            out.append((dim, position, count))
            position += count
        return tuple(out)

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
        if isinstance(self.value, int) and self.value < 1:
            raise PatternError("a scale factor must be positive", ("factor",))
        if isinstance(self.value, int) and self.value >= INT64_LIMIT:
            raise PatternError("a scale factor must be below 2**63", ("factor",))
        if isinstance(self.value, str):
            check_axis(self.value)

    def render(self) -> str:
        value = f"sqrt({self.value})" if self.sqrt else str(self.value)
        return f"{'/' if self.divide else '*'} {value}"


MODIFIERS = ("bias", "mask", "causal", "causal_lower_right", "window")
"""What may shape a normalizer's logits: an additive tensor, a boolean tensor (True =
attend), upper-left causality (key ``j`` seen by query ``i`` where ``j <= i``),
lower-right causality (``j <= i + K - Q``: the queries are the last of the keys'
positions) and a sliding window (``0 <= i - j < N``, aligned as the causality given,
upper left without one)."""

TENSOR_MODIFIERS = ("bias", "mask")


@dataclass(frozen=True, slots=True)
class Modifier:
    """One modifier of a normalizer's logits: ``mask(b k)`` is ``Modifier("mask", ("b", "k"))``,
    ``window(q k, 128)`` is ``Modifier("window", ("q", "k"), 128)``."""

    kind: str
    axes: tuple[str, ...]
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODIFIERS:
            raise PatternError(f"unknown modifier {self.kind!r}; the modifiers are {', '.join(MODIFIERS)}",
                               ("modifier", self.kind))
        if not isinstance(self.axes, tuple) or not self.axes:
            raise PatternError(f"{self.kind}(...) names the axes it applies to", ("modifier", self.kind))
        for name in self.axes:
            check_axis(name)
            if anonymous_size(name) is not None or name.startswith(ELLIPSIS):
                raise PatternError(f"{self.kind}(...) takes named axes", ("modifier", self.kind))
            if self.axes.count(name) > 1:
                raise PatternError(f"axis {name!r} appears twice in {self.kind}(...)", ("modifier", self.kind))
        positional = self.kind in ("causal", "causal_lower_right", "window")
        if positional and len(self.axes) != 2:
            raise PatternError(f"{self.kind}(...) takes two axes, the queries' and the keys', e.g. "
                               f"{self.kind}(q k{', 128' if self.kind == 'window' else ''})", ("modifier", self.kind))
        if self.kind == "window" and self.size is None:
            raise PatternError("window(q k, N) takes a size", ("modifier", self.kind))
        if self.kind != "window" and self.size is not None:
            raise PatternError(f"{self.kind}(...) takes axes only (a size is window's)", ("modifier", self.kind))
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or not 1 <= self.size < INT64_LIMIT):
            raise PatternError("a window's size is positive", ("modifier", self.kind))

    @property
    def tensor(self) -> bool:
        """Whether the modifier is a tensor the call takes."""
        return self.kind in TENSOR_MODIFIERS

    def render(self, compact: bool) -> str:
        axes = ("" if compact else " ").join(self.axes)
        return f"{self.kind}({axes}{'' if self.size is None else f', {self.size}'})"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A whole parsed pattern: ``op(inputs -> output) * scale``.

    ``op`` is ``None`` for a plain contraction (sum of products), else one of
    :data:`OPS`.  ``normalized`` lists the bracketed output axes of a normalizer.
    An input is an :class:`AxisList` or a nested :class:`Pattern` (an operation whose
    result is the operand, with that pattern's output axes).  ``scale`` multiplies the
    contraction before the operation applies.  Construction checks every rule of the
    pattern language that concerns more than one axis list (:class:`PatternError`
    says which part broke it).
    """

    inputs: tuple[AxisList | Pattern, ...]
    output: AxisList
    op: str | None = None
    normalized: tuple[str, ...] = ()
    compact: bool = False
    scale: tuple[Factor, ...] = ()
    modifiers: tuple[Modifier, ...] = ()
    """What shapes a normalizer's logits before it normalizes them (:data:`MODIFIERS`);
    each ``bias``/``mask`` is one more tensor, after the contraction's own."""

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
            raise PatternError(f"unknown operation {self.op!r}; the operations are {', '.join(OPS)}", ("op",))
        for index, operand in enumerate(self.operands):
            if operand.ellipsis_merged:
                raise PatternError("'...' inside parentheses merges dimensions: only in the output (as einops)",
                                   ("input", index, MERGED_ELLIPSIS))
            anonymous = [a for a in operand.axes if anonymous_size(a) is not None]
            if anonymous and self.op is None and isinstance(self.inputs[index], AxisList):
                # A plain contraction would sum it silently.
                raise PatternError("an anonymous axis in an input is reduced, which needs an operation: "
                                   "write sum(...), mean(...) or another (einops' rearrange refuses it too)",
                                   ("input", index, anonymous[0]))
        out = self.output.axes
        for name in out:
            if out.count(name) > 1:
                raise PatternError(f"axis {name!r} appears twice in the output", ("output", name))
        if self.output.has_ellipsis and not any(a.has_ellipsis for a in self.operands):
            raise PatternError("the output has '...' but no input has", ("output", ELLIPSIS))
        if self.scale and self.op not in SCALED_OPS:
            raise PatternError(
                f"a scale applies to sums of products and the logits of softmax/log_softmax, not to {self.op}(...)",
                ("scale", 0),
            )
        for index, factor in enumerate(self.scale):
            if not isinstance(factor, Factor):
                raise EincError(f"a scale is a tuple of Factor, not {factor!r}")
            if isinstance(factor.value, str) and factor.value not in self.input_axes | set(out):
                raise PatternError(f"scale factor axis {factor.value!r} is not an axis of this contraction",
                                   ("scale", index))
        for name in self.normalized:
            check_axis(name)
            if name not in out:
                raise PatternError(f"normalized axis {name!r} is not in the output", ("output", name))
        if self.op in NORMALIZERS and not self.normalized:
            raise PatternError(f"{self.op} needs the normalized axes in brackets, e.g. '{self.op}(b [c])'", ("op",))
        if self.normalized and self.op not in NORMALIZERS:
            raise PatternError("brackets mark normalized axes, only in the output of softmax/log_softmax", ("op",))
        if self.modifiers and self.op not in NORMALIZERS:
            raise PatternError(f"{self.modifiers[0].kind}(...) shapes the logits of softmax/log_softmax, "
                               "not those of another operation", ("modifier", 0))
        output_dims = set(self.output.dims)
        placed = [m for m in self.modifiers if not m.tensor]
        if len({(m.axes, m.kind == "window") for m in placed}) != len(placed) or \
                len({m.axes for m in placed if m.kind != "window"}) > 1:
            raise PatternError("one causality (and one window) per pattern", ("modifier", 0))
        for index, modifier in enumerate(self.modifiers):
            if not isinstance(modifier, Modifier):
                raise EincError(f"modifiers are a tuple of Modifier, not {modifier!r}")
            for name in modifier.axes:
                if (name,) not in output_dims:
                    raise PatternError(f"{modifier.kind}(...) names axis {name!r}, which is not a dimension of its "
                                       f"own in the output {self.output.render(self.compact)!r}",
                                       ("modifier", index))
            if not modifier.tensor and (modifier.axes[0] in self.normalized or modifier.axes[1] not in self.normalized):
                raise PatternError(f"{modifier.kind}(...) takes the queries' axis, then the keys' axis, which "
                                   f"the {self.op} normalizes; {modifier.axes[1]!r} is not normalized here"
                                   if modifier.axes[1] not in self.normalized else
                                   f"{modifier.kind}(...) takes the queries' axis first; {modifier.axes[0]!r} is "
                                   "the normalized (keys') axis", ("modifier", index))
        if self.op == "gather":
            _check_gather(self)
        if self.op == "prod" and len(self.inputs) > 1:
            raise PatternError(
                "prod takes one operand only (products of several operands have no reduction semiring)", ("op",)
            )

    @property
    def operands(self) -> tuple[AxisList, ...]:
        """The axis list of each input: a nested pattern's is its output."""
        return tuple(x.output if isinstance(x, Pattern) else x for x in self.inputs)

    def levels(self) -> tuple[Pattern, ...]:
        """This pattern's nested operations (depth first, in operand order), then itself."""
        inner = tuple(p for x in self.inputs if isinstance(x, Pattern) for p in x.levels())
        return inner + (self,)

    def leaf_lists(self) -> tuple[AxisList, ...]:
        """The axis list of each tensor the pattern takes, nested operations' included, in
        the order a call takes the tensors (a level's ``bias``/``mask`` after its inputs)."""
        return tuple(a for x in self.inputs for a in (x.leaf_lists() if isinstance(x, Pattern) else (x,))) + \
            tuple(AxisList(tuple((a,) for a in m.axes)) for m in self.modifiers if m.tensor)

    @property
    def tensor_modifiers(self) -> tuple[Modifier, ...]:
        return tuple(m for m in self.modifiers if m.tensor)

    def modifier_leaves(self, first: int = 0) -> tuple[tuple[int, Modifier], ...]:
        """(tensor position in a call, modifier) of every ``bias``/``mask``, nested levels' included."""
        found: list[tuple[int, Modifier]] = []
        position = first
        for x in self.inputs:
            if isinstance(x, Pattern):
                found.extend(x.modifier_leaves(position))
                position += x.leaves
            else:
                position += 1
        found.extend((position + i, m) for i, m in enumerate(self.tensor_modifiers))
        return tuple(found)

    @property
    def indexed(self) -> tuple[str, ...]:
        """A ``gather``'s indexed axes: the data's axes its output drops, in the data's order."""
        if self.op != "gather":
            return ()
        kept = set(self.output.axes)
        return tuple(a for a in self.operands[0].axes if a not in kept)

    def index_leaves(self, first: int = 0) -> tuple[tuple[int, str, Pattern], ...]:
        """(tensor position in a call, indexed axis, its ``gather`` level) of every index
        tensor, nested levels' included."""
        found: list[tuple[int, str, Pattern]] = []
        position = first
        for number, x in enumerate(self.inputs):
            if isinstance(x, Pattern):
                found.extend(x.index_leaves(position))
                position += x.leaves
            else:
                if number and self.op == "gather":
                    found.append((position, self.indexed[number - 1], self))
                position += 1
        return tuple(found)

    @property
    def nested(self) -> bool:
        return any(isinstance(x, Pattern) for x in self.inputs)

    @property
    def leaves(self) -> int:
        """How many tensors the pattern takes (nested operands count their own)."""
        return sum(x.leaves if isinstance(x, Pattern) else 1 for x in self.inputs) + len(self.tensor_modifiers)

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
        body = sep.join(inputs) + arrow + out + "".join(" " + f.render() for f in self.scale) + \
            "".join(" " + m.render(self.compact) for m in self.modifiers)
        return body if self.op is None else f"{self.op}({body})"


def _check_gather(pattern: Pattern) -> None:
    """The rules of ``gather(data, index... -> output)``: one integer tensor per indexed
    axis (the data's axes the output drops), each over named axes shared with the data
    (batch axes, matched by name) or new (they index), all of which the output keeps."""
    if len(pattern.inputs) < 2:
        raise PatternError("gather(...) takes the data, then one index tensor per indexed axis, e.g. "
                           "gather(b t v, b t -> b t)", ("op",))
    if any(a.has_ellipsis for a in pattern.operands) or pattern.output.has_ellipsis:
        raise PatternError("gather(...) takes named axes, not '...'", ("op",))
    data = pattern.operands[0]
    indexed = pattern.indexed
    for axis in indexed:
        if data.axes.count(axis) > 1:
            raise PatternError(f"the indexed axis {axis!r} appears twice in the data: one index tensor indexes "
                               "one dimension", ("input", 0, axis))
        if (axis,) not in data.dims:
            raise PatternError(f"the indexed axis {axis!r} (the output drops it) must be a dimension of its own "
                               "in the data, not part of a composition", ("input", 0, axis))
    if len(indexed) != len(pattern.inputs) - 1:
        raise PatternError(f"gather(...) takes one index tensor per indexed axis (the data's axes the output "
                           f"drops: {', '.join(map(repr, indexed)) or 'none'}): {len(indexed)}, not "
                           f"{len(pattern.inputs) - 1}", ("op",))
    kept = set(data.axes) - set(indexed)
    for number, index in enumerate(pattern.inputs[1:], start=1):
        if isinstance(index, Pattern):
            raise PatternError("a gather(...) index is a tensor, not a nested operation", ("op",))
        for axis in index.axes:
            if axis in indexed:
                raise PatternError(f"index operand {number} has the indexed axis {axis!r}: an index tensor's "
                                   "axes are batch axes of the data or new ones", ("input", number, axis))
            if axis not in pattern.output.axes:
                raise PatternError(f"axis {axis!r} of index operand {number} is not in the output: gather(...) "
                                   "keeps every axis of its indices (an enclosing operation may reduce it)",
                                   ("input", number, axis))
        kept |= set(index.axes)
    for axis in pattern.output.axes:
        if axis not in kept:
            raise PatternError(f"output axis {axis!r} is in neither the data nor an index", ("output", axis))
