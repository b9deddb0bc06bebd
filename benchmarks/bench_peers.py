"""The peer table of issue 11: einc against the best peer in each of its seven groups, in one run.

    python benchmarks/bench_peers.py --rounds 3 --markdown RESULTS.md

Groups: 1. operand layouts, 2. new shapes, 3. per-call overhead, 4. planning (per call
on large networks, against cotengra's paths), 5. semiring floors, 6. first use,
7. reductions under autograd.  Every case is timed as in ``common.run_case`` (CPU,
float32, one thread, contenders interleaved over ``--rounds`` passes, each checked
against a float64 reference first); a row's ratio is einc's lowest median over the
peer's, and its spread the lowest and highest of the passes' ratios.  First use
(group 6) is timed once per fresh pattern and fresh process (``time.perf_counter``,
median of 5), as in ``bench_shapes.py``.  The groups' own scripts have the full
tables; this one is the summary.

No timing here is an assertion.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import opt_einsum as oe
import torch
from opt_einsum.testing import rand_equation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core  # noqa: E402
import bench_layouts  # noqa: E402
import bench_shapes  # noqa: E402
from bench_planning import spaced  # noqa: E402
from common import PREAMBLE, Case, Result, machine_info, parse_args, run_case, write_section  # noqa: E402

import einc  # noqa: E402

HEADING = "## Peers (issue 11): the seven groups in one run"
TS, EAGER = "einc (torchscript)", "einc (eager)"


@dataclass(frozen=True)
class Row:
    group: str
    text: str
    case: str
    einc: str
    peers: tuple[str | tuple[str, str], ...]
    """The peers (the fastest counts): contenders of ``case``, or ``(case, contender)`` of another."""
    goal: float


def _fetch(results: dict[str, Result], case: str, peer: str | tuple[str, str]) -> tuple[Result, str] | None:
    """The result and contender a peer names, if it ran."""
    case, name = peer if isinstance(peer, tuple) else (case, peer)
    result = results.get(case)
    return (result, name) if result is not None and name in result.medians else None


# ----------------------------------------------------------------------- cases


def _layout(name: str) -> Callable[[], Case]:
    _, pattern, shapes = next(v for v in bench_layouts.VARIANTS if v[0] == name)
    return lambda: bench_layouts._case(name, pattern, shapes)


def _network(n: int, seed: int) -> Callable[[], Case]:
    def make() -> Case:
        equation, shapes = rand_equation(n, 3, seed=seed, d_min=2, d_max=6, n_out=2)
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(tuple(s), generator=g) for s in shapes]
        pattern = spaced(equation)
        default, hyper = einc.compile(pattern), einc.compile(pattern, optimize="cotengra")
        path = hyper.explain(*xs).path
        expression = oe.contract_expression(equation, *[x.shape for x in xs], optimize=path)
        return Case(f"network-{n}-{seed}", f"`rand_equation({n}, 3, seed={seed}, d_min=2, d_max=6, n_out=2)`", {
            TS: lambda: default(*xs),
            "einc, cotengra's path": lambda: hyper(*xs),
            "opt_einsum expression, cotengra's path": lambda: expression(*xs, backend="torch"),
        }, lambda: oe.contract(equation, *[x.double() for x in xs], optimize=path),
            [TS, "einc, cotengra's path"])
    return make


def _logmm(n: int) -> Case:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    f = einc.compile("logsumexp(i k, k j -> i j)")
    return Case("logmm", f"log semiring `logsumexp(i k, k j -> i j)`, n={n}, N(0, 1)", {
        TS: lambda: f(a, b),
        "unsafe torch.log(torch.exp(a) @ torch.exp(b))": lambda: torch.log(torch.exp(a) @ torch.exp(b)),
    }, lambda: torch.logsumexp(a.double()[:, :, None] + b.double()[None], 1), [TS])


def _maxplus(z: int, n: int) -> Callable[[], Case]:
    def make() -> Case:
        g = torch.Generator().manual_seed(4)
        a, b = torch.randn(z, n, n, generator=g) * 10, torch.randn(z, n, n, generator=g) * 10
        f = einc.compile("max(z i k, z k j -> z i j)")
        return Case(f"maxplus-{z}x{n}", f"max-plus `max(z i k, z k j -> z i j)`, ({z}, {n}, {n})", {
            TS: lambda: f(a, b),
            "naive (a[..., None] + b[:, None]).amax(2)": lambda: (a[..., None] + b[:, None]).amax(2),
        }, lambda: (a.double()[..., None] + b.double()[:, None]).amax(2), [TS])
    return make


def _structural(n: int) -> tuple[Callable[[], Case], Callable[[], Case]]:
    g = torch.Generator().manual_seed(8)
    a, b = (torch.full((n, n), float("-inf")) for _ in range(2))
    a.diagonal().copy_(torch.randn(n, generator=g))
    b.diagonal().copy_(torch.randn(n, generator=g))
    dense_a, dense_b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    f = einc.compile("logsumexp(i k, k j -> i j)")

    def diagonal() -> torch.Tensor:
        out = torch.full((n, n), float("-inf"), dtype=torch.float64)
        out.diagonal().copy_(a.diagonal().double() + b.diagonal().double())
        return out
    return (
        lambda: Case("logmm-diagonal", f"diagonal {n}x{n} log-space matrices (-inf off the diagonal)",
                     {TS: lambda: f(a, b)}, diagonal, [TS]),
        lambda: Case("logmm-dense", "the same shapes, dense N(0, 1)",
                     {"einc on dense data": lambda: f(dense_a, dense_b)},
                     lambda: torch.logsumexp(dense_a.double()[:, :, None] + dense_b.double()[None], 1), []),
    )


def _autograd(name: str, pattern: str, shape: tuple[int, ...], torch_form: Callable[[torch.Tensor], torch.Tensor],
              label: str) -> Callable[[], Case]:
    def make() -> Case:
        g = torch.Generator().manual_seed(6)
        x = torch.randn(shape, generator=g).requires_grad_()
        weight = torch.randn(torch_form(x.detach()).shape, generator=g)
        f = einc.compile(pattern)

        def both(forward: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                leaf.grad = None
                (forward(leaf) * weight).sum().backward()
                return leaf.grad
            return run

        wide = x.detach().double().requires_grad_()
        return Case(name, f"`{pattern}` at {shape}, forward + backward", {
            TS: both(f, x), label: both(torch_form, x),
        }, both(torch_form, wide), [TS])
    return make


DIAGONAL, DENSE = _structural(512)
MAKERS: list[Callable[[], Case]] = [
    _layout("narrow-n"), _layout("bilinear"), _layout("row-dots"),
    *bench_shapes.CASES,
    bench_core.case_overhead, bench_core.case_small_attention,
    _network(30, 1), _network(40, 0), _network(40, 2),
    lambda: _logmm(256), _maxplus(8, 64), _maxplus(1, 256), DIAGONAL, DENSE,
    _autograd("lse-autograd", "logsumexp(b v -> b)", (256, 8192), lambda x: torch.logsumexp(x, 1),
              "torch.logsumexp(x, 1)"),
    _autograd("softmax-autograd", "softmax(b [v])", (256, 8192), lambda x: torch.softmax(x, 1),
              "torch.softmax(x, 1)"),
]

NETWORK_PEERS = ("einc, cotengra's path", "opt_einsum expression, cotengra's path")
ROWS = [
    Row("1. layouts", "`l b n d, v b n l -> v b n d` vs torch.einsum", "narrow-n", TS, ("torch.einsum",), 1.05),
    Row("1. layouts", "batched bilinear vs F.bilinear", "bilinear", TS, ("F.bilinear",), 1.05),
    Row("1. layouts", "`b i j, b i j -> b` vs torch.linalg.vecdot", "row-dots", TS, ("torch.linalg.vecdot",), 1.05),
    Row("2. new shapes", "projection, a new shape every call, vs torch.einsum", "projection",
        bench_shapes.TS, ("torch.einsum",), 1.5),
    Row("2. new shapes", "attention scores, a new shape every call, vs torch.einsum", "scores",
        bench_shapes.TS, ("torch.einsum",), 1.5),
    Row("3. per call", "2x2 `ij,jk->ik`: eager vs torch.mm", "per-call overhead", EAGER, ("torch.mm",), 1.5),
    Row("3. per call", "2x2 `ij,jk->ik`: the default (TorchScript) vs eager", "per-call overhead", TS, (EAGER,), 1.0),
    Row("3. per call", "small attention scores vs torch.einsum", "small attention", TS, ("torch.einsum",), 1.1),
    Row("4. planning", "30-operand network per call vs the best on cotengra's path", "network-30-1", TS,
        NETWORK_PEERS, 1.1),
    Row("4. planning", "40-operand network (seed 0) per call vs the best on cotengra's path", "network-40-0", TS,
        NETWORK_PEERS, 1.1),
    Row("4. planning", "40-operand network (seed 2) per call vs the best on cotengra's path", "network-40-2", TS,
        NETWORK_PEERS, 1.1),
    Row("5. semiring floors", "log semiring n=256 vs the unsafe floor", "logmm", TS,
        ("unsafe torch.log(torch.exp(a) @ torch.exp(b))",), 1.5),
    Row("5. semiring floors", "max-plus (8, 64, 64) vs broadcast + amax", "maxplus-8x64", TS,
        ("naive (a[..., None] + b[:, None]).amax(2)",), 1.0),
    Row("5. semiring floors", "max-plus 256² vs broadcast + amax (goal: ≥ 7x faster)", "maxplus-1x256", TS,
        ("naive (a[..., None] + b[:, None]).amax(2)",), 1 / 7),
    Row("5. semiring floors", "log semiring, diagonal 512² (structural -inf) vs einc on dense data",
        "logmm-diagonal", TS, (("logmm-dense", "einc on dense data"),), 2.0),
    Row("7. autograd", "logsumexp (256, 8192) forward + backward vs torch.logsumexp", "lse-autograd", TS,
        ("torch.logsumexp(x, 1)",), 1.2),
    Row("7. autograd", "softmax (256, 8192) forward + backward vs torch.softmax", "softmax-autograd", TS,
        ("torch.softmax(x, 1)",), 1.2),
]


# ------------------------------------------------------------------ the table


def _row(row: Row, results: dict[str, Result]) -> list[str] | None:
    if row.case not in results:
        return None
    result = results[row.case]
    fetched = [f for f in (_fetch(results, row.case, p) for p in row.peers) if f is not None]
    if not fetched:
        return None
    other, name = min(fetched, key=lambda f: f[0].medians[f[1]])
    mine = result.medians[row.einc]
    ratios = [a / b for a, b in zip(result.rounds[row.einc], other.rounds[name])]
    ratio = mine / other.medians[name]
    return [row.group, row.text, f"{mine * 1e6:,.1f} µs", f"{name}: {other.medians[name] * 1e6:,.1f} µs",
            f"{ratio:.2f}x", f"{min(ratios):.2f}–{max(ratios):.2f}x", f"≤ {row.goal:.3g}x",
            "yes" if ratio <= row.goal else "**no**"]


def first_use_rows() -> list[list[str]]:
    rows = []
    worst = max(bench_shapes._first_call(p, s, "torchscript", True) for p, s in bench_shapes.FIRST_USE)
    rows.append(["6. first use", f"a new pattern's first compile + call, warm process (slowest of "
                 f"{len(bench_shapes.FIRST_USE)} patterns)", f"{worst * 1e3:.1f} ms", "—", "—", "—", "≤ 20 ms",
                 "yes" if worst <= 0.02 else "**no**"])
    torch_alone, _ = bench_shapes._fresh("")
    _, first = bench_shapes._fresh("import einc\neinc.compile('ij,jk->ik')(torch.randn(8, 8), torch.randn(8, 8))")
    share = first / torch_alone
    rows.append(["6. first use", "`import einc` + first compile and call, fresh process, vs `import torch`",
                 f"{first * 1e3:.0f} ms", f"import torch: {torch_alone * 1e3:.0f} ms", f"{share:.2f}x", "—",
                 "≤ 0.1x", "yes" if share <= 0.1 else "**no**"])
    return rows


HEADER = ["group", "case", "einc", "best peer", "ratio", "spread over passes", "goal", "met"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Result] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cotengra's note on optional kahypar
        for make in MAKERS:
            case = make()
            if args.only and args.only not in case.name:
                continue
            results[case.name] = run_case(case, args.min_run_time, args.rounds, verbose=False)
            print(f"  {case.name} done", flush=True)
    table = [r for r in (_row(row, results) for row in ROWS) if r is not None]
    if not args.only:
        split = next(i for i, r in enumerate(table) if r[0].startswith("7."))
        table[split:split] = first_use_rows()
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    print("\n".join(lines))
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.markdown:
        info = machine_info()
        section = [
            HEADING, "",
            ("einc (the default TorchScript backend unless the row says eager) against the best peer of each "
             "case of issue 11's seven groups, all in one run. Ratio: einc's time / the peer's (lowest medians); "
             "spread: the lowest and highest of the passes' ratios."), "",
            f"- Command: `python benchmarks/bench_peers.py {' '.join(sys.argv[1:])}`",
            f"- Run took {elapsed:.0f} s; {args.rounds} pass(es), `blocked_autorange(min_run_time="
            f"{args.min_run_time})`, one thread, float32",
            *[f"- {k}: {v}" for k, v in info.items()], "",
            *lines, "",
        ]
        write_section(args.markdown, HEADING, "\n".join(section), PREAMBLE)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
