"""Caches under concurrency and at their bounds.

Every result is checked against torch.einsum in float64, computed in the same thread.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import einc

# (pattern, shapes to draw from): compact and spaced, several operands, compositions.
WORKLOAD = [
    ("ij,jk->ik", [((3, 4), (4, 5)), ((2, 7), (7, 1)), ((6, 2), (2, 6))]),
    ("b h q d, b h k d -> b h q k", [((2, 3, 4, 5), (2, 3, 6, 5)), ((1, 2, 3, 4), (1, 2, 3, 4))]),
    ("ab,bc,cd->ad", [((3, 4), (4, 5), (5, 2)), ((8, 2), (2, 8), (8, 3))]),
    ("...ij,...j->...i", [((2, 3, 4), (4,)), ((5, 4), (2, 5, 4))]),
]
REFERENCE = {
    "ij,jk->ik": "ij,jk->ik",
    "b h q d, b h k d -> b h q k": "bhqd,bhkd->bhqk",
    "ab,bc,cd->ad": "ab,bc,cd->ad",
    "...ij,...j->...i": "...ij,...j->...i",
}


def _worker(seed: int, shared: dict[str, einc.Expression], calls: int) -> int:
    rng = random.Random(seed)
    done = 0
    for _ in range(calls):
        pattern, choices = rng.choice(WORKLOAD)
        shapes = rng.choice(choices)
        xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
        how = rng.randrange(3)
        if how == 0:  # one Expression shared by every thread
            out = shared[pattern](*xs)
        elif how == 1:  # the process-wide compile cache
            out = einc.einsum(pattern, *xs)
        else:  # a private expression compiled in this thread
            out = einc.compile(pattern, backend=rng.choice(["eager", "torchscript"]))(*xs)
        torch.testing.assert_close(out, torch.einsum(REFERENCE[pattern], *xs))
        done += 1
    return done


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_many_threads_compile_and_call(backend):
    shared = {p: einc.Expression(p, backend=backend) for p, _ in WORKLOAD}
    threads, calls = 8, 60
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda s: _worker(s, shared, calls), range(threads)))
    assert results == [calls] * threads
    for expr in shared.values():
        info = expr._lookup.cache_info()
        # Each shared expression built at most a few signatures, however many threads raced.
        assert info.currsize <= 3


def test_threads_racing_on_one_new_signature():
    expr = einc.Expression("ij,jk->ik", backend="torchscript")
    a, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    start = threading.Barrier(8)
    outputs: list[torch.Tensor] = []

    def race() -> None:
        start.wait()
        outputs.append(expr(a, b))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 8
    for out in outputs:
        torch.testing.assert_close(out, a @ b)
    assert expr._lookup.cache_info().currsize == 1


def test_expression_cache_stays_bounded_over_thousands_of_shapes():
    expr = einc.Expression("i,i->", backend="eager", cache_size=16)
    for n in range(1, 2001):
        x = torch.arange(n, dtype=torch.float64)
        assert expr(x, x).item() == pytest.approx(float((x * x).sum()))
    assert expr._lookup.cache_info().currsize == 16
    assert expr._plan_lookup.cache_info().currsize <= 16


def test_compile_cache_bound_is_configurable():
    previous = einc.configure(expression_cache_size=8)
    try:
        x = torch.ones(2, dtype=torch.float64)
        for j in range(1, 201):  # 200 distinct (pattern, sizes) keys
            out = einc.compile("i -> i j", backend="eager", j=j)(x)
            assert torch.equal(out, x[:, None].expand(2, j))
        info = einc.api._cached.cache_info()
        assert info.maxsize == 8 and info.currsize <= 8
    finally:
        einc.configure(**previous)
    assert einc.api._cached.cache_info().maxsize == previous["expression_cache_size"]


def test_plan_cache_size_default_is_configurable():
    previous = einc.configure(plan_cache_size=3)
    try:
        assert einc.Expression("i->i")._lookup.cache_info().maxsize == 3
    finally:
        einc.configure(**previous)
    assert einc.Expression("i->i")._lookup.cache_info().maxsize == previous["plan_cache_size"]


def test_process_wide_memory_limit_refuses_before_allocating():
    previous = einc.configure(memory_limit="1MiB")
    try:
        # 10^6 x 10^6 float32 output would be 4 TB; refused while planning.
        with pytest.raises(einc.EincError, match="memory_limit"):
            einc.compile("i,j->ij", backend="eager")(torch.ones(10**6), torch.ones(10**6))
        # Small work still runs, and an expression's own limit can only tighten it.
        torch.testing.assert_close(einc.compile("i,j->ij")(torch.ones(3), torch.ones(4)), torch.ones(3, 4))
    finally:
        einc.configure(**previous)


@pytest.mark.parametrize(
    "options",
    [
        {"plan_cache_size": 0},  # not positive
        {"expression_cache_size": "big"},  # not an int
        {"memory_limit": "lots"},  # no unit
        {"memory_limit": -5},  # negative
    ],
)
def test_configure_rejects_bad_values(options):
    with pytest.raises(einc.EincError, match=next(iter(options))):
        einc.configure(**options)
