"""The public API: :func:`compile`, :func:`einsum`, :class:`Expression`.

An :class:`Expression` parses its pattern once.  Per input signature (shapes and
dtypes) it plans, generates and compiles once, then reuses the compiled function;
both caches are bounded LRU caches.  Errors raised below are re-raised here with the
pattern and the shapes, ``from None``, so users see one clear :class:`EincError`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from . import ir
from .codegen import FUNCTION_NAME, Generated, generate
from .errors import EincError
from .parser import Notation, parse
from .planner import Optimize, Plan, PlanStep, Program, plan

__all__ = ["Backend", "Expression", "compile", "einsum"]

Backend = Literal["torchscript", "eager", "compile"]
_BACKENDS = ("torchscript", "eager", "compile")

PLAN_CACHE_SIZE = 256
"""Distinct input signatures an :class:`Expression` keeps compiled (LRU)."""
EXPRESSION_CACHE_SIZE = 512
"""Distinct ``(pattern, options)`` that :func:`compile` and :func:`einsum` keep (LRU)."""


def _compile_torchscript(code: Generated) -> Callable[..., torch.Tensor]:
    # TorchScript cannot script exec-made functions (no source file); a
    # CompilationUnit compiles the source text itself.  Its deprecation notice is
    # about TorchScript in general and would repeat on every compile.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        unit = torch.jit.CompilationUnit(code.source)
    return getattr(unit, FUNCTION_NAME)


def _compile_torch_compile(code: Generated) -> Callable[..., torch.Tensor]:
    # Shapes are baked into the source, so a dynamic-shape graph would buy nothing.
    # Not fullgraph: the log-semiring guard branches on data (underflow recovery).
    return torch.compile(code.eager(), dynamic=False)


_COMPILERS: dict[str, Callable[[Generated], Callable[..., torch.Tensor]]] = {
    "torchscript": _compile_torchscript,
    "eager": Generated.eager,
    "compile": _compile_torch_compile,
}


class _Compiled:
    """One input signature's program, generated code and compiled function."""

    __slots__ = ("program", "code", "fn")

    def __init__(self, program: Program, code: Generated, fn: Callable[..., torch.Tensor]) -> None:
        self.program = program
        self.code = code
        self.fn = fn


def _shape_of(value: Any, index: int) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        shape = tuple(value)
    except TypeError:
        raise EincError(f"operand {index}: expected a tensor or a shape, got {type(value).__name__}") from None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise EincError(f"operand {index}: a shape must hold non-negative ints, got {value!r}")
    return shape


def _check_sizes(sizes: dict[str, Any]) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EincError(f"size of axis {name!r} must be a non-negative int, not {value!r}")


def _format_shapes(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join("x".join(map(str, s)) if s else "()" for s in shapes)


class Expression:
    """A compiled einc pattern; call it with tensors.

    >>> import torch, einc
    >>> scores = einc.compile("b h q d, b h k d -> b h q k")
    >>> q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    >>> torch.allclose(scores(q, k), torch.einsum("bhqd,bhkd->bhqk", q, k), atol=1e-5)
    True
    >>> scores.validate(q, k) < 1e-4
    True
    """

    def __init__(
        self,
        pattern: str,
        *,
        backend: Backend = "torchscript",
        optimize: Optimize = "auto",
        notation: Notation = "auto",
        cache_size: int = PLAN_CACHE_SIZE,
        **sizes: int,
    ) -> None:
        if backend not in _BACKENDS:
            raise EincError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, not {backend!r}")
        self.pattern = pattern
        self.ir: ir.Pattern = parse(pattern, notation)
        self.backend = backend
        self.optimize = optimize
        self.sizes = dict(sizes)
        self._compile_fn = _COMPILERS[backend]
        self._lookup = functools.lru_cache(maxsize=cache_size)(self._build)
        self._plan_lookup = functools.lru_cache(maxsize=cache_size)(self._plan)
        # Validate keyword sizes now, so a typo surfaces at compile time.
        _check_sizes(sizes)
        for name in sizes:
            if name not in self.ir.input_axes and name not in self.ir.output.axes:
                raise EincError(f"size given for axis {name!r}, which is not in the pattern {pattern!r}")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.sizes.items())
        return f"einc.Expression({self.pattern!r}, backend={self.backend!r}{extra})"

    # --------------------------------------------------------------- building

    def _context(self, shapes: Sequence[Sequence[int]], err: EincError) -> EincError:
        return EincError(f"pattern {self.pattern!r} with shapes {_format_shapes(shapes)}: {err}")

    def _plan(self, shapes: tuple[tuple[int, ...], ...]) -> Program:
        try:
            return plan(self.ir, shapes, self.sizes, self.optimize)
        except EincError as err:
            raise self._context(shapes, err) from None

    def _build(self, signature: tuple[tuple[torch.Size, torch.dtype], ...]) -> _Compiled:
        for index, (_, dtype) in enumerate(signature):
            if not isinstance(dtype, torch.dtype):
                raise EincError(f"pattern {self.pattern!r}: operand {index} is not a torch.Tensor")
        shapes = tuple(tuple(shape) for shape, _ in signature)
        dtypes = {dtype for _, dtype in signature}
        if len(dtypes) > 1:
            listed = ", ".join(f"operand {i}: {dtype}" for i, (_, dtype) in enumerate(signature))
            raise self._context(shapes, EincError(f"operands must share one dtype ({listed})"))
        (dtype,) = dtypes or {torch.float32}
        if dtype.is_complex and self.ir.op not in (None, "sum", "mean", "prod"):
            raise self._context(shapes, EincError(f"{self.ir.op}(...) needs real tensors, got {dtype}"))
        program = self._plan_lookup(shapes)
        code = generate(program, dtype)
        return _Compiled(program, code, self._compile_fn(code))

    def _entry(self, tensors: Sequence[torch.Tensor]) -> _Compiled:
        try:
            return self._lookup(tuple([(t.shape, t.dtype) for t in tensors]))
        except (AttributeError, EincError):
            # Tensor-likes (numpy arrays) get this far; name the culprit's type.
            bad = next((i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)), None)
            if bad is None:
                raise
            raise EincError(
                f"pattern {self.pattern!r}: operand {bad} is a {type(tensors[bad]).__name__}, not a torch.Tensor"
            ) from None

    # ------------------------------------------------------------------ calls

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._entry(tensors).fn(*tensors)

    def explain(self, *tensors_or_shapes: torch.Tensor | Sequence[int]) -> Plan:
        """The contraction plan for these tensors (or shapes): path, steps, FLOPs, source.

        >>> import einc
        >>> plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
        >>> plan.path
        [(0, 1), (0, 1)]
        >>> [step.kernel for step in plan.steps]
        ['mm', 'mm']
        """
        shapes = tuple(_shape_of(x, i) for i, x in enumerate(tensors_or_shapes))
        program = self._plan_lookup(shapes)
        code = generate(program)
        steps = tuple(
            PlanStep(
                operands=step.operands,
                equation=_step_equation(self.ir, step.inputs, step.output),
                shapes=tuple(program.shape_of(axes) for axes in step.inputs),
                output_shape=program.shape_of(step.output),
                flops=step.flops,
                kernel=kernel,
            )
            for step, kernel in zip(program.steps, code.kernels)
        )
        return Plan(
            pattern=self.pattern,
            shapes=shapes,
            path=[tuple(p) for p in program.path],
            steps=steps,
            flops=program.flops,
            naive_flops=program.naive_flops,
            largest_intermediate=program.largest_intermediate,
            source=code.source,
            output_shape=program.output_shape,
        )

    def validate(
        self, *tensors: torch.Tensor, rtol: float | None = None, atol: float | None = None
    ) -> float:
        """Compare with a float64 reference; return the max abs error, raise on mismatch.

        The reference is torch.einsum for sums of products, the naive broadcast form with
        torch.logsumexp/amax/amin for semirings, and ``x - logsumexp(x)`` for normalizers.
        The tolerance is per element: ``atol + rtol * bound``, where the bound of a sum of
        products is the contraction of absolute values (so cancellation in the reference
        does not cause false alarms) and otherwise the reference's magnitude.  Defaults
        follow the inputs' dtype.

        >>> import torch, einc
        >>> einc.compile("ij,jk->ik").validate(torch.randn(3, 4), torch.randn(4, 5)) < 1e-5
        True
        """
        entry = self._entry(tensors)
        result = entry.fn(*tensors)
        wide = [_widen(t) for t in tensors]
        reference = _reference(entry.program, wide)
        if self.ir.op in (None, "sum", "mean"):
            bound = _reference(entry.program, [t.abs() for t in wide])
        else:
            bound = reference
        dtype = tensors[0].dtype if tensors else torch.float64
        default_rtol, default_atol = _tolerance(dtype)
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        if result.shape != reference.shape:
            raise EincError(
                f"pattern {self.pattern!r}: result shape {list(result.shape)} differs from the "
                f"reference's {list(reference.shape)}"
            )
        if result.numel() == 0:
            return 0.0
        result = result.to(reference.dtype)
        finite = torch.isfinite(reference)
        # inf and NaN entries must agree exactly; finite ones within the bound.
        if not bool((torch.isnan(result) == torch.isnan(reference)).all()) or not bool(
            (result[torch.isinf(reference)] == reference[torch.isinf(reference)]).all()
        ):
            raise EincError(f"pattern {self.pattern!r}: result and reference disagree on inf/NaN entries")
        error = (result - reference).abs()[finite]
        worst = float(error.max()) if error.numel() else 0.0
        if bool((error > atol + rtol * bound.abs()[finite]).any()):
            raise EincError(
                f"pattern {self.pattern!r}: result differs from the float64 torch.einsum reference "
                f"by up to {worst:.3g} (rtol={rtol}, atol={atol})"
            )
        return worst


def _step_equation(pattern: ir.Pattern, inputs: Sequence[tuple[str, ...]], output: tuple[str, ...]) -> str:
    sep = "" if pattern.compact else " "
    join = "," if pattern.compact else ", "
    arrow = "->" if pattern.compact else " -> "
    return join.join(sep.join(axes) for axes in inputs) + arrow + sep.join(output)


def _widen(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16,):
        return 1e-2, 1e-3
    if dtype in (torch.bfloat16,):
        return 4e-2, 1e-2
    if dtype in (torch.float32, torch.complex64):
        return 1e-5, 1e-6
    return 1e-10, 1e-12


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _reference(program: Program, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The pattern evaluated the plain way, in the tensors' (float64) dtype.

    Sums of products go through torch.einsum (which also broadcasts size-1 ellipsis
    dimensions); semirings through the naive broadcast form (combine by addition, then
    torch.logsumexp/amax/amin); normalizers as ``x - logsumexp(x)`` over the marked axes.
    """
    pattern = program.pattern
    sizes = dict(program.sizes)
    rank = sum(1 for a in sizes if a.startswith(ir.ELLIPSIS))
    operands: list[torch.Tensor] = []
    names: list[list[str]] = []
    for operand, tensor in zip(pattern.inputs, tensors):
        own = tensor.dim() - (len(operand.dims) - operand.has_ellipsis)
        shape: list[int] = []
        axes: list[str] = []
        position = 0
        for dim in operand.dims:
            if dim == (ir.ELLIPSIS,):
                for j in range(own):
                    axes.append(ir.ellipsis_axis(rank - own + j))
                    shape.append(tensor.shape[position + j])
                position += own
            else:
                axes.extend(dim)
                shape.extend(sizes[a] for a in dim)
                position += 1
        operands.append(tensor.reshape(shape))
        names.append(axes)
    atoms = list(dict.fromkeys(a for axes in names for a in axes))
    if len(atoms) > len(_LETTERS):
        raise EincError(f"validate supports at most {len(_LETTERS)} distinct axes (torch.einsum's limit)")
    letter = dict(zip(atoms, _LETTERS))
    spell = lambda axes: "".join(letter[a] for a in axes)  # noqa: E731
    present = [a for a in program.output_axes if a in letter]
    if pattern.op in _SEMIRING_REDUCE or pattern.op == "prod":
        # Naive broadcast: every operand spread over all axes, combined, then reduced.
        full = None
        for tensor, axes in zip(operands, names):
            own = [a for a in atoms if a in axes]
            spread = torch.einsum(f"{spell(axes)}->{spell(own)}", tensor)
            spread = spread.reshape([spread.shape[own.index(a)] if a in own else 1 for a in atoms])
            full = spread if full is None else full + spread
        assert full is not None
        dims = [i for i, a in enumerate(atoms) if a not in present]
        if dims and pattern.op == "prod":
            for dim in sorted(dims, reverse=True):
                full = full.prod(dim)
        elif dims:
            full = _SEMIRING_REDUCE[pattern.op](full, dims)
        kept = [a for a in atoms if a in present]
        result = torch.einsum(f"{spell(kept)}->{spell(present)}", full)
    else:
        equation = ",".join(spell(axes) for axes in names) + "->" + spell(present)
        result = torch.einsum(equation, *operands)
    if len(present) != len(program.output_axes):
        result = result.reshape([sizes[a] if a in letter else 1 for a in program.output_axes])
        result = result.expand([sizes[a] for a in program.output_axes])
    if pattern.op in ir.NORMALIZERS:
        marked = [i for i, a in enumerate(program.output_axes) if a in pattern.normalized]
        result = result - torch.logsumexp(result, marked, keepdim=True)
        if pattern.op == "softmax":
            result = result.exp()
    result = result.reshape(program.output_shape)
    if pattern.op == "mean":
        result = result / program.reduced_count
    return result


_SEMIRING_REDUCE: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor]] = {
    "logsumexp": lambda x, dims: torch.logsumexp(x, dims),
    "max": lambda x, dims: torch.amax(x, dims),
    "min": lambda x, dims: torch.amin(x, dims),
}


# ------------------------------------------------------------ module functions


@functools.lru_cache(maxsize=EXPRESSION_CACHE_SIZE)
def _cached(pattern: str, backend: str, optimize: Any, notation: str, sizes: tuple[tuple[str, int], ...]) -> Expression:
    return Expression(pattern, backend=backend, optimize=optimize, notation=notation, **dict(sizes))  # type: ignore[arg-type]



def compile(  # noqa: A001 - the name is the API
    pattern: str,
    *,
    backend: Backend = "torchscript",
    optimize: Optimize = "auto",
    notation: Notation = "auto",
    **sizes: int,
) -> Expression:
    """Compile ``pattern`` into a callable :class:`Expression` (cached by pattern and options).

    >>> import torch, einc
    >>> f = einc.compile("b q (h d), b k (h d) -> b h q k", h=4)
    >>> f(torch.randn(2, 8, 64), torch.randn(2, 6, 64)).shape
    torch.Size([2, 4, 8, 6])
    """
    _check_sizes(sizes)  # before the cache: it would take 2.0 for 2 and True for 1
    key_sizes = tuple(sorted(sizes.items()))
    try:
        hash(optimize)
    except TypeError:
        # Explicit paths are lists: freeze them so the expression cache can key them.
        if isinstance(optimize, list):
            optimize = tuple(tuple(step) for step in optimize)
        else:
            return Expression(pattern, backend=backend, optimize=optimize, notation=notation, **sizes)
    return _cached(pattern, backend, optimize, notation, key_sizes)


def einsum(pattern: str, *tensors: torch.Tensor, **sizes: int) -> torch.Tensor:
    """Evaluate ``pattern`` on ``tensors``; the compiled expression is cached.

    >>> import torch, einc
    >>> einc.einsum("ij,jk->ik", torch.ones(2, 3), torch.ones(3, 4))[0, 0].item()
    3.0
    """
    return compile(pattern, **sizes)(*tensors)
