"""Program -> Python source that is valid TorchScript, made of direct torch calls.

Each pairwise step becomes permute/reshape (views where the strides allow) around
one ``torch.mm``/``torch.bmm``, or a broadcast ``torch.mul`` when nothing is
contracted.  A nested operation is emitted inline, so one function computes the
whole pattern; an attention pattern (:mod:`einc.rewrite`) becomes one
``scaled_dot_product_attention`` call.  Only generated identifiers and integer
literals appear in the source: axis names from the pattern are used for
bookkeeping, never emitted.

Shapes are literals by default (one function per input signature).  With
``generic=True`` every size not given by keyword is read from the inputs' shapes at
run time, so one function serves all shapes of the same rank (einc.nn modules).
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
from .ir import NORMALIZERS, Factor
from .planner import Program, Step
from .rewrite import Attention, attention

__all__ = ["Generated", "generate", "FUNCTION_NAME", "CONSTANT_FUNCTION_NAME", "MODULE_NAME"]

FUNCTION_NAME = "einc_fn"
CONSTANT_FUNCTION_NAME = "einc_constants"
MODULE_NAME = "EincModule"
SDPA = "torch.nn.functional.scaled_dot_product_attention"


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
    """The torch kernel each step was lowered to, in the order of ``Program.programs()``."""
    filename: str = ""
    folds_constants: bool = False
    rewrite: str = ""
    """The fused kernels rewrites replaced steps with (``"sdpa"``), comma-separated; or ``""``."""

    def namespace(self) -> dict[str, Any]:
        """The module's functions as plain Python, its source registered in ``linecache``."""
        namespace = dict(self.globals)
        exec(compile(self.source, self.filename, "exec"), namespace)  # noqa: S102 - generated, validated
        # TorchScript names what it compiles by __module__ (None after exec); a name per
        # source keeps two generated modules apart.  No __name__ in the namespace itself:
        # torch.compile would try to import it.
        owner = "einc.generated_" + self.filename.removeprefix("<einc-generated-").removesuffix(">")
        for value in namespace.values():
            if getattr(value, "__code__", None) is not None and value.__code__.co_filename == self.filename \
                    or isinstance(value, type) and value.__module__ == "builtins":
                value.__module__ = owner
        return namespace

    def eager(self) -> Callable[..., torch.Tensor]:
        """The main function as plain Python."""
        return self.namespace()[FUNCTION_NAME]


class _Namespace:
    """Fresh identifiers that shadow no keyword, builtin or global of the generated module."""

    _reserved = (
        frozenset(keyword.kwlist)
        | frozenset(dir(builtins))
        | {"torch", "List", "Tuple", FUNCTION_NAME, CONSTANT_FUNCTION_NAME, MODULE_NAME}
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


_EMPTY_LIST = "torch.jit.annotate(List[int], [])"


def _ints(values: Sequence[int]) -> str:
    if not values:
        return _EMPTY_LIST
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


Group = tuple[str, ...]
"""One tensor dimension as the axes merged into it (``()`` is a size-1 dimension)."""


def _singles(axes: Sequence[str]) -> list[Group]:
    return [(a,) for a in axes]


_REDUCE = {None: "sum", "sum": "sum", "mean": "sum", "softmax": "sum", "log_softmax": "sum",
           "prod": "prod", "max": "amax", "min": "amin", "logsumexp": "lse"}
"""How each operation reduces an axis that only one operand has."""

_SEMIRING = {"logsumexp": "log", "max": "max", "min": "min"}
"""Operations whose operands combine by addition; the rest multiply."""

_LOW_PRECISION = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}


def _integral(factors: Sequence[Factor]) -> bool:
    return all(not f.divide and not f.sqrt for f in factors)


class _Module:
    """What the levels of one generated module share: names, helpers, kernels, mode."""

    def __init__(self, generic: bool) -> None:
        self.generic = generic
        self.names = _Namespace()
        self.helpers: dict[str, None] = {}
        self.kernels: list[str] = []
        self.rewrites: list[str] = []

    def helper(self, name: str) -> str:
        for dependency in HELPERS[name][1]:
            self.helper(dependency)
        self.helpers[name] = None
        return name


class _Emitter:
    """Emits the code of one level (one contraction) of a program."""

    def __init__(self, program: Program, dtype: torch.dtype, module: _Module, lines: list[str],
                 operands: Sequence[str | None], fallback: _Emitter | None = None) -> None:
        self.program = program
        self.module = module
        self.generic = module.generic
        self.names = module.names
        self.lines = lines
        self.operands = list(operands)
        """The variable holding each operand as it came in (sizes are read from these);
        ``None`` for one never computed (a fused nested operation): ``fallback`` knows."""
        self.fallback = fallback
        op = program.pattern.op
        self.reduce_kind = _REDUCE[op]
        self.semiring = _SEMIRING.get(op, "sum")
        # Reductions and normalizers of half floats compute in float32 (as torch.softmax
        # does internally); plain einsum keeps torch.einsum's behaviour.  Generic code
        # decides at run time, from the tensors' dtype.
        self.downcast = None if op is None else (
            "generic" if self.generic else _LOW_PRECISION.get(dtype)
        )
        wide = dtype == torch.float64 and not self.generic
        self.floor = FLOOR["float64" if wide else "float32"]
        self.tiny = TINY["float64" if wide else "float32"]
        self.sizes = dict(program.sizes)
        self.keyword = dict(program.keyword)
        self.size_vars: dict[str, str] = {}
        self.owned: set[str] = set()
        """Variables holding contiguous intermediates nothing else refers to (see ``fresh``)."""
        # Scaling the smallest operand is cheapest, but a fractional scale would turn an
        # integer operand into floats before the product: scale the result then.
        exact = dtype.is_floating_point or dtype.is_complex or self.generic
        self.scale_result = bool(program.pattern.scale) and not exact and not _integral(program.pattern.scale)

    # ------------------------------------------------------------------ sizes

    def size(self, axis: str) -> str:
        """Code for the size of ``axis``: a literal, or (generic) a variable read from shapes."""
        if not self.generic or axis in self.keyword:
            return str(int(self.sizes[axis]))
        if axis not in self.size_vars:
            expr = self._size_source(axis, frozenset())
            if expr is None:
                if self.fallback is None:  # pragma: no cover - every planned axis has a source
                    raise AssertionError(f"no shape holds axis {axis!r}")
                return self.fallback.size(axis)
            self.size_vars[axis] = self.assign(expr, "n")
        return self.size_vars[axis]

    def _size_source(self, axis: str, visiting: frozenset[str]) -> str | None:
        dims = [(index, operand) for index, operand in enumerate(self.program.input_dims)
                if self.operands[index] is not None]
        for index, operand in dims:
            for position, dim in enumerate(operand):
                if dim == (axis,) and self.program.shapes[index][position] == self.sizes[axis]:
                    return f"{self.operands[index]}.shape[{position}]"
        for index, operand in dims:
            for position, dim in enumerate(operand):
                if axis in dim and len(dim) > 1 and not (set(dim) & visiting):
                    others = [a for a in dim if a != axis]
                    parts = [self.size(a) if a in self.size_vars or a in self.keyword
                             else self._size_source(a, visiting | {axis}) for a in others]
                    if all(p is not None for p in parts):
                        return f"{self.operands[index]}.shape[{position}] // ({' * '.join(parts)})"  # type: ignore[arg-type]
        return None

    def group(self, group: Group) -> str:
        if not self.generic:
            return str(math.prod(self.sizes[a] for a in group))
        return " * ".join(self.size(a) for a in group) or "1"

    def dims(self, groups: Sequence[Group]) -> str:
        if not groups:
            return _EMPTY_LIST
        return "[" + ", ".join(self.group(g) for g in groups) + "]"

    def same(self, current: Sequence[Group], target: Sequence[Group]) -> bool:
        if self.generic:
            return [tuple(g) for g in current] == [tuple(g) for g in target]
        size = lambda groups: [math.prod(self.sizes[a] for a in g) for g in groups]  # noqa: E731
        return size(current) == size(target)

    # ------------------------------------------------------------------ basics

    def assign(self, expr: str, base: str = "t") -> str:
        name = self.names.create(base)
        self.lines.append(f"    {name} = {expr}")
        return name

    def helper(self, name: str) -> str:
        return self.module.helper(name)

    def fresh(self, expr: str) -> str:
        """Assign a kernel's result: a new contiguous tensor only this code refers to."""
        name = self.assign(expr)
        self.owned.add(name)
        return name

    def permute(self, value: str, axes: Sequence[str], order: Sequence[str]) -> str:
        if tuple(axes) == tuple(order):
            return value
        return self.assign(f"{value}.permute({_ints([list(axes).index(a) for a in order])})")

    def reshape(self, value: str, current: Sequence[Group], target: Sequence[Group]) -> str:
        if self.same(current, target):
            return value
        if value in self.owned:  # a reshape of a contiguous tensor is a contiguous view of it
            return self.fresh(f"{value}.reshape({self.dims(target)})")
        return self.assign(f"{value}.reshape({self.dims(target)})")

    def reduce(self, value: str, axes: Sequence[str], drop: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        """Reduce ``drop`` out of ``value`` with the operation's own reduction."""
        if not drop:
            return value, tuple(axes)
        dims = [list(axes).index(a) for a in drop]
        kind = self.reduce_kind
        if kind == "prod":
            for dim in sorted(dims, reverse=True):  # torch.prod takes one dim at a time
                value = self.fresh(f"{value}.prod({int(dim)})")
        elif kind == "lse":
            value = self.fresh(f"{self.helper('einc_lse')}({value}, {_ints(dims)}, {self.floor!r})")
        else:
            value = self.fresh(f"{value}.{kind}({_ints(dims)})")
        return value, tuple(a for a in axes if a not in drop)

    def scale(self, factors: Sequence[Factor], as_float: bool = False) -> str:
        """The scale as an expression of integer literals and sizes (nothing else).

        A product of integers stays an int (integer tensors stay integer); a division
        or a square root makes it a float, as ``x / 2`` does in torch.
        """
        integral = _integral(factors)
        values = [str(int(f.value)) if isinstance(f.value, int) else self.size(f.value) for f in factors]
        if integral and not as_float:
            return "(" + " * ".join(values or ["1"]) + ")"
        expr = "1.0"
        for factor, value in zip(factors, values):
            expr += f" {'/' if factor.divide else '*'} {f'{value} ** 0.5' if factor.sqrt else value}"
        return f"({expr})"

    # ------------------------------------------------------------------ stages

    def prep(self, index: int, value: str, *, widen: bool = True, scale: bool = True) -> str:
        """Operand ``index`` with one dimension per distinct axis (split, squeezed, diagonal)."""
        prep = self.program.preps[index]
        if self.downcast and widen:
            if self.downcast == "generic":
                value = self.assign(f"{self.helper('einc_widen')}({value})")
            else:
                value = self.assign(f"{value}.float()")
        value = self.reshape(value, self.program.input_dims[index], _singles(prep.split))
        for d1, d2 in prep.diagonals:
            value = self.assign(f"torch.diagonal({value}, 0, {int(d1)}, {int(d2)})")
        if scale and self.program.scaled == index and not self.scale_result:
            value = self.assign(f"{value} * {self.scale(self.program.pattern.scale)}")
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
            a = self.reshape(a, _singles(batch + left), _singles(batch + left) + [()] * len(right))
            b = self.permute(b, b_axes, batch + right)
            b = self.reshape(b, _singles(batch + right), _singles(batch) + [()] * len(left) + _singles(right))
            if self.semiring == "sum":
                return self.fresh(f"torch.mul({a}, {b})"), "mul"
            return self.fresh(f"torch.add({a}, {b})"), "add"
        if self.semiring == "sum" and batch and len(left) == len(right) == len(con) == 1 \
                and self.folds(a_axes, [batch]) and self.folds(b_axes, [batch]):
            # (batch.., M, K) @ (batch.., K, N) with foldable batch axes: matmul folds
            # them in C++, saving Python-level reshapes (they dominate small calls).
            a = self.permute(a, a_axes, batch + left + con)
            b = self.permute(b, b_axes, batch + con + right)
            return self.fresh(f"torch.matmul({a}, {b})"), "matmul"
        # The semiring helpers always take stacks; mm/bmm by whether there is a batch.
        stack = bool(batch) or self.semiring != "sum"
        a = self.matrices(a, a_axes, batch, left, con, stack)
        b = self.matrices(b, b_axes, batch, con, right, stack)
        flat: list[Group] = [batch] * stack + [left, right]
        if self.semiring == "log":
            call = f"{self.helper('einc_logmm')}({a}, {b}, {self.floor!r}, {self.tiny!r})"
            kernel = "logmm"
        elif self.semiring != "sum":
            call = f"{self.helper('einc_tropical')}({a}, {b}, {self.semiring == 'max'})"
            kernel = f"{self.semiring}plus"
        else:
            kernel = "bmm" if batch else "mm"
            call = f"torch.{kernel}({a}, {b})"
        return self.reshape(self.fresh(call), flat, _singles(batch + left + right)), kernel

    def folds(self, axes: Sequence[str], groups: Sequence[Sequence[str]]) -> bool:
        """Whether permuting ``axes`` (taken as contiguous) into ``groups`` and merging
        each group is a view: each group's axes must be adjacent and in order."""
        order = [a for a in axes if self.sizes[a] != 1]
        for group in groups:
            places = [order.index(a) for a in group if self.sizes[a] != 1]
            if places and places != list(range(places[0], places[0] + len(places))):
                return False
        return True

    def matrices(self, value: str, axes: Sequence[str], batch: Group,
                 rows: Group, cols: Group, stack: bool) -> str:
        """``value`` as a (Z, R, C) stack of matrices, or one (R, C) matrix if not ``stack``.

        Where the merge cannot be a view, the copy keeps the innermost axis innermost
        and the kernel gets a transposed view: BLAS takes those for free, while a
        transposing copy is several times slower than a straight one.
        """
        lead: list[Group] = [batch] * stack
        direct = self.folds(axes, [batch, rows, cols])
        if not direct and (self.folds(axes, [batch, cols, rows]) or (axes and axes[-1] in rows)):
            value = self.permute(value, axes, batch + cols + rows)
            value = self.reshape(value, _singles(batch + cols + rows), lead + [cols, rows])
            return self.assign(f"{value}.transpose(-1, -2)")
        value = self.permute(value, axes, batch + rows + cols)
        return self.reshape(value, _singles(batch + rows + cols), lead + [rows, cols])

    def normalize(self, value: str, axes: tuple[str, ...]) -> str:
        pattern = self.program.pattern
        fn = f"torch.{pattern.op}"
        marked = tuple(a for a in axes if a in pattern.normalized)
        if len(marked) == 1:
            dim = axes.index(marked[0])
            if value not in self.owned:
                return self.assign(f"{fn}({value}, {dim})")
            # Normalize our own intermediate in place when autograd does not need it: a
            # fresh output as large as the scores costs more in page faults than the
            # softmax itself (torch's native attention does the same).
            name = self.names.create("t")
            self.lines += [f"    if {value}.requires_grad:", f"        {name} = {fn}({value}, {dim})",
                           "    else:", f"        {name} = {fn}({value}, {dim}, out={value})"]
            return name
        # Several axes normalize jointly: bring them last and flatten them into one.
        rest = tuple(a for a in axes if a not in marked)
        value = self.permute(value, axes, rest + marked)
        flat = _singles(rest) + [marked]
        value = self.reshape(value, _singles(rest + marked), flat)
        value = self.assign(f"{fn}({value}, {len(rest)})")
        value = self.reshape(value, flat, _singles(rest + marked))
        return self.permute(value, rest + marked, axes)

    def finish(self, value: str, axes: tuple[str, ...]) -> str:
        program = self.program
        target = program.output_axes
        present = tuple(a for a in target if a in axes)
        value = self.permute(value, axes, present)
        if present != target:
            with_new = [(a,) if a in axes else () for a in target]
            value = self.reshape(value, _singles(present), with_new)
            value = self.assign(f"{value}.expand({self.dims(_singles(target))})")
        if self.scale_result:
            value = self.assign(f"{value} * {self.scale(program.pattern.scale)}")
        if program.pattern.op in NORMALIZERS:
            value = self.normalize(value, target)
        value = self.reshape(value, _singles(target), program.output_dims)
        if program.pattern.op == "mean" and (program.reduced if self.generic else program.reduced_count != 1):
            value = self.assign(f"{value} / ({self.group(program.reduced)})")
        if self.downcast == "generic":
            value = self.assign(f"{value}.to({self.operands[0]}.dtype)")
        elif self.downcast:
            value = self.assign(f"{value}.to({self.downcast})")
        return value


def _attention(module: _Module, program: Program, roles: Attention, leaves: list[str], lines: list[str]) -> str:
    """The whole attention pattern ``program`` as one SDPA call on three tensors."""
    (_, inner), = program.nested
    tensors = [leaves.pop(0) for _ in range(3)]
    inner_operands = tensors[:2] if roles.v == 2 else tensors[1:]
    inner_emit = _Emitter(inner, torch.float32, module, lines, inner_operands)
    outer_operands: list[str | None] = [None, tensors[2]] if roles.v == 2 else [tensors[0], None]
    outer = _Emitter(program, torch.float32, module, lines, outer_operands, fallback=inner_emit)
    # q and k's own axes (the head) are the inner level's: the outer reshapes them too.
    outer.sizes = {**inner_emit.sizes, **outer.sizes}
    first_inner = 0 if roles.v == 2 else 1
    where = {roles.q: (inner_emit, roles.q - first_inner), roles.k: (inner_emit, roles.k - first_inner),
             roles.v: (outer, 1 - first_inner)}
    batch = roles.batch
    # SDPA's CPU and flash kernels take (N, H, L, E): the batch axes fold into two.
    lead: list[Group] = [batch[:-1], batch[-1:]] if batch else [(), ()]

    def prepared(position: int, order: tuple[str, ...], last: list[Group]) -> str:
        emit, index = where[position]
        # SDPA runs half floats natively (its flash kernels need them) and takes the
        # scale itself: no widening, no scaling here.
        value = emit.prep(index, tensors[position], widen=False, scale=False)
        value = outer.permute(value, emit.program.preps[index].axes, order)
        return outer.reshape(value, _singles(order), lead + last)

    query, key, head, value = roles.query, roles.key, roles.head, roles.value
    q = prepared(roles.q, batch + query + head, [query, head])
    k = prepared(roles.k, batch + key + head, [key, head])
    v = prepared(roles.v, batch + key + value, [key, value])
    out = outer.assign(f"{SDPA}({q}, {k}, {v}, scale={inner_emit.scale(roles.scale, as_float=True)})")
    out = outer.reshape(out, lead + [query, value], _singles(batch + query + value))
    module.kernels.extend(["sdpa"] * (len(inner.steps) + len(program.steps)))
    module.rewrites.append("sdpa")
    return outer.finish(out, batch + query + value)


def _level(module: _Module, program: Program, dtype: torch.dtype, leaves: list[str],
           main: list[str], folding: list[str], folded: list[tuple[str, str]], fuse: bool) -> str:
    """Emit ``program`` (its nested programs first) on ``leaves``; returns the result's name.

    ``leaves`` is consumed from the front.  Work on constants alone goes to ``folding``;
    each folded value ``einc_fn`` takes is recorded in ``folded``.
    """
    roles = attention(program.pattern) if fuse and (dtype.is_floating_point or module.generic) else None
    if roles is not None and (module.generic or 0 not in dict(program.sizes).values()):
        return _attention(module, program, roles, leaves, main)
    operands: list[str | None] = []
    nested = dict(program.nested)
    for index in range(len(program.pattern.inputs)):
        if index in nested:
            operands.append(_level(module, nested[index], dtype, leaves, main, folding, folded, fuse))
        else:
            operands.append(leaves.pop(0))
    emit = _Emitter(program, dtype, module, main, operands)

    constant = program.constant_values()
    values: dict[int, str] = {}
    for index, operand in enumerate(operands):
        emit.lines = folding if index in constant else main
        values[index] = emit.prep(index, str(operand))

    def take(value_id: int) -> str:
        name = values.pop(value_id)
        if value_id in constant and emit.lines is main:
            folded.append((name, emit.names.create("k")))
            return folded[-1][1]
        return name

    last, axes = 0, program.preps[0].axes
    for step in program.steps:
        emit.lines = folding if step.value in constant else main
        args = [take(i) for i in step.args]
        if len(args) == 1:
            value, kernel = emit.unary(step, args[0])
        else:
            value, kernel = emit.binary(step, args[0], args[1])
        module.kernels.append(kernel)
        values[step.value] = value
        last, axes = step.value, step.output
    emit.lines = main
    result = emit.finish(take(last), axes)
    if last in constant:
        # Everything was folded: hand out a copy, never the cached tensor (or a view of it).
        result = emit.assign(f"{result}.clone()")
    return result


def generate(program: Program, dtype: torch.dtype = torch.float32, *, generic: bool = False,
             fuse: bool = True, module: bool = False) -> Generated:
    """Emit the function ``einc_fn(x0, x1, ...)`` that evaluates ``program``.

    ``generic`` reads sizes from the inputs' shapes (see the module docstring);
    ``fuse`` allows the attention rewrite; ``module`` also defines
    ``EincModule(torch.nn.Module)`` whose ``forward`` calls ``einc_fn``.

    >>> from einc.parser import parse
    >>> from einc.planner import plan
    >>> code = generate(plan(parse("ij,jk->ik"), [(2, 3), (3, 4)], {}))
    >>> print(code.source.splitlines()[1].strip())
    t0 = torch.mm(x0, x1)
    """
    shared = _Module(generic)
    leaves = [shared.names.create("c" if i in program.constants else "x") for i in range(program.pattern.leaves)]
    params = list(leaves)
    main: list[str] = []
    folding: list[str] = []
    folded: list[tuple[str, str]] = []  # (name in einc_constants, parameter of einc_fn)
    result = _level(shared, program, dtype, leaves, main, folding, folded, fuse)

    variable = [p for i, p in enumerate(params) if i not in program.constants]
    signature = ", ".join(f"{p}: torch.Tensor" for p in variable + [k for _, k in folded])
    parts = [HELPERS[name][0].strip() + "\n\n" for name in shared.helpers]
    if program.constants:
        constant_params = ", ".join(f"{p}: torch.Tensor" for i, p in enumerate(params) if i in program.constants)
        returned = ", ".join(name for name, _ in folded)
        parts.append("\n".join([
            f"def {CONSTANT_FUNCTION_NAME}({constant_params}) -> List[torch.Tensor]:",
            *folding, f"    return [{returned}]", "", "",
        ]))
    parts.append("\n".join([f"def {FUNCTION_NAME}({signature}) -> torch.Tensor:", *main, f"    return {result}", ""]))
    if module:
        arguments = ", ".join(variable)
        parts.append("\n".join([
            "", "", f"class {MODULE_NAME}(torch.nn.Module):",
            f"    def forward(self, {signature}) -> torch.Tensor:",
            f"        return {FUNCTION_NAME}({arguments})", "",
        ]))
    source = "".join(parts)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<einc-generated-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "List": List, "Tuple": Tuple}
    return Generated(source, namespace, tuple(shared.kernels), filename, bool(program.constants),
                     ", ".join(shared.rewrites))
