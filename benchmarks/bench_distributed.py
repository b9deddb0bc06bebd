"""Distributed execution (issue 14): strong scaling, world-size-1 overhead, bytes per rank.

    python benchmarks/bench_distributed.py --markdown RESULTS.md

Spawns gloo process groups of 1, 2 and 4 ranks on this machine (one thread per rank).

(a) Strong scaling: each call's median time (rank 0; every call starts after a
    barrier, and the combine makes every rank wait for the slowest) of compute-bound
    contractions with ``distributed=True``, against the same expression on one process
    without it.  On a machine with N cores, more than N ranks only share them.
(b) The cost of ``distributed=True`` at world size 1 (``torch.utils.benchmark``, one
    process): einc skips the collectives and the fingerprint there.
(c) Communication: the bytes each rank hands to collectives in a call, counted by
    wrapping torch.distributed's functions, against the plan's figure
    (``Plan.distribution.bytes()``) and the output's size.

No timing here is an assertion.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.benchmark as tbench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PREAMBLE, machine_info, parse_args, write_section  # noqa: E402

import einc  # noqa: E402

HEADING = "## Distributed (issue 14)"

SCALING = [  # (name, pattern, shapes, options)
    ("batched matmul", "b i j, b j k -> b i k", [(16, 384, 384), (16, 384, 384)], {}),
    ("batched matmul, shard_output", "b i j, b j k -> b i k", [(16, 384, 384), (16, 384, 384)],
     {"shard_output": True}),
    ("matrix chain", "a b, b c, c d, d e -> a e", [(768, 768), (768, 768), (768, 768), (768, 768)], {}),
    ("log-partition v=262144", "logsumexp(sum(b d, v d -> b v) -> b)", [(1, 256), (262144, 256)], {}),
]

COMMUNICATION = [  # (name, pattern, shapes, options)
    ("output axis (all_gather)", "b i j, b j k -> b i k", [(8, 64, 64), (8, 64, 64)], {}),
    ("output axis, shard_output", "b i j, b j k -> b i k", [(8, 64, 64), (8, 64, 64)], {"shard_output": True}),
    ("summed axis", "b i, i j, j k -> b k", [(1, 512), (512, 512), (512, 16)], {}),
    ("logsumexp axis", "logsumexp(sum(b d, v d -> b v) -> b)", [(1, 64), (8192, 64)], {}),
    ("softmax's own axis", "softmax(q d, k d -> q [k]), k e -> q e", [(1, 16), (4096, 16), (4096, 1)], {}),
    ("log_softmax's own axis", "log_softmax(b d, v d -> b [v]), b v -> b", [(1, 16), (4096, 16), (1, 4096)], {}),
]

CALLS = 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator) / s[-1] ** 0.5 for s in shapes]


def _timed(fn: Any, calls: int) -> float:
    """Median seconds of ``calls`` calls, each started together on every rank."""
    times = []
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.saved = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single",
                                                            "all_gather_into_tensor") if hasattr(dist, name)}

    def __enter__(self) -> _Counter:
        for name, original in self.saved.items():
            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.bytes += tensor.numel() * tensor.element_size()
                return _original(tensor, *args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


def _rank(rank: int, world: int, port: int, path: str, calls: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    found: dict[str, Any] = {"scaling": {}, "communication": {}}
    for name, pattern, shapes, options in SCALING:
        xs = _inputs(shapes)
        f = einc.compile(pattern, distributed=True, **options)
        f(*xs)
        plan = f.explain(*xs).distribution
        found["scaling"][name] = {"seconds": _timed(lambda: f(*xs), calls), "axis": plan.axis, "role": plan.role}
        if world == 1:
            plain = einc.compile(pattern)
            plain(*xs)
            found["scaling"][name]["plain"] = _timed(lambda: plain(*xs), calls)
    for name, pattern, shapes, options in COMMUNICATION:
        xs = _inputs(shapes)
        f = einc.compile(pattern, distributed=True, **options)
        plan = f.explain(*xs).distribution
        result = f(*xs)
        with _Counter() as counter:
            result = f(*xs)
        if hasattr(result, "to_local"):
            result = result.to_local()
        found["communication"][name] = {"counted": counter.bytes, "plan": plan.bytes(), "axis": plan.axis,
                                        "role": plan.role, "output": einc.compile(pattern).explain(*xs).output_shape,
                                        "local": result.numel() * result.element_size()}
    if rank == 0:
        with open(path, "w") as out:
            json.dump(found, out)
    dist.barrier()  # every rank done before any tears its connections down
    dist.destroy_process_group()


def _spawn(world: int, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "rank0.json")
        mp.start_processes(_rank, args=(world, _free_port(), path, calls), nprocs=world, start_method="spawn")
        with open(path) as f:
            return json.load(f)


def _overhead(min_run_time: float) -> list[list[str]]:
    """distributed=True at world size 1 against the plain expression, in this process."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = []
    cases = [(name, pattern, shapes) for name, pattern, shapes, options in SCALING if not options] + [
        ("small batched matmul", "b i j, b j k -> b i k", [(8, 32, 32), (8, 32, 32)])]
    for name, pattern, shapes in cases:
        xs = _inputs(shapes)
        times = {}
        for label, f in (("plain", einc.compile(pattern)), ("distributed", einc.compile(pattern, distributed=True))):
            f(*xs)
            timer = tbench.Timer("f(*xs)", globals={"f": f, "xs": xs}, num_threads=1)
            times[label] = min(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(3))
        rows.append([name, f"{times['plain'] * 1e3:.3f} ms", f"{times['distributed'] * 1e3:.3f} ms",
                     f"{times['distributed'] / times['plain']:.3f}x"])
    dist.destroy_process_group()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    torch.set_num_threads(1)
    calls = 5 if args.quick else CALLS
    worlds = {w: _spawn(w, calls) for w in (1, 2, 4)}
    overhead = _overhead(args.min_run_time)
    scaling = [["case", "split", "1 process (plain)", *[f"{w} ranks" for w in worlds], "speedup at 2", "at 4"]]
    for name, pattern, _, _ in SCALING:
        base = worlds[1]["scaling"][name]["plain"]
        seconds = {w: worlds[w]["scaling"][name]["seconds"] for w in worlds}
        split = worlds[2]["scaling"][name]
        scaling.append([f"{name}: `{pattern}`", f"{split['axis']} ({split['role']})", f"{base * 1e3:.1f} ms",
                        *[f"{seconds[w] * 1e3:.1f} ms" for w in worlds],
                        f"{base / seconds[2]:.2f}x", f"{base / seconds[4]:.2f}x"])
    communication = [["case", "ranks", "split", "counted bytes per rank", "plan", "output bytes",
                      "this rank's result"]]
    for name, pattern, shapes, options in COMMUNICATION:
        for w in (2, 4):
            row = worlds[w]["communication"][name]
            output = 4
            for n in row["output"]:
                output *= n
            communication.append([f"{name}: `{pattern}` {'x'.join(map(str, shapes[-1]))}", str(w),
                                  f"{row['axis']} ({row['role']})", f"{row['counted']:,}", f"{row['plan']:,}",
                                  f"{output:,}", f"{row['local']:,}"])
    overhead_table = [["case", "plain", "distributed=True", "ratio"], *overhead]
    text = _report(scaling, communication, overhead_table, calls)
    print(text)
    if args.markdown:
        write_section(args.markdown, HEADING, text, PREAMBLE)


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _report(scaling: list[list[str]], communication: list[list[str]], overhead: list[list[str]], calls: int) -> str:
    info = machine_info()
    machine = "; ".join(f"{k} {v}" for k, v in info.items() if k in ("CPU", "torch", "einc"))
    return "\n".join([
        HEADING, "",
        "`python benchmarks/bench_distributed.py --markdown benchmarks/RESULTS.md` "
        f"({datetime.date.today()}; {machine}; gloo, one thread per rank).", "",
        f"### (a) Strong scaling: median of {calls} calls, rank 0, each call started together", "",
        "Every rank computes its part and the parts are combined (all_gather / all_reduce). With more "
        "ranks than cores the ranks share cores: the speedup is capped by the machine, not by einc.", "",
        _table(scaling), "",
        "### (b) `distributed=True` at world size 1 (no collectives, no fingerprint), one process", "",
        _table(overhead), "",
        "### (c) Bytes each rank hands to collectives in one forward call, counted", "",
        "Counted by wrapping `torch.distributed`'s collectives; the plan's figure is "
        "`Plan.distribution.bytes()` (the same count, made by the planner). It includes the per-call "
        "fingerprint check (8 bytes from each rank, so world × 8 gathered). An all_gather counts the "
        "gathered whole (parts padded to equal length); "
        "a logsumexp combine is two all_reduces (MAX, then SUM); a softmax's adds its "
        "log-normalizer's (MAX and SUM); a max adds a byte per entry (where some rank has NaN).", "",
        _table(communication), "",
    ])


if __name__ == "__main__":
    main()
