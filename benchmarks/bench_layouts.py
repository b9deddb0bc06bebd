"""Operand layouts (issue 11.1): every operand order and axis order of attention,
bilinear and triangle-update patterns, einc against torch.einsum (and F.bilinear /
torch.linalg.vecdot where they apply), CPU float32, one thread.

    python benchmarks/bench_layouts.py                 # print the tables
    python benchmarks/bench_layouts.py --quick         # short runs
    python benchmarks/bench_layouts.py --markdown benchmarks/RESULTS.md

Targets (reported, never asserted): no variant worse than 1.1x torch.einsum; the two
headline cases within 1.05x of the best peer.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Case,
    Target,
    finish,
    parse_args,
    run_case,
)

import einc  # noqa: E402

HEADING = "## Layouts (issue 11.1)"
TS, EAGER, EINSUM = "einc (torchscript)", "einc (eager)", "torch.einsum"

B, H, L, D = 4, 8, 256, 64
N, C = 64, 32
VARIANTS = [
    # (name, pattern, shapes); the axis letters say the sizes
    ("scores", "b h q d, b h k d -> b h q k", None),
    ("scores-k-first", "b h k d, b h q d -> b h q k", None),
    ("scores-heads-inner", "b q h d, b k h d -> b h q k", None),
    ("scores-k-transposed", "b h q d, b h d k -> b h q k", None),
    ("scores-sequence-first", "q b h d, k b h d -> b h q k", None),
    ("scores-out-b-q-h-k", "b h q d, b h k d -> b q h k", None),
    ("scores-out-k-q", "b h q d, b h k d -> b h k q", None),
    ("mix", "b h q k, b h k d -> b h q d", None),
    ("mix-v-heads-inner", "b h q k, b k h d -> b q h d", None),
    ("mix-k-q", "b h k q, b h k d -> b h q d", None),
    ("bilinear", "b i, i j o, b j -> b o", [(256, 128), (128, 128, 64), (256, 128)]),
    ("bilinear-o-first", "b i, o i j, b j -> b o", [(256, 128), (64, 128, 128), (256, 128)]),
    ("bilinear-weight-first", "i j o, b i, b j -> b o", [(128, 128, 64), (256, 128), (256, 128)]),
    ("triangle-outgoing", "b i k c, b j k c -> b i j c", None),
    ("triangle-incoming", "b k i c, b k j c -> b i j c", None),
    ("triangle-out-channels-first", "b i k c, b j k c -> b c i j", None),
    ("triangle-channels-first", "b c i k, b c j k -> b i j c", None),
    ("triangle-channels-first-out", "b c i k, b c j k -> b c i j", None),
    ("narrow-n", "l b n d, v b n l -> v b n d", [(4, 8, 512, 512), (3, 8, 512, 4)]),
    ("row-dots", "b i j, b i j -> b", [(64, 128, 128), (64, 128, 128)]),
]
SIZES = {"b": B, "h": H, "q": L, "k": L, "d": D}
TRIANGLE = {"b": 1, "i": N, "j": N, "k": N, "c": C}


def _shapes(pattern: str) -> list[tuple[int, ...]]:
    sizes = TRIANGLE if "c" in pattern else SIZES
    inputs = pattern.split("->")[0].split(",")
    return [tuple(sizes[a] for a in operand.split()) for operand in inputs]


def _case(name: str, pattern: str, shapes: list[tuple[int, ...]] | None) -> Case:
    g = torch.Generator().manual_seed(0)
    shapes = shapes or _shapes(pattern)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    ts, eager = einc.compile(pattern), einc.compile(pattern, backend="eager")
    contenders = {TS: lambda: ts(*tensors), EAGER: lambda: eager(*tensors),
                  EINSUM: lambda: torch.einsum(pattern, *tensors)}
    if name == "bilinear":
        x, w, y = tensors
        weight = w.permute(2, 0, 1).contiguous()  # F.bilinear's (out, in1, in2), made once
        contenders["F.bilinear"] = lambda: F.bilinear(x, y, weight)
    if name == "row-dots":
        a, b = tensors
        contenders["torch.linalg.vecdot"] = lambda: torch.linalg.vecdot(a.flatten(1), b.flatten(1))
    kernels = ", ".join(step.kernel for step in ts.explain(*tensors).steps)
    description = f"`{pattern}`, shapes {' x '.join(map(str, shapes))}; einc's kernels: {kernels}"
    return Case(name, description, contenders, lambda: torch.einsum(pattern, *[t.double() for t in tensors]),
                [TS, EAGER])


TARGETS = [
    *[Target(name, TS, EINSUM, 1.1, f"{name}: einc ≤ 1.1x torch.einsum") for name, _, _ in VARIANTS],
    Target("bilinear", TS, "F.bilinear", 1.05, "bilinear: einc ≤ 1.05x F.bilinear"),
    Target("narrow-n", TS, EINSUM, 1.05, "narrow-n: einc ≤ 1.05x torch.einsum (the best peer)"),
    Target("row-dots", TS, "torch.linalg.vecdot", 1.05, "row-dots: einc ≤ 1.05x torch.linalg.vecdot"),
]


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for name, pattern, shapes in VARIANTS:
        if args.only and args.only not in name:
            continue
        results[name] = run_case(_case(name, pattern, shapes), args.min_run_time, args.rounds)
    intro = ["Every operand order and axis order of attention (B, H, L, D = 4, 8, 256, 64), bilinear and "
             "triangle-update (1 x 64 x 64 x 32) patterns. `einc (torchscript)` is the default backend."]
    return finish(args, results, TARGETS, HEADING, intro, started)


if __name__ == "__main__":
    raise SystemExit(main())
