"""Planning benchmarks (issue 4 "Performance"): what einc's default strategy costs and buys.

    python benchmarks/bench_planning.py                 # print the tables (~1-2 min)
    python benchmarks/bench_planning.py --quick         # short runs
    python benchmarks/bench_planning.py --markdown benchmarks/RESULTS.md

Three measurements, CPU, one thread, ``torch.utils.benchmark.Timer(...).blocked_autorange``:

(a) Planning time of a 10-operand matrix chain.  einc's default ``optimize="auto"`` is
    opt_einsum's ``"optimal"`` up to 6 operands, dynamic programming with outer products
    up to 10, ``"dp"`` up to 20 and 128 seeded random-greedy trials beyond (``einc/paths.py``); opt_einsum's
    own ``"auto"`` is greedy beyond 8 operands.  Two einc timings: ``einc.planner.plan``
    (size resolution, the opt_einsum search and einc's step bookkeeping: the
    planning alone) and ``einc.Expression(p).explain(*shapes)`` on a fresh expression
    each time (parse + plan + code generation, no compilation: what a user's first
    ``explain`` costs).  Beside them ``opt_einsum.contract_path`` with ``"auto"``,
    ``"dp"``, ``"greedy"`` (``"optimal"`` is exhaustive and only run up to 8 operands),
    and each strategy's path cost (FLOPs as opt_einsum counts them).  The first call of
    an einc expression (plan + generate + TorchScript compile) is timed once per fresh
    expression with ``time.perf_counter`` (median of a few).
(b) Per-call overhead once the plan is cached: the same 10-operand chain on tiny
    tensors (dims 2-4), einc (TorchScript and eager backends) against torch.einsum
    (which calls ``opt_einsum.contract_path(..., "auto")`` on every call, then runs the
    path in C++) and an ``opt_einsum.contract_expression`` (planned once, dispatching
    to torch per step).  Every contender is checked against torch.einsum in float64
    first (``common.run_case``).
(c) Default-strategy planning time (``einc.planner.plan``) and path cost against
    opt_einsum's ``"auto"``, for matrix chains and random tensor networks
    (``opt_einsum.testing.rand_equation(n, 3, seed=0, n_out=2)``) of 4-20 operands.

No timing here is an assertion.
"""

from __future__ import annotations

import datetime
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import opt_einsum as oe
import torch
import torch.utils.benchmark as tbench
from opt_einsum.testing import rand_equation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    PREAMBLE,
    Case,
    format_time,
    machine_info,
    markdown_table,
    parse_args,
    run_case,
    write_section,
)

import einc
from einc.parser import parse
from einc.planner import plan

HEADING = "## Planning (issue 4)"
OPTIMAL_MAX = 8
"""opt_einsum's exhaustive "optimal" is only run up to this many operands."""


def chain(n: int, seed: int, low: int, high: int) -> tuple[str, list[tuple[int, int]]]:
    """An n-matrix chain ``ab,bc,...`` with seeded random dimensions in [low, high]."""
    rng = random.Random(seed)
    dims = [rng.randint(low, high) for _ in range(n + 1)]
    letters = [oe.get_symbol(i) for i in range(n + 1)]
    equation = ",".join(letters[i] + letters[i + 1] for i in range(n)) + "->" + letters[0] + letters[n]
    return equation, [(dims[i], dims[i + 1]) for i in range(n)]


def network(n: int, seed: int = 0) -> tuple[str, list[tuple[int, ...]]]:
    equation, shapes = rand_equation(n, 3, seed=seed, n_out=2)
    return equation, [tuple(s) for s in shapes]


def median_times(fns: dict[str, Callable[[], object]], min_run_time: float, rounds: int) -> dict[str, float]:
    """Each callable's lowest median over ``rounds`` interleaved rounds (as ``common.run_case``)."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # warm up
            timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
            best[name] = min(best.get(name, float("inf")), timer.blocked_autorange(min_run_time=min_run_time).median)
    return best


def oe_cost(equation: str, shapes, optimize) -> int:
    return int(oe.contract_path(equation, *shapes, shapes=True, optimize=optimize)[1].opt_cost)


def einc_plan_fn(equation: str, shapes) -> Callable[[], object]:
    """einc's planning alone: the pattern is parsed once, ``plan`` runs on every call."""
    pattern = parse(equation, "auto")
    return lambda: plan(pattern, shapes, {}, "auto")


# ------------------------------------------------------------------------ (a)


def planning_10(min_run_time: float, rounds: int) -> tuple[str, list[tuple[int, int]], list[dict]]:
    equation, shapes = chain(10, seed=0, low=2, high=64)
    einc_cost = einc.Expression(equation).explain(*shapes).flops
    rows: list[dict] = [
        {"what": "einc default: `einc.planner.plan` (search + bookkeeping)", "cost": einc_cost,
         "fn": einc_plan_fn(equation, shapes)},
        {"what": "einc default: fresh `Expression(p).explain(*shapes)` (parse + plan + codegen)", "cost": einc_cost,
         "fn": lambda: einc.Expression(equation).explain(*shapes)},
    ]
    for strategy in ("auto", "dp", "greedy", "optimal"):
        what = f'`opt_einsum.contract_path(optimize="{strategy}")`'
        if strategy == "optimal" and len(shapes) > OPTIMAL_MAX:
            rows.append({"what": what, "cost": None, "fn": None,
                         "note": f"not run: exhaustive search, {len(shapes)} operands > {OPTIMAL_MAX}"})
            continue
        rows.append({"what": what, "cost": oe_cost(equation, shapes, strategy),
                     "fn": lambda s=strategy: oe.contract_path(equation, *shapes, shapes=True, optimize=s)})
    times = median_times({r["what"]: r["fn"] for r in rows if r["fn"]}, min_run_time, rounds)
    for r in rows:
        r["time"] = times.get(r["what"])
    # First call of a fresh expression: plan + generate + TorchScript compile + run.
    xs = [torch.randn(s) for s in shapes]
    firsts = []
    for _ in range(5):
        expr = einc.Expression(equation)
        start = time.perf_counter()
        expr(*xs)
        firsts.append(time.perf_counter() - start)
    rows.append({"what": "einc first call, fresh expression (plan + codegen + TorchScript compile + run; "
                         "`time.perf_counter`, median of 5)", "time": statistics.median(firsts), "cost": einc_cost})
    return equation, shapes, rows


# ------------------------------------------------------------------------ (b)


def overhead_case() -> tuple[Case, Callable[[], object]]:
    equation, shapes = chain(10, seed=1, low=2, high=4)
    torch.manual_seed(0)
    xs = [torch.randn(s) for s in shapes]
    ts = einc.compile(equation)
    eager = einc.compile(equation, backend="eager")
    expression = oe.contract_expression(equation, *shapes)
    contenders = {
        "einc (torchscript)": lambda: ts(*xs),
        "einc (eager)": lambda: eager(*xs),
        "torch.einsum": lambda: torch.einsum(equation, *xs),
        "opt_einsum.contract_expression": lambda: expression(*xs, backend="torch"),
    }
    path = ts.explain(*xs).path
    case = Case(
        "per-call overhead", f"10-operand chain `{equation}` on tiny float32 tensors {shapes}", contenders,
        reference=lambda: torch.einsum(equation, *[t.double() for t in xs]),
        einc=["einc (torchscript)", "einc (eager)"],
        notes=[
            (f"einc path {path} (planned once, cached per signature); each einc call is a cache lookup plus the "
            "compiled function."),
            ("torch.einsum (opt_einsum enabled, torch's default) plans with `opt_einsum.contract_path(..., "
            "optimize='auto')` on every call."),
        ],
    )
    replan = lambda: oe.contract_path(equation, *xs, optimize="auto")
    return case, replan


# ------------------------------------------------------------------------ (c)


def scaling(min_run_time: float, rounds: int, sizes: list[int]) -> list[dict]:
    rows = []
    for kind in ("chain", "network"):
        for n in sizes:
            equation, shapes = chain(n, seed=n, low=2, high=64) if kind == "chain" else network(n)
            einc_cost = einc.Expression(equation).explain(*shapes).flops
            auto_cost = oe_cost(equation, shapes, "auto")
            times = median_times({
                "einc": einc_plan_fn(equation, shapes),
                "auto": lambda eq=equation, sh=shapes: oe.contract_path(eq, *sh, shapes=True, optimize="auto"),
            }, min_run_time, rounds)
            row = {
                "kind": kind, "n": n, "equation": equation,
                "einc_time": times["einc"], "einc_cost": einc_cost,
                "auto_time": times["auto"], "auto_cost": auto_cost,
                "optimal_cost": oe_cost(equation, shapes, "optimal") if n <= OPTIMAL_MAX else None,
            }
            rows.append(row)
            print(f"  {kind:8s} n={n:2d}  einc {format_time(row['einc_time']):>10s} cost {einc_cost:>12,}   "
                  f"opt_einsum auto {format_time(row['auto_time']):>10s} cost {auto_cost:>12,}  "
                  f"(auto/einc {auto_cost / einc_cost:.2f}x)", flush=True)
    return rows


# ------------------------------------------------------------------------ (d)


def spaced(equation: str) -> str:
    """opt_einsum's letters run past what the pattern language takes: spaced names."""
    inputs, output = equation.split("->")
    name = lambda c: f"x{ord(c)}"  # noqa: E731
    return ", ".join(" ".join(map(name, term)) for term in inputs.split(",")) + " -> " + " ".join(map(name, output))


def worst_cases(sizes: list[int], seeds: list[int]) -> list[dict]:
    """The default strategy's planning time over random networks, each planned once
    (``time.perf_counter``): the slowest per operand count."""
    rows = []
    for n in sizes:
        worst: dict = {"n": n, "time": 0.0, "cases": 0}
        for regularity in (3, 4, 6):
            for seed in seeds:
                for high in (2, 9):
                    equation, shapes = rand_equation(n, regularity, seed=seed, n_out=2, d_min=2, d_max=high)
                    pattern = parse(spaced(equation), "spaced")
                    start = time.perf_counter()
                    try:
                        plan(pattern, shapes, {}, "auto")
                    except einc.EincError:
                        pass  # planned, then refused: an intermediate past 2**63 elements
                    elapsed = time.perf_counter() - start
                    worst["cases"] += 1
                    if elapsed > worst["time"]:
                        worst.update(time=elapsed, regularity=regularity, seed=seed, high=high)
        rows.append(worst)
        print(f"  n={n:2d}: slowest {worst['time']:.3f} s of {worst['cases']} (regularity {worst['regularity']}, "
              f"seed {worst['seed']}, sizes 2-{worst['high']})", flush=True)
    return rows


# ------------------------------------------------------------------------ (e)

LARGE = [(30, 1), (40, 0), (40, 2)]
"""(operands, seed) of ``rand_equation(n, 3, seed=seed, d_min=2, d_max=6, n_out=2)``."""


def large_calls(min_run_time: float, rounds: int) -> list[dict]:
    """Per-call time of large networks on einc's default path, cotengra's, and dp's
    (where dp plans in time), run by einc and by opt_einsum's expression."""
    rows = []
    for n, seed in LARGE:
        equation, shapes = rand_equation(n, 3, seed=seed, d_min=2, d_max=6, n_out=2)
        shapes = [tuple(s) for s in shapes]
        xs = [torch.randn(s) for s in shapes]
        pattern = spaced(equation)
        start = time.perf_counter()
        default = einc.compile(pattern)
        default_plan = default.explain(*xs)
        planned = time.perf_counter() - start
        start = time.perf_counter()
        hyper = einc.compile(pattern, optimize="cotengra")
        hyper_plan = hyper.explain(*xs)
        hyper_planned = time.perf_counter() - start
        fns = {"einc default": lambda e=default: e(*xs), "einc cotengra": lambda e=hyper: e(*xs)}
        for name, path in (("default", default_plan.path), ("cotengra", hyper_plan.path)):
            expression = oe.contract_expression(equation, *shapes, optimize=path)
            fns[f"opt_einsum, {name} path"] = lambda e=expression: e(*xs, backend="torch")
        times = median_times(fns, min_run_time, rounds)
        rows.append({"n": n, "seed": seed, "flops": default_plan.flops, "hyper_flops": hyper_plan.flops,
                     "planned": planned, "hyper_planned": hyper_planned, **times})
        print(f"  n={n} seed={seed}: " + ", ".join(f"{k} {format_time(v)}" for k, v in times.items()), flush=True)
    return rows


# ------------------------------------------------------------------ reporting


def _cost(value) -> str:
    return "—" if value is None else f"{value:,}"


def _time(value) -> str:
    return "—" if value is None else format_time(value)


def table_a(rows: list[dict]) -> list[str]:
    best = min(r["cost"] for r in rows if r["cost"] is not None)
    lines = ["| what is timed | median | path cost (FLOPs) | cost / cheapest |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = "—" if r["cost"] is None else f"{r['cost'] / best:.2f}x"
        cost = _cost(r["cost"]) if r["cost"] is not None else r.get("note", "—")
        lines.append(f"| {r['what']} | {_time(r['time'])} | {cost} | {ratio} |")
    return lines


def table_c(rows: list[dict]) -> list[str]:
    lines = [
        ("| kind | operands | einc default: planning | einc cost | opt_einsum auto: planning | auto cost | "
        "auto cost / einc cost | optimal cost |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['n']} | {format_time(r['einc_time'])} | {r['einc_cost']:,} | "
            f"{format_time(r['auto_time'])} | {r['auto_cost']:,} | {r['auto_cost'] / r['einc_cost']:.2f}x | "
            f"{_cost(r['optimal_cost'])} |"
        )
    return lines


def table_d(rows: list[dict]) -> list[str]:
    lines = ["| operands | networks | slowest planning | its network |", "|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['cases']} | {r['time']:.3f} s | `rand_equation({r['n']}, {r['regularity']}, "
                     f"seed={r['seed']}, n_out=2, d_min=2, d_max={r['high']})` |")
    return lines


def table_e(rows: list[dict]) -> list[str]:
    lines = ["| network | einc default: FLOPs, planning | per call | optimize=\"cotengra\": FLOPs, planning | "
             "per call | default / cotengra | opt_einsum expr, default path | opt_einsum expr, cotengra path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| `rand_equation({r['n']}, 3, seed={r['seed']}, d_min=2, d_max=6, n_out=2)` | {r['flops']:,}, "
            f"{r['planned']:.2f} s | {format_time(r['einc default'])} | {r['hyper_flops']:,}, "
            f"{r['hyper_planned']:.2f} s | {format_time(r['einc cotengra'])} | "
            f"{r['einc default'] / r['einc cotengra']:.2f}x | {format_time(r['opt_einsum, default path'])} | "
            f"{format_time(r['opt_einsum, cotengra path'])} |")
    return lines


def console(lines: list[str]) -> str:
    """A markdown table, printed as is (it reads well enough in a terminal)."""
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    started = time.time()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    plan_time = 0.05 if args.quick else 0.2
    sizes = [4, 8, 12, 16, 20]

    print("(a) planning a 10-operand chain")
    equation_a, shapes_a, rows_a = planning_10(plan_time, args.rounds)
    print(f"    {equation_a} {shapes_a}")
    print(console(table_a(rows_a)), "\n", flush=True)

    print("(b) per-call overhead, cached plan")
    case, replan = overhead_case()
    result = run_case(case, args.min_run_time, args.rounds)
    replan_time = median_times({"replan": replan}, args.min_run_time, args.rounds)["replan"]
    print(f"   opt_einsum.contract_path(auto) on these tensors alone: {format_time(replan_time)}\n")

    print("(c) default strategy vs opt_einsum auto")
    rows_c = scaling(plan_time, args.rounds, sizes)
    print(console(table_c(rows_c)))

    print("(d) slowest planning over random networks of 10-60 operands")
    rows_d = worst_cases([10, 14, 18, 20, 30, 40, 60], [0] if args.quick else [0, 1, 2])

    print("(e) per call on large networks: einc's default path against cotengra's")
    rows_e = large_calls(args.min_run_time, args.rounds)
    elapsed = time.time() - started
    print(f"total {elapsed:.0f} s")

    if args.markdown:
        info = machine_info()
        worse = [r for r in rows_c if r["auto_cost"] > r["einc_cost"]]
        better = [r for r in rows_c if r["auto_cost"] < r["einc_cost"]]
        ts = result.medians["einc (torchscript)"]
        lines = [
            HEADING, "",
            ("einc's default `optimize=\"auto\"` is opt_einsum's `\"optimal\"` up to 6 operands, dynamic "
            "programming with outer products (`DynamicProgramming(search_outer=True)`) up to 10, without them "
            "up to 20 (both bounded by `einc.paths.DP_BUDGET` comparisons), and the cheaper of seeded "
            "random-greedy and (when installed) cotengra trials beyond; "
            "opt_einsum's own `\"auto\"` switches to greedy beyond 8 operands. Path costs are FLOPs as "
            "opt_einsum counts them. A plan is cached per input signature, so its planning time is paid "
            "once per expression and shape."), "",
            f"- Command: `{' '.join(['python', 'benchmarks/bench_planning.py', *sys.argv[1:]])}`",
            f"- Date: {date}; run took {elapsed:.0f} s",
        ]
        lines += [f"- {k}: {v}" for k, v in info.items()]
        lines += [
            (f"- Timing: `torch.utils.benchmark.Timer(..., num_threads=1).blocked_autorange`, median; planning "
            f"rows min_run_time={plan_time} s, per-call rows min_run_time={args.min_run_time} s; every row is "
            f"the lowest median of {args.rounds} interleaved round(s) (the one least disturbed on a shared machine)."),
            "",
            "### (a) Planning a 10-operand chain", "",
            f"`{equation_a}`, shapes {shapes_a}.", "",
            ("`einc.planner.plan` is the planning alone (pattern parsed once; size resolution, opt_einsum's "
            "`dp` search, einc's per-step bookkeeping). `Expression(p).explain` on a fresh expression adds "
            "parsing and code generation (no compilation). The opt_einsum rows are `contract_path(..., "
            "shapes=True)`."), "",
            *table_a(rows_a), "",
            "### (b) Per-call overhead with a cached plan", "",
            case.description, "",
            markdown_table(result), "",
            *[f"- {n}" for n in case.notes],
            (f"- einc (torchscript) per call: {format_time(ts)}; torch.einsum per call: "
            f"{format_time(result.medians['torch.einsum'])}, of which its re-planning "
            f"(`opt_einsum.contract_path(eq, *tensors, optimize='auto')`, timed alone) is about "
            f"{format_time(replan_time)}."),
            "",
            "### (c) Default strategy vs opt_einsum's auto, 4-20 operands", "",
            ("Chains: `ab,bc,...` with seeded random dimensions 2-64 (seed = n). Networks: "
            "`opt_einsum.testing.rand_equation(n, 3, seed=0, n_out=2)`. Planning time is "
            "`einc.planner.plan` (default strategy) and `opt_einsum.contract_path(optimize=\"auto\")`; "
            f"`optimal` (exhaustive) only up to {OPTIMAL_MAX} operands."), "",
            *table_c(rows_c), "",
            f"- opt_einsum's auto chose a costlier path than einc's default in {len(worse)} of {len(rows_c)} cases "
            + (f"(up to {max(r['auto_cost'] / r['einc_cost'] for r in worse):.2f}x)" if worse else "")
            + f"; a cheaper one in {len(better)}"
            + (": " + ", ".join(f"{r['kind']} n={r['n']} ({r['auto_cost'] / r['einc_cost']:.3f}x)" for r in better)
               if better else "") + ".",
            ("- `dp` (as opt_einsum runs it: `search_outer=False`) never tries outer products, so where the "
            "cheapest path takes one it can cost a little more than `optimal` (and than opt_einsum's auto, "
            "which is `optimal` up to 4 operands); see `tests/test_plan.py`."),
            "",
            "### (d) Planning time is bounded: the slowest over random networks of 10-60 operands", "",
            ("Each network `opt_einsum.testing.rand_equation(n, regularity, seed=seed, n_out=2, d_min=2, "
             "d_max=high)` for regularity 3, 4, 6, the seeds, and axes of size 2 (high=2) or 2-9 (high=9), "
             "planned once by `einc.planner.plan` with the default strategy (`time.perf_counter`). Dynamic "
             "programming stops after `einc.paths.DP_BUDGET` comparisons and takes the cheaper of RandomGreedy's "
             "and cotengra's paths; "
             "networks whose intermediates pass 2**63 elements are planned, then refused."), "",
            *table_d(rows_d), "",
            "### (e) Per call on large networks: the bounded default against cotengra", "",
            ("einc's default plan (bounded planning) against `optimize=\"cotengra\"` (cotengra's "
             "`HyperOptimizer(max_repeats=32)`, unbounded planning), each run by einc and by "
             "`opt_einsum.contract_expression(..., optimize=path)` with the torch backend. Planning times "
             "include parsing and `explain` (`time.perf_counter`, once)."), "",
            *table_e(rows_e), "",
        ]
        write_section(args.markdown, HEADING, "\n".join(lines).rstrip() + "\n", PREAMBLE)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
