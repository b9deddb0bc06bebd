"""The command line: ``einc explain``, ``--help``, ``--version``, errors (exit status 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import opt_einsum as oe
import pytest

import einc
from einc.cli import main


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``einc.cli.main(argv)`` -> (exit status, stdout, stderr); argparse exits count too."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


# (pattern, shapes, extra arguments, operand shapes for opt_einsum or None)
EXPLAIN = [
    ("bhqd,bhkd->bhqk", ["2x4x8x16", "2x4x8x16"], [], [(2, 4, 8, 16), (2, 4, 8, 16)]),  # compact attention
    ("b h q d, b h k d -> b h q k", ["2x4x8x16", "2x4x6x16"], [], None),  # spaced attention
    ("ab,bc,cd->ad", ["8x64", "64x8", "8x64"], [], [(8, 64), (64, 8), (8, 64)]),  # chain
    ("ab,bc,cd->ad", ["8x64", "64x8", "8x64"], ["--optimize", "greedy"], [(8, 64), (64, 8), (8, 64)]),  # strategy
    (",->", ["scalar", "scalar"], [], [(), ()]),  # scalars
    ("ij->ji", ["3X4"], [], None),  # upper-case X in a shape
    ("ab->ba", ["3x4"], ["--notation", "compact"], None),  # forced notation
]


@pytest.mark.parametrize("pattern, shapes, extra, oe_shapes", EXPLAIN, ids=[f"{e[0]}{e[2]}" for e in EXPLAIN])
def test_explain(capsys, pattern, shapes, extra, oe_shapes):
    status, out, err = run_main(capsys, "explain", pattern, "--shapes", *shapes, *extra)
    assert status == 0, err
    assert err == ""
    assert "path:" in out
    assert "def einc_fn(" in out
    assert repr(pattern) in out
    if oe_shapes is not None:
        optimize = extra[1] if extra[:1] == ["--optimize"] else "auto"
        path, info = oe.contract_path(pattern, *oe_shapes, shapes=True, optimize=optimize)
        assert f"path:                  {[tuple(p) for p in path]}" in out
        assert f"{int(info.opt_cost):,}" in out


def test_explain_prints_what_the_api_plans(capsys):
    status, out, _ = run_main(capsys, "explain", "ab,bc,cd->ad", "--shapes", "8x64", "64x8", "8x64")
    assert status == 0
    plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
    assert plan.source.strip() in out
    assert str(plan.path) in out


def test_explain_with_size(capsys):
    status, out, err = run_main(
        capsys, "explain", "b q (h d), b k (h d) -> b h q k", "--shapes", "2x8x64", "2x6x64", "--size", "h=8"
    )
    assert status == 0, err
    assert "2x8x8x6" in out  # output shape: b h q k with h=8
    assert "def einc_fn(" in out


def test_explain_with_repeated_size(capsys):
    status, out, err = run_main(
        capsys, "explain", "h w -> (h r) w c", "--shapes", "3x4", "--size", "r=2", "--size", "c=5"
    )
    assert status == 0, err
    assert "6x4x5" in out


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["explain", "ij,jk->ik)", "--shapes", "2x3", "3x4"],
         ["unexpected ')'", "    ij,jk->ik)\n", "             ^"]),  # syntax error with caret
        (["explain", "ij,jk->ik", "--shapes", "2x3", "4x5"], ["axis 'j'", "operand 1", "4", "3"]),  # shapes
        (["explain", "ij,jk->ik", "--shapes", "2x3"], ["2 operands", "1 tensors"]),  # too few shapes
        (["explain", "b (h d) -> b h d", "--shapes", "2x12"], ["cannot infer"]),  # needs --size
        (["explain", "ij->ji", "--shapes", "2x3", "--size", "q=3"], ["'q'"]),  # unknown axis
        (["explain", "ab,bc,cd->ad", "--shapes", "2x3", "3x4", "4x5", "--optimize", "bogus"], ["bogus"]),
    ],
    ids=["syntax", "shape-mismatch", "operand-count", "underdetermined", "unknown-size", "bad-strategy"],
)
def test_errors_exit_2_without_traceback(capsys, argv, fragments):
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.startswith("einc: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "ij->ji", "--shapes", "2xq"],  # bad shape
        ["explain", "ij->ji", "--shapes", "2x-3"],  # negative size
        ["explain", "ij->ji", "--shapes", "2x3", "--size", "h"],  # size without '='
        ["explain", "ij->ji", "--shapes", "2x3", "--size", "h=x"],  # size not an int
        ["explain", "ij->ji"],  # --shapes missing
        ["explain", "ij->ji", "--shapes", "2x3", "--notation", "weird"],  # bad notation choice
        [],  # no command
        ["frobnicate"],  # unknown command
    ],
    ids=["bad-shape", "negative", "size-no-eq", "size-not-int", "no-shapes", "bad-notation", "no-command", "unknown"],
)
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert "usage: einc" in err
    assert "Traceback" not in err


def test_help(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    assert "usage: einc" in out and "explain" in out
    status, out, _ = run_main(capsys, "explain", "--help")
    assert status == 0
    for option in ("--shapes", "--size", "--optimize", "--notation"):
        assert option in out


def test_version(capsys):
    status, out, _ = run_main(capsys, "--version")
    assert status == 0
    assert out.strip() == f"einc {einc.__version__}"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_python_dash_m_einc(tmp_path):
    # A real process, as users run it (from a directory outside the repository).
    done = subprocess.run(
        [sys.executable, "-m", "einc", "explain", "b h q d, b h k d -> b h q k", "--shapes", "2x4x8x16", "2x4x8x16"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "path:                  [(0, 1)]" in done.stdout
    assert "def einc_fn(" in done.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "einc", "explain", "a -> b -> c", "--shapes", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-2:] == ["    a -> b -> c", "           ^"]

    version = subprocess.run(
        [sys.executable, "-m", "einc", "--version"], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120
    )
    assert version.returncode == 0 and version.stdout.strip() == f"einc {einc.__version__}"
