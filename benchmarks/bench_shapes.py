"""New shapes and first use (issues 11.2, 11.6): what a call costs when its shapes, or its pattern, are new.

    python benchmarks/bench_shapes.py --rounds 3 --markdown RESULTS.md

Workloads whose batch or sequence length changes from call to call (NLP with varied
lengths, detection) meet new shapes all the time.  Each case cycles through a pool of
distinct shapes larger than einc's signature cache (``plan_cache_size``), so every einc
call is a cache miss: a new signature, planned again where its path can change (three
operands or more), running shape-generic code shared by every signature with the same
plan.  torch.einsum plans on every call anyway (``opt_einsum.contract_path`` in
``torch.backends.opt_einsum``); ``opt_einsum.contract`` likewise.  The steady-state row
calls one shape again and again (its own literal code, after ``GENERIC_CALLS`` calls).

First use is timed with ``time.perf_counter`` (median of 5): the first compile and
call of a new pattern in a warm process (einc already used; the process-wide cache of
compiled sources emptied before each, so the source is compiled), of a new spelling of
a known pattern (cache kept), and, in fresh processes, ``import einc`` plus a first
compile and call against ``import torch`` alone.

No timing here is an assertion.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import opt_einsum as oe
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Case, Result, Target, script  # noqa: E402

import einc  # noqa: E402

HEADING = "## New shapes and first use (issues 11.2, 11.6)"
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


FIRST_USE = [
    ("b h q d, b h k d -> b h q k", [(2, 4, 8, 16), (2, 4, 8, 16)]),
    ("ab,bc,cd,de,ef->af", [(8, 9), (9, 10), (10, 11), (11, 12), (12, 13)]),
    ("logsumexp(b v -> b)", [(64, 128)]),
    ("logsumexp(i k, k j -> i j)", [(32, 16), (16, 32)]),
    ("max(i k, k j -> i j)", [(32, 16), (16, 32)]),
    ("softmax(b h q d, b h k d -> b h q [k])", [(2, 4, 8, 16), (2, 4, 8, 16)]),
    ("mean(b t d -> b d)", [(4, 8, 16)]),
]

FRESH = """
import time
start = time.perf_counter()
import torch
torch_done = time.perf_counter()
{body}
print(torch_done - start, time.perf_counter() - torch_done)
"""


def _first_call(pattern: str, shapes, backend: str, new_source: bool) -> float:
    xs = [torch.randn(s) for s in shapes]
    times = []
    for _ in range(5):
        einc.api._cached.cache_clear()
        if new_source:
            einc.backends._compiled.clear()
        start = time.perf_counter()
        einc.compile(pattern, backend=backend)(*xs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fresh(body: str) -> tuple[float, float]:
    """(import torch, what follows) in a fresh process, median of 5."""
    runs = [tuple(map(float, subprocess.run([sys.executable, "-c", FRESH.format(body=body)], check=True,
                                            capture_output=True, text=True).stdout.split()))
            for _ in range(5)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def first_use(results: dict[str, Result], args) -> list[str]:
    chain = results.get("5-chain")
    if chain is not None:
        chain.case.notes = [*chain.case.notes, *(
            f"{name}: {chain.medians[name] * 1e3:.3f} ms a new shape (goal ≤ 0.5 ms)" for name in (TS, EAGER))]
    if args.only:
        return []
    lines = ["", "### First use", "",
             "| pattern | new pattern, torchscript | new pattern, eager | new spelling, torchscript |",
             "|---|---:|---:|---:|"]
    for pattern, shapes in FIRST_USE:
        row = [_first_call(pattern, shapes, "torchscript", True), _first_call(pattern, shapes, "eager", True),
               _first_call(pattern, shapes, "torchscript", False)]
        lines.append(f"| `{pattern}` | " + " | ".join(f"{t * 1e3:.1f} ms" for t in row) + " |")
        print(lines[-1], flush=True)
    torch_alone, nothing = _fresh("")
    _, einc_first = _fresh("import einc\neinc.compile('ij,jk->ik')(torch.randn(8, 8), torch.randn(8, 8))")
    lines += ["", f"Fresh process: `import torch` {torch_alone * 1e3:.0f} ms; then `import einc` + first "
              f"`einc.compile('ij,jk->ik')` and call (TorchScript) {einc_first * 1e3:.0f} ms "
              f"({einc_first / torch_alone:.0%} of `import torch`; goal ≤ 10%). Occasional pauses of about "
              "80 ms in a warm process are Python's full garbage collections over torch's objects, "
              "not einc's work (they vanish under `gc.disable()`)."]
    print(lines[-1])
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    return script(argv, __doc__, CASES, TARGETS, HEADING, INTRO, after=first_use)


if __name__ == "__main__":
    raise SystemExit(main())
