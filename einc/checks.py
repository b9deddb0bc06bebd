"""The prologue of shape-generic code: what a call checks and reads from its tensors.

Generic code (``Expression.module``, ``einc.nn``) serves every shape, so what planning
checks for literal code happens at run time, with a few integer comparisons: each
tensor's rank, one size per axis name (read from the first tensor that has it),
compositions, unit axes, ``...`` (any rank, the same dimensions everywhere, merged into
one dimension), torch's type promotion of mixed dtypes, and the memory limits.  A
failed check raises ``EincError`` with a message that is data (:meth:`Unit.check`).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import dtypes, ir
from .planner import Program
from .sizes import show_axis
from .source import Group, Unit

__all__ = ["prologue", "widening"]


def widening(program: Program) -> tuple[bool, bool]:
    """(half floats widen, integers widen): what :func:`einc.dtypes.computed` looks at."""
    return program.ir.op is not None, dtypes.sums(program.ir.op, bool(program.reduced))


def _leaf_lists(program: Program) -> list[tuple[ir.AxisList, tuple[Group, ...]]]:
    """(axis list, dimensions with ``...`` spelled out) of every tensor operand, nested ones included."""
    nested = dict(program.nested)
    out: list[tuple[ir.AxisList, tuple[Group, ...]]] = []
    for index, operand in enumerate(program.ir.inputs):
        if index in nested:
            out.extend(_leaf_lists(nested[index]))
        else:
            assert isinstance(operand, ir.AxisList)
            out.append((operand, program.input_dims[index]))
    return out


def prologue(unit: Unit, program: Program, leaves: list[str], lines: list[str],
              limits: Sequence[tuple[int | None, bool]]) -> list[str]:
    """Generic code's checks and sizes: each leaf's rank, one size per name, compositions,
    the common dtype, ``...`` merged into one dimension (any rank), and the memory limit.
    Returns the leaves' variables, reshaped where ``...`` was merged."""
    for level in program.programs():
        for name, value in level.keyword:
            unit.literal[name] = value
        for name, _ in level.sizes:
            if ir.anonymous_size(name) is not None:
                unit.literal[name] = ir.anonymous_size(name)  # type: ignore[assignment]
    found: dict[str, tuple[int, int]] = {}  # axis -> (leaf, dimension) it was read from
    values = list(leaves)
    lists = _leaf_lists(program)
    compact = program.ir.compact
    for index, (axes, dims) in enumerate(lists):
        x = values[index]
        named = len(axes.dims) - axes.has_ellipsis
        spelled = axes.render(compact) or "(scalar)"
        if not axes.has_ellipsis:
            unit.check(lines, f"{x}.dim() != {named}",
                       f"operand {index} has {{}} dimensions but its axis list '{spelled}' has {named}", f"{x}.dim()")
            continue
        unit.check(lines, f"{x}.dim() < {named}",
                   f"operand {index} has {{}} dimensions but its axis list '{spelled}' has {named} and '...'",
                   f"{x}.dim()")
        start = axes.dims.index((ir.ELLIPSIS,))
        end = f"{x}.dim() - {named - start}" if named > start else f"{x}.dim()"
        if unit.ellipsis is None:
            # list(): torch.Size is a tuple in Python, List[int] in TorchScript.
            unit.ellipsis = unit.assign(lines, f"list({x}.shape[{start}:{end}])", "e")
            unit.size_vars[ir.ellipsis_axis(0)] = unit.assign(lines, f"{unit.helper('einc_prod')}({unit.ellipsis})", "n")
            first = index
        else:
            unit.check(lines, f"list({x}.shape[{start}:{end}]) != {unit.ellipsis}",
                       f"'...' stands for dimensions {{}} in operand {index} but {{}} in operand {first}; "
                       "a module needs every '...' to stand for the same dimensions",
                       f"list({x}.shape[{start}:{end}])", unit.ellipsis)
        values[index] = unit.assign(lines, f"{x}.reshape(list({x}.shape[:{start}]) + "
                                             f"[{unit.size_vars[ir.ellipsis_axis(0)]}] + list({x}.shape[{end}:]))", "x")

    def known(axis: str) -> str | None:
        if axis in unit.literal:
            return str(int(unit.literal[axis]))
        return unit.size_vars.get(axis)

    def where(axis: str) -> str:
        if axis in unit.literal:
            return f"keyword {axis}={unit.literal[axis]}" if ir.anonymous_size(axis) is None else "the pattern"
        leaf, dim = found[axis]
        return f"operand {leaf} (dimension {dim})"

    pending: list[tuple[int, int, Group]] = []
    for index, (_, dims) in enumerate(lists):
        x = values[index]
        for position, dim in enumerate(dims):
            extent = f"{x}.shape[{position}]"
            if not dim:
                unit.check(lines, f"{extent} != 1",
                           f"operand {index} (dimension {position}) is the unit axis '1' but has size {{}}", extent)
            elif len(dim) > 1:
                pending.append((index, position, dim))
            elif dim[0] == ir.ellipsis_axis(0):
                continue  # checked above, whole
            elif known(dim[0]) is None:
                unit.size_vars[dim[0]] = unit.assign(lines, extent, "n")
                found[dim[0]] = (index, position)
            else:
                unit.check(lines, f"{extent} != {known(dim[0])}",
                           f"{show_axis(dim[0], noun=True)} has size {{}} in operand {index} (dimension {position}) "
                           f"but {{}} in {where(dim[0])}", extent, str(known(dim[0])))
    # Compositions resolve in any order: one group's size may unlock another's.
    while pending:
        still = []
        for index, position, dim in pending:
            extent = f"{values[index]}.shape[{position}]"
            unknown = [a for a in dim if known(a) is None]
            group = "(" + " ".join(map(ir.spell_axis, dim)) + ")"
            product = " * ".join(str(known(a)) for a in dim if known(a) is not None) or "1"
            if not unknown:
                unit.check(lines, f"{extent} != {product}",
                           f"composition {group} in operand {index} (dimension {position}) has size {{}}, "
                           "but its axes multiply to {}", extent, product)
            elif len(unknown) == 1:
                divisor = unit.assign(lines, product, "n")
                unit.check(lines, f"{divisor} == 0 or {extent} % {divisor} != 0",
                           f"composition {group} in operand {index} (dimension {position}) has size {{}}, "
                           f"which the known sizes (product {{}}) do not divide, so {show_axis(unknown[0], noun=True)} "
                           "has no integer size", extent, divisor)
                unit.size_vars[unknown[0]] = unit.assign(lines, f"{extent} // {divisor}", "n")
                found[unknown[0]] = (index, position)
            else:
                still.append((index, position, dim))
        if len(still) == len(pending):  # pragma: no cover - planning resolved these sizes already
            raise AssertionError(f"unresolvable compositions {still}")
        pending = still
    # Torch's type promotion and the widening of half floats and integers: in a branch
    # the usual call (one floating dtype) skips.
    unit.dtype = unit.assign(lines, f"{values[0]}.dtype", "d")
    several = len(values) > 1
    promoted = [unit.assign(lines, v, "x") for v in values] if several else values
    kinds = sorted({widening(level) for level in program.programs()} - {(False, False)})
    for kind in kinds:
        unit.targets[kind] = unit.assign(lines, unit.dtype, "d")
    if several or kinds:
        usual = f"({unit.dtype} == torch.float32 or {unit.dtype} == torch.float64)"
        lines.append(f"    if {' or '.join([f'{v}.dtype != {unit.dtype}' for v in values[1:]] + [f'not {usual}'])}:")
        if several:
            common = f"{values[0]}.dtype"
            for other in values[1:]:
                common = f"torch.promote_types({common}, {other}.dtype)"
            lines.append(f"        {unit.dtype} = {common}")
            lines += [f"        {p} = {v}.to({unit.dtype})" for p, v in zip(promoted, values)]
        lines += [f"        {unit.targets[kind]} = {unit.helper('einc_computed')}({unit.dtype}, {kind[0]}, {kind[1]})"
                  for kind in kinds]
    values = promoted
    for limit in limits:
        if limit[0] is not None:
            _memory_checks(unit, program, lines, limit, values[0])
    return values


def _memory_checks(unit: Unit, program: Program, lines: list[str], limit: tuple[int | None, bool], leaf: str) -> None:
    """Generic code: every intermediate and the output within the limit, for the actual sizes."""
    bound, in_bytes = limit
    cap = f"{bound} // {leaf}.element_size()" if in_bytes else str(bound)
    unit_of = "bytes" if in_bytes else "elements"
    for level in program.programs():
        shapes = [(f"step {i} ({' '.join(map(show_axis, step.output_axes)) or 'scalar'})", step.output_axes)
                  for i, step in enumerate(level.steps) if not step.fused]
        shapes.append(("the output", level.output_axes))
        for what, axes in shapes:
            count = " * ".join(unit.size(a) for a in axes) or "1"
            unit.check(lines, f"{count} > {cap}",
                       f"memory_limit={bound:,} {unit_of} is too small: {what} would hold {{}} elements", count)
