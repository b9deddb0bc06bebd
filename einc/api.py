"""The public API: :func:`compile`, :func:`einsum`, :class:`Expression`, :func:`configure`.

An :class:`Expression` parses its pattern once.  Its first input signature (shapes
and dtypes) is planned, generated and compiled at once.  A later new signature first
runs shape-generic code shared by every signature with the same plan (for one level
of at most two operands, whose path cannot change, without planning at all); from its
:data:`GENERIC_CALLS` + 1st call it runs code planned, generated and compiled for it
alone.  Caches are bounded LRU caches.  Errors raised below are re-raised here with the
pattern and the shapes, ``from None``, so users see one clear :class:`EincError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import distributed, dtypes, ir, slicing
from .backends import compiled, instantiate, transformed
from .codegen import generate
from .errors import EincError, MemoryLimitError, format_shape
from .options import (
    EXPRESSION_CACHE_SIZE,
    Backend,
    Options,
    check_constants,
    configure,
    element_limit,
    settings,
)
from .parser import Notation, parse
from .paths import Optimize, check_output, check_path
from .planner import Program, plan
from .reference import compare, reference
from .reference import widen as to_wide
from .report import Plan, describe
from .rewrite import fusions, refusal
from .sizes import check_keyword_axes, check_new_axes, check_sizes, merge_ellipsis, show_axis

__all__ = ["Expression", "compile", "compile_ir", "configure", "einsum"]


GENERIC_CALLS = 2
"""Calls a new input signature runs on shared shape-generic code before code of its own
(sizes as literals, the path and layouts planned for them) is compiled: a shape seen
once costs no compilation, and a recurring one runs at the literal code's speed."""


class _Compiled:
    """What a call of one input signature runs: ``fn(*tensors, *folded)``."""

    __slots__ = ("fn", "folded")

    def __init__(self, fn: Callable[..., torch.Tensor], folded: tuple[torch.Tensor, ...] = ()) -> None:
        self.fn = fn
        self.folded = folded


_signature = operator.attrgetter("shape", "dtype")
"""A tensor's part of an input signature."""


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


def _narrowed(leaves: Sequence[Sequence[tuple[str, ...]]], shapes: Sequence[Sequence[int]],
              chunks: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
    """``shapes`` with each axis of ``chunks`` (a dimension of its own) cut to its chunk."""
    return tuple(tuple(chunks.get(group[0], n) if len(group) == 1 else n for group, n in zip(dims, shape))
                 for dims, shape in zip(leaves, shapes))


def _format_shapes(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join(map(format_shape, shapes))


def _options(pattern: str, **options: Any) -> Options:
    try:
        return Options(**options)
    except EincError as err:
        raise EincError(f"pattern {pattern!r}: {err}") from None


def _restore(pattern: str, options: Options, constants: Mapping[int, torch.Tensor] | None,
             sizes: dict[str, int]) -> Expression:
    """An :class:`Expression` from validated options (also how one is unpickled:
    compiled again from its pattern)."""
    expression = Expression.__new__(Expression)
    expression._setup(pattern, options, constants, sizes)
    return expression


def compile_ir(pattern: ir.Pattern, *, fuse: bool = True, **sizes: int) -> Expression:
    """An :class:`Expression` of a pattern built as IR (``einc.nn`` joins a layer's
    pattern and weight): not rendered and parsed again; its text is the rendering.

    >>> from einc.parser import parse
    >>> compile_ir(parse("b c, c d -> b d")).pattern
    'b c, c d -> b d'
    """
    expression = Expression.__new__(Expression)
    options = _options(pattern.render(), notation="compact" if pattern.compact else "spaced", fuse=fuse)
    expression._setup(pattern.render(), options, None, sizes, parsed=pattern)
    return expression


def _restore_module(pattern: str, options: Options, sizes: dict[str, int], shapes: tuple[tuple[int, ...], ...],
                    dtype: torch.dtype, process_limit: tuple[int | None, bool]) -> torch.nn.Module:
    """Unpickle a module made by :meth:`Expression.module`: generated again, with the
    process-wide limit it was made under (not the loading process's)."""
    return _restore(pattern, options, None, sizes)._module(shapes, [dtype] * len(shapes), process_limit)


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

    def __init__(self, pattern: str, /, *, cache_size: int | None = None, backend: Backend = "torchscript",
                 optimize: Optimize = "auto", notation: Notation = "auto", memory_limit: int | str | None = None,
                 constants: Mapping[int, torch.Tensor] | None = None, fuse: bool = True, slice: bool = True,
                 distributed: Any = False, shard_output: bool = False, dropout: float = 0.0, **sizes: int) -> None:
        # compile()'s options, and cache_size: the signatures this expression keeps.
        options = _options(pattern, backend=backend, optimize=optimize, notation=notation,
                           memory_limit=memory_limit, fuse=fuse, cache_size=cache_size, slice=slice,
                           distributed=distributed, shard_output=shard_output, dropout=dropout)
        self._setup(pattern, options, constants, sizes)

    def _setup(self, pattern: str, options: Options, constants: Mapping[int, torch.Tensor] | None,
               sizes: dict[str, int], parsed: ir.Pattern | None = None) -> None:
        self.pattern = pattern
        self.options = options
        self.ir: ir.Pattern = parse(pattern, options.notation) if parsed is None else parsed
        self._constants = check_constants(constants, self.ir.leaves)
        self._constant_positions = frozenset(position for position, _ in self._constants)
        if self._constants and self.ir.nested:
            raise EincError(f"pattern {pattern!r}: constants are not supported in patterns with nested operations")
        self._modifying = frozenset(position for position, _ in self.ir.modifier_leaves())
        self._masks = frozenset(position for position, m in self.ir.modifier_leaves() if m.kind == "mask")
        """Operands that are ``mask`` tensors: bool whatever the other operands' dtype."""
        self._indices = {position: (axis, level) for position, axis, level in self.ir.index_leaves()}
        """Operands that are a ``gather``'s indices (integers): position -> (indexed axis, level)."""
        self._kept = self._masks | frozenset(self._indices)
        """Operands that keep their dtype (not promoted with the others, not widened)."""
        if self._constants and any(level.modifiers or level.op == "gather" for level in self.ir.levels()):
            raise EincError(f"pattern {pattern!r}: constants are not supported with bias(...), mask(...), "
                            "causal(...), window(...) or gather(...)")
        self._distributed = options.distributed is not False
        if self._constants and self._distributed:
            raise EincError(f"pattern {pattern!r}: a distributed expression does not take constants")
        if isinstance(options.optimize, tuple):
            for level in self.ir.levels():
                try:
                    check_path(options.optimize, len(level.inputs))
                except EincError as err:
                    raise EincError(f"pattern {pattern!r}: optimize={list(options.optimize)}: {err}") from None
        check_sizes(sizes)
        check_keyword_axes(sizes, self.ir.all_axes, f"the pattern {pattern!r}")
        try:
            check_new_axes(self.ir, sizes)
        except EincError as err:
            raise EincError(f"pattern {pattern!r}: {err}") from None
        self.sizes = dict(sizes)
        self._fusions = fusions(self.ir) if options.fuse else {}
        cache_size = settings.plan_cache_size if options.cache_size is None else options.cache_size
        # functools.lru_cache: bounded, and safe to call from many threads at once (two
        # threads missing on one signature may both build it; one result is kept).
        self._cache_size = cache_size
        self._lookup = functools.lru_cache(maxsize=cache_size)(self._build)
        self._plan_lookup = functools.lru_cache(maxsize=cache_size)(self._plan)
        self._index_lookup = functools.lru_cache(maxsize=cache_size)(self._indexed_sizes)
        # Shared shape-generic code (see _shared); torch.compile specializes on shapes
        # anyway, and constants are folded per signature.
        self._shares = options.backend != "compile" and not self._constants
        self._fixed_path = not self.ir.nested and self.ir.leaves <= 2
        self._generics: dict[tuple[Any, ...], tuple[Callable[..., torch.Tensor], list[str]]] = {}
        self._runners = functools.lru_cache(maxsize=cache_size)(self._runner)
        self._local_expressions: dict[bool, Expression] = {}
        self._agreement: str | None = None

    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def optimize(self) -> Any:
        return self.options.optimize

    @property
    def memory_limit(self) -> int | str | None:
        return self.options.memory_limit

    @property
    def fuse(self) -> bool:
        return self.options.fuse

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.sizes.items())
        if self.memory_limit is not None:
            extra += f", memory_limit={self.memory_limit!r}"
        if self._constants:
            extra += f", constants={sorted(self._constant_positions)}"
        return f"einc.Expression({self.pattern!r}, backend={self.backend!r}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Caches and compiled functions are not data: pickle the recipe, compile on load.
        return _restore, (self.pattern, self.options, dict(self._constants) or None, self.sizes)

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
        # A refusal for memory stays one: slicing may still run the signature.
        kind = MemoryLimitError if isinstance(err, MemoryLimitError) else EincError
        return kind(f"pattern {self.pattern!r} with shapes {_format_shapes(shapes)}: {err}")

    def _plan_for(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype,
                  process_limit: tuple[int | None, bool] | None = None, transformed: bool = False) -> Program:
        # The dtype matters to the plan through a memory limit given in bytes, and
        # whether a fused kernel takes it (SDPA takes floating tensors only).  A module
        # keeps the process-wide limit it was made under (``process_limit``).
        limit = element_limit([self.options.limit, settings.limit if process_limit is None else process_limit],
                              dtype.itemsize)
        return self._plan_lookup(shapes, limit, dtype.is_floating_point, transformed)

    def _plan(self, shapes: tuple[tuple[int, ...], ...], limit: int | None, floating: bool,
              transformed: bool = False) -> Program:
        # Under torch.func transforms only the fused kernels they can run.
        fused = {} if not floating else self._fusions if not transformed else \
            {level: roles for level, roles in self._fusions.items() if roles.transforms}
        try:
            everything = self._with_constants(shapes, lambda t: tuple(t.shape))
            return plan(self.ir, everything, self.sizes, self.optimize, limit, self._constant_positions, fused)
        except EincError as err:
            raise self._context(shapes, err) from None

    def _common(self, types: Sequence[torch.dtype]) -> torch.dtype:
        """The dtype a call computes in: torch's promotion over its operands but the
        ``bias``/``mask`` tensors (a bias is added in the logits' dtype) and a gather's
        indices."""
        side = self._modifying | frozenset(self._indices)
        return dtypes.promoted([t for i, t in enumerate(types) if i not in side] or list(types))

    def _dtypes(self, given: Sequence[torch.dtype], shapes: Sequence[tuple[int, ...]]) -> list[torch.dtype]:
        """Every operand's dtype (constants included), checked against the pattern."""
        everything = self._with_constants(given, lambda t: t.dtype)
        try:
            for position, modifier in self.ir.modifier_leaves():
                if position < len(everything):
                    dtypes.check_modifier(modifier, position, everything[position], self.ir.compact)
            for position, (axis, _) in self._indices.items():
                if position < len(everything):
                    dtypes.check_index(axis, position, everything[position])
            dtypes.check(self.ir, self._common(everything) if everything else torch.float32)
        except EincError as err:
            raise self._context(shapes, err) from None
        return everything or [torch.float32]

    def _build(self, key: tuple[tuple[tuple[torch.Size, torch.dtype], ...], bool, int]) -> _Compiled:
        entry = self._entry_for(key)
        if not self._indices:
            return entry
        # A gather's indices: checked first on CUDA (a device-side assert would end the
        # process); on CPU torch's kernels (and einc's checks) refuse them, and the error
        # says which operand holds which index.
        shapes = tuple(tuple(shape) for shape, _ in key[0])
        sizes = self._index_sizes(shapes, [dtype for _, dtype in key[0]])
        # (Not under torch.func transforms or torch.compile: no branch on data there.)
        checked = () if key[1] else tuple(sizes)

        def guarded(*tensors: torch.Tensor) -> torch.Tensor:
            if any([tensors[p].is_cuda for p in checked]) and not torch.compiler.is_compiling():
                self._check_indices(sizes, tensors)
            try:
                return entry.fn(*tensors)
            except (IndexError, RuntimeError, torch.jit.Error):
                try:
                    self._check_indices(sizes, tensors)
                except (RuntimeError, TypeError):  # (vmap's tensors take no bool())
                    pass
                raise

        return _Compiled(guarded, entry.folded)

    def _check_indices(self, sizes: Mapping[int, int], tensors: Sequence[torch.Tensor]) -> None:
        """:class:`EincError` where a gather's index is outside its axis: which operand,
        axis and value (indices are in ``[0, n)``; negative ones do not count from the end)."""
        for position, n in sizes.items():
            index, axis = tensors[position], self._indices[position][0]
            wrong = (index < 0) | (index >= n)
            if bool(wrong.any()):
                raise EincError(f"pattern {self.pattern!r}: operand {position} indexes {show_axis(axis, noun=True)} "
                                f"of size {n} but holds the index {int(index[wrong].flatten()[0])} (indices are in "
                                f"[0, {n}); negative ones are not counted from the end)") from None

    def _index_sizes(self, shapes: tuple[tuple[int, ...], ...], given: Sequence[torch.dtype]) -> dict[int, int]:
        """The size of the axis each index operand indexes, for a call of ``shapes``
        (worked out once per signature: a distributed call asks on every call)."""
        return self._index_lookup(shapes, tuple(given))

    def _indexed_sizes(self, shapes: tuple[tuple[int, ...], ...], given: tuple[torch.dtype, ...]) -> dict[int, int]:
        types = self._dtypes(list(given), shapes)
        program = self._plan_lookup(shapes, None, self._common(types).is_floating_point)
        sizes = {level.ir: dict(level.sizes) for level in program.programs()}
        return {position: sizes[level][axis] for position, (axis, level) in self._indices.items()}

    def _entry_for(self, key: tuple[tuple[tuple[torch.Size, torch.dtype], ...], bool, int]) -> _Compiled:
        signature, transformed, _ = key
        for index, (_, dtype) in enumerate(signature):
            if not isinstance(dtype, torch.dtype):
                raise EincError(f"pattern {self.pattern!r}: operand {index} is not a torch.Tensor")
        shapes = tuple(tuple(shape) for shape, _ in signature)
        types = self._dtypes([dtype for _, dtype in signature], shapes)
        # Under a memory limit each signature is planned (and sliced where it must be).
        limited = self.options.limit[0] is not None or settings.limit[0] is not None
        try:
            if self._shares and not limited and self._lookup.cache_info().currsize:
                return self._shared(shapes, types, transformed)
            # The first signature compiles its own code at once: an expression called
            # with one shape never pays for generic code.
            return self._literal(shapes, types, transformed)
        except MemoryLimitError:
            if not self.options.slice:
                raise
            runner, inner, _ = self._slicing(shapes, types, transformed)
            slicing.warn_if_small(runner.slicing, f"pattern {self.pattern!r} with shapes {_format_shapes(shapes)}")
            return _Compiled(lambda *tensors: slicing.run(runner, inner, tensors))

    def _slicing(self, shapes: tuple[tuple[int, ...], ...], types: list[torch.dtype], transformed: bool
                 ) -> tuple[slicing.Sliced, Expression, Program]:
        """How a signature over the memory limit runs in slices: the runner, the
        expression that computes one slice, and the plan of a full slice."""
        common = self._common(types)
        limit = element_limit([self.options.limit, settings.limit], common.itemsize)
        assert limit is not None
        try:
            if transformed:
                raise MemoryLimitError("sliced execution does not run under torch.func transforms")
            if self._constants:
                raise MemoryLimitError("sliced execution does not take constants")
            if self.options.dropout:
                # Backward recomputes each slice: it would draw other dropout masks.
                raise MemoryLimitError("sliced execution does not take dropout")
            full = self._plan_lookup(shapes, None, common.is_floating_point)
            # The output is allocated whole: it must fit (the planner's message names it).
            check_output(full.output_axes, dict(full.sizes), limit)
            inner = self._inner()
            leaves = full.leaf_dims()

            def cut(chunks: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
                return _narrowed(leaves, shapes, chunks)

            def plan_at(chunks: Mapping[str, int]) -> Program | None:
                try:
                    return inner._plan_for(cut(chunks), common)
                except MemoryLimitError:
                    return None

            def peak_at(chunks: Mapping[str, int]) -> int:
                # Unfused: the limit holds for the intermediates a fused kernel replaces.
                return slicing.largest_intermediate(inner._plan_lookup(cut(chunks), None, False))

            keys = slicing.visible(full, self.sizes)
            candidates = slicing.roles(full, self.sizes, keys)
            if keys is not None and keys.query not in candidates:
                keys = None
            chosen = None
            if self.options.optimize == "cotengra":
                chosen = slicing.choose_with_cotengra(full, candidates, limit, plan_at)
            if chosen is None:
                chosen = slicing.choose(full, candidates, plan_at, peak_at, keys)
        except MemoryLimitError as err:
            message = str(err) if str(err).startswith("memory_limit=") else \
                f"memory_limit={limit:,} elements is too small: {err}"
            raise self._context(shapes, MemoryLimitError(message)) from None
        chunks = {axis.name: axis.chunk for axis in chosen.axes}
        follows = chosen.visible
        if follows is not None:
            chunks = follows.follow(chunks)
        part = any(axis.role in ir.NORMALIZERS for axis in chosen.axes)
        if part or follows is not None:
            # A slice of queries and the keys they see: its causality aligned to the lower right.
            inner = self._inner(None if follows is None else slicing.lower_right(self.ir), part=part)
        chunk = plan_at(chunks)  # (by the slices' own expression, whose code explain shows)
        assert chunk is not None
        try:
            return slicing.sliced(full, chosen, self._inner), inner, chunk
        except MemoryLimitError as err:
            raise self._context(shapes, MemoryLimitError(f"memory_limit={limit:,} elements is too small: {err}")
                                ) from None

    def _inner(self, pattern: ir.Pattern | None = None, slice: bool = False, part: bool = False  # noqa: A002
               ) -> Expression:
        """This pattern (or ``pattern``, one derived from it) with the same options but
        on one process and, by default, ``slice=False``: it computes one slice; with
        ``part``, a part of a normalizer's own axis (rows all -inf in it give zeros)."""
        pattern = self.ir if pattern is None else pattern
        inner = Expression.__new__(Expression)
        own = {name: n for name, n in self.sizes.items() if name in pattern.all_axes}
        options = dataclasses.replace(self.options, slice=slice and self.options.slice, distributed=False,
                                      shard_output=False, part=part)
        inner._setup(pattern.render(), options, None, own, parsed=pattern)
        return inner

    def _literal(self, shapes: tuple[tuple[int, ...], ...], types: list[torch.dtype], transformed: bool
                 ) -> _Compiled:
        """The signature's own code: planned for its sizes, which are literals in it."""
        program = self._plan_for(shapes, self._common(types), transformed=transformed)
        try:
            code = generate(program, types, safe=transformed, part=self.options.part, dropout=self.options.dropout)
        except EincError as err:
            raise self._context(shapes, err) from None
        fn, folding = compiled(self.options.backend, code)
        folded: tuple[torch.Tensor, ...] = ()
        if folding is not None:
            # Folded once: constants are data, not parameters (no autograd through them).
            with torch.no_grad():
                folded = tuple(folding(*(t for _, t in self._constants)))
        return _Compiled(fn, folded)

    def _generic(self, shapes: tuple[tuple[int, ...], ...], merged: tuple[tuple[int, ...], ...],
                 types: list[torch.dtype], transformed: bool) -> tuple[Callable[..., torch.Tensor], list[str]]:
        """Shape-generic code planned for ``merged`` (``shapes`` with '...' merged into one
        dimension, as generic code takes it) and its messages: generated once per plan
        structure (:meth:`Program.structure`), compiled once per source text
        (:func:`einc.backends.compiled`).  A fixed path is not planned again."""
        common = self._common(types)
        key: tuple[Any, ...] = (tuple(types), transformed, settings.version)
        program = None
        if not self._fixed_path:
            program = self._plan_for(merged, common, transformed=transformed)
            key += (program.structure(),)
        hit = self._generics.get(key)
        if hit is not None:
            return hit
        try:
            if program is None:
                program = self._plan_for(merged, common, transformed=transformed)
            code = generate(program, types, generic=True, safe=transformed, part=self.options.part,
                            dropout=self.options.dropout, context=f"pattern {self.pattern!r}",
                            limits=(self.options.limit, settings.limit))
        except EincError as err:
            raise self._context(shapes, err) from None
        if len(self._generics) >= self._cache_size:
            self._generics.clear()
        return self._generics.setdefault(key, (compiled(self.options.backend, code).main, list(code.messages)))

    def _shared(self, shapes: tuple[tuple[int, ...], ...], types: list[torch.dtype], transformed: bool
                ) -> _Compiled:
        """A new signature's entry: shared generic code for its first :data:`GENERIC_CALLS`
        calls, then its own literal code."""
        if len(shapes) != self.ir.leaves:
            return self._literal(shapes, types, transformed)  # which raises the planner's message
        try:
            merged = merge_ellipsis(self.ir, shapes)
        except EincError:
            # '...' that broadcasts (size 1, or ranks that differ) takes literal code.
            return self._literal(shapes, types, transformed)
        generic = self._generic(shapes, merged, types, transformed)
        fn, messages = generic
        calls = 0

        def first_calls(*tensors: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls <= GENERIC_CALLS:
                try:
                    return fn(*tensors, messages)
                except (torch.jit.Error, RuntimeError, ValueError, IndexError, TypeError):  # EincError: a ValueError
                    # A fixed path's signature was not planned: the planner's message
                    # names operands and shapes.  What it lets through, the literal code
                    # runs (or raises) as it always does.
                    self._plan_for(shapes, self._common(types))
            entry.fn = self._literal(shapes, types, transformed).fn
            return entry.fn(*tensors)

        entry = _Compiled(first_calls)
        return entry

    def _entry(self, tensors: Sequence[torch.Tensor]) -> _Compiled:
        try:
            return self._lookup((tuple(map(_signature, tensors)), transformed(), settings.version))
        except (AttributeError, EincError):
            # Tensor-likes (numpy arrays) get this far; name the culprit's type.
            bad = next((i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)), None)
            if bad is None:
                raise
            raise EincError(
                f"pattern {self.pattern!r}: operand {bad} is a {type(tensors[bad]).__name__}, not a torch.Tensor"
            ) from None

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        """What a call checks, and raises, before it computes anything."""
        self._entry(tensors)
        shapes = tuple(tuple(t.shape) for t in tensors)
        try:
            self._plan_for(shapes, self._common(self._dtypes([t.dtype for t in tensors], shapes)))
        except MemoryLimitError:
            if not self.options.slice:
                raise  # else the entry was made: it runs in slices

    # ------------------------------------------------------------------ calls

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self._distributed:
            return self._distribute(tensors)
        entry = self._entry(tensors)
        return entry.fn(*tensors, *entry.folded)

    # ------------------------------------------------------------ distributed

    def _local(self, part: bool = False) -> Expression:
        """What a rank computes its part with: this expression on one process (in slices
        under the memory limit); ``part`` for a share of a normalizer's own axis."""
        if self._local_expressions.get(part) is None:
            self._local_expressions[part] = self._inner(slice=True, part=part)
        return self._local_expressions[part]

    def _distribute(self, tensors: Sequence[Any]) -> Any:
        option = self.options.distributed
        world = distributed.world_of(option)
        if world == 1 and not self.options.shard_output and not any(map(distributed.is_dtensor, tensors)):
            return self._local()(*tensors)
        group = distributed.group_of(option)
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
        distributed.check_device(device, group)
        failure: EincError | None = None
        try:
            placed = distributed.placements(tensors)
            key = (tuple(map(_signature, tensors)), placed, device.type, world)
            if self._indices and placed is None:
                # The whole (replicated) indices, checked by every rank first: a bad one
                # in one rank's part would leave the others waiting in a collective.
                shapes = tuple(tuple(t.shape) for t in tensors)
                self._check_indices(self._index_sizes(shapes, [t.dtype for t in tensors]), tensors)
            description = self._call_description(tensors, placed, device)
        except (EincError, AttributeError) as err:
            # Not this rank alone: every rank takes part in the check, then raises.
            failure = err if isinstance(err, EincError) else EincError(
                f"pattern {self.pattern!r}: every operand must be a torch.Tensor ({err})")
            description = f"an invalid call of pattern {self.pattern!r}: {failure}"
        if world > 1:
            distributed.check_agreement(description, device, group)
        if failure is not None:
            raise failure
        return self._runners(key)(tensors)

    def _call_description(self, tensors: Sequence[Any], placed: distributed.Placed | None, device: torch.device
                          ) -> str:
        """What ranks must agree on: pattern, options, shapes, dtypes, placements, device,
        and what decides the collectives autograd adds (grad mode, requires_grad)."""
        if self._agreement is None:
            # The options without the group object (its address differs between processes).
            self._agreement = f"pattern {self.pattern!r} ({dataclasses.replace(self.options, distributed=True)})"
        shapes = _format_shapes([tuple(t.shape) for t in tensors])
        dtypes_ = ", ".join(str(t.dtype).removeprefix("torch.") for t in tensors)
        where = f", placements {placed}" if placed is not None else ""
        grads = "".join("1" if t.requires_grad else "0" for t in tensors)
        return (f"{self._agreement} with shapes {shapes}, dtypes {dtypes_}{where} on {device.type}, "
                f"grad mode {torch.is_grad_enabled()}, requires_grad {grads}")

    def _runner(self, key: tuple[Any, ...]) -> distributed.Runner:
        signature, placed, device, world = key
        shapes = tuple(tuple(shape) for shape, _ in signature)
        types = self._dtypes([dtype for _, dtype in signature], shapes)
        group = distributed.group_of(self.options.distributed)
        plan, places, output_dim, norm, kinds = self._distribution(shapes, types, world, placed)
        mesh = None
        if plan.sharded or placed is not None:
            mesh = placed.mesh if placed is not None else distributed.mesh_of(group, device)
        local = self._local(plan.role in ir.NORMALIZERS)
        return distributed.Runner(plan, local, places, output_dim, dist.get_rank(group), group, norm, mesh, kinds)

    def _distribution(self, shapes: tuple[tuple[int, ...], ...], types: list[torch.dtype], world: int,
                      placed: distributed.Placed | None = None
                      ) -> tuple[distributed.Distribution, tuple[tuple[int, int], ...], int | None,
                                 slicing.Normalized | None, tuple[str, ...] | None]:
        """How a signature is spread over ``world`` ranks: the plan, where the split axis
        sits in the operands and the result, a nested normalizer's log-normalizer, and
        for DTensor operands how each becomes local (:meth:`einc.distributed.Placed.kinds`)."""
        common = self._common(types)
        local = self._local()
        try:
            full = self._plan_lookup(shapes, None, common.is_floating_point)
            leaves = full.leaf_dims()
            sizes = dict(full.sizes) | {a: n for level in full.programs() for a, n in level.sizes}
            candidates = slicing.roles(full, self.sizes)
            output = math.prod(full.output_shape)

            def cut(axis: str, length: int) -> tuple[tuple[int, ...], ...]:
                return _narrowed(leaves, shapes, {axis: length})

            def volume(axis: str, role: str, chunk: int, sharded: bool) -> tuple[distributed.Collective, ...]:
                return distributed.collectives(
                    role, output=output, factor=distributed.factor_elements(full, role),
                    gathered=world * chunk * output // max(1, sizes[axis]), dtype=common,
                    inputs=[(math.prod(s), t) for s, t in zip(shapes, types)], sharded=sharded,
                    dtensor=placed is not None, world=world)

            def cost_at(axis: str, chunk: int) -> tuple[int, int]:
                part = local._plan_lookup(cut(axis, chunk), None, common.is_floating_point)
                role = candidates[axis]
                moved = volume(axis, role, chunk, self.options.shard_output)
                return (slicing.part_flops(part, role in ir.NORMALIZERS),
                        sum(c.elements for c in moved if c.when == "forward"))

            kinds = None
            if placed is not None:
                chosen = placed.split(leaves, candidates, sizes, world)
                kinds = placed.kinds(leaves, None if chosen is None else chosen[0])
            else:
                chosen = distributed.choose(candidates, sizes, world, cost_at, self.options.shard_output)
                if chosen is None and self.options.shard_output:
                    raise EincError("shard_output=True: no output axis can be split over the ranks "
                                    f"(axes that can: {', '.join(candidates) or 'none'})")
            # One rank checks nothing (and communicates nothing).
            check = distributed.Collective("all_gather", "fingerprint", world if world > 1 else 0, 8)
            if chosen is None:
                flops = slicing.flops_of(full)
                return (distributed.Distribution(world, None, "replicated", 0, 0, (flops,) * world, (1,) * world,
                                                 (), check), (), None, None, kinds)
            axis, chunk = chosen
            role = candidates[axis]
            sharded = role == "output" and (self.options.shard_output or placed is not None)
            plan = distributed.Distribution(world, axis, role, sizes[axis], chunk, (), (), (), check, sharded)
            per_rank = [self._part_cost(cut(axis, length), types, role) for _, length in plan.spans()]
            plan = dataclasses.replace(plan, flops=tuple(f for f, _ in per_rank), slices=tuple(n for _, n in per_rank),
                                       collectives=volume(axis, role, chunk, sharded))
        except EincError as err:
            raise self._context(shapes, err) from None
        # Where the axis sits in the operands and the result: slicing's rule, for one axis.
        parts = slicing.sliced(full, slicing.Slicing((slicing.SlicedAxis(axis, sizes[axis], chunk, role),),
                                                     0, 0, 0, output), lambda p: self._inner(p, slice=True))
        return plan, parts.places[0], parts.output_dims[0], parts.normalized, kinds

    def _part_cost(self, shapes: tuple[tuple[int, ...], ...], types: list[torch.dtype], role: str
                   ) -> tuple[int, int]:
        """(FLOPs, slices) of one rank's part, sliced where it is over the memory limit."""
        local = self._local()
        try:
            part = local._plan_for(shapes, self._common(types))
        except MemoryLimitError:
            if not self.options.slice:
                raise
            cut = local._slicing(shapes, types, False)[0].slicing
            return cut.flops, cut.slices
        return slicing.part_flops(part, role in ir.NORMALIZERS), 1

    def _shapes_and_dtype(self, tensors_or_shapes: Sequence[Any], dtype: torch.dtype | str | None
                          ) -> tuple[tuple[tuple[int, ...], ...], list[torch.dtype]]:
        shapes = tuple(_shape_of(x, i) for i, x in enumerate(tensors_or_shapes))
        masks, indices = self._masks, self._indices

        def default(i: int, dtype: torch.dtype) -> torch.dtype:
            return torch.bool if i in masks else torch.int64 if i in indices else dtype

        if dtype is not None:
            given = [default(i, dtypes.dtype_of(dtype)) for i in range(len(shapes))]
        else:
            given = [x.dtype if isinstance(x, torch.Tensor) else default(i, torch.float32)
                     for i, x in enumerate(tensors_or_shapes)]
        return shapes, self._dtypes(given, shapes)

    def explain(self, *tensors_or_shapes: torch.Tensor | Sequence[int], dtype: torch.dtype | str | None = None,
                world_size: int | None = None) -> Plan:
        """The contraction plan for these tensors (or shapes): path, steps, FLOPs, source.

        ``dtype`` (a torch dtype or its name; default: the tensors', else float32) sizes
        ``largest_intermediate_bytes`` and picks the code for half floats and integers.
        ``world_size`` (default: the group's, for a ``distributed`` expression) adds how
        a call is spread over that many ranks (``Plan.distribution``), without processes.

        >>> import einc
        >>> plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
        >>> plan.path
        [(0, 1), (0, 1)]
        >>> [step.kernel for step in plan.steps]
        ['mm', 'mm']
        >>> plan.largest_intermediate, plan.largest_intermediate_bytes  # the 8x64 output
        (512, 2048)
        """
        shapes, types = self._shapes_and_dtype(tensors_or_shapes, dtype)
        common = self._common(types)
        chosen = None
        spread = None
        if world_size is not None:
            if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
                raise EincError(f"world_size must be a positive int, not {world_size!r}")
            world = world_size
        elif self._distributed:
            world = distributed.world_of(self.options.distributed)
        if world_size is not None or self._distributed:
            # DTensor operands bring their split (the call's, not a chosen one).
            spread = self._distribution(shapes, types, world, distributed.placements(tensors_or_shapes))[0]
        try:
            program = self._plan_for(shapes, common)
        except MemoryLimitError:
            if not self.options.slice:
                raise
            runner, _, program = self._slicing(shapes, types, False)
            chosen = runner.slicing
        try:
            code = generate(program, types, dropout=self.options.dropout)
        except EincError as err:
            raise self._context(shapes, err) from None
        return describe(program, code, pattern=self.pattern, dtype=common,
                        shapes=self._with_constants(shapes, lambda t: tuple(t.shape)),
                        constants=sorted(self._constant_positions), slicing=chosen, distribution=spread,
                        not_fused=self._not_fused(common))

    def _not_fused(self, dtype: torch.dtype) -> str:
        """Why no SDPA call computes this pattern's attention-like level (``explain``)."""
        if not fusions(self.ir) and not refusal(self.ir):
            return ""
        if not self.options.fuse:
            return "fuse=False"
        if fusions(self.ir):
            return ("the tensors are not floating point" if not dtype.is_floating_point else
                    "an axis is empty")
        return refusal(self.ir)

    def module(self, *tensors_or_shapes: torch.Tensor | Sequence[int], dtype: torch.dtype | str | None = None
               ) -> torch.nn.Module:
        """A ``torch.nn.Module`` computing this pattern for any shapes.

        Its code reads sizes from the inputs' shapes at run time (sizes given by keyword
        stay fixed) and checks them as a call of the expression does (ranks, one name
        one size, compositions, the memory limits in effect now), raising
        :class:`EincError`; ``...`` may stand for any number of dimensions, the same in
        every operand.  One module serves every batch size and sequence length: it
        works eagerly, under ``torch.jit.script`` and under
        ``torch.compile(fullgraph=True)``, and pickles (it is generated again on load).
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
        if self._distributed:
            raise EincError(f"pattern {self.pattern!r}: module() runs on one process; call the distributed "
                            "expression itself")
        shapes, types = self._shapes_and_dtype(tensors_or_shapes, dtype)
        return self._module(shapes, types, settings.limit)

    def _module(self, shapes: tuple[tuple[int, ...], ...], types: Sequence[torch.dtype],
                process_limit: tuple[int | None, bool]) -> torch.nn.Module:
        try:
            # Generic code merges '...' into one dimension: plan it so.
            merged = merge_ellipsis(self.ir, shapes)
        except EincError as err:
            raise self._context(shapes, err) from None
        common = self._common(types)
        code = generate(self._plan_for(merged, common, process_limit), types, generic=True, module=True,
                        dropout=self.options.dropout,
                        context=f"pattern {self.pattern!r}", limits=(self.options.limit, process_limit))
        recipe = (self.pattern, self.options, self.sizes, shapes, common, process_limit)
        return instantiate(code, (_restore_module, recipe))

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
        self._check(tensors)  # the same checks (and errors) as a call
        given = self._with_constants(tensors, lambda t: t)
        kept = self._kept  # masks stay bool, indices integers
        common = self._common([t.dtype for t in given]) if given else torch.float64
        given = [t if i in kept else t.to(common) for i, t in enumerate(given)]
        if widen:
            given = [t if i in kept else to_wide(t) for i, t in enumerate(given)]
        if absolute and self.ir.op in (None, "sum", "mean"):
            return reference(self.ir, given, self.sizes, absolute=True)
        result = reference(self.ir, given, self.sizes)
        return result.abs() if absolute else result

    def validate(
        self, *tensors: torch.Tensor, rtol: float | None = None, atol: float | None = None
    ) -> float:
        """Compare with a float64 :meth:`reference`; return the max abs error, raise on mismatch.

        The tolerance is per element: ``atol + rtol * bound``, where the bound of a sum of
        products is the contraction of absolute values (so cancellation in the reference
        does not cause false alarms) and otherwise the reference's magnitude.  Defaults
        follow the inputs' dtype (:func:`einc.reference.tolerance`).

        >>> import torch, einc
        >>> einc.compile("ij,jk->ik").validate(torch.randn(3, 4), torch.randn(4, 5)) < 1e-5
        True
        """
        if self.options.dropout:
            raise EincError(f"pattern {self.pattern!r}: validate compares with a deterministic reference, and "
                            f"dropout={self.options.dropout} makes the result random; validate an expression "
                            "compiled with dropout=0.0")
        result = self(*tensors)
        if distributed.is_dtensor(result):  # shard_output=True or DTensor operands
            result = result.full_tensor()
        # The reference takes the whole tensors of DTensor operands.
        tensors = tuple(t.full_tensor() if distributed.is_dtensor(t) else t for t in tensors)
        dtype = self._common([t.dtype for t in tensors]) if tensors else torch.float64
        try:
            return compare(result, self.reference(*tensors), self.reference(*tensors, absolute=True),
                           dtype, rtol=rtol, atol=atol)
        except EincError as err:
            raise EincError(f"pattern {self.pattern!r}: result {err}") from None


# ------------------------------------------------------------ module functions


def _reset_expression_cache(size: int) -> None:
    """``configure``'s hook: a cache of ``size`` expressions, none compiled under old settings."""
    global _cached
    if size != _cached.cache_info().maxsize:
        _cached = functools.lru_cache(maxsize=size)(_cached.__wrapped__)
    _cached.cache_clear()


@functools.lru_cache(maxsize=EXPRESSION_CACHE_SIZE)
def _cached(pattern: str, options: Options, sizes: tuple[tuple[str, type, int], ...]) -> Expression:
    return _restore(pattern, options, None, {name: value for name, _, value in sizes})


settings.on_change.append(_reset_expression_cache)


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
    slice: bool = True,  # noqa: A002 - the option's name
    distributed: Any = False,
    shard_output: bool = False,
    dropout: float = 0.0,
    **sizes: int,
) -> Expression:
    """Compile ``pattern`` into a callable :class:`Expression` (cached by pattern and options).

    Every option is checked here, at compile time.

    >>> import torch, einc
    >>> f = einc.compile("b q (h d), b k (h d) -> b h q k", h=4)
    >>> f(torch.randn(2, 8, 64), torch.randn(2, 6, 64)).shape
    torch.Size([2, 4, 8, 6])
    """
    options = _options(pattern, backend=backend, optimize=optimize, notation=notation, memory_limit=memory_limit,
                       fuse=fuse, slice=slice, distributed=distributed, shard_output=shard_output, dropout=dropout)
    if constants is not None:
        # Tensors key a cache by identity only: an expression with constants is the caller's to keep.
        return _restore(pattern, options, constants, sizes)
    try:
        # Sizes keyed with their types: the cache would take 2.0 for 2 and True for 1,
        # which the expression (made on a miss) refuses.
        return _cached(pattern, options, tuple(sorted((name, type(n), n) for name, n in sizes.items())))
    except TypeError:  # an unhashable PathOptimizer, pattern or size: nothing to cache by
        return _restore(pattern, options, None, sizes)


def einsum(pattern: str, /, *tensors: torch.Tensor, **sizes: int) -> torch.Tensor:
    """Evaluate ``pattern`` on ``tensors``; the compiled expression is cached.

    >>> import torch, einc
    >>> einc.einsum("ij,jk->ik", torch.ones(2, 3), torch.ones(3, 4))[0, 0].item()
    3.0
    """
    return compile(pattern, **sizes)(*tensors)
