"""New shapes (issue 11.2): what a call costs when its shapes were not seen before.

    python benchmarks/bench_shapes.py --rounds 3 --markdown RESULTS.md

Workloads whose batch or sequence length changes from call to call (NLP with varied
lengths, detection) meet new shapes all the time.  Each case cycles through a pool of
distinct shapes larger than einc's signature cache (``plan_cache_size``), so every einc
call is a cache miss: a new signature, planned again where its path can change (three
operands or more), running shape-generic code shared by every signature with the same
plan.  torch.einsum plans on every call anyway (``opt_einsum.contract_path`` in
``torch.backends.opt_einsum``); ``opt_einsum.contract`` likewise.  The steady-state row
calls one shape again and again (its own literal code, after ``GENERIC_CALLS`` calls).

No timing here is an assertion.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence

import opt_einsum as oe
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Case, Result, Target, script  # noqa: E402

import einc  # noqa: E402

HEADING = "## New shapes (issue 11.2)"
TS = "einc (torchscript), new shape"
EAGER = "einc (eager), new shape"
STEADY = "einc (torchscript), same shape"
EINSUM = "torch.einsum"
POOL = 3 * einc.configure()["plan_cache_size"]
"""Distinct shapes per case: more than a signature cache holds, so every einc call misses."""


def _cycling(pool: Sequence[tuple[torch.Tensor, ...]], fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
    shapes = itertools.cycle(pool)
    return lambda: fn(*next(shapes))


def _case(name: str, pattern: str, equation: str, make: Callable[[int], list[tuple[int, ...]]]) -> Case:
    torch.manual_seed(0)
    pool = [tuple(torch.randn(s) for s in make(n)) for n in range(POOL)]
    ts = einc.compile(pattern)
    eager = einc.compile(pattern, backend="eager")
    for expression in (ts, eager):
        expression(*pool[-1])  # the expression exists and has run once: its generic code is compiled
    steady = einc.compile(pattern)
    return Case(
        name,
        f"`{pattern}`, {POOL} distinct shapes in turn (first: "
        f"{', '.join('x'.join(map(str, t.shape)) for t in pool[0])}; last: "
        f"{', '.join('x'.join(map(str, t.shape)) for t in pool[-1])}).",
        {
            TS: _cycling(pool, ts),
            EAGER: _cycling(pool, eager),
            STEADY: lambda: steady(*pool[0]),
            EINSUM: _cycling(pool, lambda *xs: torch.einsum(equation, *xs)),
            "opt_einsum.contract": _cycling(pool, lambda *xs: oe.contract(equation, *xs)),
        },
        reference=lambda: torch.einsum(equation, *pool[0]),
        einc=[TS, EAGER],
    )


CASES = [
    # A projection whose batch (tokens) changes every call.
    lambda: _case("projection", "t d, d e -> t e", "td,de->te", lambda n: [(32 + n, 64), (64, 64)]),
    # Attention scores over varied sequence lengths.
    lambda: _case("scores", "b h q d, b h k d -> b h q k", "bhqd,bhkd->bhqk",
                  lambda n: [(2, 4, 8 + n % 97, 32), (2, 4, 8 + n // 97 % 97, 32)]),
    # A 5-matrix chain whose outer dimension changes: planned again on every new shape.
    lambda: _case("5-chain", "ab,bc,cd,de,ef->af", "ab,bc,cd,de,ef->af",
                  lambda n: [(8 + n, 16), (16, 32), (32, 16), (16, 32), (32, 8)]),
]

TARGETS = [
    Target("projection", TS, EINSUM, 1.5, "projection: a new shape ≤ 1.5x torch.einsum's call"),
    Target("scores", TS, EINSUM, 1.5, "scores: a new shape ≤ 1.5x torch.einsum's call"),
]


INTRO = [
    "Every einc call below (but the steady-state row) is a new input signature: "
    "`einc.compile(pattern)` (TorchScript, the default) and `backend=\"eager\"`, each called "
    "once before timing. CPU float32, one thread.",
]


def _chain_goal(results: dict[str, Result]) -> None:
    chain = results.get("5-chain")
    if chain is not None:
        chain.case.notes = [*chain.case.notes, *(
            f"{name}: {chain.medians[name] * 1e3:.3f} ms a new shape (goal ≤ 0.5 ms)" for name in (TS, EAGER))]


def main(argv: Sequence[str] | None = None) -> int:
    return script(argv, __doc__, CASES, TARGETS, HEADING, INTRO, after=_chain_goal)


if __name__ == "__main__":
    raise SystemExit(main())
