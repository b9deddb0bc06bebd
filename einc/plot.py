"""Draw a :class:`~einc.Plan`'s contraction tree to a PNG (``einc explain --plot``).

Needs matplotlib (``pip install 'einc[plot]'``), imported only when a tree is drawn.

The tree is the plan's own: the operands are the leaves (spelled as
``plan.operands``), each :class:`~einc.PlanStep` is a node whose children are the nodes
in its ``inputs`` (tensors ``0..n-1``, step ``i`` is ``n + i``), and the root is the
result.  Nothing is re-parsed or replayed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import EincError, format_shape
from .report import Plan, PlanStep

__all__ = ["plot_plan"]

_FONT_SIZE = 9
_CHAR_WIDTH = 0.0075 * _FONT_SIZE  # inches per monospace character
_LINE_HEIGHT = 0.0185 * _FONT_SIZE  # inches per text line
_WRAP = 30  # equations longer than this break before the arrow
_COLOURS = {"operand": "#dbeafe", "step": "#fef9c3", "result": "#dcfce7"}


@dataclass
class _Node:
    """One box of the drawing: an operand, a step, or the result."""

    kind: str
    label: str
    shape: tuple[int, ...]
    children: list[_Node] = field(default_factory=list)
    x: float = 0.0
    level: int = 0

    def walk(self) -> Iterator[_Node]:
        """This node and everything below it, children first (left to right)."""
        for child in self.children:
            yield from child.walk()
        yield self


def plot_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Draw ``plan``'s contraction tree and write it to ``path`` as a PNG.

    Leaves are the operands (their axes and shape), each internal node a step (its
    equation in the pattern's axis names, FLOPs, and the elements of its result), and
    the root is the result.

    >>> import einc, os, tempfile
    >>> from einc.plot import plot_plan
    >>> plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
    >>> target = os.path.join(tempfile.mkdtemp(), "tree.png")
    >>> plot_plan(plan, target)  # doctest: +SKIP
    """
    root = _tree(plan)  # a plan that does not hold together fails first
    try:
        import matplotlib
    except ImportError:
        raise EincError("drawing a plan needs matplotlib: pip install 'einc[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    nodes = list(root.walk())
    _layout(root)
    leaves = sum(1 for node in nodes if node.kind == "operand")
    widest = max(len(line) for node in nodes for line in node.label.splitlines())
    tallest = max(node.label.count("\n") + 1 for node in nodes)
    column = max(1.5, widest * _CHAR_WIDTH + 0.45)  # inches between neighbouring leaves
    row = tallest * _LINE_HEIGHT + 0.55  # inches between levels
    title = (
        f"einc plan for {plan.pattern!r}\n"
        f"{plan.flops:,} FLOPs (naive {plan.naive_flops:,}, speedup {plan.speedup:.3g}x), "
        f"largest intermediate {plan.largest_intermediate:,} elements"
    )
    if plan.slicing is not None:
        cut = plan.slicing
        title += ("\nsliced: " + ", ".join(f"{a.name} in {a.count} chunks of {a.chunk}" for a in cut.axes)
                  + f" ({cut.slices} slices, {cut.overhead:.3g}x the FLOPs); the tree is one slice's")
    width = max(leaves * column, len(title.splitlines()[1]) * _CHAR_WIDTH * 1.1 + 0.5, 4.0)
    height = (root.level + 1) * row + 0.8
    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0 - 0.7 / height))
    axes.set_xlim(-width / column / 2 + (leaves - 1) / 2, width / column / 2 + (leaves - 1) / 2)
    axes.set_ylim(-0.45, root.level + 0.4)
    axes.axis("off")
    figure.suptitle(title, fontsize=_FONT_SIZE + 1, y=1.0 - 0.08 / height, va="top")
    for node in nodes:
        for child in node.children:
            axes.plot([child.x, node.x], [child.level, node.level], color="#64748b", lw=1.2, zorder=1)
    for node in nodes:
        axes.text(node.x, node.level, node.label, ha="center", va="center", family="monospace",
                  fontsize=_FONT_SIZE, zorder=2, linespacing=1.3,
                  bbox={"boxstyle": "round,pad=0.45", "fc": _COLOURS[node.kind], "ec": "#475569", "lw": 0.8})
    try:
        figure.savefig(path, format="png")
    except OSError as err:
        raise EincError(f"cannot write the plot to {os.fspath(path)!r}: {err.strerror or err}") from None


def _box(title: str, axes: str, shape: Sequence[int]) -> str:
    """An operand's or the result's label: title, axes and shape."""
    return f"{title}: {axes}\n{format_shape(shape)}"


def _step_label(index: int, step: PlanStep, entry: int) -> str:
    """A step's label: kernel, equation (broken before the arrow when long), FLOPs, size.

    ``entry`` is the step that begins the path entry this step continues: a
    continuation step's FLOPs are counted there, as opt_einsum counts them."""
    equation = step.equation
    if len(equation) > _WRAP and "->" in equation:
        inputs, _, output = equation.partition("->")
        equation = f"{inputs.rstrip()}\n-> {output.strip()}"
    flops = f"{step.flops:,} FLOPs" if step.operands else f"FLOPs in step {entry}"
    return (f"step {index}: {step.kernel}\n{equation}\n{flops}\n"
            f"{step.output_size:,} elements ({format_shape(step.output_shape)})")


def _tree(plan: Plan) -> _Node:
    """The root of ``plan``'s contraction tree, from each step's ``inputs``."""
    tensors = len(plan.shapes)
    nodes = [_Node("operand", _box(f"operand {i}", plan.operands[i], shape), shape)
             for i, shape in enumerate(plan.shapes)]
    used: set[int] = set()
    entry = 0
    for index, step in enumerate(plan.steps):
        if step.operands:
            entry = index
        if any(not 0 <= i < tensors + index or i in used for i in step.inputs):
            raise EincError(f"step {index} of the plan consumes {step.inputs}, which no earlier step left")
        used.update(step.inputs)
        nodes.append(_Node("step", _step_label(index, step, entry), step.output_shape,
                           [nodes[i] for i in step.inputs]))
    roots = [node for i, node in enumerate(nodes) if i not in used]
    return _Node("result", _box("result", plan.output, plan.output_shape), plan.output_shape, roots)


def _layout(root: _Node) -> None:
    """Leaves at level 0, spaced one apart in drawing order; a node centred over its
    children, one level above the highest; the root one level above everything."""
    leaves = 0
    for node in root.walk():
        if not node.children:
            node.x, node.level = float(leaves), 0
            leaves += 1
        else:
            node.x = math.fsum(child.x for child in node.children) / len(node.children)
            node.level = 1 + max(child.level for child in node.children)
