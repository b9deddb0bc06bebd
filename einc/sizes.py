"""Axis sizes: from tensor shapes, keyword sizes, compositions and the ellipsis.

One name has one size throughout a pattern.  :func:`resolve` gives every axis of one
level its size (the ellipsis spelled out as numbered axes), naming both places where
two sizes of one name disagree; :func:`learn_leaf_sizes` lets a nested level use what
another operand says.  Nothing here knows about contraction paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import ir
from .errors import EincError, size_hint

__all__ = ["Group", "Level", "Shape", "check_sizes", "check_keyword_axes", "check_new_axes", "show_axes",
           "learn_leaf_sizes", "merge_ellipsis", "rank", "resolve", "show_axis"]

Shape = tuple[int, ...]
Group = tuple[str, ...]
"""One tensor dimension as the axes merged into it (``()`` is a size-1 dimension)."""


def check_sizes(sizes: Mapping[str, Any]) -> None:
    """Keyword axis sizes must be ints in ``[0, 2**63)`` (bools are not sizes)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < ir.INT64_LIMIT:
            raise EincError(f"size of axis {name!r} must be a non-negative int below 2**63, not {value!r}")


def check_keyword_axes(sizes: Mapping[str, Any], axes: frozenset[str], where: str = "the pattern") -> None:
    """Every keyword size names an axis of ``axes`` (``where`` says what holds them)."""
    for name in sizes:
        if name not in axes:
            raise EincError(f"size given for axis {name!r}, which is not in {where}")


def show_axis(axis: str, *, noun: bool = False) -> str:
    """An axis as messages name it: ``'h'`` (with ``noun``, ``axis 'h'``), an anonymous
    axis by its size, an ellipsis dimension by its place."""
    if axis.startswith(ir.ELLIPSIS):
        return f"'...' (dimension {axis[3:]} of the broadcast ellipsis)"
    anonymous = ir.anonymous_size(axis)
    if anonymous is not None:
        return f"anonymous axis {anonymous}"
    return f"axis {axis!r}" if noun else repr(axis)


def show_axes(axes: Sequence[str]) -> str:
    """A tensor's axes as messages name them: ``'b' 'h' 'q'``, or ``scalar``."""
    return " ".join(map(show_axis, axes)) or "scalar"


def check_new_axes(pattern: ir.Pattern, sizes: Mapping[str, int]) -> None:
    """Output axes in no input (at any level) need a size: by keyword, or anonymous (``3``)."""
    for level in [x for x in pattern.inputs if isinstance(x, ir.Pattern)]:
        check_new_axes(level, sizes)
    for axis in pattern.new_axes:
        if axis not in sizes and ir.anonymous_size(axis) is None:
            raise EincError(f"output axis {axis!r} is in no input, so its size must be given: {size_hint(axis)}")


def rank(operand: ir.AxisList, shape: Shape) -> int | None:
    """How many dimensions ``...`` stands for in ``operand`` for ``shape`` (0 without
    one); ``None`` where the shape has the wrong number of dimensions."""
    named = len(operand.dims) - operand.has_ellipsis
    if len(shape) < named or (not operand.has_ellipsis and len(shape) != named):
        return None
    return len(shape) - named


class _Sizes:
    """Axis sizes with where each was learned, so conflicts can name both places."""

    def __init__(self, keyword: Mapping[str, int]) -> None:
        self.size: dict[str, int] = {}
        self.source: dict[str, str] = {}
        for name, value in keyword.items():
            self.learn(name, value, f"keyword {name}={value}")

    def learn(self, axis: str, value: int, where: str) -> None:
        known = self.size.get(axis)
        if known is None:
            self.size[axis] = value
            self.source[axis] = where
        elif known != value:
            raise EincError(
                f"{show_axis(axis, noun=True)} has size {value} in {where} but {known} in {self.source[axis]}"
            )


def learn_leaf_sizes(pattern: ir.Pattern, shapes: Sequence[Shape], keyword: Mapping[str, int],
                     known: MutableMapping[str, tuple[int, str]]) -> None:
    """Sizes of plain axes of every tensor, so a nested level can use what another
    operand says (``h`` learned from ``v`` splits ``(h d)`` in the nested ``q``)."""
    table = _Sizes(keyword)
    for position, operand in enumerate(pattern.leaf_lists()):
        shape = shapes[position]
        if rank(operand, shape) is None:
            continue  # the level's own planning reports it
        for dim, start, _ in operand.spans(len(shape)):
            if len(dim) == 1 and dim != (ir.ELLIPSIS,):
                table.learn(dim[0], shape[start], f"operand {position} (dimension {start})")
    for name, value in table.size.items():
        if name not in keyword:
            known[name] = (value, table.source[name])


def merge_ellipsis(pattern: ir.Pattern, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
    """Shapes with each operand's ``...`` dimensions merged into one, as shape-generic
    code sees them (it serves ``...`` of any rank).  Every ``...`` must stand for the
    same dimensions: a broadcast 1 and a real one would need different code.

    >>> from einc.parser import parse
    >>> merge_ellipsis(parse("... i, ... i -> ..."), [(2, 3, 4), (2, 3, 4)])
    ((6, 4), (6, 4))
    """
    merged: list[Shape] = []
    seen: Shape | None = None
    first = 0
    for index, (axes, shape) in enumerate(zip(pattern.leaf_lists(), shapes)):
        extra = rank(axes, shape)
        if not axes.has_ellipsis or extra is None:
            merged.append(shape)  # planning reports a wrong rank
            continue
        start = axes.dims.index((ir.ELLIPSIS,))
        end = start + extra
        own = shape[start:end]
        if seen is not None and own != seen:
            raise EincError(f"module() cannot broadcast size-1 '...' dimensions or '...' of different ranks: "
                            f"'...' stands for {list(own)} in operand {index} but {list(seen)} in operand {first}; "
                            "expand the operands first")
        if seen is None:
            seen, first = own, index
        merged.append(shape[:start] + (math.prod(own),) + shape[end:])
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class Level:
    """The shapes of one level (one contraction) in axis terms."""

    input_dims: tuple[tuple[Group, ...], ...]
    """Each operand's dimensions as axis groups, the ellipsis spelled out as numbered axes."""
    output_dims: tuple[Group, ...]
    sizes: dict[str, int]
    dropped: frozenset[tuple[int, int]]
    """(operand, dimension) of size-1 ellipsis dimensions broadcast against a larger
    size: they leave the operand like a unit dimension."""


def resolve(pattern: ir.Pattern, shapes: Sequence[Shape], labels: Sequence[str], keyword: Mapping[str, int],
            learned: Mapping[str, tuple[int, str]]) -> Level:
    """Every axis size of one level: ``shapes`` of its operands (``labels`` name them in
    messages), its keyword sizes and what other levels ``learned``."""
    input_dims, output_dims, broadcast, dropped = _expand_ellipsis(pattern, shapes, labels)
    sizes = _Sizes(keyword)
    for name, (value, where) in learned.items():
        sizes.learn(name, value, where)
    for dims in [*input_dims, output_dims]:
        for axis in (a for dim in dims for a in dim):
            anonymous = ir.anonymous_size(axis)
            if anonymous is not None:
                sizes.learn(axis, anonymous, "the pattern")
    for name, value in broadcast.items():
        sizes.learn(name, value, "the broadcast ellipsis")
    pending: list[tuple[Group, int, str]] = []
    for index, (dims, shape) in enumerate(zip(input_dims, shapes)):
        for position, (dim, extent) in enumerate(zip(dims, shape)):
            where = f"{labels[index]} (dimension {position})"
            if not dim:
                if extent != 1:
                    raise EincError(f"{where} is the unit axis '1' but has size {extent}")
            elif len(dim) > 1:
                pending.append((dim, extent, where))
            elif not dim[0].startswith(ir.ELLIPSIS):
                sizes.learn(dim[0], extent, where)
    _compositions(sizes, pending)
    check_new_axes(pattern, sizes.size)
    return Level(tuple(input_dims), tuple(output_dims), sizes.size, frozenset(dropped))


def _compositions(sizes: _Sizes, pending: list[tuple[Group, int, str]]) -> None:
    """Split compositions in any order: one group's inferred size may unlock another's."""
    while pending:
        still: list[tuple[Group, int, str]] = []
        for dim, extent, where in pending:
            unknown = [a for a in dim if a not in sizes.size]
            known = math.prod(sizes.size[a] for a in dim if a in sizes.size)
            group = "(" + " ".join(map(ir.spell_axis, dim)) + ")"
            if not unknown:
                if known != extent:
                    detail = " * ".join(f"{ir.spell_axis(a)}={sizes.size[a]}" for a in dim)
                    raise EincError(f"composition {group} in {where} has size {extent}, but {detail} = {known}")
            elif len(unknown) == 1:
                if known == 0 or extent % known:
                    raise EincError(
                        f"composition {group} in {where} has size {extent}, which the known sizes "
                        f"(product {known}) do not divide, so {show_axis(unknown[0], noun=True)} has no integer size"
                    )
                sizes.learn(unknown[0], extent // known, where)
            else:
                still.append((dim, extent, where))
        if len(still) == len(pending):
            dim, extent, where = still[0]
            missing = ", ".join(repr(a) for a in dim if a not in sizes.size)
            group = "(" + " ".join(map(ir.spell_axis, dim)) + ")"
            raise EincError(
                f"cannot infer the sizes of {missing} in composition {group} of {where} "
                f"(size {extent}): give all but one, e.g. {size_hint(dim[0], 'N')}"
            )
        pending = still


def _expand_ellipsis(
    pattern: ir.Pattern, shapes: Sequence[Shape], labels: Sequence[str]
) -> tuple[list[tuple[Group, ...]], list[Group], dict[str, int], set[tuple[int, int]]]:
    """Replace ``...`` by numbered axes, right-aligned as torch broadcasts them; returns
    (input dims, output dims, ellipsis sizes, dropped broadcast dimensions)."""
    ranks: list[int] = []
    for index, (operand, shape) in enumerate(zip(pattern.operands, shapes)):
        extra = rank(operand, shape)
        if extra is None:
            spelled = operand.render(pattern.compact) or "(scalar)"
            named = len(operand.dims) - operand.has_ellipsis
            raise EincError(
                f"{labels[index]} has {len(shape)} dimensions (shape {list(shape)}) "
                f"but its axis list '{spelled}' has {named}"
            )
        ranks.append(extra)
    names = [ir.ellipsis_axis(i) for i in range(max(ranks, default=0))]
    sizes: dict[str, int] = {}
    origin: dict[str, int] = {}
    inputs: list[tuple[Group, ...]] = []
    mine: list[tuple[int, int, str]] = []  # (operand, dimension, ellipsis axis)
    for index, (operand, shape) in enumerate(zip(pattern.operands, shapes)):
        dims: list[Group] = []
        for dim in operand.dims:
            if dim != (ir.ELLIPSIS,):
                dims.append(dim)
                continue
            for name in names[len(names) - ranks[index]:]:
                size = shape[len(dims)]
                mine.append((index, len(dims), name))
                if size != 1:
                    if sizes.get(name, 1) not in (1, size):
                        raise EincError(
                            f"{show_axis(name, noun=True)} has size {size} in {labels[index]} "
                            f"but {sizes[name]} in {labels[origin[name]]}, and they do not broadcast"
                        )
                    sizes[name], origin[name] = size, index
                else:
                    sizes.setdefault(name, 1)
                dims.append((name,))
        inputs.append(tuple(dims))
    dropped = {(index, position) for index, position, name in mine
               if shapes[index][position] == 1 and sizes[name] != 1}
    output: list[Group] = []
    for dim in pattern.output.dims:
        if dim == (ir.ELLIPSIS,):
            output.extend((n,) for n in names)
        else:  # `(...)` and `(b ...)` merge the ellipsis dimensions into this one
            output.append(tuple(n for a in dim for n in (names if a == ir.MERGED_ELLIPSIS else [a])))
    return inputs, output, sizes, dropped
