"""Memory-bounded execution (issue 13): FLOP overheads, times and peaks of sliced plans.

    python benchmarks/bench_slicing.py --rounds 3 --markdown RESULTS.md

(a) FLOP overhead of the chosen slicing at budgets 16x and 256x below the unsliced
    plan's largest intermediate (but never below the output's size), from
    ``Plan.slicing``: patterns where an axis can be sliced outside the large
    intermediates, and random tensor networks.
(b) Time: sliced against unsliced einc and the torch form, forward and forward+backward
    (``common.run_case``: one thread, interleaved passes, checked against float64).
(c) Peak memory of the log-partition ``logsumexp(sum(b d, v d -> b v) -> b)`` in a
    fresh process per contender (``common.peak_rss_growth``: VmHWM reset right before).

No timing here is an assertion.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence

import torch
from opt_einsum.testing import rand_equation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_planning import spaced  # noqa: E402
from common import (  # noqa: E402
    PREAMBLE,
    Case,
    machine_info,
    markdown_table,
    parse_args,
    peak_rss_growth,
    run_case,
    run_memory_probe,
    write_section,
)

import einc  # noqa: E402

HEADING = "## Slicing (issue 13)"

OVERHEAD_CASES = [
    ("b i, b j, i j o -> b o", [(256, 64), (256, 64), (64, 64, 32)]),
    ("b i, i j, b j, j k, b k -> b", [(256, 64), (64, 64), (256, 64), (64, 64), (256, 64)]),
    ("a b, b c, c d, d e -> a e", [(64, 512), (512, 512), (512, 512), (512, 64)]),
    ("logsumexp(sum(b t d, v d -> b t v) -> b t)", [(8, 128, 64), (8192, 64)]),
]


def overheads() -> list[list[str]]:
    rows = []
    cases = [(pattern, shapes, "auto") for pattern, shapes in OVERHEAD_CASES]
    for n, seed in ((14, 1), (16, 2)):
        equation, shapes = rand_equation(n, 3, seed=seed, d_min=4, d_max=10, n_out=2)
        for optimize in ("auto", "cotengra"):
            cases.append((spaced(equation), [tuple(s) for s in shapes], optimize))
    for pattern, shapes, optimize in cases:
        unsliced = einc.compile(pattern).explain(*shapes)
        peak = unsliced.largest_intermediate
        for factor in (16, 256):
            # A budget also holds the output: below it, nothing can run.
            expression = einc.compile(pattern, memory_limit=max(peak // factor, math.prod(unsliced.output_shape)),
                                      optimize=optimize)
            name = pattern if len(pattern) < 60 else f"rand_equation network, {len(shapes)} tensors"
            name += "" if optimize == "auto" else f", optimize={optimize!r}"
            try:
                start = time.perf_counter()
                cut = expression.explain(*shapes).slicing
                planned = time.perf_counter() - start
            except einc.EincError as err:
                reason = str(err).split(": ", 1)[-1]
                rows.append([f"`{name}`", f"{peak:,}", f"{factor}x", f"refused: {reason}", "—", "—", "—", "—"])
                print("  " + " | ".join(rows[-1]), flush=True)
                continue
            assert cut is not None
            axes = ", ".join(f"{a.name} ({a.role}): {a.count} x {a.chunk}" for a in cut.axes)
            rows.append([f"`{name}`", f"{peak:,}", f"{factor}x", axes, str(cut.slices), f"{cut.overhead:.3f}x",
                         f"{cut.largest_intermediate:,}", f"{planned * 1e3:.0f} ms"])
            print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def _timing_case(name: str, pattern: str, shapes, reference, factor: int, backward: bool) -> Case:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g) for s in shapes]
    peak = einc.compile(pattern).explain(*xs).largest_intermediate
    sliced = einc.compile(pattern, memory_limit=peak // factor)
    whole = einc.compile(pattern)
    slices = sliced.explain(*xs).slicing.slices
    if not backward:
        contenders = {"einc, sliced": lambda: sliced(*xs), "einc, unsliced": lambda: whole(*xs),
                      "torch form": lambda: reference(*xs)}
        return Case(name, f"`{pattern}` at {shapes}, forward, budget {factor}x below the peak ({slices} slices)",
                    contenders, lambda: reference(*[x.double() for x in xs]), ["einc, sliced"])
    leaves = [x.clone().requires_grad_() for x in xs]
    wide = [x.double().requires_grad_() for x in xs]

    def both(fn, inputs):
        def run():
            for leaf in inputs:
                leaf.grad = None
            fn(*inputs).sum().backward()
            return inputs[0].grad
        return run
    contenders = {"einc, sliced": both(sliced, leaves), "einc, unsliced": both(whole, leaves),
                  "torch form": both(reference, leaves)}
    return Case(name + " fwd+bwd", f"`{pattern}` at {shapes}, forward+backward, budget {factor}x below the "
                f"peak ({slices} slices)", contenders, both(reference, wide), ["einc, sliced"])


TIMING = [
    ("bilinear", "b i, b j, i j o -> b o", [(512, 128), (512, 128), (128, 128, 64)],
     lambda x, y, w: torch.einsum("bi,bj,ijo->bo", x, y, w), 16),
    ("log-partition", "logsumexp(sum(b t d, v d -> b t v) -> b t)", [(4, 256, 256), (8192, 256)],
     lambda h, w: torch.logsumexp(h @ w.T, -1), 16),
]

ATTENTION = "softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e"


def attention_probe(kind: str, length: int, budget: str) -> dict:
    """In a fresh process: peak RSS growth and time of one attention forward at
    sequence ``length`` (b=1, h=4, d=64), unfused, by ``kind``."""
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 4, length, 64) for _ in range(3))
    if kind == "sdpa":
        f = torch.nn.functional.scaled_dot_product_attention
    elif kind == "torch":
        f = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # noqa: E731
    else:
        f = einc.compile(ATTENTION, fuse=False, memory_limit=budget if kind == "sliced" else None)
    if kind == "sdpa":
        scale = 1.0  # the pattern has no scale
        f = lambda q, k, v, g=f: g(q, k, v, scale=scale)  # noqa: E731
    f(q, k, v)  # imports and compilation: not counted
    held: list[torch.Tensor] = []
    start = time.perf_counter()
    grown, method = peak_rss_growth(lambda: held.append(f(q, k, v)))
    return {"forward": grown, "seconds": time.perf_counter() - start, "method": method}


def probe(kind: str, b: int, v: int, d: int, budget: str) -> dict:
    """In a fresh process (``--memory-probe``): peak RSS growth of one forward, then of
    one backward, of the log-partition by ``kind``."""
    torch.set_num_threads(1)
    h, w = torch.randn(b, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    if kind == "torch":
        f = lambda h, w: torch.logsumexp(h @ w.T, -1)  # noqa: E731
    else:
        f = einc.compile("logsumexp(sum(b d, v d -> b v) -> b)", memory_limit=budget if kind == "sliced" else None)
    f(h, w).sum().backward()  # imports, compilation, first-backward setup: not counted
    h.grad = w.grad = None
    held: list[torch.Tensor] = []
    forward, method = peak_rss_growth(lambda: held.append(f(h, w)))
    backward, _ = peak_rss_growth(lambda: held[0].sum().backward())
    return {"forward": forward, "backward": backward, "method": method}


def memory(b: int, v: int, d: int, budget: str) -> tuple[list[list[str]], str]:
    rows, method = [], ""
    for kind in ("torch", "unsliced", "sliced"):
        got = run_memory_probe(__file__, kind, str(b), str(v), str(d), budget)
        method = got["method"]
        rows.append([{"torch": "`torch.logsumexp(h @ W.T, -1)`", "unsliced": "einc, no limit",
                      "sliced": f"einc, memory_limit={budget}"}[kind],
                     f"{got['forward'] / 2**20:.1f} MiB", f"{got['backward'] / 2**20:.1f} MiB"])
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows, method


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    if args.memory_probe:
        kind, *numbers, budget = args.memory_probe
        if kind.startswith("attention-"):
            print(json.dumps(attention_probe(kind.removeprefix("attention-"), int(numbers[0]), budget)))
        else:
            print(json.dumps(probe(kind, *map(int, numbers), budget)))
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    print("(a) FLOP overheads")
    rows_a = overheads()
    print("(b) times")
    results = []
    for name, pattern, shapes, reference, factor in TIMING:
        for backward in (False, True):
            results.append(run_case(_timing_case(name, pattern, shapes, reference, factor, backward),
                                    args.min_run_time, args.rounds))
    b, v, d, budget = (1024, 8192, 64, "8MiB") if args.quick else (4096, 32768, 64, "32MiB")
    print(f"(c) peak memory: log-partition b={b}, v={v}, d={d} (logits {b * v * 4 / 2**20:.0f} MiB)")
    rows_c, method = memory(b, v, d, budget)
    length, attention_budget = (1024, "4MiB") if args.quick else (4096, "64MiB")
    print(f"(d) attention, unfused, sequence length {length}")
    rows_d = []
    for kind in ("torch", "sdpa", "unsliced", "sliced"):
        got = run_memory_probe(__file__, f"attention-{kind}", str(length), attention_budget)
        rows_d.append([{"torch": "`torch.softmax(q @ k.transpose(-1, -2), -1) @ v`",
                        "sdpa": "`scaled_dot_product_attention` (fused, for the record)",
                        "unsliced": "einc, `fuse=False`, no limit",
                        "sliced": f"einc, `fuse=False`, memory_limit={attention_budget}"}[kind],
                       f"{got['forward'] / 2**20:.1f} MiB", f"{got['seconds']:.2f} s"])
        print("  " + " | ".join(rows_d[-1]), flush=True)
    elapsed = time.perf_counter() - started
    if args.markdown:
        header_a = ["pattern", "unsliced peak (elements)", "budget below it", "sliced axes (role): slices x chunk",
                    "slices", "FLOPs / unsliced", "a slice's largest intermediate", "planning"]
        lines = [HEADING, "",
                 ("A `memory_limit` the unsliced plan exceeds runs in slices (README, \"Memory-bounded "
                  "execution\")."), "",
                 f"- Command: `python benchmarks/bench_slicing.py {' '.join(sys.argv[1:])}`; run took {elapsed:.0f} s",
                 *[f"- {k}: {v}" for k, v in machine_info().items()], "",
                 "### (a) FLOP overhead of the chosen slicing", "",
                 "| " + " | ".join(header_a) + " |", "|" + "---|" * len(header_a),
                 *["| " + " | ".join(r) + " |" for r in rows_a], "",
                 "### (b) Time, sliced against unsliced and the torch form", ""]
        for result in results:
            lines += [f"#### {result.case.name}", "", result.case.description, "", markdown_table(result), ""]
        lines += [f"### (c) Peak memory: log-partition, b={b}, v={v}, d={d} float32 "
                  f"(logits {b * v * 4 / 2**20:.0f} MiB)", "",
                  f"Growth of the process's peak RSS over the forward call, then over the backward "
                  f"({method}; a fresh process each, `common.run_memory_probe`). Forward keeps its "
                  "output; backward holds the gradient buffers of h (b x d) and W (v x d).", "",
                  "| contender | forward | forward + backward |", "|---|---:|---:|",
                  *["| " + " | ".join(r) + " |" for r in rows_c], "",
                  f"### (d) Attention that does not take the SDPA rewrite (`fuse=False`), b=1, h=4, "
                  f"L={length}, d=64 float32 (scores {4 * length * length * 4 / 2**20:.0f} MiB)", "",
                  f"`{ATTENTION}`: growth of the peak RSS over one forward ({method}, fresh process each) "
                  "and that call's time (one run, `time.perf_counter`, memory probe included).", "",
                  "| contender | forward peak growth | time |", "|---|---:|---:|",
                  *["| " + " | ".join(r) + " |" for r in rows_d], ""]
        write_section(args.markdown, HEADING, "\n".join(lines), PREAMBLE)
        print(f"wrote {args.markdown}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
