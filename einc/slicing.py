"""Memory-bounded execution: a pattern whose plan does not fit ``memory_limit`` runs in slices.

When the unsliced plan has an intermediate over the limit, :func:`choose` picks axes
and chunk sizes (chunks of an axis, not only single index values; the last chunk may
be shorter) such that the plan of one slice, planned again for the slice's sizes with
einc's own strategy, fits; it minimizes the total FLOPs over all slices, then the
number of slices.  :class:`Sliced` runs the slices on ``narrow`` views of the inputs
(no copies) and combines them by each sliced axis' role:

- an axis of the output: each slice writes its part of a preallocated output;
- an axis the pattern reduces: ``sum`` accumulates, ``mean`` accumulates each slice's
  mean weighted by its share, ``max``/``min`` keep running values, ``logsumexp`` (and
  the log semiring) merges with ``logaddexp`` — as stable as one pass;
- the queries of a causal (or windowed) softmax that the top level sums over its keys:
  an output axis as any, each slice taking only the keys its queries see
  (:class:`Visible`) — blocks above the diagonal are never computed;
- the normalized axis of a nested softmax that the top level sums over (attention's
  keys): flash attention's recurrence, each slice rescaled by its log-normalizer's
  share of the running one; of a nested log_softmax (soft-label cross-entropy): each
  slice's log-probabilities corrected by (its log-normalizer - the running one) times
  the top level's contraction with ones (:class:`Normalized`).

Gradients go through :class:`_SlicedFunction`, which saves only the inputs and the
result and recomputes each slice in backward, so backward stays within about the
gradient buffers plus a few budgets.  What cannot be sliced (see :func:`roles`) keeps
the refusal: axes inside compositions or ``...``, repeated in one operand, used by a
scale, sized by keyword, reduced inside a nested operation, or normalized (but for the
nested softmax/log_softmax cases above).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ir
from .errors import EincError, MemoryLimitError
from .planner import Program

__all__ = ["ROLE_OF_OP", "SlicedAxis", "Slicing", "Sliced", "SlicingWarning", "Visible", "choose",
           "choose_with_cotengra", "flops_of", "largest_intermediate", "logits_flops", "lower_right",
           "normalized_level", "part_flops", "roles", "run", "sliced", "visible", "warn_if_small"]

HALF = (torch.float16, torch.bfloat16)

ROLE_OF_OP: dict[str | None, str] = {None: "sum", "sum": "sum", "mean": "mean", "max": "max", "min": "min",
                                     "logsumexp": "logsumexp"}
"""How the slices of an axis the top level reduces combine, by the top level's operation."""

MAX_AXES = 2
"""Axes searched exhaustively: every single axis, then every pair."""

MANY_SLICES = 1024
SMALL_SLICE_FLOPS = 1_000_000
"""Over :data:`MANY_SLICES` slices averaging under :data:`SMALL_SLICE_FLOPS` FLOPs, the
per-slice cost in Python (narrowing, the call, combining: about 30 µs, and each step's
kernel launch) outweighs the work: :func:`warn_if_small` says so."""

MAX_GREEDY_AXES = 8
"""Beyond pairs (tensor networks), axes are added one at a time, each the one whose
single-index slices leave the smallest largest intermediate, up to this many."""


@dataclass(frozen=True, slots=True)
class SlicedAxis:
    name: str
    size: int
    chunk: int
    """Elements per slice (the last slice may have fewer)."""
    role: str
    """``"output"``, or how the top level reduces it (:data:`ROLE_OF_OP`)."""

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk)

    def spans(self, split: int = 1) -> list[tuple[int, int]]:
        """(start, length) of each slice; ``split`` divides the chunk (backward's finer slices)."""
        chunk = max(1, -(-self.chunk // split))
        return [(start, min(chunk, self.size - start)) for start in range(0, self.size, chunk)]


@dataclass(frozen=True, slots=True)
class Visible:
    """Causal block skipping: the keys a slice of a causal (or windowed) softmax's queries
    see.  Query ``i`` sees key ``j`` where ``j <= i + offset`` (``offset`` 0 for upper-left
    causality, ``K - Q`` for lower-right) and, with a window, ``i + offset - j < window``.
    A slice of queries ``[s, s + n)`` takes the keys ``[max(0, s + offset - window + 1),
    s + n + offset)``; on that range its queries are the last ``n`` of the keys'
    positions shifted by the range's start, i.e. ``causal_lower_right`` holds it exactly
    (:func:`lower_right`).  Keys past every query's range are never computed."""

    query: str
    key: str
    queries: int
    keys: int
    """The queries' and the keys' axis lengths."""
    offset: int
    window: int | None = None

    def span(self, start: int, length: int) -> tuple[int, int]:
        """(first key, count) that queries ``[start, start + length)`` see (count 0: none)."""
        end = min(self.keys, max(0, start + length + self.offset))
        first = 0 if self.window is None else min(end, max(0, start + self.offset - self.window + 1))
        return first, end - first

    def longest(self, chunk: int) -> int:
        """The most keys any slice of ``chunk`` queries sees."""
        return max(self.span(start, min(chunk, self.queries - start))[1] for start in range(0, self.queries, chunk))

    def follow(self, chunks: Mapping[str, int]) -> dict[str, int]:
        """``chunks`` (axis -> chunk size) with the keys' chunk where the queries are cut:
        the most keys a slice of them sees (a plan of that slice holds every slice)."""
        if self.query in chunks and self.key not in chunks:
            return dict(chunks) | {self.key: self.longest(chunks[self.query])}
        return dict(chunks)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "key": self.key, "offset": self.offset, "window": self.window}


@dataclass(frozen=True, slots=True)
class Slicing:
    """How a pattern is sliced for a budget, and what it costs (``Plan.slicing``)."""

    axes: tuple[SlicedAxis, ...]
    flops: int
    """All slices' FLOPs together."""
    unsliced_flops: int
    largest_intermediate: int
    """Elements of the largest intermediate of one slice."""
    output: int
    """Elements of the (preallocated) output."""
    visible: Visible | None = None
    """Where a causal softmax's queries are sliced: the keys each slice takes."""

    @property
    def slices(self) -> int:
        return math.prod(axis.count for axis in self.axes)

    @property
    def overhead(self) -> float:
        """All slices' FLOPs over the unsliced plan's."""
        return self.flops / max(1, self.unsliced_flops)

    def peak(self, itemsize: int) -> int:
        """Estimated peak extra bytes: one slice's largest intermediate, its result, the
        output and, where slices are reduced, a running value of the output's size (two
        for a log_softmax cut along its axis: also the contraction with ones)."""
        reduced = any(axis.role != "output" for axis in self.axes)
        ones = any(axis.role == "log_softmax" for axis in self.axes)
        return (self.largest_intermediate + self.output * (2 + reduced + ones)) * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [{"name": a.name, "size": a.size, "chunk": a.chunk, "slices": a.count, "role": a.role}
                         for a in self.axes],
                "slices": self.slices, "flops": self.flops, "overhead": self.overhead,
                "largest_intermediate": self.largest_intermediate,
                "keys_follow": None if self.visible is None else self.visible.to_dict()}


def roles(program: Program, keyword: Mapping[str, int], visible: Visible | None = None) -> dict[str, str]:
    """The axes a pattern can be sliced along, each with its role.

    An axis qualifies when it is a dimension of its own wherever it appears (not inside
    a composition or ``...``, not repeated in one operand), is not sized by keyword or
    used by a scale, is not normalized, is not one of a causality's or window's (but
    the queries of ``visible``, whose keys follow them), and no nested operation
    reduces it; the top level either keeps it (``"output"``) or reduces it by an
    operation whose slices combine (:data:`ROLE_OF_OP`; a scale then rules out
    non-linear ones).
    """
    top = program.ir
    leaves = program.leaf_dims()
    present = {a for dims in leaves for group in dims for a in group}
    allowed = set()
    for axis in present:
        if axis.startswith(ir.ELLIPSIS) or axis in keyword:
            continue
        if _own_dimension(axis, leaves):
            allowed.add(axis)
    for level in program.programs():
        allowed -= {f.value for f in level.ir.scale if isinstance(f.value, str)}
        # Causality and windows count positions: a part of those axes would misalign
        # them, but for queries whose keys follow (Visible).
        allowed -= {a for m in level.ir.modifiers if not m.tensor for a in m.axes} - \
            ({visible.query} if visible is not None else set())
        allowed -= set(level.ir.normalized)
        if level is not program:
            allowed -= set(level.reduced)
    output = [tuple(g) for g in program.output_dims]
    found: dict[str, str] = {}
    normalized = normalized_level(program)
    scaled = {f.value for level in program.programs() for f in level.ir.scale if isinstance(f.value, str)}
    if normalized is not None:
        axis, _, level = normalized
        if axis not in keyword and axis not in scaled and _own_dimension(axis, leaves):
            found[axis] = str(level.ir.op)  # "softmax" or "log_softmax"
    for axis in sorted(allowed):
        if any(axis in g for g in output):
            if (axis,) in output:
                found[axis] = "output"
        elif top.op in ROLE_OF_OP and (top.op in (None, "sum", "mean") or not top.scale):
            found[axis] = ROLE_OF_OP[top.op]
    return found


def _own_dimension(axis: str, leaves: Sequence[Sequence[tuple[str, ...]]]) -> bool:
    """Whether ``axis`` is a dimension of its own in every tensor that has it (not in a
    composition, not repeated): a slice of it is a ``narrow`` of those tensors."""
    return all((axis,) in dims and sum(axis in g for g in dims) == 1 for dims in leaves if any(axis in g for g in dims))


def warn_if_small(slicing: Slicing, context: str) -> None:
    """A warning where per-slice overhead dominates (a larger budget takes fewer slices)."""
    if slicing.slices > MANY_SLICES and slicing.flops < SMALL_SLICE_FLOPS * slicing.slices:
        warnings.warn(f"{context}: {slicing.slices:,} slices of about {slicing.flops // slicing.slices:,} FLOPs "
                      "each: the per-slice overhead (tens of microseconds) will dominate; a larger "
                      "memory_limit takes fewer slices", SlicingWarning, stacklevel=4)


class SlicingWarning(UserWarning):
    """A sliced plan whose per-slice overhead will outweigh its work."""


def normalized_level(program: Program) -> tuple[str, int, Program] | None:
    """(axis, position, level) of a nested softmax or log_softmax that slices along its
    normalized axis (:class:`Normalized`): the top level a plain sum of products reducing
    that axis, the softmax over plain operands and one axis of its own dimension, and
    every other axis of its output an axis of the top output, also of its own dimension.
    ``None`` where the pattern has no such level."""
    top = program.ir
    if top.op not in (None, "sum"):
        return None
    output = [tuple(g) for g in program.output_dims]
    for position, level in program.nested:
        pattern = level.ir
        if pattern.op not in ir.NORMALIZERS or len(pattern.normalized) != 1 or pattern.nested or pattern.modifiers:
            continue  # (a masked softmax's log-normalizer is not yet computed per part)
        (axis,) = pattern.normalized
        kept = [tuple(g) for g in level.output_dims]
        others = [p for pos, p in program.nested if pos != position for p in p.programs()]
        # '...' may broadcast between operands: its log-normalizer would not line up.
        if ((axis,) in kept and axis not in program.output_axes
                and all(len(g) == 1 and g in output and not g[0].startswith(ir.ELLIPSIS)
                        for g in kept if g != (axis,))
                and not any(axis in p.ir.all_axes for p in others)):
            return axis, position, level
    return None


def visible(program: Program, keyword: Mapping[str, int]) -> Visible | None:
    """The keys that follow a slice of a causal (or windowed) softmax's queries, where
    slicing the queries can narrow them (:class:`Visible`): the top level a plain sum of
    products that reduces the keys, the causality in a softmax nested directly under it
    (a log_softmax's masked -inf entries would reach the top level), the keys a
    dimension of their own everywhere, in no other nested operation, no scale and no
    keyword.  Upper-left causality with more queries than keys (the last queries see
    every key, which no narrowed range aligns) is not.  ``None`` otherwise."""
    top = program.ir
    placed = [(position, level) for position, level in program.nested
              if any(not m.tensor for p in level.programs() for m in p.ir.modifiers)]
    if top.op not in (None, "sum") or len(placed) != 1:
        return None
    position, level = placed[0]
    modifiers = [m for m in level.ir.modifiers if not m.tensor]
    if level.ir.op != "softmax" or level.nested or not modifiers or len({m.axes for m in modifiers}) != 1:
        return None
    query, key = modifiers[0].axes
    others = [p for pos, p in program.nested if pos != position for p in p.programs()]
    scaled = {f.value for p in program.programs() for f in p.ir.scale if isinstance(f.value, str)}
    if (key in program.output_axes or key in keyword or key in scaled or any(key in p.ir.all_axes for p in others)
            or not _own_dimension(key, program.leaf_dims())):
        return None
    sizes = dict(level.sizes)
    queries, keys = sizes[query], sizes[key]
    offset = keys - queries if any(m.kind == "causal_lower_right" for m in modifiers) else 0
    if queries + offset > keys:
        return None
    window = next((m.size for m in modifiers if m.kind == "window"), None)
    return Visible(query, key, queries, keys, offset, window)


def lower_right(pattern: ir.Pattern) -> ir.Pattern:
    """``pattern`` with its causality (and a window's alignment) lower right: how a slice
    of :class:`Visible` queries and the keys they see is computed."""
    inputs = tuple(lower_right(x) if isinstance(x, ir.Pattern) else x for x in pattern.inputs)
    placed = [m for m in pattern.modifiers if not m.tensor]
    modifiers = tuple(ir.Modifier("causal_lower_right", m.axes) if m.kind == "causal" else m
                      for m in pattern.modifiers)
    if placed and not any(m.kind.startswith("causal") for m in placed):
        modifiers += (ir.Modifier("causal_lower_right", placed[0].axes),)  # a window alone is causal too
    return dataclasses.replace(pattern, inputs=inputs, modifiers=modifiers)


def choose(program: Program, candidates: Mapping[str, str], plan_at: Callable[[Mapping[str, int]], Program | None],
           peak_at: Callable[[Mapping[str, int]], int], keys: Visible | None = None) -> Slicing:
    """The slicing of ``program`` (planned without a limit) whose slices fit: the least
    total FLOPs, then the fewest slices, over every single axis and pair of axes; then
    (tensor networks) axes added greedily.  ``plan_at(chunks)`` plans one slice (axis ->
    chunk size) under the limit, or gives ``None`` where it does not fit; ``peak_at``
    gives a slice's largest intermediate without the limit; ``keys``, where the
    queries of a causal softmax are a candidate, the keys that follow them (a slice of
    queries is planned with the most keys any slice of its length sees).  Raises
    :class:`MemoryLimitError` when nothing fits."""
    sizes = dict(program.sizes) | {a: n for level in program.programs() for a, n in level.sizes}
    if keys is not None:
        plan_at = (lambda f, follow: lambda chunks: f(follow(chunks)))(plan_at, keys.follow)
        peak_at = (lambda f, follow: lambda chunks: f(follow(chunks)))(peak_at, keys.follow)

    def made(found: tuple[tuple[SlicedAxis, ...], int, int]) -> Slicing:
        axes, flops, largest = found
        follows = keys if keys is not None and any(a.name == keys.query for a in axes) else None
        return Slicing(axes, flops, flops_of(program), largest, math.prod(program.output_shape), follows)
    names = [a for a in candidates if sizes.get(a, 0) > 1]
    leaves = program.leaf_dims()
    largest = {a: max(math.prod(sizes[x] for g in dims for x in g if not x.startswith(ir.ELLIPSIS))
                      for dims in leaves if any(a in g for g in dims)) for a in names}
    best: tuple[tuple[int, int, int, int], Slicing] | None = None
    for count in range(1, MAX_AXES + 1):
        for combo in itertools.combinations(names, count):
            found = _fit(combo, sizes, candidates, plan_at, keys=keys)
            if found is not None:
                slicing = made(found)
                # Ties go to output and reduced axes (a softmax's own axis costs its logits
                # twice), then to axes of the largest operand: backward writes its gradient
                # in disjoint slices instead of adding a whole one per slice.
                key = (slicing.flops, slicing.slices, sum(a.role in ir.NORMALIZERS for a in slicing.axes),
                       -max(largest[a] for a in combo))
                if best is None or key < best[0]:
                    best = (key, slicing)
        if best is not None:
            return best[1]
    chosen: list[str] = []
    while len(chosen) < min(MAX_GREEDY_AXES, len(names)):
        rest = [a for a in names if a not in chosen]
        chosen.append(min(rest, key=lambda a: peak_at(dict.fromkeys([*chosen, a], 1))))
        if len(chosen) > MAX_AXES and plan_at(dict.fromkeys(chosen, 1)) is not None:
            found = _fit(chosen, sizes, candidates, plan_at, split=False, keys=keys)
            assert found is not None
            return made(found)
    if not names:
        raise MemoryLimitError("no slicing fits it either (no axis can be sliced)")
    least = peak_at(dict.fromkeys(names, 1))
    raise MemoryLimitError(f"no slicing fits it either (tried the axes {', '.join(names)}; single index "
                           f"values of all of them still leave an intermediate of {least:,} elements)")


def choose_with_cotengra(program: Program, candidates: Mapping[str, str], limit: int,
                         plan_at: Callable[[Mapping[str, int]], Program | None]) -> Slicing | None:
    """``optimize="cotengra"``: the indices cotengra's hyper-optimizer slices to bring its
    largest intermediate under ``limit`` (``slicing_reconf_opts``: slicing interleaved with
    subtree reconfiguration), each in single index values but the last, whose chunk is
    then widened as far as it fits.  ``None`` where cotengra is missing, the pattern is
    nested, or it slices an axis einc cannot (the built-in slicer runs then)."""
    try:
        import cotengra
    except ImportError:
        return None
    leaves = program.leaf_dims()
    inputs = [tuple(a for group in dims for a in group) for dims in leaves]
    if program.nested or any(len(set(term)) != len(term) for term in inputs):
        return None
    sizes = dict(program.sizes)
    output = tuple(a for group in program.output_dims for a in group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # on its optional kahypar
        optimizer = cotengra.HyperOptimizer(max_repeats=32, parallel=False, progbar=False,
                                            slicing_reconf_opts={"target_size": limit})
        tree = optimizer.search(inputs, output, {a: sizes[a] for term in inputs for a in term})
    chosen = list(tree.sliced_inds)
    if not chosen or not set(chosen) <= set(candidates) or plan_at(dict.fromkeys(chosen, 1)) is None:
        return None
    found = _fit(chosen, sizes, candidates, plan_at, split=False)
    if found is None:  # pragma: no cover - single index values were just planned
        return None
    return Slicing(found[0], found[1], flops_of(program), found[2], math.prod(program.output_shape))


def logits_flops(program: Program) -> int:
    """What computing a sliced softmax's logits again costs: a contraction over the
    level's axes (counted as opt_einsum counts one pairwise product; a fused plan keeps
    the level's sizes but not its FLOPs)."""
    found = normalized_level(program)
    if found is None:  # pragma: no cover - only asked for a "softmax" slicing
        return 0
    return 2 * math.prod(n for _, n in found[2].sizes)


def flops_of(program: Program) -> int:
    """All levels' FLOPs of ``program`` (as opt_einsum counts them)."""
    return sum(level.flops for level in program.programs())


def part_flops(program: Program, normalized: bool) -> int:
    """FLOPs of a part (a slice, a rank's share) planned as ``program``; ``normalized``
    where it is cut along a nested normalizer's own axis, whose logits it computes again."""
    return flops_of(program) + (logits_flops(program) if normalized else 0)


def largest_intermediate(program: Program) -> int:
    """The largest intermediate of any level of ``program`` (elements)."""
    return max(level.largest_intermediate for level in program.programs())


def _fit(combo: Sequence[str], sizes: Mapping[str, int], candidates: Mapping[str, str],
         plan_at: Callable[[Mapping[str, int]], Program | None], split: bool = True, keys: Visible | None = None
         ) -> tuple[tuple[SlicedAxis, ...], int, int] | None:
    """Chunk sizes for ``combo``: the first axes split into powers of two (or, without
    ``split``, single index values), the last one's chunk the largest that fits (by
    bisection).  Returns (axes, total FLOPs, largest intermediate of a slice) or ``None``.
    Slices of ``keys``' queries count the FLOPs of the keys each sees."""
    if plan_at(dict.fromkeys(combo, 1)) is None:
        return None  # not even single index values fit
    *first, last = combo
    splits = [[2 ** p for p in range(0, max(1, sizes[a]).bit_length()) if 2 ** p <= sizes[a]] if split
              else [sizes[a]] for a in first]
    best = None
    for parts in itertools.product(*splits) if first else [()]:
        chunks = {a: -(-sizes[a] // p) for a, p in zip(first, parts)}
        low, high = 1, sizes[last]
        if plan_at(chunks | {last: low}) is None:
            continue
        while low < high:  # the largest chunk of `last` that fits
            middle = (low + high + 1) // 2
            if plan_at(chunks | {last: middle}) is not None:
                low = middle
            else:
                high = middle - 1
        chunks[last] = low
        axes = tuple(SlicedAxis(a, sizes[a], chunks[a], candidates[a]) for a in combo)
        total, largest = 0, 0
        # Each distinct slice shape once: full chunks and the shorter last ones.
        # Slicing a softmax's own axis computes its logits again, for the log-normalizer.
        again = any(axis.role in ir.NORMALIZERS for axis in axes)
        queries = next((axis for axis in axes if keys is not None and axis.name == keys.query), None)
        for lengths in itertools.product(*[_lengths(axis) for axis in axes]):
            chunks = dict(zip(combo, (n for n, _ in lengths)))
            count = math.prod(k for _, k in lengths)
            if queries is None or keys is None:
                program = plan_at(chunks)
                assert program is not None, "a shorter slice fits where a longer one does"
                total += part_flops(program, again) * count
            else:
                program, flops = _following(keys, queries, chunks, plan_at, again)
                total += flops * (count // _lengths_count(queries, chunks[queries.name]))
            largest = max(largest, largest_intermediate(program))
        key = (total, math.prod(axis.count for axis in axes))
        if best is None or key < best[0]:
            best = (key, (axes, total, largest))
    return None if best is None else best[1]


def _lengths(axis: SlicedAxis) -> list[tuple[int, int]]:
    """(slice length, how many slices have it)."""
    full, rest = divmod(axis.size, axis.chunk)
    return [(axis.chunk, full)] + ([(rest, 1)] if rest else [])


def _lengths_count(axis: SlicedAxis, length: int) -> int:
    return dict(_lengths(axis))[length]


def _following(keys: Visible, queries: SlicedAxis, chunks: Mapping[str, int],
               plan_at: Callable[[Mapping[str, int]], Program | None], again: bool) -> tuple[Program, int]:
    """The plan of the slices of ``queries`` of length ``chunks[queries]`` with the most
    keys, and the FLOPs of all those slices, each with the keys it sees: a slice's FLOPs
    are affine in its keys' length (each step either has the keys, once, or not), so
    two plans give them all."""
    length = chunks[queries.name]
    seen = [keys.span(start, length)[1] for start, n in queries.spans() if n == length]
    most = max(seen)
    program = plan_at(dict(chunks) | {keys.key: most})
    assert program is not None, "a shorter slice fits where a longer one does"
    flops = part_flops(program, again)
    slope = 0.0
    if most > 1:
        half = plan_at(dict(chunks) | {keys.key: most // 2})
        assert half is not None
        slope = (flops - part_flops(half, again)) / (most - most // 2)
    return program, sum(max(0, round(flops - slope * (most - n))) for n in seen)


# ------------------------------------------------------------------ running


@dataclass(frozen=True)
class Normalized:
    """What slicing a nested softmax along its normalized axis needs: each slice's
    log-normalizer (``fn`` on the nested level's tensors), and how a tensor over the
    softmax's other axes (``factor``) lines up with the result's dimensions."""

    fn: Callable[..., torch.Tensor]
    leaves: tuple[int, ...]
    """The nested level's tensors among the call's."""
    factor: tuple[str, ...]
    """The log-normalizer's axes, in its dimension order."""
    output: tuple[str, ...]
    """The result's axes, one per dimension."""
    axis: str = ""
    """The normalized axis."""
    kept: tuple[str, ...] = ()
    """The nested level's output axes, the normalized one included, in its dimension order."""
    ones: Callable[..., torch.Tensor] | None = None
    """For ``log_softmax``: the top level with the nested operand replaced by ones (on the
    call's tensors, the nested level's replaced by one tensor of ones)."""

    def ones_for(self, views: Sequence[torch.Tensor], lse: torch.Tensor, length: int) -> torch.Tensor:
        """The top level's contraction with the log_softmax replaced by ones, for a slice
        (``length`` entries of :attr:`axis`; ``lse`` gives the other sizes)."""
        assert self.ones is not None
        shape = [length if a == self.axis else lse.shape[self.factor.index(a)] for a in self.kept]
        first, last = self.leaves[0], self.leaves[-1] + 1
        filler = views[first].new_ones(()).expand(shape)
        return self.ones(*views[:first], filler, *views[last:])

    def to_output(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` (over :attr:`factor`) as a tensor that broadcasts over the result."""
        order = [self.factor.index(a) for a in self.output if a in self.factor]
        f = f.permute(order)
        shape = [f.shape[order.index(self.factor.index(a))] if a in self.factor else 1 for a in self.output]
        return f.reshape(shape)

    def to_factor(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (over :attr:`output`) summed over the axes not in :attr:`factor`."""
        rest = [d for d, a in enumerate(self.output) if a not in self.factor]
        x = x.sum(rest) if rest else x
        kept = [a for a in self.output if a in self.factor]
        return x.permute([kept.index(a) for a in self.factor])


@dataclass(frozen=True)
class Sliced:
    """Runs one input signature in slices: ``run(slice_fn, tensors)``."""

    slicing: Slicing
    places: tuple[tuple[tuple[int, int], ...], ...]
    """Per sliced axis: (tensor, dimension) of each operand that has it."""
    output_dims: tuple[int | None, ...]
    """Per sliced axis: its dimension in the result (``None`` for reduced axes)."""
    role: str
    """How reduced slices combine (``"output"`` when only output axes are sliced)."""
    normalized: Normalized | None = None
    """For ``"softmax"``/``"log_softmax"``: the nested normalizer's log-normalizer."""
    keys: tuple[tuple[int, int], ...] = ()
    """(tensor, dimension) of each operand that has the keys that follow sliced queries
    (``slicing.visible``)."""

    def slices(self, split: int = 1) -> list[tuple[tuple[int, int], ...]]:
        """Every slice's spans, one per sliced axis; ``split`` divides the last axis' chunk."""
        *first, last = self.slicing.axes
        return list(itertools.product(*[axis.spans() for axis in first], last.spans(split)))

    def cut(self, tensor: torch.Tensor, index: int, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Operand ``index`` (``tensor``, or its gradient buffer) narrowed to a slice."""
        for places, (start, length) in zip(self.places, spans):
            for where, dim in places:
                if where == index:
                    tensor = tensor.narrow(dim, start, length)
        visible = self.slicing.visible
        if visible is not None:
            first, count = visible.span(*self.span_of(spans, visible.query))
            for where, dim in self.keys:
                if where == index:
                    tensor = tensor.narrow(dim, first, count)
        return tensor

    def narrow(self, tensors: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        return [self.cut(tensor, index, spans) for index, tensor in enumerate(tensors)]

    def out_slice(self, result: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        for dim, (start, length) in zip(self.output_dims, spans):
            if dim is not None:
                result = result.narrow(dim, start, length)
        return result

    def factor_slice(self, factor: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The part of a log-normalizer (over ``normalized.factor``) an output slice covers."""
        assert self.normalized is not None
        for axis, (start, length) in zip(self.slicing.axes, spans):
            if axis.role == "output" and axis.name in self.normalized.factor:
                factor = factor.narrow(self.normalized.factor.index(axis.name), start, length)
        return factor

    def lse(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """A slice's log-normalizer; from half floats in float32 (a rounded one would
        weigh the slice by as much as 2**(1/256 * |logits|) wrong)."""
        assert self.normalized is not None
        picked = [views[i] for i in self.normalized.leaves]
        return self.normalized.fn(*[t.float() if t.dtype in HALF else t for t in picked])

    def weight(self, spans: Sequence[tuple[int, int]]) -> float:
        """A slice's share of the reduced elements (``mean``)."""
        return math.prod(length / axis.size for axis, (_, length) in zip(self.slicing.axes, spans)
                         if axis.role != "output")

    def span_of(self, spans: Sequence[tuple[int, int]], name: str) -> tuple[int, int]:
        return next(span for axis, span in zip(self.slicing.axes, spans) if axis.name == name)

    def forward(self, fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The result, and what backward needs besides: for ``max``/``min`` how many slices
        hold each entry's extremum; for a normalizer the log-normalizer over the whole
        axis (and for ``log_softmax`` the contraction with ones, summed over slices)."""
        result: torch.Tensor | None = None
        state: list[torch.Tensor] = []
        written: set[tuple[tuple[int, int], ...]] = set()
        norm = self.normalized
        for spans in self.slices():
            views = self.narrow(tensors, spans)
            part = fn(*views)
            if norm is not None:
                lse = self.lse(views)
            if result is None:
                shape = list(part.shape)
                for dim, axis in zip(self.output_dims, self.slicing.axes):
                    if dim is not None:
                        shape[dim] = axis.size
                # Half floats accumulate slices in float32, rounded once at the end.
                wide = self.role != "output" and part.dtype in HALF
                result = part.new_empty(shape, dtype=torch.float32 if wide else part.dtype)
                if self.role in ("max", "min"):
                    state.append(torch.zeros(shape, dtype=torch.int32, device=part.device))
                if norm is not None:
                    factor = list(lse.shape)
                    for axis in self.slicing.axes:
                        if axis.role == "output" and axis.name in norm.factor:
                            factor[norm.factor.index(axis.name)] = axis.size
                    state.append(lse.new_empty(factor, dtype=torch.float32 if lse.dtype in HALF else lse.dtype))
                if self.role == "log_softmax":
                    state.append(torch.zeros_like(result))
            target = self.out_slice(result, spans)
            key = tuple(span for span, dim in zip(spans, self.output_dims) if dim is not None)
            first = key not in written
            written.add(key)
            if self.role == "mean":
                part = part * self.weight(spans)
            if norm is not None:
                running = self.factor_slice(state[0], spans)
                if self.role == "log_softmax":
                    # Each slice's log-probabilities are off by (its lse - the whole
                    # axis' lse), a constant per row: add it times the contraction with ones.
                    ones = norm.ones_for(views, lse, self.span_of(spans, norm.axis)[1]).to(target.dtype)
                    total_ones = self.out_slice(state[1], spans)
                if first:
                    target.copy_(part)
                    running.copy_(lse)
                    if self.role == "log_softmax":
                        total_ones.copy_(ones)
                else:
                    merged = torch.logaddexp(running, lse.to(running.dtype))
                    if self.role == "softmax":
                        # Flash attention's recurrence: rescale what was kept and the new
                        # part by their log-normalizers' shares of the running one.
                        target.mul_(norm.to_output(torch.exp(running - merged)))
                        target.add_(part.to(target.dtype) * norm.to_output(torch.exp(lse - merged)))
                    else:
                        target.add_(norm.to_output(running - merged) * total_ones)
                        target.add_(part.to(target.dtype) + norm.to_output(lse - merged) * ones)
                        total_ones.add_(ones)
                    running.copy_(merged)
            elif first:
                target.copy_(part)
                if state:
                    self.out_slice(state[0], spans).fill_(1)
            elif self.role in ("sum", "mean"):
                target.add_(part)
            elif self.role == "logsumexp":
                target.copy_(torch.logaddexp(target, part.to(target.dtype)))
            else:
                count = self.out_slice(state[0], spans)
                better = part > target if self.role == "max" else part < target
                count.copy_(torch.where(better, 1, count + (part == target).to(count.dtype)))
                target.copy_((torch.maximum if self.role == "max" else torch.minimum)(target, part.to(target.dtype)))
            dtype = part.dtype
        assert result is not None
        return result.to(dtype), state

    def backward(self, fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], result: torch.Tensor,
                 state: Sequence[torch.Tensor], grad: torch.Tensor, needed: Sequence[bool]
                 ) -> list[torch.Tensor | None]:
        """Each slice recomputed with autograd; its gradient accumulated into the inputs'.

        A slice's backward holds its forward's intermediates and their gradients at once
        (about 3-4x the slice), so backward takes slices half as long as forward's — but
        for ``max``/``min``, whose gradient goes where a slice's value equals the result
        (and is shared by the forward slices that tie): those recompute forward's own
        slices, exactly."""
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, needed)]
        norm = self.normalized
        for spans in self.slices(split=1 if self.role in ("max", "min") else 2):
            with torch.enable_grad():
                views = [t.detach().requires_grad_(need) for t, need in
                         zip(self.narrow(tensors, spans), needed)]
                part = fn(*views)
                g = self.out_slice(grad, spans)
                outputs, wanted = [part], [g]
                if self.role == "mean":
                    wanted = [g * self.weight(spans)]
                elif self.role == "logsumexp":
                    total = self.out_slice(result, spans)
                    # Where every slice is -inf the result is -inf: gradient 0, not NaN.
                    wanted = [g * torch.exp(part.detach() - total).masked_fill(total == float("-inf"), 0.0)]
                elif self.role in ("max", "min"):
                    total = self.out_slice(result, spans)
                    wanted = [g * (part.detach() == total) / self.out_slice(state[0], spans)]
                elif norm is not None:
                    lse = self.lse(views)
                    whole = self.factor_slice(state[0], spans)
                    share = torch.exp(lse.detach() - whole)
                    if self.role == "softmax":
                        # result = sum_s w_s R_s with w_s = exp(lse_s - lse): through R_s
                        # and through w_s, whose total over slices the result holds.
                        kept = norm.to_factor(g * part.detach())
                        total = norm.to_factor(g * self.out_slice(result, spans))
                        outputs = [part, lse]
                        wanted = [g * norm.to_output(share).to(g.dtype), share * (kept - total)]
                    else:
                        # result = sum_s R_s + (lse_s - lse) C_s, with C_s the contraction
                        # with ones and lse = logsumexp over s of lse_s.
                        ones = norm.ones_for(views, lse, self.span_of(spans, norm.axis)[1])
                        own = norm.to_factor(g * ones.detach())
                        every = norm.to_factor(g * self.out_slice(state[1], spans))
                        outputs = [part, lse, ones]
                        wanted = [g, own - share * every, g * norm.to_output(lse.detach() - whole).to(g.dtype)]
                inputs = [v for v, need in zip(views, needed) if need]
                # (A contraction with ones over nothing but the ones has no gradient.)
                pairs = [(o, w.to(o.dtype)) for o, w in zip(outputs, wanted) if o.requires_grad]
                parts = torch.autograd.grad([o for o, _ in pairs], inputs, [w for _, w in pairs], allow_unused=True)
            got = iter(parts)
            for index, need in enumerate(needed):
                if need:
                    piece = next(got)
                    if piece is not None:
                        target = grads[index]
                        assert target is not None
                        self.cut(target, index, spans).add_(piece)
        return grads


def sliced(program: Program, slicing: Slicing,
           normalizer: Callable[[ir.Pattern], Callable[..., torch.Tensor]] | None = None) -> Sliced:
    """Where each sliced axis sits in the operands and the result of ``program``;
    ``normalizer(pattern)`` compiles the log-normalizer a ``"softmax"`` slicing needs."""
    leaves = program.leaf_dims()

    def places_of(name: str) -> tuple[tuple[int, int], ...]:
        return tuple((index, dims.index((name,))) for index, dims in enumerate(leaves) if (name,) in dims)

    places = tuple(places_of(axis.name) for axis in slicing.axes)
    output = [tuple(g) for g in program.output_dims]
    dims = tuple(output.index((axis.name,)) if axis.role == "output" else None for axis in slicing.axes)
    reduced = {axis.role for axis in slicing.axes if axis.role != "output"}
    if len(reduced) > 1:
        raise MemoryLimitError(f"slices combine by one rule, not {' and '.join(sorted(reduced))}")
    role = reduced.pop() if reduced else "output"
    normalized = None
    if role in ir.NORMALIZERS:
        found = normalized_level(program)
        assert found is not None and normalizer is not None
        axis, position, level = found
        first = sum(x.leaves if isinstance(x, ir.Pattern) else 1 for x in program.ir.inputs[:position])
        factor = tuple(g[0] for g in level.output_dims if g != (axis,))
        nested = level.ir
        logits = ir.Pattern(nested.inputs, nested.output, "sum", compact=nested.compact, scale=nested.scale)
        kept = ir.AxisList(tuple(dim for dim in nested.output.dims if dim != (axis,)))
        lse = ir.Pattern((logits,), kept, "logsumexp", compact=nested.compact)
        ones = None
        if role == "log_softmax":
            top = program.ir
            inputs = top.inputs[:position] + (nested.output,) + top.inputs[position + 1:]
            ones = normalizer(ir.Pattern(inputs, top.output, top.op, compact=top.compact, scale=top.scale))
        # The result's dimensions by name (a composition by a name no axis has).
        names = tuple(g[0] if len(g) == 1 else "(" + " ".join(g) + ")" for g in output)
        normalized = Normalized(normalizer(lse), tuple(range(first, first + nested.leaves)), factor, names,
                                axis, tuple(g[0] for g in level.output_dims), ones)
    keys = () if slicing.visible is None else places_of(slicing.visible.key)
    return Sliced(slicing, places, dims, role, normalized, keys)


class _SlicedFunction(torch.autograd.Function):
    """Sliced forward that saves only the inputs and the result; backward recomputes."""

    @staticmethod
    def forward(ctx: Any, runner: Sliced, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            result, state = runner.forward(fn, tensors)
        ctx.runner, ctx.fn, ctx.count = runner, fn, len(tensors)
        ctx.save_for_backward(*tensors, result, *state)
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True: its gradients would miss this call's
            raise EincError("a sliced call (over its memory_limit) has no double backward "
                            "(create_graph=True); use slice=False or a larger memory_limit")
        saved = ctx.saved_tensors
        tensors, result, state = saved[:ctx.count], saved[ctx.count], saved[ctx.count + 1:]
        grads = ctx.runner.backward(ctx.fn, tensors, result, state, grad, ctx.needs_input_grad[2:])
        return (None, None, *grads)


def run(runner: Sliced, fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sliced result; differentiable (recomputing slices in backward) where autograd needs it."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SlicedFunction.apply(runner, fn, *tensors)
    return runner.forward(fn, tensors)[0]
