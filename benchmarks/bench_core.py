"""Core benchmarks (issue 2): einc against torch.einsum and peers, CPU float32, one thread.

    python benchmarks/bench_core.py                 # print the tables
    python benchmarks/bench_core.py --quick         # short runs
    python benchmarks/bench_core.py --markdown benchmarks/RESULTS.md

Ratios are einc's time / the contender's time (lower is better for einc).  No timing
here is an assertion: the targets are reported as met or missed, never enforced.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import einops
import opt_einsum as oe
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Case,
    Contender,
    Target,
    script,
)

import einc  # noqa: E402

try:
    import einx
except Exception:  # noqa: BLE001 - einx is optional
    einx = None

HEADING = "## Core (issue 2)"

TS = "einc (torchscript)"
EAGER = "einc (eager)"


def _opt_einsum_off() -> contextlib.AbstractContextManager:
    return torch.backends.opt_einsum.flags(enabled=False)


def _einc_pair(pattern: str, tensors, **sizes) -> dict:
    ts = einc.compile(pattern, **sizes)
    eager = einc.compile(pattern, backend="eager", **sizes)
    return {TS: lambda: ts(*tensors), EAGER: lambda: eager(*tensors)}


def case_chain() -> Case:
    eq = "ab,bc,cd,de,ef->af"
    shapes = [(512, 8), (8, 512), (512, 8), (8, 512), (512, 64)]
    torch.manual_seed(0)
    A, B, C, D, E = ts = [torch.randn(s) / s[0] ** 0.5 for s in shapes]
    expr = oe.contract_expression(eq, *shapes)
    contenders = _einc_pair(eq, ts)
    contenders.update({
        "torch.einsum": lambda: torch.einsum(eq, *ts),
        "torch.einsum (opt_einsum off)": Contender(lambda: torch.einsum(eq, *ts), _opt_einsum_off),
        "opt_einsum.contract_expression": lambda: expr(*ts, backend="torch"),
        "einops.einsum": lambda: einops.einsum(*ts, "a b, b c, c d, d e, e f -> a f"),
    })
    if einx is not None:
        contenders["einx.dot"] = lambda: einx.dot("a b, b c, c d, d e, e f -> a f", *ts)
    # Optimal order, written by hand: (B C) and (D E) are the cheap inner products.
    contenders["hand: (A @ (B @ C)) @ (D @ E)"] = lambda: (A @ (B @ C)) @ (D @ E)
    path = einc.compile(eq).explain(*ts).path
    return Case(
        "chain", f"5-operand chain `{eq}`, shapes {shapes}", contenders,
        reference=lambda: torch.einsum(eq, *[t.double() for t in ts]), einc=[TS, EAGER],
        notes=[
            f"einc path {path}; torch.einsum (opt_einsum on, torch's default when installed) calls "
            "`opt_einsum.contract_path(..., optimize='auto')` on every call, then runs the path in C++.",
            "`opt_einsum off` (`torch.backends.opt_einsum.flags(enabled=False)`) contracts left to right "
            "(512x512 intermediates).",
        ],
    )


def case_small_attention() -> Case:
    shape = (2, 4, 8, 16)
    torch.manual_seed(1)
    q, k = torch.randn(shape), torch.randn(shape)
    pattern = "b h q d, b h k d -> b h q k"
    expr = oe.contract_expression("bhqd,bhkd->bhqk", shape, shape)
    contenders = _einc_pair(pattern, (q, k))
    contenders.update({
        "torch.einsum": lambda: torch.einsum("bhqd,bhkd->bhqk", q, k),
        "opt_einsum.contract_expression": lambda: expr(q, k, backend="torch"),
        "einops.einsum": lambda: einops.einsum(q, k, pattern),
    })
    if einx is not None:
        contenders["einx.dot"] = lambda: einx.dot(pattern, q, k)
    contenders["hand: q @ k.transpose(-1, -2)"] = lambda: q @ k.transpose(-1, -2)
    return Case(
        "small attention", f"`{pattern}` at {shape}", contenders,
        reference=lambda: torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()), einc=[TS, EAGER],
    )


def case_large_attention() -> Case:
    b, s, h, d = 8, 256, 8, 64
    torch.manual_seed(2)
    q, k = torch.randn(b, s, h * d), torch.randn(b, s, h * d)
    q4, k4 = q.view(b, s, h, d), k.view(b, s, h, d)
    pattern = "b q (h d), b k (h d) -> b h q k"
    expr = oe.contract_expression("bqhd,bkhd->bhqk", q4.shape, k4.shape)
    contenders = _einc_pair(pattern, (q, k), h=h)
    contenders.update({
        "torch.einsum (4-D views)": lambda: torch.einsum("bqhd,bkhd->bhqk", q.view(b, s, h, d), k.view(b, s, h, d)),
        "opt_einsum.contract_expression (views)": lambda: expr(q.view(b, s, h, d), k.view(b, s, h, d),
                                                               backend="torch"),
        "einops.einsum (views)": lambda: einops.einsum(q.view(b, s, h, d), k.view(b, s, h, d),
                                                       "b q h d, b k h d -> b h q k"),
    })
    if einx is not None:
        contenders["einx.dot"] = lambda: einx.dot(pattern, q, k, h=h)
    contenders["hand: view/transpose @ view/permute"] = (
        lambda: q.view(b, s, h, d).transpose(1, 2) @ k.view(b, s, h, d).permute(0, 2, 3, 1)
    )
    return Case(
        "large attention", f"`{pattern}` with h={h}: q, k of shape {(b, s, h * d)} (b, seq, (h d)), d={d}",
        contenders, reference=lambda: torch.einsum("bqhd,bkhd->bhqk", q4.double(), k4.double()),
        einc=[TS, EAGER],
    )


def case_matmul() -> Case:
    n = 1024
    torch.manual_seed(3)
    A, B = torch.randn(n, n), torch.randn(n, n)
    contenders = _einc_pair("ij,jk->ik", (A, B))
    contenders.update({
        "torch.einsum": lambda: torch.einsum("ij,jk->ik", A, B),
        "hand: A @ B": lambda: A @ B,
    })
    return Case(
        "matmul", f"`ij,jk->ik` at {n}x{n} @ {n}x{n}", contenders,
        reference=lambda: A.double() @ B.double(), einc=[TS, EAGER],
    )


def case_overhead() -> Case:
    torch.manual_seed(4)
    A, B = torch.randn(2, 2), torch.randn(2, 2)
    contenders = _einc_pair("ij,jk->ik", (A, B))
    contenders.update({
        "torch.einsum": lambda: torch.einsum("ij,jk->ik", A, B),
        "torch.mm": lambda: torch.mm(A, B),
        "hand: A @ B": lambda: A @ B,
    })
    return Case(
        "per-call overhead", "`ij,jk->ik` at 2x2: the fixed cost of a cached call", contenders,
        reference=lambda: A.double() @ B.double(), einc=[TS, EAGER],
    )


def case_module() -> Case:
    # A shape-generic module reads its sizes from the tensors and checks them on every
    # call (rank, one name one size, dtype); the expression's code has them as literals.
    torch.manual_seed(5)
    q, k = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5)
    pattern = "b h q d, b h k d -> b h q k"
    module = einc.compile(pattern).module(q, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    contenders = _einc_pair(pattern, (q, k))
    contenders.update({
        "module (eager)": lambda: module(q, k),
        "module (torch.jit.script)": lambda: scripted(q, k),
        "hand: q @ k.transpose(-1, -2)": lambda: q @ k.transpose(-1, -2),
    })
    return Case(
        "module", f"`{pattern}` at (2, 3, 4, 5): `Expression.module` (sizes read and checked at run time) "
        "beside the expression (sizes in the code)", contenders,
        reference=lambda: q.double() @ k.double().transpose(-1, -2), einc=[TS, EAGER],
    )


CASES = [case_chain, case_small_attention, case_large_attention, case_matmul, case_overhead, case_module]

TARGETS = [
    Target("chain", TS, "torch.einsum", 0.25, "chain: einc ≥ 4x faster than torch.einsum (≤ 0.25x)"),
    Target("chain", TS, "hand: (A @ (B @ C)) @ (D @ E)", 1.3, "chain: einc within 1.3x of hand-written"),
    Target("small attention", EAGER, "torch.einsum", 0.7, "small attention: eager ≤ 0.7x torch.einsum"),
    Target("small attention", TS, "torch.einsum", 1.1, "small attention: TorchScript ≤ 1.1x torch.einsum"),
    Target("large attention", TS, "hand: view/transpose @ view/permute", 1.1,
           "large attention: einc within 1.1x of hand-written"),
    Target("matmul", TS, "hand: A @ B", 1.1, "matmul 1024³: einc within 1.1x of hand-written"),
]


INTRO = [
    "einc against torch.einsum and its peers on CPU float32, one thread. `einc (torchscript)` is "
    "`einc.compile(pattern)` (the default backend), `einc (eager)` is `backend=\"eager\"`; both "
    "called after a warm-up, so their plan and compiled function are cached.",
]


def main(argv=None) -> int:
    return script(argv, __doc__, CASES, TARGETS, HEADING, INTRO)


if __name__ == "__main__":
    raise SystemExit(main())
