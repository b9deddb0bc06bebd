"""The public API: :func:`compile`, :func:`einsum`, :class:`Expression`.

An :class:`Expression` parses its pattern once.  Per input signature (shapes and
dtypes) it plans, generates and compiles once, then reuses the compiled function;
both caches are bounded LRU caches.  Errors raised below are re-raised here with the
pattern and the shapes, ``from None``, so users see one clear :class:`EincError`.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from . import ir
from .codegen import CONSTANT_FUNCTION_NAME, FUNCTION_NAME, MODULE_NAME, Generated, generate
from .errors import EincError
from .parser import Notation, parse
from .planner import Optimize, Plan, PlanStep, Program, check_sizes, plan

__all__ = ["Backend", "Expression", "compile", "configure", "einsum"]

Backend = Literal["torchscript", "eager", "compile"]
_BACKENDS = ("torchscript", "eager", "compile")

PLAN_CACHE_SIZE = 256
"""Default number of input signatures an :class:`Expression` keeps compiled (LRU)."""
EXPRESSION_CACHE_SIZE = 512
"""Default number of ``(pattern, options)`` that :func:`compile` and :func:`einsum` keep (LRU)."""


class _Settings:
    """Process-wide defaults, changed through :func:`configure`."""

    plan_cache_size: int = PLAN_CACHE_SIZE
    expression_cache_size: int = EXPRESSION_CACHE_SIZE
    memory_limit: int | str | None = None


_settings = _Settings()
_UNSET: Any = object()


_Functions = tuple[Callable[..., torch.Tensor], Callable[..., list[torch.Tensor]] | None]
"""The compiled ``einc_fn`` and, for constant operands, ``einc_constants``."""


def _compile_torchscript(code: Generated) -> _Functions:
    # TorchScript cannot script exec-made functions (no source file); a
    # CompilationUnit compiles the source text itself.  Its deprecation notice is
    # about TorchScript in general and would repeat on every compile.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        unit = torch.jit.CompilationUnit(code.source)
    folding = getattr(unit, CONSTANT_FUNCTION_NAME) if code.folds_constants else None
    return getattr(unit, FUNCTION_NAME), folding


def _compile_eager(code: Generated) -> _Functions:
    namespace = code.namespace()
    return namespace[FUNCTION_NAME], namespace.get(CONSTANT_FUNCTION_NAME)


def _compile_torch_compile(code: Generated) -> _Functions:
    # Shapes are baked into the source, so a dynamic-shape graph would buy nothing.
    # Not fullgraph: the log-semiring guard branches on data (underflow recovery).
    # Constants are folded once, so their function stays plain Python.
    fn, folding = _compile_eager(code)
    return torch.compile(fn, dynamic=False), folding


_COMPILERS: dict[str, Callable[[Generated], _Functions]] = {
    "torchscript": _compile_torchscript,
    "eager": _compile_eager,
    "compile": _compile_torch_compile,
}


class _Compiled:
    """One input signature's program, generated code, compiled function and folded constants."""

    __slots__ = ("program", "code", "fn", "folded")

    def __init__(self, program: Program, code: Generated, fn: Callable[..., torch.Tensor],
                 folded: tuple[torch.Tensor, ...]) -> None:
        self.program = program
        self.code = code
        self.fn = fn
        self.folded = folded


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]+)\s*\Z")


def _memory_limit(value: int | str | None) -> tuple[int | None, bool]:
    """``(limit, in_bytes)``: an int counts elements, a string such as ``"64MiB"`` bytes."""
    if value is None:
        return None, False
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, False
    if isinstance(value, str):
        match = _BYTES.match(value.lower())
        if match and match.group(2) in _BYTE_UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)]), True
    raise EincError(
        f"memory_limit must be a positive int (elements) or a size in bytes such as '64MiB' "
        f"(units {', '.join(_BYTE_UNITS)}), not {value!r}"
    )


def _constants(value: Mapping[int, torch.Tensor] | None, operands: int) -> tuple[tuple[int, torch.Tensor], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise EincError(f"constants must map operand positions to tensors, e.g. {{1: weight}}, not {value!r}")
    for position, tensor in value.items():
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < operands:
            raise EincError(f"constants: {position!r} is not an operand position (0..{operands - 1})")
        if not isinstance(tensor, torch.Tensor):
            raise EincError(f"constants: operand {position} is a {type(tensor).__name__}, not a torch.Tensor")
    return tuple(sorted(value.items()))


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


def _format_shapes(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join("x".join(map(str, s)) if s else "()" for s in shapes)


_NEEDS_FLOAT = ("logsumexp", "softmax", "log_softmax")


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
        /,
        *,
        backend: Backend = "torchscript",
        optimize: Optimize = "auto",
        notation: Notation = "auto",
        memory_limit: int | str | None = None,
        constants: Mapping[int, torch.Tensor] | None = None,
        cache_size: int | None = None,
        fuse: bool = True,
        **sizes: int,
    ) -> None:
        options = {"backend": backend, "optimize": optimize, "notation": notation,
                   "memory_limit": memory_limit, "constants": constants, "cache_size": cache_size,
                   "fuse": fuse}
        self._setup(pattern, options, sizes)

    def _setup(self, pattern: str, options: dict[str, Any], sizes: dict[str, int]) -> None:
        backend = options.get("backend", "torchscript")
        if backend not in _BACKENDS:
            raise EincError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, not {backend!r}")
        self.pattern = pattern
        self.ir: ir.Pattern = parse(pattern, options.get("notation", "auto"))
        self.backend = backend
        self.optimize = options.get("optimize", "auto")
        self.memory_limit = options.get("memory_limit")
        _memory_limit(self.memory_limit)
        self.fuse = options.get("fuse", True)
        if not isinstance(self.fuse, bool):
            raise EincError(f"fuse must be True or False, not {self.fuse!r}")
        self._constants = _constants(options.get("constants"), self.ir.leaves)
        self._constant_positions = frozenset(position for position, _ in self._constants)
        if self._constants and self.ir.nested:
            raise EincError(f"pattern {pattern!r}: constants are not supported in patterns with nested operations")
        self.sizes = dict(sizes)
        self._compile_fn = _COMPILERS[backend]
        cache_size = options.get("cache_size")
        if cache_size is None:
            cache_size = _settings.plan_cache_size
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise EincError(f"cache_size must be a positive int, not {cache_size!r}")
        # functools.lru_cache: bounded, and safe to call from many threads at once (two
        # threads missing on one signature may both build it; one result is kept).
        self._lookup = functools.lru_cache(maxsize=cache_size)(self._build)
        self._plan_lookup = functools.lru_cache(maxsize=cache_size)(self._plan)
        # Validate keyword sizes now, so a typo surfaces at compile time.
        check_sizes(sizes)
        everywhere = self.ir.all_axes
        for name in sizes:
            if name not in everywhere:
                raise EincError(f"size given for axis {name!r}, which is not in the pattern {pattern!r}")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.sizes.items())
        if self.memory_limit is not None:
            extra += f", memory_limit={self.memory_limit!r}"
        if self._constants:
            extra += f", constants={sorted(self._constant_positions)}"
        return f"einc.Expression({self.pattern!r}, backend={self.backend!r}{extra})"

    def _with_constants(self, given: Sequence[Any], of_constant: Callable[[torch.Tensor], Any]) -> list[Any]:
        """``given`` (one item per call operand) with ``of_constant(tensor)`` put in the
        constants' places: every operand of the pattern, in order."""
        if not self._constants:
            return list(given)
        expected = self.ir.leaves - len(self._constants)
        if len(given) != expected:
            raise EincError(
                f"pattern {self.pattern!r} takes {expected} tensors ({len(self._constants)} of its "
                f"{self.ir.leaves} operands are constants), got {len(given)}"
            )
        rest = iter(given)
        fixed = dict(self._constants)
        return [of_constant(fixed[i]) if i in fixed else next(rest) for i in range(self.ir.leaves)]

    # --------------------------------------------------------------- building

    def _context(self, shapes: Sequence[Sequence[int]], err: EincError) -> EincError:
        return EincError(f"pattern {self.pattern!r} with shapes {_format_shapes(shapes)}: {err}")

    def _plan_for(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype) -> Program:
        # The dtype matters to the plan only through a memory limit given in bytes.
        return self._plan_lookup(shapes, self._element_limit(dtype.itemsize))

    def _element_limit(self, itemsize: int) -> int | None:
        """The tighter of this expression's and the process-wide memory limit, in elements."""
        limits = []
        for value in (self.memory_limit, _settings.memory_limit):
            limit, in_bytes = _memory_limit(value)
            if limit is not None:
                limits.append(limit // itemsize if in_bytes else limit)
        return min(limits, default=None)

    def _plan(self, shapes: tuple[tuple[int, ...], ...], limit: int | None) -> Program:
        try:
            everything = self._with_constants(shapes, lambda t: tuple(t.shape))
            return plan(self.ir, everything, self.sizes, self.optimize, limit, self._constant_positions)
        except EincError as err:
            raise self._context(shapes, err) from None

    def _build(self, signature: tuple[tuple[torch.Size, torch.dtype], ...]) -> _Compiled:
        for index, (_, dtype) in enumerate(signature):
            if not isinstance(dtype, torch.dtype):
                raise EincError(f"pattern {self.pattern!r}: operand {index} is not a torch.Tensor")
        shapes = tuple(tuple(shape) for shape, _ in signature)
        dtypes = {dtype for _, dtype in signature} | {t.dtype for _, t in self._constants}
        if len(dtypes) > 1:
            listed = ", ".join(f"operand {i}: {dtype}" for i, (_, dtype) in enumerate(signature))
            listed += "".join(f", constant {i}: {t.dtype}" for i, t in self._constants)
            raise self._context(shapes, EincError(f"operands must share one dtype ({listed})"))
        (dtype,) = dtypes or {torch.float32}
        if dtype.is_complex and self.ir.op not in (None, "sum", "mean", "prod"):
            raise self._context(shapes, EincError(f"{self.ir.op}(...) needs real tensors, got {dtype}"))
        if not (dtype.is_floating_point or dtype.is_complex) and self.ir.op in _NEEDS_FLOAT:
            raise self._context(shapes, EincError(f"{self.ir.op}(...) needs floating-point tensors, got {dtype}"))
        program = self._plan_for(shapes, dtype)
        code = generate(program, dtype, fuse=self.fuse)
        fn, folding = self._compile_fn(code)
        folded: tuple[torch.Tensor, ...] = ()
        if folding is not None:
            # Folded once: constants are data, not parameters (no autograd through them).
            with torch.no_grad():
                folded = tuple(folding(*(t for _, t in self._constants)))
        return _Compiled(program, code, fn, folded)

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
        entry = self._entry(tensors)
        return entry.fn(*tensors, *entry.folded)

    def explain(self, *tensors_or_shapes: torch.Tensor | Sequence[int], dtype: torch.dtype | None = None) -> Plan:
        """The contraction plan for these tensors (or shapes): path, steps, FLOPs, source.

        ``dtype`` (default: the tensors', else float32) sizes ``largest_intermediate_bytes``
        and picks the code for half floats.

        >>> import einc
        >>> plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
        >>> plan.path
        [(0, 1), (0, 1)]
        >>> [step.kernel for step in plan.steps]
        ['mm', 'mm']
        >>> plan.largest_intermediate, plan.largest_intermediate_bytes  # the 8x64 output
        (512, 2048)
        """
        shapes = tuple(_shape_of(x, i) for i, x in enumerate(tensors_or_shapes))
        if dtype is None:
            dtype = next((x.dtype for x in tensors_or_shapes if isinstance(x, torch.Tensor)), torch.float32)
        program = self._plan_for(shapes, dtype)
        code = generate(program, dtype, fuse=self.fuse)
        # Nested programs come first, as they run (and as code.kernels lists them).
        levels = program.programs()
        located = [(level, step) for level in levels for step in level.steps]
        path = _tree_path(program)
        # Steps name their operands as the whole pattern's path does (a nested level's own
        # positions would not say which tensors they are).
        entries = iter(path)
        operands = [next(entries) if step.operands else () for _, step in located]
        steps = tuple(
            PlanStep(
                operands=position,
                equation=_step_equation(level.pattern, step.inputs, step.output),
                shapes=tuple(level.shape_of(axes) for axes in step.inputs),
                output_shape=level.shape_of(step.output),
                flops=step.flops,
                kernel=kernel,
            )
            for (level, step), kernel, position in zip(located, code.kernels, operands)
        )
        return Plan(
            pattern=self.pattern,
            shapes=tuple(self._with_constants(shapes, lambda t: tuple(t.shape))),
            path=path,
            steps=steps,
            flops=sum(level.flops for level in levels),
            naive_flops=sum(level.naive_flops for level in levels),
            # A nested operation's result is an intermediate of the whole pattern.
            largest_intermediate=max(level.largest_intermediate for level in levels) if not program.nested
            else max([level.largest_intermediate for level in levels]
                     + [math.prod(level.output_shape) for level in levels[:-1]]),
            source=code.source,
            output_shape=program.output_shape,
            dtype=str(dtype).removeprefix("torch."),
            itemsize=dtype.itemsize,
            constants=tuple(sorted(self._constant_positions)),
            rewrite=code.rewrite,
        )

    def module(self, *tensors_or_shapes: torch.Tensor | Sequence[int], dtype: torch.dtype | None = None
               ) -> torch.nn.Module:
        """A ``torch.nn.Module`` computing this pattern for any shapes of the example's ranks.

        Its code reads sizes from the inputs' shapes at run time (sizes given by keyword
        stay fixed), so one module serves every batch size and sequence length: it works
        eagerly, under ``torch.jit.script`` and under ``torch.compile(fullgraph=True)``.
        The contraction path is planned once, for the example shapes.  Half-float
        reductions and normalizers compute in float32, decided from the inputs' dtype.

        >>> import torch, einc
        >>> m = einc.compile("b t (h d), h d e -> b t h e", h=2).module((1, 1, 8), (2, 4, 3))
        >>> scripted = torch.jit.script(m)
        >>> scripted(torch.randn(5, 7, 8), torch.randn(2, 4, 3)).shape
        torch.Size([5, 7, 2, 3])
        """
        if self._constants:
            raise EincError(f"pattern {self.pattern!r}: module() does not take constants")
        shapes = tuple(_shape_of(x, i) for i, x in enumerate(tensors_or_shapes))
        if dtype is None:
            dtype = next((x.dtype for x in tensors_or_shapes if isinstance(x, torch.Tensor)), torch.float32)
        program = self._plan_for(shapes, dtype)
        for level in program.programs():
            for prep, dims in zip(level.preps, level.input_dims):
                # Broadcasting a size-1 ellipsis dimension (dropped from the operand) is
                # decided per shape; generic code could not tell a broadcast 1 from a real one.
                if len(prep.split) != sum(len(d) for d in dims):
                    raise self._context(shapes, EincError(
                        "module() cannot broadcast size-1 '...' dimensions (its code serves every shape); "
                        "expand the operand first"))
        code = generate(program, dtype, generic=True, fuse=self.fuse, module=True)
        module: torch.nn.Module = code.namespace()[MODULE_NAME]()
        module.einc_source = code.source  # type: ignore[assignment]
        return module

    def reference(self, *tensors: torch.Tensor, absolute: bool = False, widen: bool = True) -> torch.Tensor:
        """The pattern evaluated the plain way, in float64 (complex128) unless ``widen=False``.

        torch.einsum for sums of products, the naive broadcast form with
        torch.logsumexp/amax/amin for semirings, ``x - logsumexp(x)`` for normalizers.
        ``absolute=True`` gives the error bound :meth:`validate` scales ``rtol`` by: the
        contraction of absolute values for sums of products, else the reference's magnitude.

        >>> import torch, einc
        >>> einc.compile("i,i->").reference(torch.tensor([1., -2.]), torch.tensor([3., 4.]), absolute=True)
        tensor(11., dtype=torch.float64)
        """
        entry = self._entry(tensors)
        given = [_widen(t) if widen else t for t in self._with_constants(tensors, lambda t: t)]
        if absolute and self.ir.op in (None, "sum", "mean"):
            return _reference(entry.program, given, absolute=True)
        result = _reference(entry.program, given)
        return result.abs() if absolute else result

    def validate(
        self, *tensors: torch.Tensor, rtol: float | None = None, atol: float | None = None
    ) -> float:
        """Compare with a float64 :meth:`reference`; return the max abs error, raise on mismatch.

        The tolerance is per element: ``atol + rtol * bound``, where the bound of a sum of
        products is the contraction of absolute values (so cancellation in the reference
        does not cause false alarms) and otherwise the reference's magnitude.  Defaults
        follow the inputs' dtype (:func:`tolerance`).

        >>> import torch, einc
        >>> einc.compile("ij,jk->ik").validate(torch.randn(3, 4), torch.randn(4, 5)) < 1e-5
        True
        """
        result = self(*tensors)
        dtype = tensors[0].dtype if tensors else torch.float64
        try:
            return compare(result, self.reference(*tensors), self.reference(*tensors, absolute=True),
                           dtype, rtol=rtol, atol=atol)
        except EincError as err:
            raise EincError(f"pattern {self.pattern!r}: result {err}") from None


def compare(result: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, *,
            rtol: float | None = None, atol: float | None = None) -> float:
    """Max abs error of ``result`` against ``reference``; :class:`EincError` (saying how
    the result is off) beyond
    ``atol + rtol * bound`` per element or where inf/NaN entries differ.  ``rtol``/``atol``
    default to :func:`tolerance` of ``dtype``."""
    default_rtol, default_atol = tolerance(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if result.shape != reference.shape:
        raise EincError(f"has shape {list(result.shape)} but the reference has {list(reference.shape)}")
    if result.numel() == 0:
        return 0.0
    result = result.to(reference.dtype)
    finite = torch.isfinite(reference)
    # inf and NaN entries must agree exactly; finite ones within the bound.
    if not bool((torch.isnan(result) == torch.isnan(reference)).all()) or not bool(
        (result[torch.isinf(reference)] == reference[torch.isinf(reference)]).all()
    ):
        raise EincError("disagrees with the reference on inf/NaN entries")
    error = (result - reference).abs()[finite]
    worst = float(error.max()) if error.numel() else 0.0
    if bool((error > atol + rtol * bound.abs()[finite]).any()):
        raise EincError(f"differs from the float64 reference by up to {worst:.3g} (rtol={rtol}, atol={atol})")
    return worst


def _tree_path(program: Program) -> list[tuple[int, ...]]:
    """The path over all tensors in opt_einsum's linear format: for a nested pattern, each
    nested operation's steps first (as they run), its result then an operand like any other."""
    leaves = program.pattern.leaves
    live = list(range(leaves))  # every tensor is live from the start, as in opt_einsum
    tensors = iter(range(leaves))
    results = itertools.count(leaves)
    path: list[tuple[int, ...]] = []

    def level(node: Program) -> int:
        nested = dict(node.nested)
        own = [level(nested[i]) if i in nested else next(tensors) for i in range(len(node.pattern.inputs))]
        for step in node.path:
            tokens = [own[i] for i in step]
            for i in sorted(step, reverse=True):
                own.pop(i)
            path.append(tuple(live.index(t) for t in tokens))
            for t in tokens:
                live.remove(t)
            own.append(next(results))
            live.append(own[-1])
        (result,) = own
        return result

    level(program)
    return path


def _step_equation(pattern: ir.Pattern, inputs: Sequence[tuple[str, ...]], output: tuple[str, ...]) -> str:
    sep = "" if pattern.compact else " "
    join = "," if pattern.compact else ", "
    arrow = "->" if pattern.compact else " -> "
    return join.join(sep.join(axes) for axes in inputs) + arrow + sep.join(output)


def _widen(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """Default ``(rtol, atol)`` of :meth:`Expression.validate` for inputs of ``dtype``."""
    if dtype in (torch.float16,):
        return 1e-2, 1e-3
    if dtype in (torch.bfloat16,):
        return 4e-2, 1e-2
    if dtype in (torch.float32, torch.complex64):
        return 1e-5, 1e-6
    return 1e-10, 1e-12


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _reference(program: Program, tensors: Sequence[torch.Tensor], absolute: bool = False) -> torch.Tensor:
    """The pattern evaluated the plain way, in the tensors' (float64) dtype.

    Sums of products go through torch.einsum (which also broadcasts size-1 ellipsis
    dimensions); semirings through the naive broadcast form (combine by addition, then
    torch.logsumexp/amax/amin); normalizers as ``x - logsumexp(x)`` over the marked axes.
    A nested operation's reference is computed first and is an operand.  ``absolute``
    contracts absolute values (the error bound of a sum of products).
    """
    pattern = program.pattern
    sizes = dict(program.sizes)
    rank = sum(1 for a in sizes if a.startswith(ir.ELLIPSIS))
    nested = dict(program.nested)
    rest = iter(tensors)
    values: list[torch.Tensor] = []
    for index, operand in enumerate(pattern.inputs):
        if index in nested:
            inner = nested[index]
            values.append(_reference(inner, [next(rest) for _ in range(inner.pattern.leaves)]))
        else:
            values.append(next(rest))
    if absolute:
        values = [t.abs() for t in values]
    operands: list[torch.Tensor] = []
    names: list[list[str]] = []
    for operand, tensor in zip(pattern.operands, values):
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
            for position in sorted(dims, reverse=True):
                full = full.prod(position)
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
    if pattern.scale:
        result = result * abs(_scale_value(pattern.scale, sizes)) if absolute else result * _scale_value(
            pattern.scale, sizes)
    if pattern.op in ir.NORMALIZERS:
        marked = [i for i, a in enumerate(program.output_axes) if a in pattern.normalized]
        result = result - torch.logsumexp(result, marked, keepdim=True)
        if pattern.op == "softmax":
            result = result.exp()
    result = result.reshape(program.output_shape)
    if pattern.op == "mean":
        result = result / program.reduced_count
    return result


def _scale_value(factors: Sequence[ir.Factor], sizes: Mapping[str, int]) -> float:
    value = 1.0
    for factor in factors:
        number = float(factor.value if isinstance(factor.value, int) else sizes[factor.value])
        number = math.sqrt(number) if factor.sqrt else number
        value = value / number if factor.divide else value * number
    return value


_SEMIRING_REDUCE: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor]] = {
    "logsumexp": lambda x, dims: torch.logsumexp(x, dims),
    "max": lambda x, dims: torch.amax(x, dims),
    "min": lambda x, dims: torch.amin(x, dims),
}


# ------------------------------------------------------------ module functions


def _expression(pattern: str, options: dict[str, Any], sizes: dict[str, int]) -> Expression:
    """An Expression whose axis sizes may be named like its options (``cache_size``)."""
    expression = Expression.__new__(Expression)
    expression._setup(pattern, options, sizes)
    return expression


def configure(
    *,
    plan_cache_size: int = _UNSET,
    expression_cache_size: int = _UNSET,
    memory_limit: int | str | None = _UNSET,
) -> dict[str, Any]:
    """Set process-wide defaults; returns the previous values (pass them back to restore).

    - ``plan_cache_size``: input signatures each new :class:`Expression` keeps (LRU).
    - ``expression_cache_size``: expressions :func:`compile`/:func:`einsum` keep (LRU).
    - ``memory_limit``: a cap on every intermediate of every plan made from now on, in
      elements (int) or bytes (``"8GiB"``), on top of each expression's own; ``None``
      for no cap. A plan over it raises :class:`EincError` before anything is allocated.

    Any call clears the expression cache, so later ``compile`` calls see the new values.

    >>> import einc
    >>> previous = einc.configure(memory_limit="1GiB")
    >>> einc.configure(**previous)["memory_limit"]
    '1GiB'
    """
    previous = {
        "plan_cache_size": _settings.plan_cache_size,
        "expression_cache_size": _settings.expression_cache_size,
        "memory_limit": _settings.memory_limit,
    }
    for name, value in (("plan_cache_size", plan_cache_size), ("expression_cache_size", expression_cache_size)):
        if value is not _UNSET and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EincError(f"{name} must be a positive int, not {value!r}")
    if memory_limit is not _UNSET:
        _memory_limit(memory_limit)
        _settings.memory_limit = memory_limit
    if plan_cache_size is not _UNSET:
        _settings.plan_cache_size = plan_cache_size
    global _cached
    if expression_cache_size is not _UNSET:
        _settings.expression_cache_size = expression_cache_size
        _cached = functools.lru_cache(maxsize=expression_cache_size)(_cached.__wrapped__)
    _cached.cache_clear()
    return previous


@functools.lru_cache(maxsize=EXPRESSION_CACHE_SIZE)
def _cached(pattern: str, backend: str, optimize: Any, notation: str, memory_limit: int | str | None,
            fuse: bool, sizes: tuple[tuple[str, int], ...]) -> Expression:
    return _expression(pattern, {"backend": backend, "optimize": optimize, "notation": notation,
                                 "memory_limit": memory_limit, "fuse": fuse}, dict(sizes))



def compile(  # noqa: A001 - the name is the API
    pattern: str,
    /,
    *,
    backend: Backend = "torchscript",
    optimize: Optimize = "auto",
    notation: Notation = "auto",
    memory_limit: int | str | None = None,
    constants: Mapping[int, torch.Tensor] | None = None,
    fuse: bool = True,
    **sizes: int,
) -> Expression:
    """Compile ``pattern`` into a callable :class:`Expression` (cached by pattern and options).

    >>> import torch, einc
    >>> f = einc.compile("b q (h d), b k (h d) -> b h q k", h=4)
    >>> f(torch.randn(2, 8, 64), torch.randn(2, 6, 64)).shape
    torch.Size([2, 4, 8, 6])
    """
    # Checked before the cache, which would take 2.0 for 2 and True for 1.
    check_sizes(sizes)
    _memory_limit(memory_limit)
    options: dict[str, Any] = {"backend": backend, "notation": notation, "memory_limit": memory_limit,
                               "fuse": fuse}
    if constants is not None:
        # Tensors key a cache by identity only: an expression with constants is the caller's to keep.
        return _expression(pattern, {"optimize": optimize, "constants": constants, **options}, sizes)
    if isinstance(optimize, (list, tuple)):
        # Explicit paths are lists: freeze them so the expression cache can key them, but
        # only exact ints (1.0 == 1 as a key would let a bad path shadow a good one).
        if not all(isinstance(step, (list, tuple)) and all(type(i) is int for i in step) for step in optimize):
            return _expression(pattern, {"optimize": optimize, **options}, sizes)
        optimize = tuple(tuple(step) for step in optimize)
    try:
        hash(optimize)
    except TypeError:
        return _expression(pattern, {"optimize": optimize, **options}, sizes)
    if not isinstance(fuse, bool):
        raise EincError(f"fuse must be True or False, not {fuse!r}")
    return _cached(pattern, backend, optimize, notation, memory_limit, fuse, tuple(sorted(sizes.items())))


def einsum(pattern: str, /, *tensors: torch.Tensor, **sizes: int) -> torch.Tensor:
    """Evaluate ``pattern`` on ``tensors``; the compiled expression is cached.

    >>> import torch, einc
    >>> einc.einsum("ij,jk->ik", torch.ones(2, 3), torch.ones(3, 4))[0, 0].item()
    3.0
    """
    return compile(pattern, **sizes)(*tensors)
