"""Program -> Python source that is valid TorchScript, made of direct torch calls.

Each pairwise step becomes permute/reshape (views where the strides allow) around
one ``torch.mm``/``torch.bmm``, or a broadcast ``torch.mul`` when nothing is
contracted.  Only generated identifiers and integer literals appear in the source:
axis names from the pattern are used for bookkeeping, never emitted.
"""

from __future__ import annotations

import builtins
import hashlib
import keyword
import linecache
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, List, Tuple  # noqa: UP035 - TorchScript source names typing.List/Tuple

import torch

from ._runtime import FLOOR, HELPERS, TINY
from .ir import NORMALIZERS
from .planner import Program, Step

__all__ = ["Generated", "generate", "FUNCTION_NAME", "CONSTANT_FUNCTION_NAME"]

FUNCTION_NAME = "einc_fn"
CONSTANT_FUNCTION_NAME = "einc_constants"


@dataclass(frozen=True)
class Generated:
    """Generated source with what it needs to run: a value object, like torch.fx's PythonCode.

    ``source`` defines :data:`FUNCTION_NAME` and, when the program has constant operands,
    :data:`CONSTANT_FUNCTION_NAME`: it takes the constants and returns the folded values
    that ``einc_fn`` takes after the other operands.
    """

    source: str
    globals: dict[str, Any] = field(compare=False)
    kernels: tuple[str, ...]
    """The torch kernel each step of the program was lowered to, in step order."""
    filename: str = ""
    folds_constants: bool = False

    def namespace(self) -> dict[str, Any]:
        """The module's functions as plain Python, its source registered in ``linecache``."""
        namespace = dict(self.globals)
        exec(compile(self.source, self.filename, "exec"), namespace)  # noqa: S102 - generated, validated
        return namespace

    def eager(self) -> Callable[..., torch.Tensor]:
        """The main function as plain Python."""
        return self.namespace()[FUNCTION_NAME]


class _Namespace:
    """Fresh identifiers that shadow no keyword, builtin or global of the generated module."""

    _reserved = (
        frozenset(keyword.kwlist)
        | frozenset(dir(builtins))
        | {"torch", "List", "Tuple", FUNCTION_NAME, CONSTANT_FUNCTION_NAME}
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


def _ints(values: Sequence[int]) -> str:
    if not values:
        return "torch.jit.annotate(List[int], [])"
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


_REDUCE = {None: "sum", "sum": "sum", "mean": "sum", "softmax": "sum", "log_softmax": "sum",
           "prod": "prod", "max": "amax", "min": "amin", "logsumexp": "lse"}
"""How each operation reduces an axis that only one operand has."""

_SEMIRING = {"logsumexp": "log", "max": "max", "min": "min"}
"""Operations whose operands combine by addition; the rest multiply."""

_LOW_PRECISION = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}


class _Emitter:
    def __init__(self, program: Program, dtype: torch.dtype) -> None:
        self.program = program
        op = program.pattern.op
        self.reduce_kind = _REDUCE[op]
        self.semiring = _SEMIRING.get(op, "sum")
        # Reductions and normalizers of half floats compute in float32 (as torch.softmax
        # does internally); plain einsum keeps torch.einsum's behaviour.
        self.downcast = _LOW_PRECISION.get(dtype) if op is not None else None
        wide = dtype == torch.float64
        self.floor = FLOOR["float64" if wide else "float32"]
        self.tiny = TINY["float64" if wide else "float32"]
        self.sizes = dict(program.sizes)
        self.names = _Namespace()
        self.lines: list[str] = []
        self.helpers: dict[str, None] = {}

    def shape(self, axes: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.sizes[a] for a in axes)

    def assign(self, expr: str) -> str:
        name = self.names.create("t")
        self.lines.append(f"    {name} = {expr}")
        return name

    def helper(self, name: str) -> str:
        for dependency in HELPERS[name][1]:
            self.helper(dependency)
        self.helpers[name] = None
        return name

    def permute(self, value: str, axes: Sequence[str], order: Sequence[str]) -> str:
        if tuple(axes) == tuple(order):
            return value
        return self.assign(f"{value}.permute({_ints([list(axes).index(a) for a in order])})")

    def reshape(self, value: str, current: Sequence[int], target: Sequence[int]) -> str:
        if tuple(current) == tuple(target):
            return value
        return self.assign(f"{value}.reshape({_ints(target)})")

    def reduce(self, value: str, axes: Sequence[str], drop: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        """Reduce ``drop`` out of ``value`` with the operation's own reduction."""
        if not drop:
            return value, tuple(axes)
        dims = [list(axes).index(a) for a in drop]
        kind = self.reduce_kind
        if kind == "prod":
            for dim in sorted(dims, reverse=True):  # torch.prod takes one dim at a time
                value = self.assign(f"{value}.prod({int(dim)})")
        elif kind == "lse":
            value = self.assign(f"{self.helper('einc_lse')}({value}, {_ints(dims)}, {self.floor!r})")
        else:
            value = self.assign(f"{value}.{kind}({_ints(dims)})")
        return value, tuple(a for a in axes if a not in drop)

    # ------------------------------------------------------------------ stages

    def prep(self, value: str, shape: Sequence[int], reshape: Sequence[int] | None,
             diagonals: Sequence[tuple[int, int]]) -> str:
        if self.downcast:
            value = self.assign(f"{value}.float()")
        if reshape is not None:
            value = self.reshape(value, shape, reshape)
        for d1, d2 in diagonals:
            value = self.assign(f"torch.diagonal({value}, 0, {int(d1)}, {int(d2)})")
        return value

    def unary(self, step: Step, value: str) -> tuple[str, str]:
        (axes,) = step.inputs
        value, _ = self.reduce(value, axes, step.a_reduce)
        return value, self.reduce_kind if step.a_reduce else "none"

    def binary(self, step: Step, a: str, b: str) -> tuple[str, str]:
        a_axes, b_axes = step.inputs
        a, a_axes = self.reduce(a, a_axes, step.a_reduce)
        b, b_axes = self.reduce(b, b_axes, step.b_reduce)
        batch, left, right, con = step.batch, step.left, step.right, step.contracted
        if not con:
            # Nothing reduced: a broadcast product (or sum, in a semiring of log-values)
            # lands directly in batch+left+right order.
            a = self.permute(a, a_axes, batch + left)
            a = self.reshape(a, self.shape(batch + left), self.shape(batch + left) + (1,) * len(right))
            b = self.permute(b, b_axes, batch + right)
            b = self.reshape(b, self.shape(batch + right),
                             self.shape(batch) + (1,) * len(left) + self.shape(right))
            if self.semiring == "sum":
                return self.assign(f"torch.mul({a}, {b})"), "mul"
            return self.assign(f"torch.add({a}, {b})"), "add"
        if self.semiring == "sum" and batch and len(left) == len(right) == len(con) == 1 \
                and self.folds(a_axes, [batch]) and self.folds(b_axes, [batch]):
            # (batch.., M, K) @ (batch.., K, N) with foldable batch axes: matmul folds
            # them in C++, saving Python-level reshapes (they dominate small calls).
            a = self.permute(a, a_axes, batch + left + con)
            b = self.permute(b, b_axes, batch + con + right)
            return self.assign(f"torch.matmul({a}, {b})"), "matmul"
        # The semiring helpers always take stacks; mm/bmm by whether there is a batch.
        stack = bool(batch) or self.semiring != "sum"
        a = self.matrices(a, a_axes, batch, left, con, stack)
        b = self.matrices(b, b_axes, batch, con, right, stack)
        flat = (math.prod(self.shape(batch)),) * stack + (math.prod(self.shape(left)), math.prod(self.shape(right)))
        if self.semiring == "log":
            call = f"{self.helper('einc_logmm')}({a}, {b}, {self.floor!r}, {self.tiny!r})"
            kernel = "logmm"
        elif self.semiring != "sum":
            call = f"{self.helper('einc_tropical')}({a}, {b}, {self.semiring == 'max'})"
            kernel = f"{self.semiring}plus"
        else:
            kernel = "bmm" if batch else "mm"
            call = f"torch.{kernel}({a}, {b})"
        return self.reshape(self.assign(call), flat, self.shape(batch + left + right)), kernel

    def folds(self, axes: Sequence[str], groups: Sequence[Sequence[str]]) -> bool:
        """Whether permuting ``axes`` (taken as contiguous) into ``groups`` and merging
        each group is a view: each group's axes must be adjacent and in order."""
        order = [a for a in axes if self.sizes[a] != 1]
        for group in groups:
            places = [order.index(a) for a in group if self.sizes[a] != 1]
            if places and places != list(range(places[0], places[0] + len(places))):
                return False
        return True

    def matrices(self, value: str, axes: Sequence[str], batch: tuple[str, ...],
                 rows: tuple[str, ...], cols: tuple[str, ...], stack: bool) -> str:
        """``value`` as a (Z, R, C) stack of matrices, or one (R, C) matrix if not ``stack``.

        Where the merge cannot be a view, the copy keeps the innermost axis innermost
        and the kernel gets a transposed view: BLAS takes those for free, while a
        transposing copy is several times slower than a straight one.
        """
        lead = (math.prod(self.shape(batch)),) * stack + (math.prod(self.shape(rows)),)
        shape = lead + (math.prod(self.shape(cols)),)
        direct = self.folds(axes, [batch, rows, cols])
        if not direct and (self.folds(axes, [batch, cols, rows]) or (axes and axes[-1] in rows)):
            value = self.permute(value, axes, batch + cols + rows)
            value = self.reshape(value, self.shape(batch + cols + rows), shape[:-2] + shape[:-3:-1])
            return self.assign(f"{value}.transpose(-1, -2)")
        value = self.permute(value, axes, batch + rows + cols)
        return self.reshape(value, self.shape(batch + rows + cols), shape)

    def normalize(self, value: str, axes: tuple[str, ...]) -> str:
        pattern = self.program.pattern
        fn = f"torch.{pattern.op}"
        marked = tuple(a for a in axes if a in pattern.normalized)
        if len(marked) == 1:
            return self.assign(f"{fn}({value}, {axes.index(marked[0])})")
        # Several axes normalize jointly: bring them last and flatten them into one.
        rest = tuple(a for a in axes if a not in marked)
        value = self.permute(value, axes, rest + marked)
        flat = self.shape(rest) + (math.prod(self.shape(marked)),)
        value = self.reshape(value, self.shape(rest + marked), flat)
        value = self.assign(f"{fn}({value}, {len(rest)})")
        value = self.reshape(value, flat, self.shape(rest + marked))
        return self.permute(value, rest + marked, axes)

    def finish(self, value: str, axes: tuple[str, ...]) -> str:
        program = self.program
        target = program.output_axes
        present = tuple(a for a in target if a in axes)
        value = self.permute(value, axes, present)
        if present != target:
            with_new = tuple(self.sizes[a] if a in axes else 1 for a in target)
            value = self.reshape(value, self.shape(present), with_new)
            value = self.assign(f"{value}.expand({_ints(self.shape(target))})")
        if program.pattern.op in NORMALIZERS:
            value = self.normalize(value, target)
        value = self.reshape(value, self.shape(target), program.output_shape)
        if program.pattern.op == "mean" and program.reduced_count != 1:
            value = self.assign(f"{value} / {int(program.reduced_count)}")
        if self.downcast:
            value = self.assign(f"{value}.to({self.downcast})")
        return value


def generate(program: Program, dtype: torch.dtype = torch.float32) -> Generated:
    """Emit the function ``einc_fn(x0, x1, ...)`` that evaluates ``program``.

    >>> from einc.parser import parse
    >>> from einc.planner import plan
    >>> code = generate(plan(parse("ij,jk->ik"), [(2, 3), (3, 4)], {}))
    >>> print(code.source.splitlines()[1].strip())
    t0 = torch.mm(x0, x1)
    """
    emit = _Emitter(program, dtype)
    constant = program.constant_values()
    main: list[str] = []
    folding: list[str] = []
    params = [emit.names.create("c" if i in program.constants else "x") for i in range(len(program.preps))]
    values: dict[int, str] = {}
    for index, (param, shape, prep) in enumerate(zip(params, program.shapes, program.preps)):
        emit.lines = folding if index in constant else main
        values[index] = emit.prep(param, shape, prep.reshape, prep.diagonals)
    folded: list[tuple[str, str]] = []  # (name in einc_constants, parameter of einc_fn)

    def take(value_id: int) -> str:
        name = values.pop(value_id)
        if value_id in constant and emit.lines is main:
            folded.append((name, emit.names.create("k")))
            return folded[-1][1]
        return name

    kernels: list[str] = []
    last, axes = 0, program.preps[0].axes
    for step in program.steps:
        emit.lines = folding if step.value in constant else main
        args = [take(i) for i in step.args]
        if len(args) == 1:
            value, kernel = emit.unary(step, args[0])
        else:
            value, kernel = emit.binary(step, args[0], args[1])
        kernels.append(kernel)
        values[step.value] = value
        last, axes = step.value, step.output
    emit.lines = main
    result = emit.finish(take(last), axes)
    if last in constant:
        # Everything was folded: hand out a copy, never the cached tensor (or a view of it).
        result = emit.assign(f"{result}.clone()")

    variable = [p for i, p in enumerate(params) if i not in program.constants]
    signature = ", ".join(f"{p}: torch.Tensor" for p in variable + [k for _, k in folded])
    parts = [HELPERS[name][0].strip() + "\n\n" for name in emit.helpers]
    if program.constants:
        constant_params = ", ".join(f"{p}: torch.Tensor" for i, p in enumerate(params) if i in program.constants)
        returned = ", ".join(name for name, _ in folded)
        parts.append("\n".join([
            f"def {CONSTANT_FUNCTION_NAME}({constant_params}) -> List[torch.Tensor]:",
            *folding, f"    return [{returned}]", "", "",
        ]))
    parts.append("\n".join([f"def {FUNCTION_NAME}({signature}) -> torch.Tensor:", *main, f"    return {result}", ""]))
    source = "".join(parts)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<einc-generated-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "List": List, "Tuple": Tuple}
    return Generated(source, namespace, tuple(kernels), filename, bool(program.constants))
