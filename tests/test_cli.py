"""The command line: ``einc explain`` (text, ``--json``, ``--plot``), ``einc bench``,
``--help``, ``--version``, errors (exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import opt_einsum as oe
import pytest
import torch

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


ATTENTION = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"


@pytest.mark.parametrize("fuse, kernels", [("--fuse", ["sdpa"]), ("--no-fuse", ["bmm", "bmm"])])
def test_explain_attention_with_and_without_the_rewrite(capsys, fuse, kernels):
    # The fused plan is one SDPA step on the three tensors; the plain one two products.
    status, out, err = run_main(capsys, "explain", ATTENTION, "--shapes", "2x8x64", "2x8x64", "2x8x64",
                                "--size", "h=4", fuse, "--json")
    assert status == 0, err
    plan = json.loads(out)
    kernel = kernels[0]
    assert [step["kernel"] for step in plan["steps"]] == kernels
    assert plan["path"] == ([[0, 1, 2]] if kernel == "sdpa" else [[0, 1], [1, 0]])
    assert plan["rewrite"] == ("sdpa" if kernel == "sdpa" else "")
    assert ("scaled_dot_product_attention(" in plan["source"]) is (kernel == "sdpa")


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


# ------------------------------------------------------------------- --json

JSON_CASES = [
    ("ab,bc,cd->ad", [(8, 64), (64, 8), (8, 64)]),
    ("ab,bc,cd,de,ef->af", [(8, 64), (64, 8), (8, 64), (64, 8), (8, 32)]),
    ("bhqd,bhkd->bhqk", [(2, 4, 8, 16), (2, 4, 6, 16)]),
    ("ij,jk,kl,lm,mi->", [(3, 4), (4, 5), (5, 6), (6, 7), (7, 3)]),
]


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


@pytest.mark.parametrize("pattern, shapes", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_explain_json_matches_opt_einsum(capsys, pattern, shapes):
    argv = ["explain", pattern, "--shapes", *map(_dims, shapes), "--json"]
    status, out, err = run_main(capsys, *argv, "--optimize", "dp")
    assert status == 0, err
    data = json.loads(out)  # all of stdout is one JSON document
    path, info = oe.contract_path(pattern, *shapes, shapes=True, optimize="dp")
    assert data["path"] == [list(p) for p in path]
    assert data["flops"] == int(info.opt_cost)
    assert data["naive_flops"] == int(info.naive_cost)
    assert data["largest_intermediate"] == int(info.largest_intermediate)
    assert data["shapes"] == [list(s) for s in shapes]
    assert len(data["steps"]) == len(path)
    assert "def einc_fn(" in data["source"]
    # The default strategy is exact for few operands: never costlier than dp, and its
    # FLOPs are opt_einsum's count for the path it chose.
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    default = json.loads(out)
    _, chosen = oe.contract_path(pattern, *shapes, shapes=True, optimize=[tuple(p) for p in default["path"]])
    assert default["flops"] == int(chosen.opt_cost) <= int(info.opt_cost)


def test_explain_json_with_strategy_and_dtype(capsys):
    shapes = [(8, 64), (64, 8), (8, 64), (64, 8)]
    status, out, err = run_main(capsys, "explain", "ab,bc,cd,de->ae", "--shapes", *map(_dims, shapes),
                                "--optimize", "greedy", "--dtype", "float16", "--json")
    assert status == 0, err
    data = json.loads(out)
    path, info = oe.contract_path("ab,bc,cd,de->ae", *shapes, shapes=True, optimize="greedy")
    assert data["path"] == [list(p) for p in path]
    assert data["flops"] == int(info.opt_cost)
    assert data["dtype"] == "float16"
    assert data["largest_intermediate_bytes"] == 2 * data["largest_intermediate"]


def test_explain_dtype_in_text(capsys):
    status, out, _ = run_main(capsys, "explain", "ij,jk->ik", "--shapes", "8x8", "8x8", "--dtype", "float64")
    assert status == 0
    assert "(512 B as float64)" in out


def test_explain_cotengra(capsys):
    pytest.importorskip("cotengra")
    shapes = [(8, 64), (64, 8), (8, 64)]
    status, out, err = run_main(capsys, "explain", "ab,bc,cd->ad", "--shapes", *map(_dims, shapes),
                                "--optimize", "cotengra", "--json")
    assert status == 0, err
    data = json.loads(out)
    # Whatever path cotengra picks, its cost is opt_einsum's count for that path.
    _, info = oe.contract_path("ab,bc,cd->ad", *shapes, shapes=True, optimize=[tuple(p) for p in data["path"]])
    assert data["flops"] == int(info.opt_cost)


def test_explain_memory_limit(capsys):
    # 8x64 intermediates: 512 elements, 2 KiB in float32.
    argv = ["explain", "ab,bc,cd->ad", "--shapes", "8x64", "64x8", "8x64"]
    for limit in ("512", "2KiB", "2048b"):
        status, out, err = run_main(capsys, *argv, "--memory-limit", limit)
        assert status == 0, err
        assert "def einc_fn(" in out
    for limit in ("511", "2047B"):
        status, out, err = run_main(capsys, *argv, "--memory-limit", limit)
        assert status == 2
        assert out == ""
        assert err.startswith("einc: error: ") and "Traceback" not in err
        assert "memory_limit=511 elements is too small" in err


# ------------------------------------------------------------------- --plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    mpl_image = pytest.importorskip("matplotlib.image")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return mpl_image.imread(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["ab,bc,cd,de,ef->af", "--shapes", "8x64", "64x8", "8x64", "64x8", "8x32"],
        ["b q (h d), b k (h d) -> b h q k", "--shapes", "2x8x64", "2x6x64", "--size", "h=8"],
        ["logsumexp(b h w -> b)", "--shapes", "2x3x4"],
        [",->", "--shapes", "scalar", "scalar"],
        ["softmax(i j, j k -> i [k]), k l, l m -> i m", "--shapes", "2x3", "3x4", "4x50", "50x2"],
    ],
    ids=["chain-5", "spaced", "reduce", "scalars", "nested"],
)
def test_explain_plot_writes_png(capsys, tmp_path, argv):
    pytest.importorskip("matplotlib")
    target = tmp_path / "tree.png"
    status, out, err = run_main(capsys, "explain", *argv, "--plot", str(target))
    assert status == 0, err
    assert "def einc_fn(" in out  # the text is still printed
    image = _read_png(target)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_explain_plot_with_json_keeps_stdout_json(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "tree.png"
    status, out, err = run_main(capsys, "explain", "ab,bc->ac", "--shapes", "2x3", "3x4", "--json",
                                "--plot", str(target))
    assert status == 0, err
    assert json.loads(out)["path"] == [[0, 1]]
    _read_png(target)


def test_plot_tree_follows_the_path():
    """A path entry of three operands is two steps; the tree has every step once."""
    from einc.plot import _tree

    plan = einc.compile("ab,bc,cd,de->ae", optimize=[(0, 1, 2), (0, 1)]).explain((8, 64), (64, 8), (8, 64), (64, 8))
    assert [step.operands for step in plan.steps] == [(0, 1, 2), (), (0, 1)]
    root = _tree(plan)
    nodes = list(root.walk())
    assert [n.kind for n in nodes].count("operand") == 4
    assert [n.label.splitlines()[0] for n in nodes if n.kind == "step"] == ["step 0: mm", "step 1: mm", "step 2: mm"]
    (top,) = root.children
    assert top.label.startswith("step 2:")
    # step 2 contracts step 1's result with operand 3; step 1 folds operand 2 into step 0.
    assert [c.label.split("\n")[0] for c in top.children] == ["step 1: mm", "operand 3: de"]
    step1 = top.children[0]
    assert [c.label.split("\n")[0] for c in step1.children] == ["step 0: mm", "operand 2: cd"]
    assert "FLOPs in step 0" in step1.label
    assert "ab,bc->ac" in step1.children[0].label and "786,432 FLOPs" in step1.children[0].label


def test_plot_rejects_steps_that_do_not_follow_the_path():
    # The tree comes from each step's inputs: a step consuming what no earlier step left
    # (or a value twice) makes no tree.
    import dataclasses

    from einc.plot import plot_plan

    plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
    for inputs in [(0, 7), (1, 2)]:  # a later node; a value the first step consumed already
        last = dataclasses.replace(plan.steps[-1], inputs=inputs)
        broken = dataclasses.replace(plan, steps=(*plan.steps[:-1], last))
        with pytest.raises(einc.EincError, match="step"):
            plot_plan(broken, os.devnull)


def test_explain_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    target = tmp_path / "tree.png"
    status, out, err = run_main(capsys, "explain", "ab,bc->ac", "--shapes", "2x3", "3x4", "--plot", str(target))
    assert status == 2
    assert out == ""
    assert err.startswith("einc: error: ") and "pip install 'einc[plot]'" in err
    assert "Traceback" not in err
    assert not target.exists()


def test_explain_plot_unwritable(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "missing" / "tree.png"
    status, _, err = run_main(capsys, "explain", "ab,bc->ac", "--shapes", "2x3", "3x4", "--plot", str(target))
    assert status == 2
    assert err.startswith("einc: error: cannot write the plot")


# -------------------------------------------------------------------- bench

TINY = ["--repeat-time", "0.002"]
PLAIN_CONTENDERS = ["einc (torchscript)", "einc (eager)", "torch.einsum", "opt_einsum", "einops.einsum"]


def _timed(out: str) -> dict[str, list[str]]:
    """The bench table's rows by contender: the cells after the name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("einc (") and not line.startswith(("torch", "opt_einsum", "einops")):
            break
        name, _, rest = line.partition("  ")
        rows[name] = rest.split()
    return rows


@pytest.mark.parametrize(
    "pattern, shapes",
    [
        ("ab,bc,cd->ad", ["8x16", "16x8", "8x16"]),
        ("b h q d, b h k d -> b h q k", ["2x2x4x8", "2x2x5x8"]),
        ("...ij,...jk->...ik", ["2x3x4", "4x5"]),
        ("ii->i", ["4x4"]),
    ],
    ids=["chain", "spaced", "ellipsis", "diagonal"],
)
def test_bench_plain_times_every_contender(capsys, pattern, shapes):
    status, out, err = run_main(capsys, "bench", pattern, "--shapes", *shapes, *TINY)
    assert status == 0, err
    assert err == ""  # stderr is not a terminal: no progress lines
    rows = _timed(out)
    assert list(rows) == PLAIN_CONTENDERS, out
    for name, cells in rows.items():
        # median (value and unit), one ratio per einc backend ("-" against itself), max error
        assert cells[1] in ("us", "ms", "s") and len(cells) == 5
        assert [c == "-" for c in cells[2:4]] == [name == "einc (torchscript)", name == "einc (eager)"]
        assert all(c == "-" or c.endswith("x") and float(c[:-1]) > 0 for c in cells[2:4])
        assert 0 <= float(cells[4]) < 1e-4
    assert "einc time / contender time" in out
    assert "not timed" not in out


@pytest.mark.parametrize(
    "argv, why",
    [
        (["logsumexp(i k, k j -> i j)", "--shapes", "8x16", "16x4", "--dtype", "float64"],
         "cannot express logsumexp(...)"),
        (["max(b h w -> b)", "--shapes", "2x3x4"], "cannot express max(...)"),
        (["softmax(b h q d, b h k d -> b h q [k])", "--shapes", "2x2x4x8", "2x2x5x8"], "cannot express softmax(...)"),
        (["b q (h d), b k (h d) -> b h q k", "--shapes", "2x4x16", "2x3x16", "--size", "h=2"],
         "cannot express compositions or unit axes"),
        (["h w -> h w c", "--shapes", "3x4", "--size", "c=2"], "cannot create new output axes (c)"),
        ([ATTENTION, "--shapes", "2x4x16", "2x3x16", "2x3x16", "--size", "h=2"], "cannot express nested operations"),
        (["i j, j k -> i k / 2", "--shapes", "2x3", "3x4"], "cannot express a scale"),
    ],
    ids=["logsumexp", "max", "softmax", "composition", "new-axis", "nested", "scale"],
)
def test_bench_beyond_einsum_times_einc_and_the_torch_form(capsys, argv, why):
    status, out, err = run_main(capsys, "bench", *argv, *TINY)
    assert status == 0, err
    assert list(_timed(out)) == ["einc (torchscript)", "einc (eager)", "torch (reference form)"]
    assert f"not timed: torch.einsum, opt_einsum, einops.einsum: {why}" in out


def test_bench_progress(capsys):
    status, out, err = run_main(capsys, "bench", "ij,jk->ik", "--shapes", "4x4", "4x4", "--progress",
                                "--threads", "2", *TINY)
    assert status == 0, err
    assert err.splitlines() == [f"[{i}/5] timing {name} ..." for i, name in enumerate(PLAIN_CONTENDERS, start=1)]
    assert "2 threads" in out


def test_bench_reports_a_wrong_peer(capsys, monkeypatch):
    einops = pytest.importorskip("einops")
    monkeypatch.setattr(einops, "einsum", lambda *args: args[0] * 0 + 1)
    status, out, err = run_main(capsys, "bench", "ij,jk->ik", "--shapes", "4x4", "4x4", *TINY)
    assert status == 0, err
    assert "einops.einsum" not in _timed(out)
    assert "not timed: einops.einsum: differs from the float64 reference by up to" in out


def test_bench_wrong_einc_result_exits_1(capsys, monkeypatch):
    monkeypatch.setattr(einc.Expression, "__call__", lambda self, *tensors: torch.zeros(4, 4))
    status, out, err = run_main(capsys, "bench", "ij,jk->ik", "--shapes", "4x4", "4x4", *TINY)
    assert status == 1
    assert list(_timed(out)) == PLAIN_CONTENDERS[2:]
    for name in PLAIN_CONTENDERS[:2]:
        assert f"not timed: {name}: differs from the float64 reference by up to" in out


def test_bench_reports_a_failing_peer(capsys, monkeypatch):
    import opt_einsum

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel\nsecond line")

    monkeypatch.setattr(opt_einsum, "contract_expression", lambda *a, **k: broken)
    status, out, err = run_main(capsys, "bench", "ij,jk->ik", "--shapes", "4x4", "4x4", *TINY)
    assert status == 0, err
    assert "not timed: opt_einsum: failed: RuntimeError no kernel\n" in out


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
        (["explain", "ij->ji", "--shapes", "2x3", "--memory-limit", "lots"], ["memory_limit", "'lots'", "64MiB"]),
        (["explain", "ij->ji", "--shapes", "2x3", "--memory-limit", "0"], ["memory_limit", "not 0"]),
        (["explain", "ij->ij", "--shapes", "2x3", "--size", "i=2", "--size", "i=3"], ["--size i", "2", "3"]),
        (["bench", "ij,jk->ik)", "--shapes", "2x3", "3x4"], ["unexpected ')'", "             ^"]),
        (["bench", "ij,jk->ik", "--shapes", "2x3", "4x5"], ["axis 'j'", "operand 1"]),
        (["bench", "ij,jk,kl->il", "--shapes", "2x3", "3x4"], ["3 operands"]),
    ],
    ids=["syntax", "shape-mismatch", "operand-count", "underdetermined", "unknown-size", "bad-strategy",
         "memory-limit-text", "memory-limit-zero", "size-twice", "bench-syntax", "bench-shapes", "bench-operands"],
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
        ["explain", "ij->ji", "--shapes", "2x3", "--dtype", "int7"],  # bad dtype choice
        ["bench", "ij->ji", "--shapes", "2x3", "--threads", "0"],  # threads not positive
        ["bench", "ij->ji", "--shapes", "2x3", "--repeat-time", "-1"],  # time not positive
        ["bench", "ij->ji", "--shapes", "2x3", "--repeat-time", "soon"],  # time not a number
        [],  # no command
        ["frobnicate"],  # unknown command
    ],
    ids=["bad-shape", "negative", "size-no-eq", "size-not-int", "no-shapes", "bad-notation", "bad-dtype",
         "threads", "repeat-time", "repeat-time-text", "no-command", "unknown"],
)
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert out == ""
    assert "usage: einc" in err
    assert "einc: error: " in err
    assert "Traceback" not in err


def test_help(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    assert "usage: einc" in out and "explain" in out and "bench" in out and "example" in out
    status, out, _ = run_main(capsys, "explain", "--help")
    assert status == 0
    for option in ("--shapes", "--size", "--optimize", "--notation", "--memory-limit", "--dtype", "--json",
                   "--plot", "cotengra", "einc[plot]", "example"):
        assert option in out
    status, out, _ = run_main(capsys, "bench", "--help")
    assert status == 0
    for option in ("--shapes", "--size", "--dtype", "--repeat-time", "--threads", "--progress", "--no-progress",
                   "torch.einsum", "opt_einsum", "einops", "example"):
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
        [sys.executable, "-m", "einc", "--version"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )
    assert version.returncode == 0 and version.stdout.strip() == f"einc {einc.__version__}"


def test_python_dash_m_einc_bench(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "einc", "bench", "ab,bc->ac", "--shapes", "4x8", "8x4", "--repeat-time", "0.002",
         "--progress"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "[5/5] timing einops.einsum ..." in done.stderr
    assert list(_timed(done.stdout)) == PLAIN_CONTENDERS



def test_bench_makes_bool_masks(capsys):
    from einc.cli import main

    assert main(["bench", "softmax(b q d, b k d -> b q [k] mask(b k)), b k e -> b q e",
                 "--shapes", "2x3x4", "2x5x4", "2x5", "2x5x3", "--repeat-time", "0.01"]) == 0
    assert "einc (torchscript)" in capsys.readouterr().out


def test_explain_world_size(capsys):
    """--world-size shows the split without starting processes, as text and as JSON."""
    pattern = "logsumexp(sum(b d, v d -> b v) -> b)"
    code, out, _ = run_main(capsys, "explain", pattern, "--shapes", "1x64", "4096x64", "--world-size", "4")
    assert code == 0 and "4 ranks split v (logsumexp) 4096 as 1024, 1024, 1024, 1024" in out
    code, out, _ = run_main(capsys, "explain", pattern, "--shapes", "1x64", "4096x64", "--world-size", "3", "--json")
    data = json.loads(out)["distribution"]
    assert code == 0 and data["world_size"] == 3 and [n for _, n in data["spans"]] == [1366, 1366, 1364]
    code, _, err = run_main(capsys, "explain", pattern, "--shapes", "1x64", "4096x64", "--world-size", "0")
    assert code == 2 and "'0' is not a positive int" in err and "Traceback" not in err
