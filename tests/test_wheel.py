"""The built wheel works on its own: grammar and py.typed inside, importable from a fresh
virtual environment that does not see the editable source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out)])
    (built,) = out.glob("einc-*.whl")
    return built


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "einc/grammar/einc.lark" in names
    assert "einc/grammar/einc.lark.tables" in names  # the parser's tables, built once
    assert "einc/py.typed" in names
    for module in ("__init__", "__main__", "api", "cli", "codegen", "errors", "ir", "parser", "planner"):
        assert f"einc/{module}.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    grammar = zipfile.ZipFile(wheel).read("einc/grammar/einc.lark").decode()
    assert grammar == (REPO / "grammar" / "einc.lark").read_text()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "einc = einc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    new_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())

    # Dependencies (torch, lark, opt_einsum) come from this environment's site-packages,
    # added as a plain path line: site does not process the .pth files of a directory
    # added that way, so the editable install's hook (which puts the repo on sys.path)
    # does not run.
    here_site = Path(torch.__file__).resolve().parent.parent
    (new_site / "einc_test_deps.pth").write_text(f"{here_site}\n")

    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])

    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path

        repo = Path({str(REPO)!r}).resolve()
        # The editable install's path hook did not run: the repository is not on sys.path.
        assert not any(p and Path(p).resolve() == repo for p in sys.path), sys.path

        import torch, einc, einc.parser
        venv = Path({str(venv)!r}).resolve()
        package = Path(einc.__file__).resolve().parent
        assert venv in package.parents, einc.__file__
        grammar = einc.parser.grammar_path().resolve()
        assert grammar == package / "grammar" / "einc.lark", grammar
        assert grammar.is_file()

        a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
        out = einc.compile("b i j, b j k -> b i k")(a, b)
        assert torch.allclose(out, torch.einsum("bij,bjk->bik", a, b), rtol=1e-12, atol=1e-12)
        x = torch.randn(2, 12)
        assert torch.equal(einc.compile("b (h d) -> b h d", h=3)(x), x.reshape(2, 3, 4))
        try:
            einc.compile("ij,jk->ik)")
        except einc.EincError as err:
            assert str(err).splitlines()[-1] == "             ^"
        else:
            raise AssertionError("no error")
        print("ok", einc.__version__)
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = _run([str(python), "-c", script], cwd=outside)
    assert done.stdout.split() == ["ok", "0.1.0"]

    # The console script of the wheel runs too.
    einc_script = venv / ("Scripts/einc.exe" if os.name == "nt" else "bin/einc")
    shown = _run([str(einc_script), "explain", "ij,jk->ik", "--shapes", "2x3", "3x4"], cwd=outside)
    assert "def einc_fn(" in shown.stdout


def test_plain_path_line_does_not_run_pth_hooks(tmp_path):
    # What the test above relies on: a plain path in a .pth file adds that directory
    # to sys.path without processing the .pth files inside it.
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "hook.pth").write_text("import os; os.environ['EINC_HOOK_RAN'] = '1'\n")
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "plain.pth").write_text(f"{inner}\n")
    done = _run([sys.executable, "-c",
                 f"import site, sys, os; site.addsitedir({str(outer)!r}); "
                 f"print({str(inner)!r} in sys.path, os.environ.get('EINC_HOOK_RAN'))"])
    assert done.stdout.split() == ["True", "None"]
    assert sysconfig.get_paths()["purelib"]  # this interpreter has a site-packages
