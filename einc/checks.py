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

import torch

from . import dtypes, ir
from .errors import EincError
from .paths import too_small
from .planner import Program
from .sizes import show_axes, show_axis
from .source import Group, Unit

__all__ = ["prologue", "tensors", "widening"]


@torch.jit.unused
def tensors(values: list[torch.Tensor], message: str) -> None:
    """A module's call in Python: every operand a tensor (``message`` formatted with the
    operand's index and type), as TorchScript's signature checks scripted calls."""
    for index, value in enumerate(values):
        if not isinstance(value, torch.Tensor):
            raise EincError(message.format(index, type(value).__name__))


def widening(program: Program) -> tuple[bool, bool]:
    """(half floats widen, integers widen): what :func:`einc.dtypes.computed` looks at."""
    return program.ir.op is not None, dtypes.sums(program.ir.op, bool(program.reduced))


def prologue(unit: Unit, program: Program, leaves: list[str], lines: list[str],
             limits: Sequence[tuple[int | None, bool]]) -> list[str]:
    """Generic code's checks and sizes: each leaf's rank, one size per name, compositions,
    the common dtype, ``...`` merged into one dimension (any rank), and the memory limits.
    Returns the leaves' variables, reshaped where ``...`` was merged."""
    for level in program.programs():
        for name, value in level.keyword:
            unit.literal[name] = value
        for name, _ in level.sizes:
            anonymous = ir.anonymous_size(name)
            if anonymous is not None:
                unit.literal[name] = anonymous
    reader = _Reader(unit, list(zip(program.ir.leaf_lists(), program.leaf_dims())), list(leaves), lines,
                     program.ir.compact)
    reader.ranks()
    reader.sizes()
    values = _promotion(unit, program, reader.values, lines)
    for limit in limits:
        if limit[0] is not None:
            _memory_checks(unit, program, lines, limit, values[0])
    return values


class _Reader:
    """Reads sizes from the leaves' shapes into ``unit.size_vars``, checking as it goes."""

    def __init__(self, unit: Unit, lists: list[tuple[ir.AxisList, tuple[Group, ...]]], values: list[str],
                 lines: list[str], compact: bool) -> None:
        self.unit = unit
        self.compact = compact
        self.lists = lists
        self.values = values
        self.lines = lines
        self.found: dict[str, tuple[int, int]] = {}
        """axis -> (leaf, dimension) it was read from."""

    def check(self, condition: str, message: str, *values: str) -> None:
        self.unit.check(self.lines, condition, message, *values)

    def ranks(self) -> None:
        """Each leaf's rank; ``...`` the same dimensions everywhere, merged into one."""
        unit, first = self.unit, 0
        for index, (axes, _) in enumerate(self.lists):
            x = self.values[index]
            named = len(axes.dims) - axes.has_ellipsis
            listed = axes.render(self.compact) or "(scalar)"
            spelled = f"operand {index} has {{}} dimensions but its axis list '{listed}'"
            if not axes.has_ellipsis:
                self.check(f"{x}.dim() != {named}", f"{spelled} has {named}", f"{x}.dim()")
                continue
            self.check(f"{x}.dim() < {named}", f"{spelled} has {named} and '...'", f"{x}.dim()")
            start = axes.dims.index((ir.ELLIPSIS,))
            end = f"{x}.dim() - {named - start}" if named > start else f"{x}.dim()"
            # list(): torch.Size is a tuple in Python, List[int] in TorchScript.
            own = f"list({x}.shape[{start}:{end}])"
            if unit.ellipsis is None:
                unit.ellipsis = unit.assign(self.lines, own, "e")
                unit.size_vars[ir.ellipsis_axis(0)] = unit.assign(
                    self.lines, f"{unit.helper('einc_prod')}({unit.ellipsis})", "n")
                first = index
            else:
                self.check(f"{own} != {unit.ellipsis}",
                           f"'...' stands for dimensions {{}} in operand {index} but {{}} in operand {first}; "
                           "a module needs every '...' to stand for the same dimensions", own, unit.ellipsis)
            merged = f"[{unit.size_vars[ir.ellipsis_axis(0)]}]"
            self.values[index] = unit.assign(
                self.lines, f"{x}.reshape(list({x}.shape[:{start}]) + {merged} + list({x}.shape[{end}:]))", "x")

    def known(self, axis: str) -> str | None:
        if axis in self.unit.literal:
            return str(int(self.unit.literal[axis]))
        return self.unit.size_vars.get(axis)

    def where(self, axis: str) -> str:
        if axis in self.unit.literal:
            return f"keyword {axis}={self.unit.literal[axis]}" if ir.anonymous_size(axis) is None else "the pattern"
        leaf, dim = self.found[axis]
        return f"operand {leaf} (dimension {dim})"

    def read(self, axis: str, extent: str, index: int, position: int) -> None:
        self.unit.size_vars[axis] = self.unit.assign(self.lines, extent, "n")
        self.found[axis] = (index, position)

    def sizes(self) -> None:
        """One size per name: read from the first dimension that has it, checked elsewhere."""
        pending: list[tuple[int, int, Group]] = []
        for index, (_, dims) in enumerate(self.lists):
            for position, dim in enumerate(dims):
                extent = f"{self.values[index]}.shape[{position}]"
                if not dim:
                    self.check(f"{extent} != 1",
                               f"operand {index} (dimension {position}) is the unit axis '1' but has size {{}}", extent)
                elif len(dim) > 1:
                    pending.append((index, position, dim))
                elif dim[0] == ir.ellipsis_axis(0):
                    continue  # checked whole, in ranks()
                elif self.known(dim[0]) is None:
                    self.read(dim[0], extent, index, position)
                else:
                    self.check(f"{extent} != {self.known(dim[0])}",
                               f"{show_axis(dim[0], noun=True)} has size {{}} in operand {index} (dimension "
                               f"{position}) but {{}} in {self.where(dim[0])}", extent, str(self.known(dim[0])))
        # Compositions resolve in any order: one group's size may unlock another's.
        while pending:
            still = [entry for entry in pending if not self.composition(*entry)]
            if len(still) == len(pending):  # pragma: no cover - planning resolved these sizes already
                raise AssertionError(f"unresolvable compositions {still}")
            pending = still

    def composition(self, index: int, position: int, dim: Group) -> bool:
        """Check or split one composition; ``False`` while two of its axes are unknown."""
        extent = f"{self.values[index]}.shape[{position}]"
        unknown = [a for a in dim if self.known(a) is None]
        where = f"composition ({' '.join(map(ir.spell_axis, dim))}) in operand {index} (dimension {position})"
        product = " * ".join(str(self.known(a)) for a in dim if self.known(a) is not None) or "1"
        if len(unknown) > 1:
            return False
        if not unknown:
            self.check(f"{extent} != {product}", f"{where} has size {{}}, but its axes multiply to {{}}",
                       extent, product)
            return True
        divisor = self.unit.assign(self.lines, product, "n")
        self.check(f"{divisor} == 0 or {extent} % {divisor} != 0",
                   f"{where} has size {{}}, which the known sizes (product {{}}) do not divide, so "
                   f"{show_axis(unknown[0], noun=True)} has no integer size", extent, divisor)
        self.read(unknown[0], f"{extent} // {divisor}", index, position)
        return True


def _promotion(unit: Unit, program: Program, values: list[str], lines: list[str]) -> list[str]:
    """Torch's type promotion and the widening of half floats and integers, in a branch
    the usual call (one floating dtype) skips.  Returns the promoted leaves; a ``mask``
    stays bool, a ``bias`` keeps its dtype (it is added in the logits' dtype) and a
    gather's index its integers."""
    modifying = dict(program.ir.modifier_leaves())
    for position, modifier in modifying.items():
        if modifier.kind == "mask":
            unit.check(lines, f"{values[position]}.dtype != torch.bool",
                       f"{modifier.render(program.ir.compact)} (operand {position}) must be a bool tensor "
                       "(True = attend)")
        else:
            unit.check(lines, f"not {values[position]}.is_floating_point()",
                       f"{modifier.render(program.ir.compact)} (operand {position}) must be a floating-point tensor")
    indices = {position: axis for position, axis, _ in program.ir.index_leaves()}
    for position, axis in indices.items():
        value = values[position]
        unit.check(lines, " and ".join(f"{value}.dtype != {dtypes.name(t)}" for t in dtypes.INDEX_DTYPES),
                   f"operand {position} indexes {show_axis(axis, noun=True)} of gather(...): it must be an integer "
                   "tensor (int64, int32, int16, int8 or uint8)")
    kept = modifying.keys() | indices.keys()
    promoted = iter(_promote(unit, program, [v for i, v in enumerate(values) if i not in kept], lines))
    return [v if i in kept else next(promoted) for i, v in enumerate(values)]


def _promote(unit: Unit, program: Program, values: list[str], lines: list[str]) -> list[str]:
    unit.dtype = unit.assign(lines, f"{values[0]}.dtype", "d")
    several = len(values) > 1
    promoted = [unit.assign(lines, v, "x") for v in values] if several else values
    kinds = sorted({widening(level) for level in program.programs()} - {(False, False)})
    for kind in kinds:
        unit.targets[kind] = unit.assign(lines, unit.dtype, "d")
    refusals = dtypes.refusals(program.ir)
    if several or kinds or refusals:
        usual = f"({unit.dtype} == torch.float32 or {unit.dtype} == torch.float64)"
        lines.append(f"    if {' or '.join([f'{v}.dtype != {unit.dtype}' for v in values[1:]] + [f'not {usual}'])}:")
        if several:
            common = f"{values[0]}.dtype"
            for other in values[1:]:
                common = f"torch.promote_types({common}, {other}.dtype)"
            lines.append(f"        {unit.dtype} = {common}")
            lines += [f"        {p} = {v}.to({unit.dtype})" for p, v in zip(promoted, values)]
        branch: list[str] = []
        for refused, why in refusals:
            for dtype in refused:
                unit.check(branch, f"{unit.dtype} == {dtypes.name(dtype)}", dtypes.refusal(why, dtype))
        lines += ["    " + line for line in branch]
        lines += [f"        {unit.targets[kind]} = {unit.helper('einc_computed')}({unit.dtype}, {kind[0]}, {kind[1]})"
                  for kind in kinds]
    return promoted


def _memory_checks(unit: Unit, program: Program, lines: list[str], limit: tuple[int | None, bool], leaf: str) -> None:
    """Generic code: every intermediate and the output within the limit, for the actual sizes."""
    bound, in_bytes = limit
    cap = f"{bound} // {leaf}.element_size()" if in_bytes else str(bound)
    unit_of = "bytes" if in_bytes else "elements"
    # A kernel that bounds its own workspace never makes its nested level's result.
    unmade = {id(inner) for level in program.programs() if level.fused is not None and level.fused.bounded
              for _, inner in level.nested}
    for level in program.programs():
        if id(level) in unmade:
            continue
        shapes = [(f"step {i} ({show_axes(step.output_axes)})", step.output_axes)
                  for i, step in enumerate(level.steps) if not step.fused]
        shapes.append(("the output", level.output_axes))
        for what, axes in shapes:
            count = " * ".join(unit.size(a) for a in axes) or "1"
            unit.check(lines, f"{count} > {cap}",
                       str(too_small(bound, f"{what} would hold {{}} elements", unit_of)), count)
