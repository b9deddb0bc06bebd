"""Path choice: which order of pairwise contractions opt_einsum's strategies give.

A registry of einc's own strategies beside opt_einsum's names (``optimize=``), an
explicit path's check, the constant-folding path, and the one converter pair between
path formats: opt_einsum's ``linear_to_ssa``, and :func:`ssa_to_linear` back (opt_einsum's
own sorts each entry; this one keeps a user's order).  Paths here are in SSA form:
operands ``0..n-1``, then one id per entry.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import opt_einsum as oe

from .errors import EincError, MemoryLimitError
from .sizes import show_axes

__all__ = ["Optimize", "STRATEGY_NAMES", "check_output", "check_path", "folding_path", "opt_einsum_path",
           "ssa_to_linear", "too_small"]

Optimize = Union[str, oe.paths.PathOptimizer, Sequence[Sequence[int]]]
"""An opt_einsum strategy name, a ``PathOptimizer`` instance, or an explicit path."""


def ssa_to_linear(ssa_path: Sequence[tuple[int, ...]], operands: int) -> list[tuple[int, ...]]:
    """An SSA path (operands ``0..n-1``, then one id per entry) in opt_einsum's linear
    format, each entry's order kept (``opt_einsum.paths.linear_to_ssa`` goes back;
    opt_einsum's own ``ssa_to_linear`` sorts every entry).

    >>> ssa_to_linear([(2, 0), (1, 3)], 3)
    [(2, 0), (0, 1)]
    """
    live = list(range(operands))
    linear = []
    for index, entry in enumerate(ssa_path):
        linear.append(tuple(live.index(i) for i in entry))
        live = [i for i in live if i not in entry] + [operands + index]
    return linear


OPTIMAL_MAX_OPERANDS = 6
EXACT_MAX_OPERANDS = 10
DP_MAX_OPERANDS = 20
DP_BUDGET = 150_000
RANDOM_GREEDY_REPEATS = 128
COTENGRA_WORK = 8_000
"""einc's ``"auto"``: opt_einsum's exhaustive ``"optimal"`` up to
:data:`OPTIMAL_MAX_OPERANDS` operands, dynamic programming with outer products up to
:data:`EXACT_MAX_OPERANDS`, without them up to :data:`DP_MAX_OPERANDS`, and beyond the
cheaper (in FLOPs) of two searches (:class:`_Cheapest`): opt_einsum's ``RandomGreedy``
(:data:`RANDOM_GREEDY_REPEATS` seeded trials, so the same path every time; 32 when
cotengra is installed) and, when cotengra is installed, a short seeded run of its
hyper-optimizer (greedy and label-propagation trials; as many as
:data:`COTENGRA_WORK` / (operands x indices) allows, up to 8, about 0.04-0.4 s each).
On random networks of 30-100 operands RandomGreedy planned in 0.25-0.7 s and found
paths 2-340x cheaper than plain ``"greedy"``; cotengra's paths were 1.03-3x cheaper
again at 21-40 operands (up to 10^6x on dense 60-operand networks).

Dynamic programming compares at most :data:`DP_BUDGET` pairs of sub-networks, then
gives way to the same two searches: a count, not a clock, so a plan does not depend on
the machine's speed.  A comparison costs 1.5-2.6 us (rand_equation networks of 14-20
operands), so the budget is about 0.25-0.4 s; regular networks of size-2 axes took
dynamic programming 7 s and more at 18 operands, and minutes at 20.

Measured on chains and random networks (benchmarks/RESULTS.md): plain ``"dp"`` matched
the cheapest path in 0.2-25 ms nearly always, but skips outer products and so missed it
in rare cases; with them it stays under 25 ms up to 10 operands. opt_einsum's own
``"auto"`` (greedy beyond 8 operands) chose paths up to 8x costlier. Plans are cached
per signature, so the planning time is paid once.
"""


class _OverBudget(Exception):
    """Dynamic programming used up :data:`DP_BUDGET`."""


class _BudgetedDP(oe.paths.DynamicProgramming):
    """opt_einsum's ``DynamicProgramming`` (minimizing FLOPs) that stops after
    :data:`DP_BUDGET` comparisons and returns :class:`_Cheapest`'s path instead."""

    def __init__(self, search_outer: bool) -> None:
        super().__init__(minimize=self._compare, search_outer=search_outer)
        self._left = DP_BUDGET
        self._give_up = math.inf

    def _compare(self, *args: Any) -> None:
        self._left -= 1
        if self._left < 0:
            raise _OverBudget
        # args[4] is the cost cap.  A callable ``minimize`` turns off opt_einsum's own
        # "no path under memory_limit" stop (its cap would grow forever): stop where it
        # would, one growth of the cap later at most.
        if args[4] > self._give_up:
            raise RuntimeError("No contraction found for given `memory_limit`.")
        oe.paths._dp_compare_flops(*args)

    def __call__(self, inputs: Any, output: Any, size_dict: dict[str, int], memory_limit: int | None = None) -> Any:
        self._left = DP_BUDGET
        if memory_limit is not None:
            naive = len(inputs) * math.prod(size_dict[a] for a in set().union(*inputs, output))
            self._give_up = naive * max(2, *size_dict.values())
        try:
            return super().__call__(inputs, output, size_dict, memory_limit)
        except _OverBudget:
            return _Cheapest()(inputs, output, size_dict, memory_limit)


def _flops(path: Sequence[tuple[int, ...]], inputs: Sequence[Any], output: Any, size_dict: Mapping[str, int]
           ) -> int:
    """A linear path's cost as opt_einsum's ``contract_path`` counts it."""
    live = [set(term) for term in inputs]
    cost = 0
    for contraction in path:
        picked = [live[i] for i in contraction]
        live = [term for i, term in enumerate(live) if i not in contraction]
        union = set().union(*picked)
        kept = union & set().union(set(output), *live)
        cost += oe.helpers.flop_count(union, bool(union - kept), len(picked), size_dict)
        live.append(kept)
    return cost


def _cotengra_path(inputs: Sequence[Any], output: Any, size_dict: Mapping[str, int]) -> Any:
    """cotengra's hyper-optimizer's path in a bounded number of trials; ``None`` without
    cotengra, or where not even one trial fits the budget.  Seeded by the caller."""
    trials = min(8, COTENGRA_WORK // max(1, len(inputs) * len(size_dict)))
    try:
        import cotengra
    except ImportError:
        return None
    if not trials:
        return None  # one trial on a dense 60-operand network takes about 0.75 s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # on its optional kahypar
        optimizer = cotengra.HyperOptimizer(methods=["greedy", "labels"], max_repeats=trials, optlib="random",
                                            parallel=False, progbar=False)
        return [tuple(contraction) for contraction in optimizer(inputs, output, size_dict)]


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Global ``random`` (and ``numpy.random``) seeded for a search, and given back
    as they were: opt_einsum's RandomGreedy reseeds ``random`` per trial, and cotengra
    draws from both."""
    import random

    numpy = sys.modules.get("numpy")
    states = random.getstate(), numpy.random.get_state() if numpy is not None else None
    random.seed(0)
    if numpy is not None:
        numpy.random.seed(0)
    try:
        yield
    finally:
        random.setstate(states[0])
        if numpy is not None:
            numpy.random.set_state(states[1])


class _Cheapest(oe.paths.PathOptimizer):
    """The cheaper (FLOPs; RandomGreedy's on a tie) of RandomGreedy's path and, when
    cotengra is installed and no memory limit applies, cotengra's."""

    def __call__(self, inputs: Any, output: Any, size_dict: dict[str, int], memory_limit: int | None = None) -> Any:
        with _seeded():
            found = _cotengra_path(inputs, output, size_dict) if memory_limit is None else None
            repeats = RANDOM_GREEDY_REPEATS if found is None else 32
            paths = [oe.path_random.RandomGreedy(max_repeats=repeats)(inputs, output, size_dict, memory_limit)]
        if found is not None:
            paths.append(found)
        return min(paths, key=lambda path: _flops(path, inputs, output, size_dict))


def _auto(operands: int) -> Any:
    if operands <= OPTIMAL_MAX_OPERANDS:
        return "optimal"
    if operands <= DP_MAX_OPERANDS:
        return _BudgetedDP(search_outer=operands <= EXACT_MAX_OPERANDS)
    return _Cheapest()


def _cotengra(operands: int) -> Any:
    with warnings.catch_warnings():
        # cotengra warns when its optional kahypar is missing, on every optimizer.
        warnings.simplefilter("ignore", UserWarning)
        try:
            import cotengra
        except ImportError:
            raise EincError("optimize='cotengra' needs cotengra: pip install 'einc[cotengra]'") from None
        return cotengra.HyperOptimizer(max_repeats=32, progbar=False)


_STRATEGIES: dict[str, Callable[[int], Any]] = {"auto": _auto, "cotengra": _cotengra}
"""einc's own strategies, by name: each makes opt_einsum's ``optimize`` for a number of
operands.  opt_einsum's names are passed through."""

STRATEGY_NAMES: tuple[str, ...] = tuple(sorted({*oe.paths._PATH_OPTIONS, *_STRATEGIES}))
"""Every strategy name ``optimize`` takes."""


def _strategy(optimize: Optimize, operands: int, sizes: Mapping[str, int]) -> Any:
    if isinstance(optimize, str) and 0 in sizes.values():
        # Every path costs nothing when an axis is empty, and some strategies ("dp")
        # find no path at all then.
        return "greedy"
    if isinstance(optimize, str) and optimize in _STRATEGIES:
        return _STRATEGIES[optimize](operands)
    return optimize


def too_small(limit: int, what: str, unit: str = "elements") -> MemoryLimitError:
    """The one message for a plan over the memory limit."""
    return MemoryLimitError(f"memory_limit={limit:,} {unit} is too small: {what}")


def check_output(output: Sequence[str], sizes: Mapping[str, int], limit: int) -> None:
    size = math.prod(sizes[a] for a in output)
    if size > limit:
        raise too_small(limit, f"the output alone ({show_axes(output)}) "
                                f"has {size:,} elements")


def opt_einsum_path(operands: Sequence[tuple[str, ...]], output: tuple[str, ...], sizes: Mapping[str, int],
                     optimize: Optimize, memory_limit: int | None) -> tuple[list[tuple[int, ...]], Any]:
    """opt_einsum's path (SSA form) and ``PathInfo`` for atomic axes."""
    symbols = {a: oe.get_symbol(i) for i, a in enumerate(dict.fromkeys(a for op in operands for a in op))}
    equation = ",".join("".join(symbols[a] for a in op) for op in operands)
    equation += "->" + "".join(symbols[a] for a in output)
    shapes = [tuple(sizes[a] for a in op) for op in operands]
    strategy = _strategy(optimize, len(operands), sizes)
    try:
        try:
            path, info = oe.contract_path(equation, *shapes, shapes=True, optimize=strategy,
                                          memory_limit=memory_limit)
        except RuntimeError:
            if optimize != "auto" or memory_limit is None:
                raise
            # Dynamic programming finds nothing under some limits that a greedy path
            # (checked by the caller) fits.
            path, info = oe.contract_path(equation, *shapes, shapes=True, optimize="greedy",
                                          memory_limit=memory_limit)
    except RuntimeError as err:
        if memory_limit is None:
            raise EincError(f"opt_einsum could not plan with optimize={optimize!r}: {err}") from None
        check_output(output, sizes, memory_limit)
        raise too_small(memory_limit, "no contraction path keeps every intermediate under it") from None
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise EincError(f"opt_einsum could not plan with optimize={optimize!r}: {err}") from None
    return [tuple(entry) for entry in oe.paths.linear_to_ssa(path)], info


def check_path(path: Sequence[Sequence[int]], operands: int) -> None:
    """An explicit path in opt_einsum's linear format must contract ``operands``
    operands into one: each entry names distinct live positions."""
    live = operands
    for contraction in path:
        if not contraction or len(set(contraction)) != len(contraction) or not all(
            0 <= i < live for i in contraction
        ):
            raise EincError(f"invalid contraction {tuple(contraction)} in path {list(map(tuple, path))} "
                            f"for {operands} operands")
        live += 1 - len(contraction)
    if live != 1:
        raise EincError(f"path {list(map(tuple, path))} leaves {live} operands uncontracted; it must end with one")


def folding_path(operands: list[tuple[str, ...]], output: tuple[str, ...], sizes: Mapping[str, int],
                  optimize: Optimize, memory_limit: int | None, constants: frozenset[int]
                  ) -> list[tuple[int, ...]] | None:
    """An SSA path that contracts the constants among themselves first (opt_einsum's
    order for that sub-network), then the rest; ``None`` where that cannot be planned.

    opt_einsum's constant folding only folds what its cost-optimal path happens to
    contract first; a separate plan lets work that depends on constants alone be done
    once, which pays whenever it lowers the per-call cost.
    """
    fixed = sorted(constants)
    others = [i for i in range(len(operands)) if i not in constants]
    needed = set(output).union(*(set(operands[i]) for i in others))
    inner = [operands[i] for i in fixed]
    inner_output = tuple(a for a in dict.fromkeys(a for op in inner for a in op) if a in needed)
    try:
        inner_path, _ = opt_einsum_path(inner, inner_output, sizes, optimize, memory_limit)
        rest_path, _ = opt_einsum_path([operands[i] for i in others] + [inner_output], output, sizes,
                                        optimize, memory_limit)
    except EincError:
        return None
    n = len(operands)
    # Renumber both sub-paths into the level's SSA ids: its operands, then one per entry.
    inner_ids = fixed + [n + j for j in range(len(inner_path))]
    rest_ids = others + [inner_ids[-1]] + [n + len(inner_path) + j for j in range(len(rest_path))]
    return [tuple(inner_ids[i] for i in e) for e in inner_path] + [tuple(rest_ids[i] for i in e) for e in rest_path]
