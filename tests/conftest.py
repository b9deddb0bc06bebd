"""Shared helpers for einc's tests.

References are always computed without einc: ``torch.einsum`` in float64 (complex128
for complex inputs), ``einops`` for rearrange/repeat, and naive loops where needed.
Test modules import the helpers directly (``from conftest import ...``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# One reproducible hypothesis profile for everyone (CI included): derandomized, no
# example database, no deadline (the first call of a pattern compiles it).
settings.register_profile(
    "einc",
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=100,
    print_blob=True,
    # function_scoped_fixture: both_codes only sets which code runs, the same for every example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.load_profile("einc")


def examples(n: int) -> int:
    """``n`` hypothesis examples, times ``$EINC_EXAMPLES_SCALE`` (default 1) for long hunts."""
    return n * max(1, int(os.environ.get("EINC_EXAMPLES_SCALE", "1")))


@pytest.fixture(params=["shared", "literal"])
def both_codes(request, monkeypatch) -> None:
    """Run a test twice: on the shape-generic code a new input signature shares for its
    first calls, and on the literal code compiled for it alone (from then on); modules
    use it with ``pytestmark = pytest.mark.usefixtures("both_codes")``."""
    import einc.api

    einc.api._cached.cache_clear()  # fresh expressions: their first calls are new signatures
    if request.param == "literal":
        monkeypatch.setattr(einc.api, "GENERIC_CALLS", 0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


def widen(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex) copy of ``t``; integers and bools widen to float64."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def reference_einsum(equation: str, *tensors: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` evaluated in float64 / complex128."""
    return torch.einsum(equation, *[widen(t) for t in tensors])


def randn(*shape: int, dtype: torch.dtype = torch.float64, **kw) -> torch.Tensor:
    """Random tensor (``randn()`` is a scalar); float16/bfloat16 are drawn in float32 and rounded."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.randn(tuple(shape), **kw).to(dtype)
    return torch.randn(tuple(shape), dtype=dtype, **kw)


def operands(shapes, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [randn(*s, dtype=dtype) for s in shapes]


_COMPACT_TERM = re.compile(r"\.\.\.|[A-Za-z]")


def to_spaced(equation: str) -> str:
    """Spell a compact einsum equation in einc's spaced notation.

    >>> to_spaced("bhqd,bhkd->bhqk")
    'b h q d, b h k d -> b h q k'
    >>> to_spaced("...ij,...jk->...ik")
    '... i j, ... j k -> ... i k'
    >>> to_spaced(",->")
    ', ->'
    >>> to_spaced("ij,jk")
    'i j, j k'
    """
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")

    def spell(axes: str) -> str:
        terms = _COMPACT_TERM.findall(axes)
        assert "".join(terms) == axes, f"not a compact axis list: {axes!r}"
        return " ".join(terms)

    spaced = ", ".join(spell(op) for op in lhs.split(","))
    if arrow:
        spaced += " -> " + spell(rhs)
    return re.sub(" +", " ", spaced).strip()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Shape, then values (compared in the wider of the two dtypes; NaN matches only NaN)."""
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), tuple(expected.shape))
    torch.testing.assert_close(widen(actual), widen(expected), rtol=rtol, atol=atol, check_dtype=False, equal_nan=True)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """rtol/atol for comparing a result in ``dtype`` (with O(1) random inputs)."""
    return {
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.complex64: dict(rtol=1e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.complex128: dict(rtol=1e-10, atol=1e-12),
    }[dtype]


def default_strategy(operands: int):
    """einc's documented ``optimize="auto"`` (README), in opt_einsum's terms."""
    import opt_einsum as oe

    if operands <= 6:
        return "optimal"
    if operands <= 10:
        return oe.paths.DynamicProgramming(search_outer=True)
    if operands <= 20:
        return "dp"
    return oe.path_random.RandomGreedy(max_repeats=128)


PROBE = """
import re, sys, torch, einc
torch.set_num_threads(1)
{setup}
{call}  # imports, compilation: not counted
status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
{call}
print((status("VmHWM") - before) * 1024)
"""


def peak_growth(setup: str, call: str, *argv: str) -> int:
    """How far one more ``call`` (after ``setup`` and a first call) grows the peak RSS of a
    fresh process, in bytes (Linux: reads /proc/self); ``sys.argv[1:]`` is ``argv``."""
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    script = PROBE.format(setup=setup, call=call)
    return int(subprocess.run([sys.executable, "-c", script, *argv], check=True, capture_output=True, text=True,
                              env=env).stdout)


def assert_peak(setup: str, call: str, budget: str, bound: int | None, floor: int) -> None:
    """One more ``call`` grows the peak RSS by less than ``bound`` under ``budget``; with
    ``bound=None`` (unsliced, for the record) by at least ``floor``: the probe sees it."""
    grown = peak_growth(setup, call, budget)
    if bound is None:
        assert grown >= floor, f"unsliced peak grew by only {grown / 2**20:.1f} MiB: the probe sees nothing"
    else:
        assert grown < bound, f"peak grew by {grown / 2**20:.1f} MiB under a {budget} budget"
