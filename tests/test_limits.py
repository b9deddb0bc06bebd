"""Bounds on what einc accepts and keeps: pattern length, nesting, option values, the
linecache entries of generated code; and hostile options at every entry point.

References: the documented limits (README, "Limits"), and the CLI's contract (exit 2,
``einc: error:``, no traceback).
"""

from __future__ import annotations

import gc
import linecache
import subprocess
import sys

import pytest
import torch
from conftest import randn

import einc
from einc import parser
import einc.api
import einc.backends
from einc.backends import registered_sources
from einc.cli import main


def _nested(depth: int) -> str:
    pattern = "a"
    for _ in range(depth):
        pattern = f"sum({pattern} -> a)"
    return pattern


@pytest.mark.parametrize("depth", [parser.MAX_NESTING + 1, 400])
def test_deep_nesting_is_an_einc_error(depth):
    with pytest.raises(einc.EincError, match=f"nest deeper than {parser.MAX_NESTING}") as err:
        einc.compile(_nested(depth))
    assert "^" in str(err.value)


def test_nesting_up_to_the_limit_compiles_and_runs():
    # MAX_NESTING parentheses: one per nested operation here.
    f = einc.compile(_nested(parser.MAX_NESTING - 1), backend="eager")
    x = randn(3)
    torch.testing.assert_close(f(x), x)


def test_long_patterns_are_refused_before_parsing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the parser ran on an over-long pattern")

    monkeypatch.setattr(parser, "_lark", never)
    pattern = "a " * (parser.MAX_PATTERN_LENGTH // 2) + "b -> b"
    with pytest.raises(einc.EincError, match=f"at most {parser.MAX_PATTERN_LENGTH:,}"):
        einc.compile(pattern)
    with pytest.raises(einc.EincError, match="characters"):
        einc.compile("a" * 1_000_000)


def test_a_long_valid_pattern_within_the_limit_compiles():
    # 2,000 operands of a ring network, about 30,000 characters: under the limit.
    names = [f"x{i}" for i in range(2000)]
    pattern = ", ".join(f"{names[i]} {names[(i + 1) % 2000]}" for i in range(2000)) + " ->"
    assert len(pattern) < parser.MAX_PATTERN_LENGTH
    assert einc.compile(pattern).ir.leaves == 2000


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"memory_limit": "1" + "0" * 400 + "b"}, "memory_limit"),  # a float overflow before
        ({"memory_limit": "1e3MiB"}, "memory_limit"),  # no exponents
        ({"memory_limit": 2**63}, "below 2**63"),
        ({"notation": ["spaced"]}, "notation"),  # unhashable: a TypeError before
        ({"notation": 1}, "notation"),
        ({"backend": ["eager"]}, "backend"),
        ({"fuse": "yes"}, "fuse"),
        ({"optimize": {"dp": 1}}, "optimize"),
        ({"optimize": "fast"}, "optimize='fast'"),
    ],
)
def test_bad_options_are_einc_errors_at_compile_time(options, fragment):
    with pytest.raises(einc.EincError, match=fragment.replace("*", r"\*")):
        einc.compile("ij->i", **options)
    with pytest.raises(einc.EincError, match=fragment.replace("*", r"\*")):
        einc.Expression("ij->i", **options)


@pytest.mark.parametrize("dtype", ["float32", "torch.float64", torch.float16])
def test_explain_takes_a_dtype_or_its_name(dtype):
    plan = einc.compile("ij->i").explain((2, 3), dtype=dtype)
    assert plan.dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", ["float33", 32, torch.Tensor])
def test_explain_refuses_what_is_no_dtype(dtype):
    with pytest.raises(einc.EincError, match="dtype"):
        einc.compile("ij->i").explain((2, 3), dtype=dtype)
    with pytest.raises(einc.EincError, match="dtype"):
        einc.compile("ij->i").module((2, 3), dtype=dtype)


def test_linecache_holds_only_live_generated_code(monkeypatch):
    # An expression called over many shapes keeps cache_size compiled signatures, and the
    # process keeps COMPILED_CACHE_SIZE compiled sources; the linecache entries of the
    # code both dropped go with it.
    monkeypatch.setattr(einc.backends, "COMPILED_CACHE_SIZE", 4)
    einc.backends._compiled.clear()
    gc.collect()
    before = registered_sources()
    f = einc.Expression("b t c, c d -> b t d", backend="eager", cache_size=8)
    weight = randn(4, 3)
    for length in range(1, 300):
        x = randn(1, length, 4)
        for _ in range(einc.api.GENERIC_CALLS + 1):  # past the shared code: literal code for each shape
            f(x, weight)
    gc.collect()
    # 8 signatures' literal code, the shared generic code, 4 more in the process cache.
    assert registered_sources() - before <= 8 + 1 + 4
    generated = [name for name in linecache.cache if name.startswith("<einc-generated-")]
    assert len(generated) <= before + 8 + 1 + 4
    del f
    einc.backends._compiled.clear()
    gc.collect()
    assert registered_sources() <= before


def test_generated_code_shows_in_tracebacks():
    f = einc.compile("ij,jk->ik", backend="eager")
    source = f.explain((2, 3), (3, 4)).source
    with pytest.raises(RuntimeError) as err:
        entry = f._entry((randn(2, 3), randn(3, 4)))
        entry.fn(randn(2, 3), randn(5, 4))  # the compiled function, past einc's checks
    frames = [frame for frame in err.traceback if "einc-generated" in str(frame.path)]
    assert frames and frames[-1].statement is not None
    assert str(frames[-1].statement).strip() in source


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["explain", _nested(400), "--shapes", "3"], "nest deeper"),  # a RecursionError before
        (["explain", "ij->i", "--shapes", "2x3", "--memory-limit", "1" + "0" * 400 + "b"], "memory_limit"),
        (["bench", "ij->i", "--shapes", "100000000x100000000"], "cannot allocate"),  # a traceback before
        (["bench", "ij->i", "--shapes", "2x3", "--threads", "100000"], "threads"),  # a segfault before
        (["explain", "h w -> h w c", "--shapes", "2x3"], "--size c=4"),  # the CLI's way to give a size
    ],
    ids=["deep-nesting", "huge-memory-limit", "unallocatable", "threads", "size-hint"],
)
def test_cli_bad_input_exits_2_without_traceback(argv, fragment, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors exit from inside
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "einc: error:" in err and fragment in err and "Traceback" not in err


def test_cli_prints_no_numpy_warning():
    # torch warns "Failed to initialize NumPy" on import where numpy is missing; einc
    # depends on numpy, so no command prints it.
    result = subprocess.run([sys.executable, "-m", "einc", "explain", "ij->i", "--shapes", "2x3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "NumPy" not in result.stderr and "Warning" not in result.stderr


def test_numpy_is_a_declared_dependency():
    # What keeps torch's "Failed to initialize NumPy" warning away on a fresh install.
    from importlib.metadata import requires

    assert any(r.split(";")[0].strip().lower().startswith("numpy") for r in requires("einc") or [])


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_a_new_shape_over_the_limit_on_shared_code_is_refused(backend):
    # A new shape of a two-operand pattern runs shared shape-generic code without a
    # plan: the limit is checked all the same, with the planner's message.
    f = einc.compile("ij,jk->ik", memory_limit=100, backend=backend)
    a, b = randn(2, 3), randn(3, 4)
    torch.testing.assert_close(f(a, b), a @ b)
    with pytest.raises(einc.EincError, match=r"memory_limit=100 elements is too small: the output alone"):
        f(randn(20, 3), randn(3, 20))
