"""IR + concrete shapes -> a contraction program, with opt_einsum choosing the path.

The planner resolves every axis size (tensor shapes, keyword sizes, compositions,
the broadcast ellipsis), reduces each operand to distinct "atomic" axes (splitting
compositions, dropping unit dimensions, taking diagonals), asks opt_einsum for a
contraction path in its own terms (``inputs, output, size_dict``), and records each
step with its axis bookkeeping.  Codegen turns a :class:`Program` into torch calls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

import opt_einsum as oe

from . import ir
from .errors import EincError, size_hint

__all__ = ["show_axis", "Prep", "Step", "Program", "Plan", "PlanStep", "plan", "check_sizes", "check_path", "check_new_axes", "Optimize"]

Optimize = Union[str, oe.paths.PathOptimizer, Sequence[Sequence[int]]]
"""An opt_einsum strategy name, a ``PathOptimizer`` instance, or an explicit path."""

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Prep:
    """How one input tensor becomes a tensor with one dimension per distinct axis."""

    split: tuple[str, ...]
    """The axes after splitting compositions and dropping unit and broadcast dimensions,
    before diagonals (repeats kept): one dimension each."""
    diagonals: tuple[tuple[int, int], ...]
    """``torch.diagonal(x, 0, d1, d2)`` calls, applied in order (the diagonal goes last)."""
    axes: tuple[str, ...]
    """The distinct axes of the prepared tensor, in dimension order."""


@dataclass(frozen=True, slots=True)
class Step:
    """One contraction of the path: one or two operands -> one result.

    For two operands the result's axes are ``batch + left + right``; ``contracted``
    axes are summed over by the product, ``a_reduce``/``b_reduce`` are axes of only one
    side that nothing later needs, summed before the product.
    """

    operands: tuple[int, ...]
    """Positions in the list of live operands, as opt_einsum's linear path gives them
    (empty for the continuation of a step of more than two operands)."""
    args: tuple[int, ...]
    """Values consumed: inputs are numbered 0..n-1, step ``i`` produces value ``n + i``."""
    value: int
    inputs: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]
    flops: int
    batch: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    right: tuple[str, ...] = ()
    contracted: tuple[str, ...] = ()
    a_reduce: tuple[str, ...] = ()
    b_reduce: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Program:
    """Everything codegen needs for one input signature."""

    pattern: ir.Pattern
    shapes: tuple[Shape, ...]
    sizes: tuple[tuple[str, int], ...]
    preps: tuple[Prep, ...]
    steps: tuple[Step, ...]
    output_axes: tuple[str, ...]
    """Atomic output axes in output order (new axes included, units excluded)."""
    output_shape: Shape
    path: tuple[tuple[int, ...], ...]
    flops: int
    naive_flops: int
    largest_intermediate: int
    reduced_count: int
    """Number of elements summed into each output element (``mean`` divides by it)."""
    constants: frozenset[int] = frozenset()
    """Input positions given as constants: what depends on them alone is folded once."""
    input_dims: tuple[tuple[tuple[str, ...], ...], ...] = ()
    """Each operand's dimensions as axis groups, the ellipsis spelled out."""
    output_dims: tuple[tuple[str, ...], ...] = ()
    keyword: tuple[tuple[str, int], ...] = ()
    """Sizes given by keyword: shape-generic code keeps these, reads the rest from shapes."""
    reduced: tuple[str, ...] = ()
    """Axes reduced away (``mean`` divides by the product of their sizes)."""
    nested: tuple[tuple[int, Program], ...] = ()
    """(operand position, program) of each nested operation, which computes that operand."""
    scaled: int | None = None
    """The operand the pattern's scale multiplies (the smallest), or ``None`` for no scale."""

    def programs(self) -> tuple[Program, ...]:
        """This program's nested programs (depth first, in operand order), then itself."""
        inner = tuple(p for _, sub in self.nested for p in sub.programs())
        return inner + (self,)

    def constant_values(self) -> frozenset[int]:
        """Value ids (inputs, then one per step) that depend on constants alone."""
        return _constant_values(self.steps, self.constants)

    def shape_of(self, axes: Sequence[str]) -> Shape:
        sizes = dict(self.sizes)
        return tuple(sizes[a] for a in axes)


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of a :class:`Plan`, in the user's axis names."""

    operands: tuple[int, ...]
    """Positions in the live operand list (opt_einsum's linear path format)."""
    equation: str
    shapes: tuple[Shape, ...]
    output_shape: Shape
    flops: int
    kernel: str
    """The torch call the step was lowered to (``mm``, ``bmm``, ``matmul``, ``mul``, ...)."""

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operands": list(self.operands),
            "equation": self.equation,
            "shapes": [list(s) for s in self.shapes],
            "output_shape": list(self.output_shape),
            "output_size": self.output_size,
            "flops": self.flops,
            "kernel": self.kernel,
        }


@dataclass(frozen=True)
class Plan:
    """What a compiled expression does for one input signature (``Expression.explain``).

    FLOP counts and ``largest_intermediate`` are opt_einsum's; ``speedup`` is
    ``naive_flops / flops``.  ``shapes`` are all operands' (constants included).
    """

    pattern: str
    shapes: tuple[Shape, ...]
    path: list[tuple[int, ...]]
    steps: tuple[PlanStep, ...]
    flops: int
    naive_flops: int
    largest_intermediate: int
    """Elements of the largest intermediate tensor."""
    source: str
    output_shape: Shape = ()
    dtype: str = "float32"
    itemsize: int = 4
    constants: tuple[int, ...] = ()
    rewrite: str = ""
    """The fused kernel that replaced the steps (``"sdpa"``), or ``""``."""

    @property
    def speedup(self) -> float:
        return self.naive_flops / max(self.flops, 1)

    @property
    def largest_intermediate_bytes(self) -> int:
        return self.largest_intermediate * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (lists, ints, floats and strings)."""
        return {
            "pattern": self.pattern,
            "shapes": [list(s) for s in self.shapes],
            "output_shape": list(self.output_shape),
            "dtype": self.dtype,
            "constants": list(self.constants),
            "path": [list(p) for p in self.path],
            "flops": self.flops,
            "naive_flops": self.naive_flops,
            "speedup": self.speedup,
            "largest_intermediate": self.largest_intermediate,
            "largest_intermediate_bytes": self.largest_intermediate_bytes,
            "steps": [step.to_dict() for step in self.steps],
            "rewrite": self.rewrite,
            "source": self.source,
        }

    def __str__(self) -> str:
        shapes = ", ".join(_dims(s) for s in self.shapes)
        constants = f" (constants: operands {', '.join(map(str, self.constants))})" if self.constants else ""
        lines = [
            f"einc plan for {self.pattern!r}",
            f"  input shapes:          {shapes}{constants}",
            f"  output shape:          {_dims(self.output_shape)}",
            f"  path:                  {self.path}",
            f"  flops:                 {self.flops:,} (naive {self.naive_flops:,}, speedup {self.speedup:.3g}x)",
            f"  largest intermediate:  {self.largest_intermediate:,} elements "
            f"({_bytes(self.largest_intermediate_bytes)} as {self.dtype})",
        ]
        if self.rewrite:
            lines.append(f"  rewrite:               {self.rewrite}: one fused call replaces the steps below "
                         "(flops and intermediates above are the unfused plan's)")
        lines += [
            "",
        ]
        rows = [("step", "operands", "equation", "output", "flops", "kernel")]
        for i, step in enumerate(self.steps):
            rows.append((str(i), str(step.operands), step.equation, _dims(step.output_shape),
                         f"{step.flops:,}", step.kernel))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        lines += ["", "generated code:", self.source.rstrip()]
        return "\n".join(lines)


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape)) or "()"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- sizes


def check_sizes(sizes: Mapping[str, Any]) -> None:
    """Keyword axis sizes must be ints in ``[0, 2**63)`` (bools are not sizes)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise EincError(f"size of axis {name!r} must be a non-negative int below 2**63, not {value!r}")


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
                f"axis {show_axis(axis)} has size {value} in {where} but {known} in {self.source[axis]}"
            )


def show_axis(axis: str) -> str:
    if axis.startswith(ir.ELLIPSIS):
        return f"'...' (dimension {axis[3:]} of the broadcast ellipsis)"
    anonymous = ir.anonymous_size(axis)
    if anonymous is not None:
        return f"anonymous axis {anonymous!r}"
    return repr(axis)


def _expand_ellipsis(
    pattern: ir.Pattern, shapes: Sequence[Shape], labels: Sequence[str]
) -> tuple[list[list[tuple[str, ...]]], list[tuple[str, ...]], dict[str, int], set[tuple[int, int]]]:
    """Replace ``...`` by named ellipsis axes; returns (input dims, output dims, sizes, dropped).

    ``dropped`` holds (operand, dim) of size-1 ellipsis dimensions broadcast against a
    larger size: they leave the operand like a unit dimension.
    """
    ranks: list[int] = []
    for index, (operand, shape) in enumerate(zip(pattern.operands, shapes)):
        named = len(operand.dims) - operand.has_ellipsis
        if len(shape) < named or (not operand.has_ellipsis and len(shape) != named):
            spelled = operand.render(pattern.compact) or "(scalar)"
            raise EincError(
                f"{labels[index]} has {len(shape)} dimensions (shape {list(shape)}) "
                f"but its axis list '{spelled}' has {named}"
            )
        ranks.append(len(shape) - named if operand.has_ellipsis else 0)
    rank = max(ranks, default=0)
    names = [ir.ellipsis_axis(i) for i in range(rank)]

    sizes: dict[str, int] = {}
    origin: dict[str, int] = {}
    inputs: list[list[tuple[str, ...]]] = []
    per_operand: list[list[tuple[int, str]]] = []
    for index, (operand, shape) in enumerate(zip(pattern.operands, shapes)):
        dims: list[tuple[str, ...]] = []
        mine: list[tuple[int, str]] = []
        position = 0
        for dim in operand.dims:
            if dim == (ir.ELLIPSIS,):
                own = names[rank - ranks[index]:]
                for name in own:
                    mine.append((position, name))
                    size = shape[position]
                    if size != 1:
                        if sizes.get(name, 1) not in (1, size):
                            raise EincError(
                                f"axis {show_axis(name)} has size {size} in {labels[index]} "
                                f"but {sizes[name]} in {labels[origin[name]]}, and they do not broadcast"
                            )
                        sizes[name] = size
                        origin[name] = index
                    else:
                        sizes.setdefault(name, 1)
                    dims.append((name,))
                    position += 1
            else:
                dims.append(dim)
                position += 1
        inputs.append(dims)
        per_operand.append(mine)

    dropped = {
        (index, position)
        for index, mine in enumerate(per_operand)
        for position, name in mine
        if shapes[index][position] == 1 and sizes[name] != 1
    }
    output: list[tuple[str, ...]] = []
    for dim in pattern.output.dims:
        if dim == (ir.ELLIPSIS,):
            output.extend((n,) for n in names)
        else:  # `(...)` and `(b ...)` merge the ellipsis dimensions into this one
            output.append(tuple(n for a in dim for n in (names if a == ir.MERGED_ELLIPSIS else [a])))
    return inputs, output, sizes, dropped


def _resolve(
    pattern: ir.Pattern,
    inputs: list[list[tuple[str, ...]]],
    shapes: Sequence[Shape],
    ellipsis_sizes: Mapping[str, int],
    keyword: Mapping[str, int],
    names: Sequence[str],
    learned: Mapping[str, tuple[int, str]],
) -> dict[str, int]:
    sizes = _Sizes(keyword)
    for name, (value, where) in learned.items():
        sizes.learn(name, value, where)
    for dims in [*inputs, pattern.output.dims]:
        for dim in dims:
            for axis in dim:
                anonymous = ir.anonymous_size(axis)
                if anonymous is not None:
                    sizes.learn(axis, anonymous, "its spelling")
    for name, value in ellipsis_sizes.items():
        sizes.learn(name, value, "the broadcast ellipsis")

    pending: list[tuple[tuple[str, ...], int, str]] = []
    for index, (dims, shape) in enumerate(zip(inputs, shapes)):
        for position, (dim, extent) in enumerate(zip(dims, shape)):
            where = f"{names[index]} (dimension {position})"
            if not dim:
                if extent != 1:
                    raise EincError(f"{where} is the unit axis '1' but has size {extent}")
            elif len(dim) == 1:
                if not dim[0].startswith(ir.ELLIPSIS):
                    sizes.learn(dim[0], extent, where)
            else:
                pending.append((dim, extent, where))

    # Compositions resolve in any order: one group's inferred size may unlock another's.
    while pending:
        still: list[tuple[tuple[str, ...], int, str]] = []
        for dim, extent, where in pending:
            unknown = [a for a in dim if a not in sizes.size]
            known = math.prod(sizes.size[a] for a in dim if a in sizes.size)
            group = "(" + " ".join(dim) + ")"
            if not unknown:
                if known != extent:
                    detail = " * ".join(f"{a}={sizes.size[a]}" for a in dim)
                    raise EincError(f"composition {group} in {where} has size {extent}, but {detail} = {known}")
            elif len(unknown) == 1:
                if known == 0 or extent % known:
                    raise EincError(
                        f"composition {group} in {where} has size {extent}, which the known sizes "
                        f"(product {known}) do not divide, so axis {unknown[0]!r} has no integer size"
                    )
                sizes.learn(unknown[0], extent // known, where)
            else:
                still.append((dim, extent, where))
        if len(still) == len(pending):
            dim, extent, where = still[0]
            missing = ", ".join(repr(a) for a in dim if a not in sizes.size)
            raise EincError(
                f"cannot infer the sizes of {missing} in composition ({' '.join(dim)}) of {where} "
                f"(size {extent}): give all but one, e.g. {size_hint(dim[0], 'N')}"
            )
        pending = still

    check_new_axes(pattern, sizes.size)
    return sizes.size


def check_new_axes(pattern: ir.Pattern, sizes: Mapping[str, int]) -> None:
    """Output axes in no input (at any level) need a size: by keyword, or anonymous (``3``)."""
    for level in [x for x in pattern.inputs if isinstance(x, ir.Pattern)]:
        check_new_axes(level, sizes)
    for axis in pattern.new_axes:
        if axis not in sizes and ir.anonymous_size(axis) is None:
            raise EincError(f"output axis {axis!r} is in no input, so its size must be given: {size_hint(axis)}")


def _prep(dims: list[tuple[str, ...]], dropped: set[int]) -> Prep:
    split = tuple(a for position, dim in enumerate(dims) if position not in dropped for a in dim)
    atoms = list(split)
    diagonals: list[tuple[int, int]] = []
    while len(set(atoms)) != len(atoms):
        first = next(i for i, a in enumerate(atoms) if atoms.index(a) != i)
        original = atoms.index(atoms[first])
        diagonals.append((original, first))
        name = atoms[first]
        atoms = [a for i, a in enumerate(atoms) if i not in (original, first)] + [name]
    return Prep(split=split, diagonals=tuple(diagonals), axes=tuple(atoms))


# --------------------------------------------------------------------------- path


OPTIMAL_MAX_OPERANDS = 6
EXACT_MAX_OPERANDS = 10
DP_MAX_OPERANDS = 20
"""einc's ``"auto"``: opt_einsum's exhaustive ``"optimal"`` up to
:data:`OPTIMAL_MAX_OPERANDS` operands, dynamic programming with outer products up to
:data:`EXACT_MAX_OPERANDS`, without them up to :data:`DP_MAX_OPERANDS`, and
``"greedy"`` beyond.

Measured on chains and random networks (benchmarks/RESULTS.md): plain ``"dp"`` matched
the cheapest path in 0.2-25 ms nearly always, but skips outer products and so missed it
in rare cases; with them it stays under 25 ms up to 10 operands and grows to seconds at
16-20. opt_einsum's own ``"auto"`` (greedy beyond 8 operands) chose paths up to 8x
costlier. Plans are cached per signature, so the planning time is paid once.
"""


def _strategy(optimize: Optimize, operands: int, sizes: Mapping[str, int]) -> Optimize:
    if isinstance(optimize, str) and 0 in sizes.values():
        # Every path costs nothing when an axis is empty, and some strategies ("dp")
        # find no path at all then.
        return "greedy"
    if optimize == "auto":
        if operands <= OPTIMAL_MAX_OPERANDS:
            return "optimal"
        if operands <= EXACT_MAX_OPERANDS:
            return oe.paths.DynamicProgramming(search_outer=True)
        return "dp" if operands <= DP_MAX_OPERANDS else "greedy"
    if optimize == "cotengra":
        with warnings.catch_warnings():
            # cotengra warns when its optional kahypar is missing, on every optimizer.
            warnings.simplefilter("ignore", UserWarning)
            try:
                import cotengra
            except ImportError:
                raise EincError("optimize='cotengra' needs cotengra: pip install 'einc[cotengra]'") from None
            return cotengra.HyperOptimizer(max_repeats=32, progbar=False)
    if isinstance(optimize, (list, tuple)):
        return [tuple(step) for step in optimize]
    return optimize


def _opt_einsum_path(
    operands: Sequence[tuple[str, ...]],
    output: tuple[str, ...],
    sizes: Mapping[str, int],
    optimize: Optimize,
    memory_limit: int | None = None,
) -> tuple[list[tuple[int, ...]], Any]:
    symbols = {a: oe.get_symbol(i) for i, a in enumerate(dict.fromkeys(a for op in operands for a in op))}
    equation = ",".join("".join(symbols[a] for a in op) for op in operands)
    equation += "->" + "".join(symbols[a] for a in output)
    shapes = [tuple(sizes[a] for a in op) for op in operands]
    try:
        strategy = _strategy(optimize, len(operands), sizes)
        try:
            path, info = oe.contract_path(
                equation, *shapes, shapes=True, optimize=strategy, memory_limit=memory_limit
            )
        except RuntimeError:
            if optimize != "auto" or memory_limit is None:
                raise
            # Dynamic programming finds nothing under some limits that a greedy path
            # (checked by the caller) fits.
            path, info = oe.contract_path(
                equation, *shapes, shapes=True, optimize="greedy", memory_limit=memory_limit
            )
    except RuntimeError as err:
        if memory_limit is None:
            raise EincError(f"opt_einsum could not plan with optimize={optimize!r}: {err}") from None
        _check_output(output, sizes, memory_limit)
        raise EincError(
            f"memory_limit={memory_limit:,} elements is too small: no contraction path keeps every "
            "intermediate under it"
        ) from None
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise EincError(f"opt_einsum could not plan with optimize={optimize!r}: {err}") from None
    return [tuple(step) for step in path], info


def check_path(path: Sequence[Sequence[int]], operands: int) -> None:
    """An explicit path in opt_einsum's linear format must contract ``operands``
    operands into one: each entry names distinct live positions."""
    live = operands
    for contraction in path:
        if not contraction or len(set(contraction)) != len(contraction) or not all(
            0 <= i < live for i in contraction
        ):
            raise EincError(f"invalid contraction {tuple(contraction)} in path {list(map(tuple, path))} "
                            f"for {operands} operands")
        live += 1 - len(contraction)
    if live != 1:
        raise EincError(f"path {list(map(tuple, path))} leaves {live} operands uncontracted; it must end with one")


def _pairwise(a: tuple[str, ...], b: tuple[str, ...], keep: set[str]) -> dict[str, tuple[str, ...]]:
    b_set, a_set = set(b), set(a)
    return {
        "a_reduce": tuple(x for x in a if x not in b_set and x not in keep),
        "b_reduce": tuple(x for x in b if x not in a_set and x not in keep),
        "batch": tuple(x for x in a if x in b_set and x in keep),
        "contracted": tuple(x for x in a if x in b_set and x not in keep),
        "left": tuple(x for x in a if x not in b_set and x in keep),
        "right": tuple(x for x in b if x not in a_set and x in keep),
    }


def _steps(
    prepared: list[tuple[str, ...]],
    path: list[tuple[int, ...]],
    output: tuple[str, ...],
    sizes: Mapping[str, int],
) -> list[Step]:
    # Values are numbered SSA-style: inputs 0..n-1, then one per step, so codegen
    # need not replay opt_einsum's list surgery.
    check_path(path, len(prepared))
    live = list(enumerate(prepared))
    steps: list[Step] = []
    for contraction in path:
        # opt_einsum pops in descending order and appends the result; so do we, but
        # the operands of a step are taken in ascending order (A is the lower index).
        picked = [live.pop(i) for i in sorted(contraction, reverse=True)][::-1]
        needed = set(output).union(*(set(axes) for _, axes in live))
        involved = [a for _, axes in picked for a in axes]
        keep = {a for a in involved if a in needed}
        flops = oe.helpers.flop_count(
            set(involved), len(set(involved)) != len(keep), len(picked), sizes
        )
        value = len(prepared) + len(steps)
        if len(picked) == 1:
            ((arg, only),) = picked
            result = tuple(a for a in only if a in keep)
            steps.append(Step(tuple(contraction), (arg,), value, (only,), result, flops, left=result,
                              a_reduce=tuple(a for a in only if a not in keep)))
        else:
            if len(picked) == 2 and not live:
                # The last product: take the operands in the order that lands the
                # result in output order, sparing a final transposing copy.
                swapped = _pairwise(picked[1][1], picked[0][1], keep)
                if swapped["batch"] + swapped["left"] + swapped["right"] == tuple(output):
                    picked.reverse()
            # A step of more than two operands (explicit paths) folds left to right.
            arg, acc = picked[0]
            for position, (other_arg, other) in enumerate(picked[1:], start=1):
                later = set().union(*(set(axes) for _, axes in picked[position + 1:]))
                parts = _pairwise(acc, other, keep | later)
                result = parts["batch"] + parts["left"] + parts["right"]
                first = position == 1
                value = len(prepared) + len(steps)
                steps.append(Step(tuple(contraction) if first else (), (arg, other_arg), value,
                                  (acc, other), result, flops if first else 0, **parts))
                arg, acc = value, result
        live.append((steps[-1].value, steps[-1].output))
    return steps


def _constant_values(steps: Sequence[Step], constants: frozenset[int]) -> frozenset[int]:
    known = set(constants)
    for step in steps:
        if all(arg in known for arg in step.args):
            known.add(step.value)
    return frozenset(known)


def _per_call_flops(steps: Sequence[Step], constants: frozenset[int]) -> int:
    """FLOPs of the steps that run on every call (not folded from constants)."""
    folded = _constant_values(steps, constants)
    return sum(step.flops for step in steps if step.value not in folded)


def _fold_constants_first(
    operands: list[tuple[str, ...]],
    output: tuple[str, ...],
    sizes: Mapping[str, int],
    optimize: Optimize,
    memory_limit: int | None,
    constants: frozenset[int],
) -> tuple[list[tuple[int, ...]], Any, list[Step]] | None:
    """A path that contracts the constants among themselves first (opt_einsum's order
    for that sub-network), then plans the rest; ``None`` where that cannot be planned.

    opt_einsum's constant folding only folds what its cost-optimal path happens to
    contract first; a separate plan lets work that depends on constants alone be done
    once, which pays whenever it lowers the per-call cost.
    """
    fixed = sorted(constants)
    others = set(output).union(*(set(operands[i]) for i in range(len(operands)) if i not in constants))
    inner = [operands[i] for i in fixed]
    inner_output = tuple(a for a in dict.fromkeys(a for op in inner for a in op) if a in others)
    try:
        inner_path, _ = _opt_einsum_path(inner, inner_output, sizes, optimize, memory_limit)
        # Replay the sub-path on the full operand list, in opt_einsum's linear format.
        live = list(range(len(operands)))
        inner_live = list(fixed)
        axes = dict(enumerate(operands))
        path: list[tuple[int, ...]] = []
        for step in inner_path:
            ids = [inner_live[i] for i in step]
            for i in sorted(step, reverse=True):
                inner_live.pop(i)
            positions = tuple(live.index(v) for v in ids)
            for i in sorted(positions, reverse=True):
                live.pop(i)
            new = max(axes) + 1
            needed = set(output).union(*(set(axes[v]) for v in live))
            axes[new] = tuple(dict.fromkeys(a for v in ids for a in axes[v] if a in needed))
            live.append(new)
            inner_live.append(new)
            path.append(positions)
        rest, _ = _opt_einsum_path([axes[v] for v in live], output, sizes, optimize, memory_limit)
    except EincError:
        return None
    path += rest
    _, info = _opt_einsum_path(operands, output, sizes, path, memory_limit)
    return path, info, _steps(operands, path, output, sizes)


def _check_output(output: Sequence[str], sizes: Mapping[str, int], limit: int) -> None:
    size = math.prod(sizes[a] for a in output)
    if size > limit:
        raise EincError(f"memory_limit={limit:,} elements is too small: the output alone "
                        f"({' '.join(map(show_axis, output)) or 'scalar'}) has {size:,} elements")


def _check_memory(steps: Sequence[Step], preps: Sequence[Prep], path: Sequence[tuple[int, ...]],
                  sizes: Mapping[str, int], limit: int, explicit: bool) -> None:
    # opt_einsum answers "nothing fits" with one naive step over every operand, which
    # would allocate the whole broadcast product: refuse instead.  (A user's explicit
    # step of several operands runs pairwise; its intermediates are checked below.)
    if not explicit and len(preps) > 2 and any(len(step) > 2 for step in path):
        raise EincError(
            f"memory_limit={limit:,} elements is too small: no pairwise contraction path keeps "
            "every intermediate under it"
        )
    for index, step in enumerate(steps):
        size = math.prod(sizes[a] for a in step.output)
        if size > limit:
            raise EincError(
                f"memory_limit={limit:,} elements is too small: step {index} "
                f"({' '.join(step.output) or 'scalar'}) produces {size:,} elements"
            )


def plan(
    pattern: ir.Pattern,
    shapes: Sequence[Shape],
    sizes: Mapping[str, int],
    optimize: Optimize = "auto",
    memory_limit: int | None = None,
    constants: frozenset[int] = frozenset(),
) -> Program:
    """Plan ``pattern`` for tensors of ``shapes`` (with keyword ``sizes``).

    ``memory_limit`` bounds the elements of every intermediate (opt_einsum's meaning);
    ``constants`` are the input positions whose values are folded once.  A nested
    operation is planned first, as a program of its own, and its result is an operand
    of the enclosing contraction; one axis name has one size throughout.
    """
    shapes = tuple(tuple(int(n) for n in s) for s in shapes)
    if len(shapes) != pattern.leaves:
        raise EincError(f"the pattern has {pattern.leaves} operands but {len(shapes)} tensors were given")
    everywhere = pattern.all_axes
    for name in sizes:
        if name not in everywhere:
            raise EincError(f"size given for axis {name!r}, which is not in the pattern")
    check_sizes(sizes)
    if pattern.nested and constants:
        raise EincError("constants are not supported in patterns with nested operations")
    known: dict[str, tuple[int, str]] = {}
    if pattern.nested:
        _learn_leaf_sizes(pattern, shapes, sizes, known)
    return _plan_node(pattern, shapes, sizes, known, 0, optimize, memory_limit, constants)


def _leaves(pattern: ir.Pattern, first: int = 0) -> list[tuple[int, ir.AxisList]]:
    """(tensor position, axis list) of every tensor operand, nested ones included."""
    out: list[tuple[int, ir.AxisList]] = []
    for operand in pattern.inputs:
        position = first + len(out)
        if isinstance(operand, ir.Pattern):
            out.extend(_leaves(operand, position))
        else:
            out.append((position, operand))
    return out


def _learn_leaf_sizes(pattern: ir.Pattern, shapes: Sequence[Shape], keyword: Mapping[str, int],
                      known: MutableMapping[str, tuple[int, str]]) -> None:
    """Sizes of plain axes of every tensor, so a nested level can use what another
    operand says (``h`` learned from ``v`` splits ``(h d)`` in the nested ``q``)."""
    table = _Sizes(keyword)
    for position, operand in _leaves(pattern):
        shape = shapes[position]
        named = len(operand.dims) - operand.has_ellipsis
        if len(shape) < named or (not operand.has_ellipsis and len(shape) != named):
            continue  # the level's own planning reports it
        cut = next((i for i, d in enumerate(operand.dims) if d == (ir.ELLIPSIS,)), len(operand.dims))
        placed = list(enumerate(operand.dims[:cut])) + [
            (len(shape) - (len(operand.dims) - i), d) for i, d in enumerate(operand.dims) if i > cut
        ]
        for dim_index, dim in placed:
            if len(dim) == 1:
                table.learn(dim[0], shape[dim_index], f"operand {position} (dimension {dim_index})")
    for name, value in table.size.items():
        if name not in keyword:
            known[name] = (value, table.source[name])


def _plan_node(
    pattern: ir.Pattern,
    shapes: Sequence[Shape],
    sizes: Mapping[str, int],
    known: dict[str, tuple[int, str]],
    first: int,
    optimize: Optimize,
    memory_limit: int | None,
    constants: frozenset[int],
) -> Program:
    nested: list[tuple[int, Program]] = []
    operand_shapes: list[Shape] = []
    names: list[str] = []
    position = first
    for index, operand in enumerate(pattern.inputs):
        if isinstance(operand, ir.Pattern):
            inner = _plan_node(operand, shapes[position - first:position - first + operand.leaves], sizes, known,
                               position, optimize, memory_limit, constants)
            nested.append((index, inner))
            operand_shapes.append(inner.output_shape)
            names.append(f"the result of {operand.op}(...) (operand {index} of {pattern.render()!r})")
            for name, value in inner.sizes:
                if not name.startswith(ir.ELLIPSIS):
                    known.setdefault(name, (value, f"{operand.op}(...) of operands {position}.."
                                                   f"{position + operand.leaves - 1}"))
            position += operand.leaves
        else:
            operand_shapes.append(shapes[position - first])
            names.append(f"operand {position}")
            position += 1
    own = pattern.input_axes | set(pattern.output.axes)
    keyword = {name: value for name, value in sizes.items() if name in own}
    program = _plan_level(pattern, tuple(operand_shapes), keyword, names, known, optimize, memory_limit, constants)
    return replace(program, nested=tuple(nested)) if nested else program


def _plan_level(
    pattern: ir.Pattern,
    shapes: tuple[Shape, ...],
    sizes: Mapping[str, int],
    names: Sequence[str],
    known: Mapping[str, tuple[int, str]],
    optimize: Optimize,
    memory_limit: int | None,
    constants: frozenset[int],
) -> Program:
    inputs, output_dims, ellipsis_sizes, dropped = _expand_ellipsis(pattern, shapes, names)
    size = _resolve(pattern, inputs, shapes, ellipsis_sizes, sizes, names, known)
    preps = tuple(_prep(dims, {d for op, d in dropped if op == index}) for index, dims in enumerate(inputs))
    output_axes = tuple(a for dim in output_dims for a in dim)
    present = set().union(*(set(p.axes) for p in preps))
    contracted_output = tuple(a for a in output_axes if a in present)
    operand_axes = [p.axes for p in preps]
    if memory_limit is not None:
        if memory_limit < 1:
            raise EincError(f"memory_limit={memory_limit} elements is too small: it holds no element")
        # The output, new axes included, must fit whatever the path.
        _check_output(output_axes, size, memory_limit)
    path, info = _opt_einsum_path(operand_axes, contracted_output, size, optimize, memory_limit)
    steps = _steps(operand_axes, path, contracted_output, size)
    if len(constants) > 1 and not isinstance(optimize, (list, tuple)):
        folded = _fold_constants_first(operand_axes, contracted_output, size, optimize, memory_limit, constants)
        if folded is not None and _per_call_flops(folded[2], constants) < _per_call_flops(steps, constants):
            path, info, steps = folded
    output_shape = tuple(math.prod(size[a] for a in dim) for dim in output_dims)
    reduced = present - set(output_axes)
    empty = sorted(a for a in reduced if size[a] == 0)
    if pattern.op in ("max", "min") and empty:
        raise EincError(
            f"cannot take {pattern.op} over axis {show_axis(empty[0])} of size 0 "
            f"(torch.a{pattern.op} refuses empty reductions too)"
        )
    for what, n in [("the output", math.prod(output_shape))] + [
        (f"step {i}", math.prod(size[a] for a in step.output)) for i, step in enumerate(steps)
    ]:
        if n >= 2**63:
            raise EincError(f"{what} would have {n:,} elements, more than a tensor can index (2**63)")
    if memory_limit is not None:
        _check_memory(steps, preps, path, size, memory_limit, isinstance(optimize, (list, tuple)))
    used = set(output_axes) | present | {f.value for f in pattern.scale if isinstance(f.value, str)}
    scaled = None
    if pattern.scale:
        # Scaling the smallest operand costs least; a sum of products is linear in each.
        scaled = min(range(len(preps)), key=lambda i: (i in constants, math.prod(size[a] for a in preps[i].axes)))
    return Program(
        pattern=pattern,
        shapes=shapes,
        sizes=tuple(sorted((a, n) for a, n in size.items() if a in used)),
        preps=preps,
        steps=tuple(steps),
        output_axes=output_axes,
        output_shape=output_shape,
        path=tuple(path),
        flops=int(info.opt_cost),
        naive_flops=int(info.naive_cost),
        # opt_einsum's figure, or more where a step of several operands runs pairwise.
        largest_intermediate=max([int(info.largest_intermediate)] + [math.prod(size[a] for a in step.output)
                                                                     for step in steps]),
        reduced_count=math.prod(size[a] for a in reduced),
        constants=constants,
        input_dims=tuple(tuple(dims) for dims in inputs),
        output_dims=tuple(output_dims),
        keyword=tuple(sorted(sizes.items())),
        reduced=tuple(sorted(reduced)),
        scaled=scaled,
    )
