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
run time, so one function serves all shapes (einc.nn modules).  Generic code checks
what planning checks for literal code — ranks, one name one size, compositions,
memory limits — with a few integer comparisons; its error messages are data passed
to the function (``messages``), never source.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, List, Tuple  # noqa: UP035 - TorchScript source names typing.List/Tuple

import torch

from . import crossentropy, dtypes, ir
from ._runtime import FLOOR, HELPERS, TINY
from .checks import prologue, tensors, widening
from .errors import EincError
from .ir import NORMALIZERS
from .planner import Program, Step, gather_roles
from .rewrite import Attention, CrossEntropy
from .scaling import Scaling, integral
from .sizes import show_axis
from .source import (
    CONSTANT_FUNCTION_NAME,
    EMPTY_LIST,
    FUNCTION_NAME,
    MODULE_NAME,
    TENSORS_CHECK,
    Group,
    Unit,
    ints,
    singles,
)

__all__ = ["Generated", "generate", "FUNCTION_NAME", "CONSTANT_FUNCTION_NAME", "MODULE_NAME", "result_dtype"]

SDPA = "torch.nn.functional.scaled_dot_product_attention"


@dataclass(frozen=True)
class Generated:
    """Generated source with what it needs to run: a value object, like torch.fx's PythonCode.

    ``source`` defines :data:`FUNCTION_NAME` and, when the program has constant operands,
    :data:`CONSTANT_FUNCTION_NAME`: it takes the constants and returns the folded values
    that ``einc_fn`` takes after the other operands.  Generic code (``messages`` not
    empty) takes the messages its checks raise as its last argument; its module class
    :data:`MODULE_NAME` is built with them.  Executing it is :mod:`einc.backends`' job.
    """

    source: str
    globals: dict[str, Any] = field(compare=False)
    kernels: tuple[str, ...]
    """The torch kernel each step was lowered to, in the order of ``Program.programs()``."""
    filename: str = ""
    folds_constants: bool = False
    rewrite: str = ""
    """The fused kernels rewrites replaced steps with (``"sdpa"``), comma-separated; or ``""``."""
    messages: tuple[str, ...] = ()
    """Generic code: the error message of each run-time check, in ``str.format`` form."""


_REDUCE = {None: "sum", "sum": "sum", "mean": "sum", "softmax": "sum", "log_softmax": "sum",
           "prod": "prod", "max": "amax", "min": "amin", "logsumexp": "lse", "gather": "none"}
"""How each operation reduces an axis that only one operand has (a gather reduces none)."""

_SEMIRING = {"logsumexp": "log", "max": "max", "min": "min"}
"""Operations whose operands combine by addition; the rest multiply."""


def _computed(dtype: torch.dtype, program: Program) -> torch.dtype:
    return dtypes.computed(dtype, program.ir.op, dtypes.sums(program.ir.op, bool(program.reduced)))


def result_dtype(dtype: torch.dtype, program: Program) -> torch.dtype:
    """The dtype of a level's result for operands of ``dtype`` (:func:`einc.dtypes.result`)."""
    fractional = program.ir.op == "mean" or not integral(program.ir.scale)
    return dtypes.result(dtype, program.ir.op, dtypes.sums(program.ir.op, bool(program.reduced)), fractional)


class Emitter:
    """Emits the code of one level (one contraction) of a program."""

    def __init__(self, program: Program, dtype: torch.dtype | None, unit: Unit, lines: list[str],
                 top: bool = False, sizes: dict[str, int] | None = None) -> None:
        self.program = program
        self.unit = unit
        self.generic = unit.generic
        self.names = unit.names
        self.lines = lines
        self.top = top
        self.dtype = dtype
        """The operands' dtype (literal code); ``None`` in generic code, which decides at run time."""
        op = program.ir.op
        self.reduce_kind = _REDUCE[op]
        self.semiring = _SEMIRING.get(op, "sum")
        self.computed = None if dtype is None else _computed(dtype, program)
        wide = self.computed in (torch.float64, torch.complex128)
        self.floor = FLOOR["float64" if wide else "float32"]
        self.tiny = TINY["float64" if wide else "float32"]
        self.sizes = dict(program.sizes) if sizes is None else sizes
        self.owned: set[str] = set()
        """Variables holding contiguous intermediates nothing else refers to (see ``fresh``)."""
        self.scaling = Scaling(self) if program.ir.scale else None
        self.modifying: list[str] = []
        """The variables of this level's ``bias``/``mask`` tensors (set by :func:`_level`)."""

    # ------------------------------------------------------------------ sizes

    def into(self, lines: list[str]) -> Emitter:
        """This emitter writing to ``lines`` instead (constant folding's function): the
        same sizes and scale, its own intermediates.  Only literal code folds constants
        (modules take none), so the scale has no run-time state to share."""
        assert not self.generic, "generic code has no constants to fold"
        other = copy.copy(self)
        other.lines = lines
        other.owned = set()
        return other

    def size(self, axis: str) -> str:
        """Code for the size of ``axis``: a literal, or (generic) a variable read from shapes."""
        return self.unit.size(axis) if self.generic else str(int(self.sizes[axis]))

    def group(self, group: Group) -> str:
        if not self.generic:
            return str(math.prod(self.sizes[a] for a in group))
        return " * ".join(self.size(a) for a in group) or "1"

    def dims(self, groups: Sequence[Group]) -> str:
        if not groups:
            return EMPTY_LIST
        return "[" + ", ".join(self.group(g) for g in groups) + "]"

    def same(self, current: Sequence[Group], target: Sequence[Group]) -> bool:
        if self.generic:
            return [tuple(g) for g in current] == [tuple(g) for g in target]
        size = lambda groups: [math.prod(self.sizes[a] for a in g) for g in groups]  # noqa: E731
        return size(current) == size(target)

    # ------------------------------------------------------------------ basics

    def assign(self, expr: str, base: str = "t") -> str:
        return self.unit.assign(self.lines, expr, base)

    def helper(self, name: str) -> str:
        return self.unit.helper(name)

    def fresh(self, expr: str) -> str:
        """Assign a kernel's result: a new contiguous tensor only this code refers to."""
        name = self.assign(expr)
        self.owned.add(name)
        return name

    def permute(self, value: str, axes: Sequence[str], order: Sequence[str]) -> str:
        if tuple(axes) == tuple(order):
            return value
        return self.assign(f"{value}.permute({ints([list(axes).index(a) for a in order])})")

    def reshape(self, value: str, current: Sequence[Group], target: Sequence[Group], shape: str = "") -> str:
        if not shape and self.same(current, target):
            return value
        shape = shape or self.dims(target)
        if value in self.owned:  # a reshape of a contiguous tensor is a contiguous view of it
            return self.fresh(f"{value}.reshape({shape})")
        return self.assign(f"{value}.reshape({shape})")

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
            value = self.fresh(f"{self.helper('einc_lse')}({value}, {ints(dims)}, {self.floor!r}, "
                               f"{not self.unit.safe})")
        else:
            value = self.fresh(f"{value}.{kind}({ints(dims)})")
        return value, tuple(a for a in axes if a not in drop)

    # ------------------------------------------------------------------ stages

    def cast(self, value: str, dtype: torch.dtype | None, *, widen: bool = True) -> str:
        """``value`` (of ``dtype``) in the dtype this level computes in (``widen``), or
        in the operands' common dtype."""
        if not widen:
            if self.generic or dtype == self.dtype:
                return value  # generic code promoted every tensor in its prologue
            return self.assign(f"{value}.to({dtypes.name(self.dtype)})")  # type: ignore[arg-type]
        if self.generic:
            target = self.generic_target()
            if target is None:
                return value
            return self.assign(f"{value} if {target} == {self.unit.dtype} else {value}.to({target})")
        assert self.computed is not None
        if dtype == self.computed:
            return value
        return self.assign(f"{value}.to({dtypes.name(self.computed)})")

    def generic_target(self) -> str | None:
        """Generic code: the variable holding the dtype this level computes in (set by
        the prologue); ``None`` where it is always the common one."""
        return self.unit.targets.get(widening(self.program))

    def prep(self, index: int, value: str, dtype: torch.dtype | None, *, widen: bool = True,
             scale: bool = True, cast: bool = True) -> str:
        """Operand ``index`` with one dimension per distinct axis (split, squeezed, diagonal);
        without ``cast``, in its own dtype (a gather's index)."""
        prep = self.program.preps[index]
        if cast:
            value = self.cast(value, dtype, widen=widen)
        value = self.reshape(value, self.program.input_dims[index], singles(prep.split))
        for d1, d2 in prep.diagonals:
            value = self.assign(f"torch.diagonal({value}, 0, {int(d1)}, {int(d2)})")
        if scale and self.scaling is not None and self.program.scaled == index:
            value = self.scaling.operand(value, self)
        return value

    def unary(self, step: Step, value: str) -> tuple[str, str]:
        (axes,) = step.input_axes
        value, _ = self.reduce(value, axes, step.a_reduce)
        return value, self.reduce_kind if step.a_reduce else "none"

    def integral(self) -> bool:
        """Whether this level computes on integers (known in literal code only)."""
        return self.computed is not None and not (self.computed.is_floating_point or self.computed.is_complex)

    def binary(self, step: Step, a: str, b: str) -> tuple[str, str]:
        a_axes, b_axes = step.input_axes
        a, a_axes = self.reduce(a, a_axes, step.a_reduce)
        b, b_axes = self.reduce(b, b_axes, step.b_reduce)
        batch, left, right, con = step.batch, step.left, step.right, step.contracted
        if not con:
            # Nothing reduced: a broadcast product (or sum, in a semiring of log-values)
            # lands directly in batch+left+right order.
            a = self.permute(a, a_axes, batch + left)
            a = self.reshape(a, singles(batch + left), singles(batch + left) + [()] * len(right))
            b = self.permute(b, b_axes, batch + right)
            b = self.reshape(b, singles(batch + right), singles(batch) + [()] * len(left) + singles(right))
            if self.semiring == "sum":
                return self.fresh(f"torch.mul({a}, {b})"), "mul"
            return self.fresh(f"torch.add({a}, {b})"), "add"
        integral = self.integral()
        if self.semiring == "sum" and not integral and batch and len(left) == len(right) == len(con) == 1 \
                and self.folds(a_axes, [batch]) and self.folds(b_axes, [batch]):
            # (batch.., M, K) @ (batch.., K, N) with foldable batch axes: matmul folds
            # them in C++, saving Python-level reshapes (they dominate small calls).
            a = self.permute(a, a_axes, batch + left + con)
            b = self.permute(b, b_axes, batch + con + right)
            return self.fresh(f"torch.matmul({a}, {b})"), "matmul"
        if self.semiring == "sum" and not left and not right and self.computed is not None \
                and (self.computed.is_floating_point or self.computed.is_complex and not self.unit.safe):
            # Dot products (one per batch entry) in one pass: a bmm of 1xK by Kx1
            # matrices runs up to 5x slower.  vecdot conjugates its first argument, so
            # complex ones pass it conjugated (a view vmap cannot batch: not in safe code).
            a = self.matrices(a, a_axes, (), batch, con, False)
            b = self.matrices(b, b_axes, (), batch, con, False)
            value = self.fresh(f"torch.linalg.vecdot({a}{'.conj()' if self.computed.is_complex else ''}, {b})")
            return self.reshape(value, [batch], singles(batch)), "vecdot"
        # The semiring and integer helpers take stacks; mm/bmm by whether there is a batch.
        stack = bool(batch) or self.semiring != "sum" or integral
        a = self.matrices(a, a_axes, batch, left, con, stack)
        b = self.matrices(b, b_axes, batch, con, right, stack)
        flat: list[Group] = [batch] * stack + [left, right]
        if self.semiring == "log":
            safe = "_safe" if self.unit.safe else ""
            call = f"{self.helper('einc_logmm' + safe)}({a}, {b}, {self.floor!r}, {self.tiny!r})"
            kernel = "logmm"
        elif self.semiring != "sum":
            call = f"{self.helper('einc_tropical')}({a}, {b}, {self.semiring == 'max'})"
            kernel = f"{self.semiring}plus"
        elif integral:
            # torch has no integer matmul on CUDA: the helper falls back to a broadcast there.
            call = f"{self.helper('einc_int_bmm')}({a}, {b})"
            kernel = "bmm"
        else:
            kernel = "bmm" if batch else "mm"
            call = f"torch.{kernel}({a}, {b})"
        return self.reshape(self.fresh(call), flat, singles(batch + left + right)), kernel

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
            value = self.reshape(value, singles(batch + cols + rows), lead + [cols, rows])
            return self.assign(f"{value}.transpose(-1, -2)")
        value = self.permute(value, axes, batch + rows + cols)
        return self.reshape(value, singles(batch + rows + cols), lead + [rows, cols])

    def normalize(self, value: str, axes: tuple[str, ...]) -> str:
        pattern = self.program.ir
        fn = f"torch.{pattern.op}"
        marked = tuple(a for a in axes if a in pattern.normalized)
        if len(marked) == 1:
            dim = axes.index(marked[0])
            if self.zero_dead_rows:
                return self.part_normalized(value, dim, marked)
            if value not in self.owned or self.unit.safe or self.generic:
                return self.assign(f"{fn}({value}, {dim})")
            # Normalize our own intermediate in place when autograd does not need it: a
            # fresh output as large as the scores costs more in page faults than the
            # softmax itself (torch's native attention does the same).  Not in generic
            # code: it cannot tell whether a torch.func transform runs it, and
            # transforms take no out= (the expression picks safe code for them).
            name = self.names.create("t")
            self.lines += [f"    if {value}.requires_grad:", f"        {name} = {fn}({value}, {dim})",
                           "    else:", f"        {name} = {fn}({value}, {dim}, out={value})"]
            return name
        # Several axes normalize jointly: bring them last and flatten them into one.
        rest = tuple(a for a in axes if a not in marked)
        value = self.permute(value, axes, rest + marked)
        flat = singles(rest) + [marked]
        value = self.reshape(value, singles(rest + marked), flat)
        value = self.part_normalized(value, len(rest), marked) if self.zero_dead_rows else \
            self.assign(f"{fn}({value}, {len(rest)})")
        value = self.reshape(value, flat, singles(rest + marked))
        return self.permute(value, rest + marked, axes)

    def spread(self, value: str, axes: Sequence[str], target: Sequence[str]) -> str:
        """``value`` (over ``axes``) laid out to broadcast against a tensor over ``target``."""
        order = tuple(a for a in target if a in axes)
        value = self.permute(value, tuple(axes), order)
        return self.reshape(value, singles(order), [(a,) if a in axes else () for a in target])

    def modify(self, value: str, target: tuple[str, ...]) -> str:
        """The logits with the level's ``bias`` added and its masks applied: -inf where a
        mask, the causality or the window does not attend."""
        pattern = self.program.ir
        allowed: list[str] = []
        for modifier, tensor in zip(pattern.tensor_modifiers, self.modifying):
            laid = self.spread(tensor, modifier.axes, target)
            if modifier.kind == "bias":
                value = self.assign(f"{value} + {laid}.to({value}.dtype)")
            else:
                allowed.append(laid)
        lower_right = any(m.kind == "causal_lower_right" for m in pattern.modifiers)
        positions: dict[tuple[str, ...], tuple[str, str]] = {}
        for modifier in pattern.modifiers:
            if modifier.tensor:
                continue
            if modifier.axes not in positions:  # a causality and a window share them
                q, k = modifier.axes
                device = f"{value}.device"
                rows = self.spread(self.assign(f"torch.arange({self.size(q)}, device={device})", "i"), (q,), target)
                cols = self.spread(self.assign(f"torch.arange({self.size(k)}, device={device})", "j"), (k,), target)
                if lower_right:  # the queries are the last positions of the keys'
                    rows = self.assign(f"{rows} + ({self.size(k)} - {self.size(q)})", "i")
                positions[modifier.axes] = rows, cols
            rows, cols = positions[modifier.axes]
            if modifier.kind == "window":
                gap = self.assign(f"{rows} - {cols}", "g")
                allowed.append(self.assign(f"({gap} >= 0) & ({gap} < {modifier.size})", "a"))
            else:
                allowed.append(self.assign(f"{cols} <= {rows}", "a"))
        if allowed:
            mask = self.assign(" & ".join(allowed), "a")
            if self.in_place(value):
                self.lines.append(f"    {value}.masked_fill_(~{mask}, float('-inf'))")
            else:
                value = self.assign(f"{value}.masked_fill(~{mask}, float('-inf'))")
        return value

    def in_place(self, value: str) -> bool:
        """Whether ``value`` may be written in place: our own logits (a contraction's
        result, which its backward does not need), in literal code that no torch.func
        transform runs (see :meth:`normalize`).  A copy as large as the scores costs
        as much as the masking itself."""
        return value in self.owned and not self.unit.safe and not self.generic

    @property
    def zero_dead_rows(self) -> bool:
        """Whether a row whose logits are all -inf normalizes to zeros (:meth:`part_normalized`):
        in a part of a normalizer's axis, and wherever masks apply (SDPA's rule)."""
        return self.unit.part or bool(self.program.ir.modifiers)

    def part_normalized(self, value: str, dim: int, normalized: Sequence[str]) -> str:
        """A part's normalizer (a slice's or a rank's share of the normalized axis): a row
        whose logits are all -inf in this part has no share of the whole; it normalizes
        to zeros for softmax (-inf for log_softmax) with a zero gradient, not NaN, so
        that rescaling it by its zero share leaves the other parts' result as it is."""
        if self.generic or not all(self.sizes[a] for a in normalized):
            # (all(), not amax(): an empty axis has no row to kill, and amax refuses it.)
            dead = self.assign(f"({value} == float('-inf')).all({dim}, keepdim=True)")
        else:  # one reading pass, no bool tensor of the scores' size
            dead = self.assign(f"{value}.amax({dim}, keepdim=True) == float('-inf')")
        fill = "0.0" if self.program.ir.op == "softmax" else "float('-inf')"
        if not self.in_place(value):
            kept = self.assign(f"torch.{self.program.ir.op}({value}.masked_fill({dead}, 0.0), {dim})")
            return self.assign(f"{kept}.masked_fill({dead}, {fill})")
        self.lines.append(f"    {value}.masked_fill_({dead}, 0.0)")
        # The normalizer's backward needs its result: normalized in place only without
        # autograd (as :meth:`normalize`).
        fn, name = f"torch.{self.program.ir.op}", self.names.create("t")
        self.lines += [f"    if {value}.requires_grad:",
                       f"        {name} = {fn}({value}, {dim}).masked_fill({dead}, {fill})",
                       "    else:", f"        {name} = {fn}({value}, {dim}, out={value}).masked_fill_({dead}, {fill})"]
        return name

    def output_shape(self) -> str:
        """Generic code at the top level: the output shape, ``...`` spelled out again."""
        program = self.program
        parts: list[str] = []
        plain: list[str] = []
        for spelled, dim in zip(program.ir.output.dims, program.output_dims):
            if spelled == (ir.ELLIPSIS,):
                if plain:
                    parts.append("[" + ", ".join(plain) + "]")
                    plain = []
                assert self.unit.ellipsis is not None
                parts.append(self.unit.ellipsis)
            else:
                plain.append(self.group(dim))
        if plain or not parts:
            parts.append("[" + ", ".join(plain) + "]" if plain else EMPTY_LIST)
        return " + ".join(parts)

    def finish(self, value: str, axes: tuple[str, ...]) -> str:
        program = self.program
        target = program.output_axes
        present = tuple(a for a in target if a in axes)
        value = self.permute(value, axes, present)
        if present != target:
            with_new = [(a,) if a in axes else () for a in target]
            value = self.reshape(value, singles(present), with_new)
            value = self.assign(f"{value}.expand({self.dims(singles(target))})")
        if self.scaling is not None:
            value = self.scaling.result(value, self)
        if program.ir.op in NORMALIZERS:
            if program.ir.modifiers:
                value = self.modify(value, target)
            value = self.normalize(value, target)
            if self.unit.dropout and program.ir.op == "softmax":
                value = self.assign(f"torch.dropout({value}, {float(self.unit.dropout)!r}, True)")
        merged = self.generic and self.top and program.ir.output.has_ellipsis
        value = self.reshape(value, singles(target), program.output_dims,
                             shape=self.output_shape() if merged else "")
        if program.ir.op == "mean" and (program.reduced if self.generic else program.reduced_count != 1):
            value = self.assign(f"{value} / ({self.group(program.reduced)})")
        target = self.generic_target() if self.generic and program.ir.op is not None else None
        if target is not None:
            # Only half floats widen to float32: they come back in their dtype.
            value = self.assign(f"{value}.to({self.unit.dtype}) if {target} == torch.float32 and "
                                f"{target} != {self.unit.dtype} else {value}")
        elif self.dtype in dtypes.HALF and program.ir.op is not None:
            value = self.assign(f"{value}.to({dtypes.name(self.dtype)})")
        return value


def _attention(unit: Unit, program: Program, values: dict[int, str], types_of: dict[int, torch.dtype | None],
               lines: list[str], top: bool) -> tuple[str, torch.dtype | None]:
    """The whole attention pattern ``program`` as one SDPA call on three tensors."""
    roles = program.fused
    assert roles is not None
    (_, inner), = program.nested
    (step,) = program.steps
    tensors = [values[v] for v in step.inputs]
    types = [types_of[v] for v in step.inputs]
    common = None if unit.generic else dtypes.promoted(types)  # type: ignore[arg-type]
    # One name, one size: the outer level reshapes q and k's own axes (the head) too.
    sizes = {**dict(inner.sizes), **dict(program.sizes)}
    inner_emit = Emitter(inner, common, unit, lines, sizes=sizes)
    outer = Emitter(program, common, unit, lines, top=top, sizes=sizes)
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
        value = emit.prep(index, tensors[position], types[position], widen=False, scale=False)
        value = outer.permute(value, emit.program.preps[index].axes, order)
        return outer.reshape(value, singles(order), lead + last)

    query, key, head, value = roles.query, roles.key, roles.head, roles.value
    q = prepared(roles.q, batch + query + head, [query, head])
    k = prepared(roles.k, batch + key + head, [key, head])
    v = prepared(roles.v, batch + key + value, [key, value])
    scale = inner_emit.scaling.float_value() if inner_emit.scaling is not None else "(1.0)"
    masking = ""
    modifiers = inner.ir.modifiers
    if [m.kind for m in modifiers] == ["causal"] and query + key == modifiers[0].axes:
        masking = ", is_causal=True"  # SDPA's own causality is upper left, as causal(q k)
    elif modifiers:
        inner_emit.modifying = [values[v] for v in inner.modifier_values]
        masking = f", attn_mask={_sdpa_mask(inner_emit, q, batch + query + key, lead + [query, key])}"
    if unit.dropout:
        masking += f", dropout_p={float(unit.dropout)!r}"
    out = outer.assign(f"{SDPA}({q}, {k}, {v}{masking}, scale={scale})")
    out = outer.reshape(out, lead + [query, value], singles(batch + query + value))
    unit.kernels.append("sdpa")
    unit.rewrites.append("sdpa")
    return outer.finish(out, batch + query + value), common


def _cross_entropy(unit: Unit, program: Program, values: dict[int, str], types_of: dict[int, torch.dtype | None],
                   lines: list[str], top: bool) -> tuple[str, torch.dtype | None]:
    """Token log-probabilities over a projection as one call of :mod:`einc.crossentropy`'s
    kernel on h (N, D), w (V, D) and the index (N,); it never holds the N x V logits."""
    roles = program.fused
    assert isinstance(roles, CrossEntropy)
    (_, inner), = program.nested
    (step,) = program.steps
    tensors = [values[v] for v in step.inputs]
    types = [types_of[v] for v in step.inputs]
    common = None if unit.generic else dtypes.promoted(types[:2])  # type: ignore[arg-type]
    sizes = {**dict(inner.sizes), **dict(program.sizes)}
    inner_emit = Emitter(inner, common, unit, lines, sizes=sizes)
    outer = Emitter(program, common, unit, lines, top=top, sizes=sizes)
    rows, vocab, hidden = roles.rows, (roles.vocab,), roles.hidden

    def laid(position: int, order: tuple[str, ...], groups: list[Group]) -> str:
        value = inner_emit.prep(position, tensors[position], types[position], widen=False, scale=False)
        value = outer.permute(value, inner.preps[position].axes, order)
        return outer.reshape(value, singles(order), groups)

    h = laid(roles.h, rows + hidden, [rows, hidden])
    w = laid(roles.w, vocab + hidden, [vocab, hidden])
    index = outer.prep(1, tensors[2], None, cast=False)
    index = outer.permute(index, program.preps[1].axes, rows)
    index = outer.reshape(index, singles(rows), [rows])
    _check_index(outer, index, step.inputs[2], roles.vocab)
    budget = crossentropy.DEFAULT_BUDGET if program.budget is None else program.budget
    # The gradients it computes ahead: those autograd will want.
    wanted = ", ".join(f"torch.is_grad_enabled() and {x}.requires_grad" for x in (h, w))
    out = outer.fresh(f"{crossentropy.register()}({h}, {w}, {index}.long(), {int(budget)}, {wanted})[0]")
    out = outer.reshape(out, [rows], singles(rows))
    unit.kernels.append("linear_cross_entropy")
    unit.rewrites.append("cross_entropy")
    return outer.finish(out, rows), common


FUSED: dict[type, Callable[[Unit, Program, dict[int, str], dict[int, torch.dtype | None], list[str], bool],
                           tuple[str, torch.dtype | None]]] = {Attention: _attention, CrossEntropy: _cross_entropy}
"""How each fused kernel (:mod:`einc.rewrite`'s roles) is emitted."""


def _sdpa_mask(emit: Emitter, query: str, axes: tuple[str, ...], groups: list[Group]) -> str:
    """The level's bias and masks as SDPA's additive ``attn_mask`` (0 where attended, -inf
    where not, plus the bias), in the query's dtype, broadcastable to its (N, H, L, S):
    axes no modifier names stay 1; a folded group that some modifier names is expanded
    over the rest of its axes before it merges."""
    mask = emit.modify(emit.assign(f"torch.zeros([1], dtype={query}.dtype, device={query}.device)"), axes)
    named = {a for m in emit.program.ir.modifiers for a in m.axes}
    needed = {a for group in groups if named & set(group) for a in group}
    laid = [(a,) if a in needed else () for a in axes]
    mask = emit.assign(f"{mask}.expand({emit.dims(laid)})")
    return emit.reshape(mask, laid, [tuple(a for a in group if a in needed) for group in groups])


def _gather(unit: Unit, program: Program, values: dict[int, str], types_of: dict[int, torch.dtype | None],
            out: _Output, top: bool) -> tuple[str, torch.dtype | None]:
    """A ``gather`` level: the data as (batch..., indexed, rest), each index as (batch...,
    own), one ``torch.gather`` along the indexed dimension, the batch axes kept as they
    are (no copy where the data is laid out so already: token logits are
    ``torch.gather(x, 2, ids.reshape(b, t, 1))``), ``index_select`` of rows where no batch
    axis is shared (embedding lookups).  Several indexed axes merge into one, their
    indices into one linear index."""
    nested = dict(program.nested)
    data, dtype = _level(unit, nested[0], values, types_of, out) if 0 in nested else \
        (values[program.operands[0]], types_of[program.operands[0]])
    emit = Emitter(program, dtype, unit, out.main, top=top)
    batch, indexed, rest, own = gather_roles(program.ir, program.preps)
    data = emit.prep(0, data, dtype, widen=False, scale=False)
    # Rows of the data picked whole (index_select, as advanced indexing: about 2x
    # torch.gather's speed, which reads an index per element), the batch folded into
    # the rows, where that needs no copy; else torch.gather along the indexed dimension.
    rowwise = (bool(rest) or not batch) and program.preps[0].axes == batch + indexed + rest
    data = emit.permute(data, program.preps[0].axes, batch + indexed + rest)
    # Folded or merged, an index out of its range could land in range: it points past
    # the end instead, where torch's kernel refuses it.
    poisoned = len(indexed) > 1 or (rowwise and bool(batch))
    end = emit.group(batch + indexed) if rowwise else emit.group(indexed)
    target = batch + own
    laid = singles(batch) + [own]
    linear = ""
    for number, axis in enumerate(indexed, start=1):
        index = emit.prep(number, values[program.operands[number]], None, cast=False)
        index = emit.spread(index, program.preps[number].axes, target)
        if tuple(a for a in target if a in program.preps[number].axes) != target:
            index = emit.assign(f"{index}.expand({emit.dims(singles(target))})")
        index = emit.reshape(index, singles(target), laid)
        _check_index(emit, index, program.operands[number], axis)
        stride = emit.group(indexed[number:])
        wide = index if types_of[program.operands[number]] == torch.int64 else emit.assign(f"{index}.long()")
        term = wide if stride == "1" else emit.assign(f"{wide} * {stride}")
        if poisoned:
            term = emit.assign(f"torch.where(({index} >= 0) & ({index} < {emit.size(axis)}), {term}, {end})")
        linear = term if not linear else emit.assign(f"{linear} + {term}")
    if rowwise:
        if batch:  # each batch entry's rows start N rows further
            first = emit.assign(f"torch.arange({emit.group(batch)}, device={linear}.device)"
                                f".reshape({emit.dims(singles(batch) + [()])}) * {emit.group(indexed)}")
            linear = emit.assign(f"{linear} + {first}")
        rows = emit.reshape(data, singles(batch + indexed + rest), [batch + indexed, rest])
        picked = emit.fresh(f"{rows}.index_select(0, {linear}.reshape([-1]))")
        unit.kernels.append("index_select")
        groups = [batch + own, rest]
    else:
        # The data's other axes stay dimensions of their own: merging them could copy.
        data = emit.reshape(data, singles(batch + indexed + rest), singles(batch) + [indexed] + singles(rest))
        groups = laid + singles(rest)
        spread = emit.reshape(linear, laid, laid + [()] * len(rest))
        if rest:
            spread = f"{spread}.expand({emit.dims(groups)})"
        picked = emit.fresh(f"torch.gather({data}, {len(batch)}, {spread})")
        unit.kernels.append("gather")
    result = emit.reshape(picked, groups, singles(batch + own + rest))
    result = emit.finish(result, batch + own + rest)
    values[program.result], types_of[program.result] = result, dtype
    return result, dtype


def _check_index(emit: Emitter, index: str, position: int, axis: str) -> None:
    """Generic code (modules): an :class:`EincError` naming the operand where ``index`` (the
    call's tensor ``position``) is outside ``axis``.  (A call of an expression finds
    which after torch's kernel refuses it; torch.func transforms take no branch on data.)"""
    if not emit.generic or emit.unit.safe:
        return
    size = emit.size(axis)
    emit.unit.check(emit.lines, f"{emit.helper('einc_index_bad')}({index}, {size})",
                    f"operand {position} indexes {show_axis(axis, noun=True)} of size {{}}, but has an index "
                    "outside [0, {})", size, size)


@dataclass
class _Output:
    """Where a level's code goes: per-call lines, the constant-folding function's lines,
    and each folded value ``einc_fn`` takes (name in ``einc_constants``, parameter)."""

    main: list[str]
    folding: list[str]
    folded: list[tuple[str, str]]


def _level(unit: Unit, program: Program, values: dict[int, str], types_of: dict[int, torch.dtype | None],
           out: _Output, top: bool = False) -> tuple[str, torch.dtype | None]:
    """Emit ``program`` (its nested programs first); ``values`` holds the variable of
    each value computed so far (the tensors to begin with) and ``types_of`` its dtype
    (``None`` in generic code).  Returns the result's variable and dtype."""
    if program.fused is not None:
        return FUSED[type(program.fused)](unit, program, values, types_of, out.main, top)
    if program.ir.op == "gather":
        return _gather(unit, program, values, types_of, out, top)
    nested = dict(program.nested)
    operands: list[str] = []
    types: list[torch.dtype | None] = []
    for index, value_id in enumerate(program.operands):
        if index in nested:
            variable, dtype = _level(unit, nested[index], values, types_of, out)
        else:
            variable, dtype = values[value_id], types_of[value_id]
        operands.append(variable)
        types.append(dtype)
    common = None if unit.generic else dtypes.promoted(types)  # type: ignore[arg-type]
    emit = Emitter(program, common, unit, out.main, top=top)
    emit.modifying = [values[v] for v in program.modifier_values]
    # What depends on constants alone is computed once, in einc_constants.
    constant = program.constant_values()
    folding = emit.into(out.folding) if constant else emit
    prepared: dict[int, str] = {}
    for index, (value_id, operand) in enumerate(zip(program.operands, operands)):
        prepared[value_id] = (folding if value_id in constant else emit).prep(index, operand, types[index])

    def take(value_id: int, folded: bool) -> str:
        name = prepared.pop(value_id)
        if value_id in constant and not folded:
            out.folded.append((name, emit.names.create("k")))  # einc_fn takes it as a parameter
            return out.folded[-1][1]
        return name

    for step in program.steps:
        folded = step.value in constant
        here = folding if folded else emit
        args = [take(i, folded) for i in step.inputs]
        variable, kernel = here.unary(step, args[0]) if len(args) == 1 else here.binary(step, args[0], args[1])
        unit.kernels.append(kernel)
        prepared[step.value] = variable
    last = program.steps[-1]
    result = emit.finish(take(last.value, False), last.output_axes)
    if last.value in constant:
        # Everything was folded: hand out a copy, never the cached tensor (or a view of it).
        result = emit.assign(f"{result}.clone()")
    result_type = None if common is None else result_dtype(common, program)
    values[last.value], types_of[last.value] = result, result_type
    return result, result_type


def _module_class(parameters: list[str], not_tensor: int) -> str:
    """``EincModule``, whose ``forward`` calls ``einc_fn`` with its messages, after
    checking (in Python; TorchScript's signature does it there) that it got tensors,
    the message ``not_tensor`` saying which did not."""
    forward = ", ".join(f"{p}: torch.Tensor" for p in parameters)
    passed = ", ".join(parameters + ["self.einc_messages"])
    return "\n".join([
        "", "", f"class {MODULE_NAME}(torch.nn.Module):",
        "    def __init__(self, messages: List[str]) -> None:",
        "        super().__init__()",
        "        self.einc_messages = messages",
        "",
        f"    def forward(self, {forward}) -> torch.Tensor:",
        "        if not torch.jit.is_scripting():",
        f"            {TENSORS_CHECK}([{', '.join(parameters)}], self.einc_messages[{not_tensor}])",
        f"        return {FUNCTION_NAME}({passed})", "",
    ])


def generate(program: Program, types: Sequence[torch.dtype] | torch.dtype = torch.float32, *,
             generic: bool = False, module: bool = False, safe: bool = False, part: bool = False,
             dropout: float = 0.0,
             context: str = "", limits: Sequence[tuple[int | None, bool]] = ()) -> Generated:
    """Emit the function ``einc_fn(x0, x1, ...)`` that evaluates ``program``.

    ``types`` are the tensors' dtypes (one for all, or one each: operands are promoted
    to a common dtype as torch's type promotion does).  ``generic`` reads sizes from the
    inputs' shapes and checks them (see the module docstring), ``context`` prefixing its
    messages and each of ``limits`` (``(limit, in_bytes)``) bounding its intermediates;
    ``safe`` avoids in-place writes and branches on data
    (for torch.func transforms); ``part`` computes a part of a normalizer's axis (a
    slice, a rank's share: see :meth:`Emitter.part_normalized`); ``dropout`` drops
    softmax weights (SDPA's ``dropout_p``); ``module`` also defines ``EincModule(torch.nn.Module)``
    whose ``forward`` calls ``einc_fn``.

    >>> from einc.parser import parse
    >>> from einc.planner import plan
    >>> code = generate(plan(parse("ij,jk->ik"), [(2, 3), (3, 4)], {}))
    >>> print(code.source.splitlines()[1].strip())
    t0 = torch.mm(x0, x1)
    """
    unit = Unit(generic, safe, context, part, dropout)
    count = program.ir.leaves
    leaves = [unit.names.create("c" if i in program.constants else "x") for i in range(count)]
    params = list(leaves)
    out = _Output([], [], [])
    if isinstance(types, torch.dtype):
        types = [types] * count
    types_of: dict[int, torch.dtype | None] = dict.fromkeys(range(count)) if generic else dict(enumerate(types))
    if generic:
        leaves = prologue(unit, program, leaves, out.main, limits)
    result, _ = _level(unit, program, dict(enumerate(leaves)), types_of, out, top=True)

    variable = [p for i, p in enumerate(params) if i not in program.constants]
    parts = [HELPERS[name][0].strip() + "\n\n\n" for name in unit.helpers]
    if program.constants:
        constant_params = ", ".join(f"{p}: torch.Tensor" for i, p in enumerate(params) if i in program.constants)
        returned = ", ".join(name for name, _ in out.folded)
        parts.append("\n".join([
            f"def {CONSTANT_FUNCTION_NAME}({constant_params}) -> List[torch.Tensor]:",
            *out.folding, f"    return [{returned}]", "", "",
        ]))
    signature = ", ".join(f"{p}: torch.Tensor" for p in variable + [k for _, k in out.folded])
    if generic:
        signature += f", {unit.messages_var}: List[str]"
    parts.append("\n".join([f"def {FUNCTION_NAME}({signature}) -> torch.Tensor:", *out.main,
                            f"    return {result}", ""]))
    if module:
        assert generic, "modules are shape-generic"
        unit.messages.append(f"{unit.context}: operand {{}} must be a torch.Tensor, not {{}}")
        parts.append(_module_class(variable, len(unit.messages) - 1))
    source = "".join(parts)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    namespace = {"torch": torch, "List": List, "Tuple": Tuple, "EincError": EincError, TENSORS_CHECK: tensors}
    return Generated(source, namespace, tuple(unit.kernels), f"<einc-generated-{digest}>", bool(program.constants),
                     ", ".join(unit.rewrites), tuple(unit.messages))
