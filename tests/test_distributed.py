"""Distributed execution (einc.distributed) on real gloo process groups of 2 and 3 ranks.

Each world size is spawned once (a spawn costs seconds) and runs every check of
``distributed_cases.py`` on every rank; each check then is one test here, failing with
the message of every rank where it failed.  Single-process parts (plans, options,
errors) are tested directly.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_cases
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import einc
from einc.errors import EincError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLDS = (2, 3)
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, str]]]:
    found = {}
    for world in WORLDS:
        directory = tmp_path_factory.mktemp(f"world{world}")
        context = mp.start_processes(distributed_cases.worker, nprocs=world, join=False, start_method="spawn",
                                     args=(world, _free_port(), str(directory), list(distributed_cases.CHECKS)))
        deadline = TIMEOUT
        start = time.monotonic()
        while not context.join(timeout=5):
            if time.monotonic() - start > deadline:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"{world} ranks did not finish within {deadline} s")
        found[world] = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(world)]
    return found


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(distributed_cases.CHECKS))
def test_on_every_rank(outcomes: dict[int, list[dict[str, str]]], world: int, name: str) -> None:
    failed = [f"rank {r}: {ranks[name]}" for r, ranks in enumerate(outcomes[world]) if ranks.get(name) != "ok"]
    assert not failed, "\n".join(failed)


def test_the_table_covers_every_role() -> None:
    roles = {row[4] for row in distributed_cases.PATTERNS}
    assert roles == {"output", "sum", "mean", "max", "min", "logsumexp", "softmax", "log_softmax"}


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pattern, shapes", [
    ("b i j, b j k -> b i k", [(6, 8, 16), (6, 16, 8)]),
    ("logsumexp(b i, i j, j k -> b k)", [(1, 48), (48, 48), (48, 2)]),
    ("softmax(q d, k d -> q [k]), k e -> q e", [(1, 4), (96, 4), (96, 1)]),
])
def test_each_rank_takes_at_most_its_share(world: int, pattern: str, shapes: list[tuple[int, ...]]) -> None:
    plan = einc.compile(pattern).explain(*shapes, world_size=world).distribution
    spans = plan.spans()
    assert len(spans) == world and sum(n for _, n in spans) == plan.size
    # DTensor's Shard layout: parts of ceil(size / world), in order.
    assert all(start == min(r * plan.chunk, plan.size) for r, (start, _) in enumerate(spans))
    assert max(n for _, n in spans) == math.ceil(plan.size / world)
    assert max(plan.slices) <= math.ceil(sum(plan.slices) / world)


@pytest.mark.parametrize("limit", [256, 1024, 4096])
@pytest.mark.parametrize("world", [2, 3])
def test_sliced_parts_stay_balanced(limit: int, world: int) -> None:
    f = einc.compile("logsumexp(sum(b t d, v d -> b t v) -> b t)", memory_limit=limit)
    plan = f.explain((2, 8, 16), (256, 16), world_size=world).distribution
    assert max(plan.slices) <= math.ceil(sum(plan.slices) / world), plan.slices
    # Each rank's part is within the limit: its plan slices where the whole would.
    whole = f.explain((2, 8, 16), (256, 16)).slicing
    assert sum(plan.slices) >= (1 if whole is None else whole.slices)


def test_communication_figures() -> None:
    """Bytes per rank by role: the output once for a sum or a gather, twice for logsumexp."""
    out = 1 * 2 * 4  # the (1, 2) float32 result
    cases = {
        "b i, i j, j k -> b k": out,
        "logsumexp(b i, i j, j k -> b k)": 2 * out,
        "max(b i, i j, j k -> b k)": out + 2,  # and a byte per entry: which are NaN on some rank
    }
    for pattern, expected in cases.items():
        plan = einc.compile(pattern).explain((1, 48), (48, 48), (48, 2), world_size=2).distribution
        assert plan.role != "output", plan
        assert plan.bytes() == expected + 2 * 8, (pattern, plan.bytes())
    plan = einc.compile("b i j, b j k -> b i k").explain((6, 8, 16), (6, 16, 8), world_size=3).distribution
    assert plan.bytes(True) == plan.bytes() + 4 * (6 * 8 * 16 * 2)  # both inputs' gradients summed once


def test_explain_text_and_json() -> None:
    plan = einc.compile("logsumexp(b i, i j, j k -> b k)").explain((1, 48), (48, 48), (48, 2), world_size=3)
    text = str(plan)
    assert "3 ranks split j (logsumexp) 48 as 16, 16, 16" in text and "all_reduce MAX" in text
    data = plan.to_dict()["distribution"]
    assert data["spans"] == [[0, 16], [16, 16], [32, 16]] and data["bytes"] == plan.distribution.bytes()
    assert einc.compile("i j, j k -> i k").explain((4, 4), (4, 4)).distribution is None


def test_nothing_to_split_computes_on_every_rank() -> None:
    plan = einc.compile("i, i ->").explain((1,), (1,), world_size=2).distribution
    assert plan.axis is None and plan.role == "replicated" and plan.collectives == ()


@pytest.mark.parametrize("options, message", [
    ({"distributed": "yes"}, "distributed must be True, False or a torch.distributed.ProcessGroup"),
    ({"distributed": 1}, "distributed must be"),
    ({"shard_output": True}, "shard_output=True needs distributed=True"),
    ({"distributed": True, "shard_output": 1}, "shard_output must be True or False"),
    ({"distributed": True, "constants": {0: torch.ones(2, 2)}}, "does not take constants"),
])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(EincError, match=message):
        einc.compile("i j, j k -> i k", **options)


def test_bad_world_size() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(EincError, match="world_size must be a positive int"):
            einc.compile("i j, j k -> i k").explain((2, 2), (2, 2), world_size=bad)


def test_shard_output_without_an_output_axis() -> None:
    f = einc.compile("i, i ->", distributed=True, shard_output=True)
    with pytest.raises(EincError, match="shard_output=True: no output axis can be split"):
        f.explain((8,), (8,), world_size=2)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists")
def test_without_a_process_group() -> None:
    f = einc.compile("i j, j k -> i k", distributed=True)
    with pytest.raises(EincError, match="needs torch.distributed.init_process_group"):
        f(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(EincError, match="module\\(\\) runs on one process"):
        f.module((2, 2), (2, 2))


def test_the_readme_example_runs_under_torchrun(tmp_path: Path) -> None:
    """The README's torchrun example, as written there, on 2 gloo ranks."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    source = "# logz.py" + readme.split("```python\n# logz.py", 1)[1].split("```", 1)[0]
    script = tmp_path / "logz.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks split v (logsumexp) 262144 as 131072, 131072" in done.stdout, done.stdout
    error = float(done.stdout.split("max abs error vs torch:")[1].split()[0])
    assert error < 1e-5
    # The README shows this output: keep it true.
    shown = readme.split("prints (2 ranks, float32):\n\n```\n", 1)[1].split("```", 1)[0]
    for line in shown.splitlines():
        if not line.startswith("max abs error"):
            assert line in done.stdout, line


@pytest.mark.parametrize("backend, device, takes", [
    ("gloo", "cpu", True),                 # gloo takes CPU tensors (and CUDA ones)
    ("gloo", "cuda", True),
    ("nccl", "cuda", True),
    ("nccl", "cpu", False),                # NCCL takes CUDA tensors only
    ("cpu:gloo,cuda:nccl", "cpu", True),   # a backend per device
    ("cpu:gloo,cuda:nccl", "cuda", True),
    ("cuda:nccl", "cpu", False),
])
def test_the_backend_must_take_the_device(monkeypatch: pytest.MonkeyPatch, backend: str, device: str,
                                          takes: bool) -> None:
    from einc import distributed

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    if takes:
        distributed.check_device(torch.device(device), None)
    else:
        with pytest.raises(EincError, match=f"backend {backend!r} does not take {device} tensors"):
            distributed.check_device(torch.device(device), None)


def test_one_rank_communicates_nothing() -> None:
    plan = einc.compile("b i, i j, j k -> b k").explain((1, 48), (48, 48), (48, 2), world_size=1).distribution
    assert plan.collectives == () and plan.bytes(True) == 0
