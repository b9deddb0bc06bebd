"""Attention benchmarks (issue 5): einc's fused attention against hand-written SDPA and einsum.

    python benchmarks/bench_attention.py                 # print the tables
    python benchmarks/bench_attention.py --quick         # small shape, short runs (a smoke test)
    python benchmarks/bench_attention.py --markdown benchmarks/RESULTS.md
    python benchmarks/bench_attention.py --only memory   # cases whose name contains a substring

The pattern

    softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)

is compiled three ways: ``einc.compile(pattern, h=H)`` (TorchScript; einc rewrites it into
``torch.nn.functional.scaled_dot_product_attention``, which ``explain(...).rewrite == "sdpa"``
reports), the same with ``backend="eager"``, and with ``fuse=False`` (the unfused lowering:
bmm, softmax, bmm).  Every contender takes q, k, v of shape (b, seq, (h d)) and returns
(b, seq, (h d)); (B, H, L, D) = (8, 8, 512, 64), with ``--quick`` (2, 2, 64, 16).

CPU, float32, one thread (``torch.set_num_threads(1)``, ``Timer(num_threads=1)``).  Two timed
cases: the forward pass, and forward + backward (inputs with ``requires_grad=True``, their
``.grad`` cleared before each call, ``out.backward(grad)`` with a fixed random ``grad``; the
call returns the three gradients concatenated, which every row pays alike).  Before timing,
each contender is checked (allclose) against the float64 einsum + softmax + einsum (and its
float64 autograd gradients); see ``common.run_case`` for the timing (contenders interleaved
over ``--rounds`` rounds, lowest median kept).  Ratios are einc's time / the contender's:
below 1x einc is faster.  Targets are reported as met or missed, never asserted.

Peak memory is measured per contender and pass in a fresh subprocess, after two warm-up
calls: ``common.peak_rss_growth`` resets the peak RSS right before one call (inputs
excluded; the output, or the gradients, included) and ``common.run_memory_probe`` pins
glibc's mmap threshold so that freed temporaries leave the process.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    PREAMBLE,
    Case,
    Result,
    Target,
    check_targets,
    console_table,
    markdown_report,
    parse_args,
    peak_rss_growth,
    print_targets,
    render_console,
    render_markdown,
    run_case,
    run_memory_probe,
    write_section,
)

import einc
import einc.nn

try:
    import einops
except Exception:  # noqa: BLE001 - einops is optional
    einops = None

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

HEADING = "## Attention (issue 5)"
PATTERN = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"
SHAPE = (8, 8, 512, 64)
"""(B, H, L, D): batch, heads, sequence length, head dimension."""
QUICK_SHAPE = (2, 2, 64, 16)
RTOL = 1e-5
"""allclose against the float64 reference: rtol, and atol = RTOL x max |reference|."""

TS = "einc (torchscript)"
EAGER = "einc (eager)"
UNFUSED = "einc unfused"
SDPA = "hand-written SDPA"
EINSUM = "einsum+softmax+einsum"
EINOPS = "einops.rearrange + einsum+softmax+einsum"
MEMORY = [TS, UNFUSED, SDPA, EINSUM]
"""The contenders whose peak memory is measured."""
FORWARD = "forward"
BACKWARD = "forward+backward"
PASSES = [FORWARD, BACKWARD]
"""The timed cases, also the passes whose peak memory is measured."""
MEMORY_CASE = "peak memory"
LAYER = "MultiheadAttention layer"
TORCH_LAYER = "torch.nn.MultiheadAttention"
EINC_LAYER = "einc.nn.MultiheadAttention"
SCRIPTED_LAYER = "einc.nn (torch.jit.script)"

TARGETS = [
    target
    for case in PASSES
    for target in (
        Target(case, TS, SDPA, 1.1, f"{case}: einc within 1.1x of hand-written SDPA"),
        Target(case, TS, EINSUM, 1 / 3, f"{case}: einc ≥ 3x faster than einsum+softmax+einsum (≤ 0.33x)"),
    )
]


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(b, seq, (h d)) -> (b, seq, h, d), a view."""
    b, n, hd = t.shape
    return t.view(b, n, h, hd // h)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    d = q.shape[-1] // h
    q4, k4, v4 = (_heads(t, h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, scale=1 / math.sqrt(d))
    return out.transpose(1, 2).reshape(q.shape)


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    d = q.shape[-1] // h
    q4, k4, v4 = (_heads(t, h) for t in (q, k, v))
    p = (torch.einsum("bqhd,bkhd->bhqk", q4, k4) * (1 / math.sqrt(d))).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v4).reshape(q.shape)


def einops_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    q4, k4, v4 = (einops.rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k, v))
    p = (torch.einsum("bhqd,bhkd->bhqk", q4, k4) * (1 / math.sqrt(q4.shape[-1]))).softmax(-1)
    return einops.rearrange(torch.einsum("bhqk,bhkd->bhqd", p, v4), "b h n d -> b n (h d)")


def attentions(h: int) -> dict[str, Attention]:
    """Every contender, as a function of (q, k, v)."""
    fns: dict[str, Attention] = {
        TS: einc.compile(PATTERN, h=h),
        EAGER: einc.compile(PATTERN, h=h, backend="eager"),
        UNFUSED: einc.compile(PATTERN, h=h, fuse=False),
        SDPA: functools.partial(sdpa_attention, h=h),
        EINSUM: functools.partial(einsum_attention, h=h),
    }
    if einops is not None:
        fns[EINOPS] = functools.partial(einops_attention, h=h)
    return fns


def inputs(shape: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Seeded q, k, v of shape (b, seq, (h d)) ~ N(0, 1), and an output gradient like them."""
    b, h, n, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(b, n, h * d, generator=g) for _ in range(4))
    return [q, k, v], grad


def leaves(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def backward(fn: Attention, qkv: Sequence[torch.Tensor], grad: torch.Tensor) -> None:
    """Clear the inputs' gradients, run the forward pass and backpropagate ``grad``."""
    for t in qkv:
        t.grad = None
    fn(*qkv).backward(grad)


def forward_backward(fn: Attention, qkv: Sequence[torch.Tensor], grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A contender: forward + backward, returning the three gradients concatenated (for the check)."""

    def call() -> torch.Tensor:
        backward(fn, qkv, grad)
        return torch.cat([t.grad.flatten() for t in qkv])

    return call


def cases(shape: Sequence[int]) -> list[Case]:
    h = shape[1]
    fns = attentions(h)
    qkv, grad = inputs(shape)
    q64, k64, v64 = (t.double() for t in qkv)
    qkv_grad = leaves(qkv)
    described = f"(B, H, L, D) = {tuple(shape)}: q, k, v of shape {tuple(qkv[0].shape)} (b, seq, (h d)), float32"
    return [
        Case(
            FORWARD, f"`{PATTERN}`, {described}",
            {name: functools.partial(fn, *qkv) for name, fn in fns.items()},
            reference=lambda: einsum_attention(q64, k64, v64, h), einc=[TS, EAGER],
        ),
        Case(
            BACKWARD, f"forward, then `out.backward(grad)`; {described}",
            {name: forward_backward(fn, qkv_grad, grad) for name, fn in fns.items()},
            reference=forward_backward(functools.partial(einsum_attention, h=h), leaves(qkv, torch.float64),
                                       grad.double()),
            einc=[TS, EAGER],
        ),
    ]


def layer_cases(shape: Sequence[int]) -> list[Case]:
    """einc.nn.MultiheadAttention against torch's layer (same weights), batch_first, eval,
    under ``torch.no_grad`` (so torch takes its native fast path where it can)."""
    _, h, _, d = shape
    reference = torch.nn.MultiheadAttention(h * d, h, batch_first=True).eval()
    mine = einc.nn.MultiheadAttention(h * d, h, batch_first=True).eval()
    mine.load_state_dict(reference.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(mine)
    wide = copy.deepcopy(reference).double()
    x = inputs(shape)[0][0]
    layers = {TORCH_LAYER: reference, EINC_LAYER: mine, SCRIPTED_LAYER: scripted}

    def output(layer: torch.nn.Module, x: torch.Tensor, need_weights: bool) -> Callable[[], torch.Tensor]:
        return lambda: layer(x, x, x, need_weights=need_weights)[0]

    return [
        Case(
            f"{LAYER} (need_weights={need_weights})",
            f"self-attention `layer(x, x, x, need_weights={need_weights})[0]`, embed_dim {h * d}, {h} heads, "
            f"x of shape {tuple(x.shape)}, float32, eval, no_grad",
            {name: output(layer, x, need_weights) for name, layer in layers.items()},
            reference=output(wide, x.double(), need_weights),
            einc=[EINC_LAYER, SCRIPTED_LAYER],
        )
        for need_weights in (False, True)
    ]


def memory_probe(name: str, case: str, *shape: str) -> dict:
    """Run in a fresh subprocess: the peak RSS growth (bytes) of one call of one contender."""
    torch.set_num_threads(1)
    sizes = [int(s) for s in shape]
    fn = attentions(sizes[1])[name]
    qkv, grad = inputs(sizes)
    call: Callable[[], object]
    if case == FORWARD:
        call = functools.partial(fn, *qkv)
    else:
        qkv = leaves(qkv)
        call = functools.partial(backward, fn, qkv, grad)
    for _ in range(2):  # warm-up: plan, TorchScript's profiling run and optimisation
        call()
    for t in qkv:
        t.grad = None  # the gradients are part of the measured call's footprint
    nbytes, method = peak_rss_growth(call)
    return {"bytes": nbytes, "method": method}


def peak_memory(shape: Sequence[int]) -> tuple[str, list[str], list[list[str]], list[str]]:
    """The peak-memory table: (title, header, rows, notes)."""
    b, h, n, d = shape
    mib = 2.0**20
    probes = {(name, case): run_memory_probe(__file__, name, case, *map(str, shape))
              for name in MEMORY for case in PASSES}
    rows = [[name, *(f"{probes[name, case]['bytes'] / mib:.1f} MiB" for case in PASSES)] for name in MEMORY]
    notes = [
        f"`{TS}` is the fused form (scaled_dot_product_attention), `{UNFUSED}` the bmm, softmax, bmm one",
        (f"one (b, h, q, k) float32 score matrix is {b * h * n * n * 4 / mib:.1f} MiB; q, k, v and the output "
         f"are {b * n * h * d * 4 / mib:.1f} MiB each"),
        ("peak RSS growth of a fresh process during one call after two warm-up calls; inputs excluded, the "
         "output (forward) or the three gradients (forward+backward) included; "
         f"{probes[MEMORY[0], PASSES[0]]['method']}, `MALLOC_MMAP_THRESHOLD_=131072`"),
    ]
    return MEMORY_CASE, ["contender", *PASSES], rows, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return 0
    torch.set_num_threads(1)
    shape = QUICK_SHAPE if args.quick else SHAPE
    started = time.perf_counter()
    qkv, _ = inputs(shape)
    rewrite = einc.compile(PATTERN, h=shape[1]).explain(*qkv).rewrite
    print(f"einc.compile(pattern, h={shape[1]}).explain(q, k, v).rewrite == {rewrite!r}\n")

    results: dict[str, Result] = {}
    for case in cases(shape) + layer_cases(shape):
        if args.only and args.only not in case.name:
            continue
        with torch.no_grad() if case.name.startswith(LAYER) else contextlib.nullcontext():
            result = run_case(case, args.min_run_time, args.rounds, rtol=RTOL, verbose=False)
        case.notes = ["max |error| / max |float64 reference|: "
                      + ", ".join(f"{name} {err:.1e}" for name, err in result.max_errors.items())]
        if SDPA in result.medians and EINSUM in result.medians:
            # einc calls SDPA: this is how far the rewrite can go against einsum.
            case.notes.append(f"bound of the rewrite: {SDPA} / {EINSUM} = {result.ratio(SDPA, EINSUM):.2f}x "
                              "(einc's fused form is this plus its own permutes/reshapes)")
        print(console_table(result), "\n", flush=True)
        results[case.name] = result
    memory = None
    if not args.only or args.only in MEMORY_CASE:
        memory = peak_memory(shape)
        print(render_console(*memory), "\n")

    checked = check_targets(TARGETS, results)
    print_targets(checked)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    if args.markdown:
        intro = [(
            f"`{PATTERN}` with h={shape[1]}, compiled as `einc.compile(pattern, h=h)` (`{TS}`, default "
            f"backend; `explain(q, k, v).rewrite` = `{rewrite!r}`: fused into "
            "`torch.nn.functional.scaled_dot_product_attention`), with `backend=\"eager\"` "
            f"(`{EAGER}`) and with `fuse=False` (`{UNFUSED}`: bmm, softmax, bmm). "
            f"`{SDPA}` splits the heads with `view`/`transpose` and calls "
            f"`scaled_dot_product_attention(..., scale=1/sqrt(d))`; `{EINSUM}` is "
            "`torch.einsum(\"bqhd,bkhd->bhqk\") * scale`, `.softmax(-1)`, `torch.einsum(\"bhqk,bkhd->bqhd\")` "
            "on `view`s. The reference (allclose, "
            f"rtol {RTOL:.0e}, atol {RTOL:.0e} x max |reference|) is {EINSUM} in float64, and its float64 "
            "autograd gradients for forward+backward; for the layers, torch's layer in float64. "
            "A forward+backward call clears the inputs' `.grad`, "
            "runs `out.backward(grad)` and returns the three gradients concatenated (a copy every row pays)."
        )]
        section = markdown_report(HEADING, list(results.values()), checked, args, intro,
                                  reference="its float64 reference")
        if memory is not None:
            title, header, rows, notes = memory
            section += "\n" + "\n".join([f"### {title}", "", render_markdown(header, rows), "",
                                         *[f"- {n}" for n in notes]]) + "\n"
        write_section(args.markdown, HEADING, section, PREAMBLE)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
