"""IR + concrete shapes -> a contraction program: steps, constant folding, memory.

Per level (one contraction; a nested operation is a level of its own, planned first)
the planner takes the sizes :mod:`einc.sizes` resolves, reduces each operand to
distinct "atomic" axes (splitting compositions, dropping unit dimensions, taking
diagonals), takes the path :mod:`einc.paths` chooses, and records each pairwise step
with its axis bookkeeping.  Every value of the whole pattern has one number: tensors
``0..n-1``, then each step's result in execution order, and the whole pattern's path
is kept in SSA form as the levels are planned.  A level the rewrite pass fuses
(:mod:`einc.rewrite`) becomes one step.  Codegen turns a :class:`Program` into torch
calls; :mod:`einc.report` describes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import opt_einsum as oe

from . import ir
from .errors import EincError, format_shape
from .paths import (
    Optimize,
    check_output,
    check_path,
    folding_path,
    opt_einsum_path,
    ssa_to_linear,
    too_small,
)
from .rewrite import Fusion
from .sizes import (
    Group,
    Level,
    Shape,
    check_keyword_axes,
    learn_leaf_sizes,
    resolve,
    show_axes,
    show_axis,
)

__all__ = ["Prep", "Step", "Program", "gather_roles", "plan"]


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
    """One step of the path: one or two values -> one value (or a fused kernel).

    For two inputs the result's axes are ``batch + left + right``; ``contracted`` axes
    are summed over by the product, ``a_reduce``/``b_reduce`` are axes of only one
    side that nothing later needs, reduced before the product.
    """

    inputs: tuple[int, ...]
    """The values consumed (tensors ``0..n-1`` of the whole pattern, then one per step)."""
    value: int
    """The value produced."""
    input_axes: tuple[tuple[str, ...], ...]
    output_axes: tuple[str, ...]
    flops: int
    entry: int | None = None
    """The index of this step's entry in the whole pattern's path (``None`` for the
    continuation of an entry of more than two operands, run pairwise)."""
    batch: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    right: tuple[str, ...] = ()
    contracted: tuple[str, ...] = ()
    a_reduce: tuple[str, ...] = ()
    b_reduce: tuple[str, ...] = ()
    fused: bool = False
    """One fused kernel computes this level (``Program.fused``); no axis bookkeeping."""


@dataclass(frozen=True)
class Program:
    """Everything codegen needs for one input signature (one level and, in
    ``nested``, the levels that compute its nested operands)."""

    ir: ir.Pattern
    shapes: tuple[Shape, ...]
    sizes: tuple[tuple[str, int], ...]
    preps: tuple[Prep, ...]
    steps: tuple[Step, ...]
    operands: tuple[int, ...]
    """The value each operand of this level is (a tensor, or a nested level's result)."""
    output_axes: tuple[str, ...]
    """Atomic output axes in output order (new axes included, units excluded)."""
    output_shape: Shape
    path: tuple[tuple[int, ...], ...]
    """This level's path in opt_einsum's linear format (over its own operands)."""
    flops: int
    naive_flops: int
    largest_intermediate: int
    reduced_count: int
    """Number of elements summed into each output element (``mean`` divides by it)."""
    constants: frozenset[int] = frozenset()
    """Input positions given as constants: what depends on them alone is folded once."""
    input_dims: tuple[tuple[Group, ...], ...] = ()
    """Each operand's dimensions as axis groups, the ellipsis spelled out."""
    output_dims: tuple[Group, ...] = ()
    keyword: tuple[tuple[str, int], ...] = ()
    """Sizes given by keyword: shape-generic code keeps these, reads the rest from shapes."""
    reduced: tuple[str, ...] = ()
    """Axes reduced away (``mean`` divides by the product of their sizes)."""
    nested: tuple[tuple[int, Program], ...] = ()
    """(operand position, program) of each nested operation, which computes that operand."""
    scaled: int | None = None
    """The operand the pattern's scale multiplies (the smallest), or ``None`` for no scale."""
    fused: Fusion | None = None
    """The roles where one fused kernel computes this level and its nested operation
    (SDPA for attention, :mod:`einc.crossentropy` for token log-probabilities)."""
    budget: int | None = None
    """Elements a fused kernel's own workspace may take (the ``memory_limit``; ``None``:
    its default)."""
    modifier_values: tuple[int, ...] = ()
    """The tensor of each ``bias``/``mask`` of this level (``ir.tensor_modifiers``), in order."""
    ssa_path: tuple[tuple[int, ...], ...] = field(default=(), compare=False)
    """The whole pattern's path, in SSA form (top level only): tensors ``0..n-1``, then
    one id per entry; :meth:`path_over_tensors` converts it."""

    @property
    def result(self) -> int:
        """The value of this level's result."""
        return self.steps[-1].value

    def programs(self) -> tuple[Program, ...]:
        """This program's nested programs (depth first, in operand order), then itself."""
        inner = tuple(p for _, sub in self.nested for p in sub.programs())
        return inner + (self,)

    def leaf_dims(self) -> tuple[tuple[Group, ...], ...]:
        """Every tensor operand's dimensions (axis groups, ``...`` spelled out), nested
        levels' included, in the order a call takes the tensors."""
        nested = dict(self.nested)
        return tuple(dims for index in range(len(self.ir.inputs))
                     for dims in (nested[index].leaf_dims() if index in nested else (self.input_dims[index],))) + \
            tuple(tuple((a,) for a in m.axes) for m in self.ir.tensor_modifiers)

    def structure(self) -> tuple[Any, ...]:
        """What this program computes, and how, without its sizes: the path, each step's
        axes and kernel roles, the preparations, and its nested levels likewise.  Two
        plans of one pattern with equal structures have one shape-generic code (it
        reads sizes at run time; a size of 1 may only change a layout choice, valid for
        every size), so this keys that code."""
        steps = tuple((s.inputs, s.value, s.input_axes, s.output_axes, s.batch, s.left, s.right, s.contracted,
                       s.a_reduce, s.b_reduce, s.fused) for s in self.steps)
        nested = tuple((position, inner.structure()) for position, inner in self.nested)
        return (self.path, steps, self.preps, self.operands, self.output_axes, self.input_dims, self.output_dims,
                self.reduced, self.scaled, self.fused, self.budget, self.modifier_values, nested)

    def constant_values(self) -> frozenset[int]:
        """Values that depend on constants alone."""
        return _constant_values(self.steps, self.constants)

    def shape_of(self, axes: Sequence[str]) -> Shape:
        sizes = dict(self.sizes)
        return tuple(sizes[a] for a in axes)

    def path_over_tensors(self) -> list[tuple[int, ...]]:
        """The whole pattern's path in opt_einsum's linear format, over all its tensors."""
        return ssa_to_linear(self.ssa_path, self.ir.leaves)


# --------------------------------------------------------------------------- steps


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


@dataclass
class _Numbering:
    """The whole pattern's numbering while it is planned: values (tensors, then one per
    step, in execution order) and the SSA path over tensors (one id per entry)."""

    tensors: int
    next_value: int = field(init=False)
    ssa: list[tuple[int, ...]] = field(default_factory=list)
    ssa_id: dict[int, int] = field(default_factory=dict)
    """value -> its id in :attr:`ssa` (tensors, and the result of each entry)."""

    def __post_init__(self) -> None:
        self.next_value = self.tensors
        self.ssa_id = {i: i for i in range(self.tensors)}

    def value(self) -> int:
        self.next_value += 1
        return self.next_value - 1

    def mark(self) -> tuple[int, int]:
        """Where the numbering stands, to :meth:`rewind` to."""
        return len(self.ssa), self.next_value

    def rewind(self, mark: tuple[int, int]) -> None:
        del self.ssa[mark[0]:]
        self.next_value = mark[1]

    def entry(self, values: Sequence[int]) -> int:
        """Record an entry of the whole pattern's path consuming ``values``; its index."""
        self.ssa.append(tuple(self.ssa_id[v] for v in values))
        return len(self.ssa) - 1

    def produced(self, value: int, entry: int) -> None:
        self.ssa_id[value] = self.tensors + entry


def _consumer_batch(index: int, ssa_path: Sequence[tuple[int, ...]], axes: Mapping[int, tuple[str, ...]],
                    output: set[str], operands: int) -> set[str]:
    """The output axes that the entry consuming entry ``index``'s result shares with its
    other (already known) operands: its batch axes, as far as they are known now."""
    result = operands + index
    for later in ssa_path[index + 1:]:
        if result in later:
            others = [axes[i] for i in later if i != result and i in axes]
            return {a for other in others for a in other if a in output}
    return set()


def _steps(prepared: Sequence[tuple[str, ...]], operands: Sequence[int], ssa_path: Sequence[tuple[int, ...]],
           output: tuple[str, ...], sizes: Mapping[str, int], numbering: _Numbering) -> list[Step]:
    """One level's steps for its SSA path (ids: its operands, then one per entry)."""
    axes = dict(enumerate(prepared))
    value_of = dict(enumerate(operands))
    live = set(axes)
    steps: list[Step] = []
    for index, contraction in enumerate(ssa_path):
        picked = sorted(contraction)  # ascending ids: A is the lower position, as opt_einsum lists them
        live -= set(picked)
        needed = set(output).union(*(set(axes[i]) for i in live))
        involved = [a for i in picked for a in axes[i]]
        keep = {a for a in involved if a in needed}
        flops = oe.helpers.flop_count(set(involved), len(set(involved)) != len(keep), len(picked), sizes)
        entry = numbering.entry([value_of[i] for i in contraction])  # the path's own order
        if len(picked) == 1:
            (only,) = picked
            result = tuple(a for a in axes[only] if a in keep)
            steps.append(Step((value_of[only],), numbering.value(), (axes[only],), result, flops, entry,
                              left=result, a_reduce=tuple(a for a in axes[only] if a not in keep)))
        else:
            if len(picked) == 2:
                # A product takes its operands in the better of the two orders.
                orders = [_pairwise(axes[x], axes[y], keep) for x, y in (picked, picked[::-1])]
                if index == len(ssa_path) - 1:
                    # The last: the order that lands the result in output order (no
                    # final copy), else whose result ends in the output's innermost
                    # axis (a final copy, but not a transposing one), else with the
                    # larger free side on the right, as the GEMM's N (a skinny N is 4x
                    # slower: "l b n d, v b n l -> v b n d").
                    results = [p["batch"] + p["left"] + p["right"] for p in orders]
                    rank = [(r == tuple(output), r[-1:] == tuple(output[-1:]),
                             math.prod(sizes[a] for a in p["right"]) - math.prod(sizes[a] for a in p["left"]))
                            for p, r in zip(orders, results)]
                else:
                    # An intermediate: the side holding the axes its consumer keeps as
                    # batch axes goes first; they must be outer for a bmm without a copy
                    # ("i j o, b i, b j -> b o": [b, j, o], not [j, o, b]).
                    batch = _consumer_batch(index, ssa_path, axes, set(output), len(prepared))
                    rank = [tuple(a in batch for a in p["left"] + p["right"]) for p in orders]
                if rank[1] > rank[0]:
                    picked.reverse()
            # An entry of more than two operands (explicit paths) runs pairwise, left to right.
            value, acc = value_of[picked[0]], axes[picked[0]]
            for position, other in enumerate(picked[1:], start=1):
                later = set().union(*(set(axes[i]) for i in picked[position + 1:]))
                parts = _pairwise(acc, axes[other], keep | later)
                result = parts["batch"] + parts["left"] + parts["right"]
                first = position == 1
                steps.append(Step((value, value_of[other]), numbering.value(), (acc, axes[other]), result,
                                  flops if first else 0, entry if first else None, **parts))
                value, acc = steps[-1].value, result
        new = len(prepared) + index
        axes[new], value_of[new] = steps[-1].output_axes, steps[-1].value
        live.add(new)
        numbering.produced(steps[-1].value, entry)
    return steps


def _constant_values(steps: Sequence[Step], constants: frozenset[int]) -> frozenset[int]:
    known = set(constants)
    for step in steps:
        if all(value in known for value in step.inputs):
            known.add(step.value)
    return frozenset(known)


def _check_memory(steps: Sequence[Step], ssa_path: Sequence[tuple[int, ...]], operands: int,
                  sizes: Mapping[str, int], limit: int, explicit: bool) -> None:
    # opt_einsum answers "nothing fits" with one naive step over every operand, which
    # would allocate the whole broadcast product: refuse instead.  (A user's explicit
    # step of several operands runs pairwise; its intermediates are checked below.)
    if not explicit and operands > 2 and any(len(entry) > 2 for entry in ssa_path):
        raise too_small(limit, "no pairwise contraction path keeps every intermediate under it")
    for index, step in enumerate(steps):
        size = math.prod(sizes[a] for a in step.output_axes)
        if size > limit:
            raise too_small(limit, f"step {index} ({show_axes(step.output_axes)}) "
                                    f"produces {size:,} elements")


# --------------------------------------------------------------------------- levels


def _prep(dims: Sequence[Group], dropped: set[int]) -> Prep:
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


@dataclass(frozen=True)
class _Request:
    """What every level of one plan shares."""

    keyword: Mapping[str, int]
    optimize: Optimize
    memory_limit: int | None
    constants: frozenset[int]
    fusions: Mapping[ir.Pattern, Fusion]


def plan(
    pattern: ir.Pattern,
    shapes: Sequence[Shape],
    sizes: Mapping[str, int],
    optimize: Optimize = "auto",
    memory_limit: int | None = None,
    constants: frozenset[int] = frozenset(),
    fusions: Mapping[ir.Pattern, Fusion] | None = None,
) -> Program:
    """Plan ``pattern`` for tensors of ``shapes`` (with keyword ``sizes``).

    ``memory_limit`` bounds the elements of every intermediate (opt_einsum's meaning);
    ``constants`` are the input positions whose values are folded once; ``fusions``
    are the levels :func:`einc.rewrite.fusions` found that one kernel may compute.  A
    nested operation is planned first, as a level of its own, and its result is an
    operand of the enclosing contraction; one axis name has one size throughout.

    >>> from einc.parser import parse
    >>> program = plan(parse("ab,bc,cd->ad"), [(2, 3), (3, 4), (4, 5)], {})
    >>> program.path_over_tensors(), [step.inputs for step in program.steps]
    ([(0, 1), (0, 1)], [(0, 1), (3, 2)])
    """
    shapes = tuple(tuple(int(n) for n in s) for s in shapes)
    if len(shapes) != pattern.leaves:
        raise EincError(f"the pattern has {pattern.leaves} operands but {len(shapes)} tensors were given")
    check_keyword_axes(sizes, pattern.all_axes)
    if pattern.nested and constants:
        raise EincError("constants are not supported in patterns with nested operations")
    if memory_limit is not None and memory_limit < 1:
        raise too_small(memory_limit, "it holds no element")
    known: dict[str, tuple[int, str]] = {}
    if pattern.nested:
        learn_leaf_sizes(pattern, shapes, sizes, known)
    numbering = _Numbering(len(shapes))
    request = _Request(sizes, optimize, memory_limit, constants, fusions or {})
    program = _plan_node(pattern, shapes, list(range(len(shapes))), known, request, numbering)
    return replace(program, ssa_path=tuple(numbering.ssa))


def _plan_node(pattern: ir.Pattern, shapes: Sequence[Shape], tensors: list[int], known: dict[str, tuple[int, str]],
               request: _Request, numbering: _Numbering) -> Program:
    """Plan one level, its nested levels first; ``tensors`` are the values of its
    leaves, consumed from the front."""
    nested: list[tuple[int, Program]] = []
    operand_shapes: list[Shape] = []
    operands: list[int] = []
    labels: list[str] = []
    mark = numbering.mark()
    roles = request.fusions.get(pattern)
    # A kernel that bounds its own workspace: the unfused intermediates never exist.
    inner_request = replace(request, memory_limit=None) if roles is not None and roles.bounded else request
    unplanned = list(tensors)
    for index, operand in enumerate(pattern.inputs):
        if isinstance(operand, ir.Pattern):
            first = tensors[0]
            inner = _plan_node(operand, shapes, tensors, known, inner_request, numbering)
            nested.append((index, inner))
            operand_shapes.append(inner.output_shape)
            operands.append(inner.result)
            labels.append(f"the result of {operand.op}(...) (operand {index} of {pattern.render()!r})")
            for name, value in inner.sizes:
                if not name.startswith(ir.ELLIPSIS):
                    known.setdefault(name, (value, f"{operand.op}(...) of operands {first}.."
                                                   f"{first + operand.leaves - 1}"))
        else:
            value = tensors.pop(0)
            operand_shapes.append(shapes[value])
            operands.append(value)
            labels.append(f"operand {value}")
    modifier_values = tuple(tensors.pop(0) for _ in pattern.tensor_modifiers)
    own = pattern.input_axes | set(pattern.output.axes)
    keyword = {name: value for name, value in request.keyword.items() if name in own}
    program = _plan_level(pattern, tuple(operand_shapes), tuple(operands), keyword, labels, known, request,
                          numbering)
    _check_modifiers(pattern, program, modifier_values, shapes)
    program = replace(program, nested=tuple(nested), modifier_values=modifier_values)
    if roles is not None and 0 not in dict(program.sizes).values() and 0 not in dict(nested[0][1].sizes).values():
        numbering.rewind(mark)
        return _fused(program, roles, numbering, request.memory_limit)
    if inner_request is not request and request.memory_limit is not None:
        # Not fused after all (an empty axis): planned again, the limit counting everything.
        numbering.rewind(mark)
        tensors[:] = unplanned
        unfused = replace(request, fusions={p: f for p, f in request.fusions.items() if p != pattern})
        return _plan_node(pattern, shapes, tensors, known, unfused, numbering)
    return program


def _check_modifiers(pattern: ir.Pattern, program: Program, values: Sequence[int], shapes: Sequence[Shape]) -> None:
    """Each ``bias``/``mask`` tensor has its axes' sizes (they broadcast onto the logits by name)."""
    sizes = dict(program.sizes)
    for modifier, value in zip(pattern.tensor_modifiers, values):
        shape = shapes[value]
        spelled = f"{modifier.render(pattern.compact)} (operand {value})"
        if len(shape) != len(modifier.axes):
            raise EincError(f"{spelled} has shape {format_shape(shape)}: {len(shape)} dimensions for its "
                            f"{len(modifier.axes)} axes")
        for axis, n in zip(modifier.axes, shape):
            if sizes.get(axis, n) != n:
                raise EincError(f"{show_axis(axis, noun=True).capitalize()} has size {sizes[axis]} in the logits "
                                f"but {n} in {spelled}, of shape {format_shape(shape)}")


def _fused(program: Program, roles: Fusion, numbering: _Numbering, budget: int | None) -> Program:
    """``program`` (and its nested operation) as one fused step on their tensors.

    The unfused steps were planned (their FLOPs count, and for SDPA a memory limit was
    checked against their intermediates: it may fall back to a kernel that makes them);
    the numbering was rewound past them, for one entry and one value.  ``budget``: the
    memory limit, for a kernel that bounds its own workspace."""
    (position, inner), = program.nested
    tensors = [v for index, value in enumerate(program.operands)
               for v in (inner.operands if index == position else (value,))]
    entry = numbering.entry(tensors)
    step = Step(tuple(tensors), numbering.value(), (), program.output_axes, inner.flops + program.flops,
                entry, fused=True)
    numbering.produced(step.value, entry)
    emptied = replace(inner, steps=(), flops=0, naive_flops=0, largest_intermediate=0)
    return replace(program, steps=(step,), nested=((position, emptied),), flops=step.flops,
                   naive_flops=inner.naive_flops + program.naive_flops,
                   largest_intermediate=math.prod(program.output_shape), fused=roles,
                   budget=budget if roles.bounded else None)


def _plan_level(pattern: ir.Pattern, shapes: tuple[Shape, ...], operands: tuple[int, ...],
                keyword: Mapping[str, int], labels: Sequence[str], known: Mapping[str, tuple[int, str]],
                request: _Request, numbering: _Numbering) -> Program:
    level = resolve(pattern, shapes, labels, keyword, known)
    size = level.sizes
    preps = tuple(_prep(dims, {d for op, d in level.dropped if op == index})
                  for index, dims in enumerate(level.input_dims))
    output_axes = tuple(a for dim in level.output_dims for a in dim)
    present = set().union(*(set(p.axes) for p in preps))
    contracted_output = tuple(a for a in output_axes if a in present)
    atoms = [p.axes for p in preps]
    limit = request.memory_limit
    if limit is not None:
        check_output(output_axes, size, limit)  # the output, new axes included, must fit whatever the path
    if pattern.op == "gather":
        return _gather(pattern, level, preps, shapes, operands, keyword, request, numbering)
    ssa_path, info = _path(atoms, contracted_output, size, request)
    steps = _steps(atoms, operands, ssa_path, contracted_output, size, numbering)
    output_shape = tuple(math.prod(size[a] for a in dim) for dim in level.output_dims)
    reduced = present - set(output_axes)
    empty = sorted(a for a in reduced if size[a] == 0)
    if pattern.op in ("max", "min") and empty:
        raise EincError(f"cannot take {pattern.op} over {show_axis(empty[0], noun=True)} of size 0 "
                        f"(torch.a{pattern.op} refuses empty reductions too)")
    for what, n in [("the output", math.prod(output_shape))] + [
        (f"step {i}", math.prod(size[a] for a in step.output_axes)) for i, step in enumerate(steps)
    ]:
        if n >= ir.INT64_LIMIT:
            raise EincError(f"{what} would have {n:,} elements, more than a tensor can index (2**63)")
    if limit is not None:
        _check_memory(steps, ssa_path, len(preps), size, limit, isinstance(request.optimize, (list, tuple)))
    used = set(output_axes) | present | {f.value for f in pattern.scale if isinstance(f.value, str)}
    scaled = None
    if pattern.scale:
        # Scaling the smallest operand costs least; a sum of products is linear in each.
        scaled = min(range(len(preps)), key=lambda i: (i in request.constants, math.prod(size[a] for a in atoms[i])))
    return Program(
        ir=pattern, shapes=shapes, sizes=tuple(sorted((a, n) for a, n in size.items() if a in used)),
        preps=preps, steps=tuple(steps), operands=operands, output_axes=output_axes, output_shape=output_shape,
        path=tuple(ssa_to_linear(ssa_path, len(atoms))),
        flops=int(info.opt_cost), naive_flops=int(info.naive_cost),
        # opt_einsum's figure, or more where a step of several operands runs pairwise.
        largest_intermediate=max([int(info.largest_intermediate)]
                                 + [math.prod(size[a] for a in step.output_axes) for step in steps]),
        reduced_count=math.prod(size[a] for a in reduced), constants=request.constants,
        input_dims=level.input_dims, output_dims=level.output_dims, keyword=tuple(sorted(keyword.items())),
        reduced=tuple(sorted(reduced)), scaled=scaled,
    )


def gather_roles(pattern: ir.Pattern, preps: Sequence[Prep]) -> tuple[tuple[str, ...], ...]:
    """A gather level's axes by role, each in the data's (or the indices') order: the data's
    batch axes (an index has them too), its indexed axes, its other axes, and the
    indices' own axes (each index element picks one entry)."""
    data = preps[0].axes
    on_indices = tuple(dict.fromkeys(a for prep in preps[1:] for a in prep.axes))
    batch = tuple(a for a in data if a in on_indices)
    rest = tuple(a for a in data if a not in pattern.indexed and a not in on_indices)
    return batch, pattern.indexed, rest, tuple(a for a in on_indices if a not in data)


def _gather(pattern: ir.Pattern, level: Level, preps: tuple[Prep, ...], shapes: tuple[Shape, ...],
            operands: tuple[int, ...], keyword: Mapping[str, int], request: _Request,
            numbering: _Numbering) -> Program:
    """A ``gather`` level: one step, no path; its result is over batch + the indices' own
    axes + the data's other axes (:func:`gather_roles`), one read per element."""
    size = level.sizes
    batch, indexed, rest, own = gather_roles(pattern, preps)
    result = batch + own + rest
    elements = math.prod(size[a] for a in result)
    if elements >= ir.INT64_LIMIT:
        raise EincError(f"the output would have {elements:,} elements, more than a tensor can index (2**63)")
    entry = numbering.entry(operands)
    step = Step(operands, numbering.value(), tuple(p.axes for p in preps), result, elements, entry, fused=True)
    numbering.produced(step.value, entry)
    output_axes = tuple(a for dim in level.output_dims for a in dim)
    used = set(result) | set(indexed)
    return Program(
        ir=pattern, shapes=shapes, sizes=tuple(sorted((a, n) for a, n in size.items() if a in used)),
        preps=preps, steps=(step,), operands=operands, output_axes=output_axes,
        output_shape=tuple(math.prod(size[a] for a in dim) for dim in level.output_dims),
        path=(tuple(range(len(preps))),), flops=elements, naive_flops=elements, largest_intermediate=elements,
        reduced_count=1, constants=request.constants, input_dims=level.input_dims, output_dims=level.output_dims,
        keyword=tuple(sorted(keyword.items())), reduced=indexed,
    )


def _path(atoms: list[tuple[str, ...]], output: tuple[str, ...], sizes: Mapping[str, int], request: _Request
          ) -> tuple[list[tuple[int, ...]], Any]:
    """The level's SSA path and opt_einsum's ``PathInfo`` for it: the strategy's path,
    or an explicit one, or (with constants) the folding path where it runs less per call."""
    optimize, limit = request.optimize, request.memory_limit
    if isinstance(optimize, (list, tuple)):
        check_path(optimize, len(atoms))
    ssa_path, info = opt_einsum_path(atoms, output, sizes, optimize, limit)
    constants = request.constants
    if len(constants) > 1 and not isinstance(optimize, (list, tuple)):
        folding = folding_path(list(atoms), output, sizes, optimize, limit, constants)
        if folding is not None and _per_call_flops(atoms, folding, output, sizes, constants) < \
                _per_call_flops(atoms, ssa_path, output, sizes, constants):
            _, info = opt_einsum_path(atoms, output, sizes, ssa_to_linear(folding, len(atoms)), limit)
            ssa_path = folding
    return ssa_path, info


def _per_call_flops(atoms: Sequence[tuple[str, ...]], ssa_path: Sequence[tuple[int, ...]], output: tuple[str, ...],
                    sizes: Mapping[str, int], constants: frozenset[int]) -> int:
    """FLOPs of the steps that run on every call (not folded from constants)."""
    steps = _steps(atoms, range(len(atoms)), ssa_path, output, sizes, _Numbering(len(atoms)))
    folded = _constant_values(steps, constants)
    return sum(step.flops for step in steps if step.value not in folded)
