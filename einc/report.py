"""What a compiled expression does for one signature: :class:`Plan` and :class:`PlanStep`.

:func:`describe` builds a plan from the planner's :class:`~einc.planner.Program` (path,
steps, sizes, FLOPs) and codegen's :class:`~einc.codegen.Generated` (the torch kernel of
each step, the source): nothing here re-parses a pattern or replays a path.  A plan
carries the spelling of each operand and, per step, the nodes it consumes, so a
contraction tree can be drawn from it alone (:mod:`einc.plot`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ir
from .codegen import Generated
from .errors import format_shape
from .planner import Program, Step
from .sizes import Shape
from .slicing import Slicing

if TYPE_CHECKING:
    from .distributed import Distribution

__all__ = ["Plan", "PlanStep", "describe", "table"]


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of a :class:`Plan`, in the user's axis names."""

    operands: tuple[int, ...]
    """Positions in the live operand list (opt_einsum's linear path format); ``()`` for
    the continuation of an entry of more than two operands."""
    inputs: tuple[int, ...]
    """The nodes it consumes: tensors are ``0..n-1``, step ``i`` is ``n + i``."""
    equation: str
    shapes: tuple[Shape, ...]
    output_shape: Shape
    flops: int
    kernel: str
    """The torch call the step was lowered to (``mm``, ``bmm``, ``matmul``, ``mul``, ``sdpa``, ...)."""

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operands": list(self.operands),
            "inputs": list(self.inputs),
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

    FLOP counts and ``largest_intermediate`` are opt_einsum's (a fused SDPA step counts
    the FLOPs of the products it replaces, and keeps no intermediate of einc's); ``speedup``
    is ``naive_flops / flops``.  ``shapes`` are all operands' (constants included).
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
    """The fused kernel that replaced steps (``"sdpa"``), or ``""``."""
    not_fused: str = ""
    """Where a level holds a nested softmax but no fused kernel computes it: why not."""
    operands: tuple[str, ...] = ()
    """Each tensor's axis list, as the pattern spells it."""
    output: str = ""
    """The output's axis list, as the pattern spells it."""
    slicing: Slicing | None = None
    """Where the unsliced plan is over the memory limit: the sliced axes, chunks and
    costs (:class:`einc.slicing.Slicing`); the rest of the plan is one full slice's."""
    distribution: Distribution | None = None
    """With ``explain(world_size=N)`` or a ``distributed`` expression: the split axis,
    each rank's part, FLOPs and slices, and the collectives with their bytes per rank
    (:class:`einc.distributed.Distribution`)."""

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
            "operands": list(self.operands),
            "output": self.output,
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
            "not_fused": self.not_fused,
            "slicing": None if self.slicing is None else {
                **self.slicing.to_dict(), "peak_bytes": self.slicing.peak(self.itemsize)},
            "distribution": None if self.distribution is None else self.distribution.to_dict(),
            "source": self.source,
        }

    def __str__(self) -> str:
        shapes = ", ".join(map(format_shape, self.shapes))
        constants = f" (constants: operands {', '.join(map(str, self.constants))})" if self.constants else ""
        lines = [
            f"einc plan for {self.pattern!r}",
            f"  input shapes:          {shapes}{constants}",
            f"  output shape:          {format_shape(self.output_shape)}",
            f"  path:                  {self.path}",
            f"  flops:                 {self.flops:,} (naive {self.naive_flops:,}, speedup {self.speedup:.3g}x)",
            f"  largest intermediate:  {self.largest_intermediate:,} elements "
            f"({_bytes(self.largest_intermediate_bytes)} as {self.dtype})",
        ]
        if self.rewrite:
            lines.append(f"  rewrite:               {self.rewrite}: one fused call computes what the steps "
                         "it replaces would (their flops are counted)")
        elif self.not_fused:
            lines.append(f"  rewrite:               none; not SDPA because {self.not_fused}")
        if self.slicing is not None:
            cut = self.slicing
            axes = ", ".join(f"{a.name} ({a.role}) {a.size} in {a.count} chunks of {a.chunk}" for a in cut.axes)
            lines += [f"  sliced:                {axes}: {cut.slices} slices, {cut.flops:,} flops in all "
                      f"({cut.overhead:.3g}x unsliced), peak about {_bytes(cut.peak(self.itemsize))}"]
            if cut.visible is not None:
                lines.append(f"  keys follow queries:   each slice of {cut.visible.query} takes only the keys "
                             f"{cut.visible.key} it sees (causal block skipping)")
            lines.append("  (the path, steps and code below are one full slice's)")
        if self.distribution is not None:
            lines += self.distribution.lines()
        rows = [["step", "operands", "equation", "output", "flops", "kernel"]]
        for i, step in enumerate(self.steps):
            rows.append([str(i), str(step.operands), step.equation, format_shape(step.output_shape),
                         f"{step.flops:,}", step.kernel])
        lines += ["", *("  " + line for line in table(rows)), "", "generated code:", self.source.rstrip()]
        return "\n".join(lines)


def table(rows: Sequence[Sequence[str]], *, rule: bool = False) -> list[str]:
    """Left-aligned columns; ``rule`` draws a line under the header row."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    header = [line(rows[0])] + ([line(["-" * w for w in widths])] if rule else [])
    return header + [line(row) for row in rows[1:]]


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _equation(pattern: ir.Pattern, inputs: Sequence[Sequence[str]], output: Sequence[str]) -> str:
    sep = "" if pattern.compact else " "
    join = "," if pattern.compact else ", "
    arrow = "->" if pattern.compact else " -> "
    spell = lambda axes: sep.join(map(ir.spell_axis, axes))  # noqa: E731
    return join.join(spell(axes) for axes in inputs) + arrow + spell(output)


def _plan_step(level: Program, step: Step, kernel: str, path: list[tuple[int, ...]], shapes: Sequence[Shape],
               spelled: Sequence[str]) -> PlanStep:
    operands = path[step.entry] if step.entry is not None else ()
    if step.fused and level.fused is not None:  # SDPA: on the pattern's tensors
        sep = "," if level.ir.compact else ", "
        arrow = "->" if level.ir.compact else " -> "
        equation = sep.join(spelled[v] for v in step.inputs) + arrow + level.ir.output.render(level.ir.compact)
        return PlanStep(operands, step.inputs, equation, tuple(shapes[v] for v in step.inputs), level.output_shape,
                        step.flops, kernel)
    return PlanStep(operands, step.inputs, _equation(level.ir, step.input_axes, step.output_axes),
                    tuple(level.shape_of(axes) for axes in step.input_axes), level.shape_of(step.output_axes),
                    step.flops, kernel)


def describe(program: Program, code: Generated, *, pattern: str, shapes: Sequence[Shape], dtype: Any,
             constants: Sequence[int] = (), slicing: Slicing | None = None,
             distribution: Distribution | None = None, not_fused: str = "") -> Plan:
    """The :class:`Plan` of ``program`` as ``code`` runs it (``pattern`` as the user wrote
    it, ``shapes`` of every tensor, constants included; ``dtype`` a torch dtype)."""
    top = program.ir
    levels = program.programs()
    located = [(level, step) for level in levels for step in level.steps]
    path = program.path_over_tensors()
    spelled = tuple(axes.render(top.compact) or "(scalar)" for axes in top.leaf_lists())
    steps = tuple(_plan_step(level, step, kernel, path, shapes, spelled)
                  for (level, step), kernel in zip(located, code.kernels, strict=True))
    # A nested operation's result is an intermediate of the whole pattern (unless one
    # fused kernel consumes it inside).
    nested_results = [math.prod(inner.output_shape) for level in levels if level.fused is None
                      for _, inner in level.nested]
    return Plan(
        pattern=pattern,
        shapes=tuple(tuple(s) for s in shapes),
        path=path,
        steps=steps,
        flops=sum(level.flops for level in levels),
        naive_flops=sum(level.naive_flops for level in levels),
        largest_intermediate=max([level.largest_intermediate for level in levels] + nested_results),
        source=code.source,
        output_shape=program.output_shape,
        dtype=str(dtype).removeprefix("torch."),
        itemsize=dtype.itemsize,
        constants=tuple(constants),
        rewrite=code.rewrite,
        operands=spelled,
        output=top.output.render(top.compact, frozenset(top.normalized)) or "(scalar)",
        slicing=slicing,
        distribution=distribution,
        not_fused="" if code.rewrite else not_fused,
    )
