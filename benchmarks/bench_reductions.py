"""Benchmarks for einc's stable reductions, semirings and normalizers (issue 3).

    python benchmarks/bench_reductions.py                       # print the tables
    python benchmarks/bench_reductions.py --quick               # short runs
    python benchmarks/bench_reductions.py --markdown benchmarks/RESULTS.md

CPU, float32, one thread.  Every contender's result is compared with a float64
reference before it is timed; a wrong result aborts the run.  The only exceptions are
contenders marked as *speed bounds* (numerically unstable forms): they are timed and
their error is reported, but it is not enforced.

Timing: ``torch.utils.benchmark.Timer(..., num_threads=1).blocked_autorange``.  The
contenders of one case are timed in the same run, interleaved over ``--rounds``
rounds; the lowest of each contender's round medians is reported (on a shared
machine it is the one least disturbed by neighbours).  Ratios are einc's time divided
by the contender's time: below 1x einc is faster.  Targets are reported as met or
missed, never asserted.

Peak memory of the log-semiring matmul is measured in fresh subprocesses: the
process's peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before
the call, so the import of torch and the inputs are not counted; glibc's mmap
threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed temporaries go back to the
kernel and each call's footprint is seen.  Where ``clear_refs`` is unavailable the
probe falls back to ``ru_maxrss`` growth over the first call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as tbench

from common import (  # noqa: E402 - the script's folder is on sys.path
    format_time,
    peak_rss_growth,
    render_console,
    render_markdown,
    run_memory_probe,
    write_section,
)
import einc

try:
    import einops
except Exception:  # noqa: BLE001 - optional peer
    einops = None

HEADING = "## Reductions (issue 3)"
TS = "einc (torchscript)"
EAGER = "einc (eager)"


# --------------------------------------------------------------------------- harness


@dataclass
class Contender:
    name: str
    fn: Callable[[], torch.Tensor]
    bound: bool = False
    """A speed bound (unstable form): timed, its error reported but not enforced."""


@dataclass
class Case:
    key: str
    title: str
    contenders: list[Contender]
    reference: Callable[[], torch.Tensor]
    rtol: float = 1e-5
    atol: float = 1e-5
    """Absolute tolerance, relative to the reference's largest finite magnitude."""
    notes: list[str] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """einc contenders that raised (reported, not timed)."""

    def ratio(self, einc_name: str, other: str) -> float:
        if einc_name not in self.medians or other not in self.medians:
            return float("nan")
        return self.medians[einc_name] / self.medians[other]


def _error(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[bool, str]:
    """(ok, text): same shape, same non-finite entries, finite entries allclose."""
    if tuple(out.shape) != tuple(ref.shape):
        return False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double()
    finite = torch.isfinite(ref)
    scale = float(ref[finite].abs().max()) if bool(finite.any()) else 1.0
    scale = max(scale, 1.0)
    same_nonfinite = bool(torch.equal(out[~finite], ref[~finite]))
    out_nonfinite = int((~torch.isfinite(out[finite])).sum())
    if out_nonfinite:
        return False, f"{out_nonfinite} inf/nan where the reference is finite"
    diff = (out[finite] - ref[finite]).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    ok = same_nonfinite and bool(torch.allclose(out[finite], ref[finite], rtol=rtol, atol=atol * scale))
    return ok, f"{err:.2g}"


def run_case(case: Case, min_run_time: float, rounds: int) -> Case:
    torch.set_num_threads(1)
    ref = case.reference().double()
    for c in case.contenders:
        try:
            for _ in range(3):  # warm up: TorchScript's profiling executor optimises after a few calls
                out = c.fn()
        except Exception as e:  # noqa: BLE001 - an einc failure is a result; a peer's is a bug here
            if not c.name.startswith("einc"):
                raise
            case.failed[c.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
            continue
        ok, text = _error(out, ref, case.rtol, case.atol)
        if c.bound:
            case.errors[c.name] = text if ok else f"{text} (wrong; speed bound, not validated)"
        elif not ok:
            raise AssertionError(f"{case.key}: {c.name} differs from the float64 reference: {text}")
        else:
            case.errors[c.name] = text
        del out
    for r in range(rounds):
        # Rotate the order each round so that no contender always runs first.
        shift = r % len(case.contenders)
        for c in case.contenders[shift:] + case.contenders[:shift]:
            if c.name in case.failed:
                continue
            timer = tbench.Timer(stmt="fn()", globals={"fn": c.fn}, num_threads=1, label=case.key, description=c.name)
            median = timer.blocked_autorange(min_run_time=min_run_time).median
            case.medians[c.name] = min(case.medians.get(c.name, float("inf")), median)
    print(console_table(case), "\n", flush=True)
    return case


fmt_time = format_time


def _rows(case: Case) -> tuple[list[str], list[list[str]]]:
    eincs = [c.name for c in case.contenders if c.name in (TS, EAGER)]
    header = ["contender", "median", *[f"{e} / this" for e in eincs], "max abs err vs f64"]
    rows = []
    for c in case.contenders:
        if c.name in case.failed:
            rows.append([c.name, "FAILED", *["—"] * len(eincs), case.failed[c.name]])
            continue
        row = [c.name, fmt_time(case.medians[c.name])]
        row += ["—" if e == c.name or e in case.failed else f"{case.ratio(e, c.name):.3g}x" for e in eincs]
        row.append(case.errors.get(c.name, ""))
        rows.append(row)
    return header, rows


def console_table(case: Case) -> str:
    return render_console(f"{case.key}: {case.title}", *_rows(case), case.notes)


def markdown_table(case: Case) -> str:
    return render_markdown(*_rows(case))


def _pair(pattern: str, *tensors: torch.Tensor) -> list[Contender]:
    ts = einc.compile(pattern)
    eager = einc.compile(pattern, backend="eager")
    return [Contender(TS, lambda: ts(*tensors)), Contender(EAGER, lambda: eager(*tensors))]


# --------------------------------------------------------------------------- cases


def case_logsumexp(std: float, key: str, quick: bool) -> Case:
    g = torch.Generator().manual_seed(0)
    shape = (4, 8, 256, 512)
    x = torch.randn(shape, generator=g) * std
    contenders = _pair("logsumexp(a b c n -> a b c)", x)
    compiled = einc.compile("logsumexp(a b c n -> a b c)", backend="compile")
    contenders.append(Contender("einc (compile) [torch.compile backend, info]", lambda: compiled(x)))
    contenders += [
        Contender("torch.logsumexp(x, -1)", lambda: torch.logsumexp(x, -1)),
        Contender("torch.log(torch.exp(x).sum(-1)) [unstable]", lambda: torch.log(torch.exp(x).sum(-1)), bound=True),
    ]
    notes = []
    if einops is not None:
        try:
            einops.reduce(x[:1, :1, :1], "a b c n -> a b c", "logsumexp")
            contenders.append(Contender("einops.reduce(..., 'logsumexp')",
                                        lambda: einops.reduce(x, "a b c n -> a b c", "logsumexp")))
        except Exception as e:  # noqa: BLE001 - einops may not know logsumexp
            notes.append(f"einops {einops.__version__} skipped: {str(e).splitlines()[-1].strip()}")
    return Case(key, f"`logsumexp(a b c n -> a b c)`, x {shape} float32 ~ N(0, {std:g}^2)", contenders,
                lambda: torch.logsumexp(x.double(), -1), notes=notes)


def _logmm_naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(a[:, :, None] + b[None], 1)


def _adversarial(n: int, offset: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima of A at k=0, column maxima of B at k=1: every shifted product underflows."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    a[:, 0] += offset
    b[1, :] += offset
    return a, b


def _lost_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of entries for which einc_logmm's exact-recompute guard fires (mirrors its test)."""
    ea = (a - a.amax(1, True)).clamp(min=-87.0).exp()
    eb = (b - b.amax(0, True)).clamp(min=-87.0).exp()
    return float(((ea @ eb) < 1e-19).double().mean())


def case_logmm(n: int, quick: bool) -> Case:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g) * 10
    b = torch.randn(n, n, generator=g) * 10
    contenders = _pair("logsumexp(i k, k j -> i j)", a, b)
    contenders += [
        Contender("naive torch.logsumexp(a[:, :, None] + b[None], 1)", lambda: _logmm_naive(a, b)),
        Contender("torch.log(torch.exp(a) @ torch.exp(b)) [unstable]",
                  lambda: torch.log(torch.exp(a) @ torch.exp(b)), bound=True),
    ]
    return Case(f"logmm-{n}", f"log semiring `logsumexp(i k, k j -> i j)`, n={n}, float32 ~ N(0, 10^2)",
                contenders, lambda: _logmm_naive(a.double(), b.double()),
                notes=[f"exact-recompute guard fires on {_lost_fraction(a, b):.1%} of entries"])


def case_logmm_adversarial(n: int, quick: bool) -> Case:
    a, b = _adversarial(n)
    g = torch.Generator().manual_seed(1)
    a0 = torch.randn(n, n, generator=g) * 10
    b0 = torch.randn(n, n, generator=g) * 10
    ts = einc.compile("logsumexp(i k, k j -> i j)")
    contenders = _pair("logsumexp(i k, k j -> i j)", a, b)
    contenders += [
        Contender("naive torch.logsumexp(a[:, :, None] + b[None], 1)", lambda: _logmm_naive(a, b)),
        Contender("einc (torchscript) on the N(0, 10^2) data [benign]", lambda: ts(a0, b0), bound=True),
    ]
    return Case(
        f"logmm-adversarial-{n}",
        f"log semiring, n={n}, adversarial: A ~ N(0,1) with column k=0 raised by 100, "
        f"B ~ N(0,1) with row k=1 raised by 100",
        contenders, lambda: _logmm_naive(a.double(), b.double()),
        notes=[f"exact-recompute guard fires on {_lost_fraction(a, b):.1%} of entries",
               "the [benign] row runs on other data; its error column is against this case's reference "
               "and is meaningless"])


def case_softmax(quick: bool) -> Case:
    g = torch.Generator().manual_seed(3)
    shape = (8, 8, 256, 64)
    q = torch.randn(shape, generator=g)
    k = torch.randn(shape, generator=g)
    contenders = _pair("softmax(b h q d, b h k d -> b h q [k])", q, k)
    contenders += [
        Contender('torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1)',
                  lambda: torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1)),
        Contender("torch.softmax(q @ k.transpose(-1, -2), -1)",
                  lambda: torch.softmax(q @ k.transpose(-1, -2), -1)),
    ]
    return Case("softmax", f"`softmax(b h q d, b h k d -> b h q [k])`, q, k {shape} float32 ~ N(0, 1)",
                contenders, lambda: torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()), -1),
                atol=2e-5)


def case_maxplus(n: int, quick: bool) -> Case:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, generator=g) * 10
    b = torch.randn(n, n, generator=g) * 10
    contenders = _pair("max(i k, k j -> i j)", a, b)
    contenders.append(Contender("naive (a[:, :, None] + b[None]).amax(1)", lambda: (a[:, :, None] + b[None]).amax(1)))
    return Case(f"maxplus-{n}", f"max-plus `max(i k, k j -> i j)`, n={n}, float32 ~ N(0, 10^2)", contenders,
                lambda: (a.double()[:, :, None] + b.double()[None]).amax(1))


def case_logmm_structural(n: int) -> Case:
    """Diagonal log-space matrices (forbidden transitions): nearly every output is a true
    -inf, told from underflow by one bmm of masks (once recomputed entry by entry)."""
    g = torch.Generator().manual_seed(8)
    a = torch.full((n, n), float("-inf"))
    b = torch.full((n, n), float("-inf"))
    a.diagonal().copy_(torch.randn(n, generator=g))
    b.diagonal().copy_(torch.randn(n, generator=g))
    dense_a, dense_b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    contenders = _pair("logsumexp(i k, k j -> i j)", a, b)
    dense = einc.compile("logsumexp(i k, k j -> i j)")
    contenders.append(Contender("einc (torchscript) on dense N(0,1) data [benign]", lambda: dense(dense_a, dense_b),
                                bound=True))

    def reference() -> torch.Tensor:  # diagonal times diagonal: the diagonal sums, -inf elsewhere
        out = torch.full((n, n), float("-inf"), dtype=torch.float64)
        out.diagonal().copy_(a.diagonal().double() + b.diagonal().double())
        return out
    return Case(f"logmm-diagonal-{n}", f"log semiring `logsumexp(i k, k j -> i j)`, diagonal {n}x{n} "
                "matrices (-inf off the diagonal), against einc on dense data of the same shapes", contenders,
                reference)


def case_maxplus_batched(z: int, n: int) -> Case:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(z, n, n, generator=g) * 10
    b = torch.randn(z, n, n, generator=g) * 10
    contenders = _pair("max(z i k, z k j -> z i j)", a, b)
    contenders.append(Contender("naive (a[..., None] + b[:, None]).amax(2)",
                                lambda: (a[..., None] + b[:, None]).amax(2)))
    return Case(f"maxplus-{z}x{n}", f"max-plus `max(z i k, z k j -> z i j)`, ({z}, {n}, {n}), float32 ~ N(0, 10^2)",
                contenders, lambda: (a.double()[..., None] + b.double()[:, None]).amax(2))


# --------------------------------------------------------------------------- under autograd


def _backward(forward: Callable[..., torch.Tensor], leaves: list[torch.Tensor], weight: torch.Tensor
              ) -> Callable[[], torch.Tensor]:
    """Forward and backward (a weighted sum, so normalizers get a non-zero gradient);
    returns the first leaf's gradient, which is validated."""
    def run() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        (forward(*leaves) * weight).sum().backward()
        return leaves[0].grad
    return run


def case_autograd(key: str, pattern: str, shapes: list[tuple[int, ...]], torch_form: Callable[..., torch.Tensor],
                  label: str, backward: bool) -> Case:
    """A reduction or normalizer with gradients enabled, against its torch form."""
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ts = einc.compile(pattern)
    eager = einc.compile(pattern, backend="eager")
    weight = torch.randn(torch_form(*leaves).shape, generator=g)
    wide = [leaf.detach().double().requires_grad_() for leaf in leaves]
    if backward:
        run = lambda f: _backward(f, leaves, weight)  # noqa: E731
        reference = _backward(torch_form, wide, weight.double())
    else:
        run = lambda f: lambda: f(*leaves)  # noqa: E731
        reference = lambda: torch_form(*wide)  # noqa: E731
    contenders = [Contender(TS, run(ts)), Contender(EAGER, run(eager)), Contender(label, run(torch_form))]
    what = "forward and backward" if backward else "forward, inputs requiring grad"
    return Case(key, f"`{pattern}`, {' x '.join(map(str, shapes))} float32 ~ N(0, 1), {what}", contenders,
                reference, atol=2e-5)


AUTOGRAD = [
    # (key, pattern, shapes, torch form, its label)
    ("lse", "logsumexp(b v -> b)", [(256, 8192)], lambda x: torch.logsumexp(x, 1), "torch.logsumexp(x, 1)"),
    ("lse-small", "logsumexp(b v -> b)", [(64, 4096)], lambda x: torch.logsumexp(x, 1), "torch.logsumexp(x, 1)"),
    ("lse-proj", "logsumexp(sum(b d, v d -> b v) -> b)", [(512, 64), (2048, 64)],
     lambda h, w: torch.logsumexp(h @ w.T, 1), "torch.logsumexp(h @ w.T, 1)"),
    ("softmax", "softmax(b [v])", [(256, 8192)], lambda x: torch.softmax(x, 1), "torch.softmax(x, 1)"),
    ("log_softmax", "log_softmax(b [v])", [(256, 8192)], lambda x: torch.log_softmax(x, 1),
     "torch.log_softmax(x, 1)"),
    ("max", "max(b v -> b)", [(256, 8192)], lambda x: torch.amax(x, 1), "torch.amax(x, 1)"),
    ("mean", "mean(b v -> b)", [(256, 8192)], lambda x: torch.mean(x, 1), "torch.mean(x, 1)"),
    ("logmm", "logsumexp(i k, k j -> i j)", [(128, 128), (128, 128)],
     lambda a, b: torch.logsumexp(a[:, :, None] + b[None], 1), "torch.logsumexp(a[:, :, None] + b[None], 1)"),
]


def first_calls(pattern: str, shapes: list[tuple[int, ...]], torch_form: Callable[..., torch.Tensor],
                calls: int = 3) -> tuple[float, float]:
    """Seconds of the first ``calls`` forward+backward calls of a newly compiled
    expression (default backend) and of the torch form, in this process."""
    einc.configure()  # empties the expression cache: a new compile
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    expression = einc.compile(pattern)
    out = []
    for forward in (expression, torch_form):
        start = time.perf_counter()
        for _ in range(calls):
            forward(*leaves).sum().backward()
        out.append(time.perf_counter() - start)
    return out[0], out[1]


# --------------------------------------------------------------------------- n=2048 validation


def validate_logmm_rows(n: int, rows: int = 8) -> str:
    """einc at large n against a float64 naive reference on a few rows (the full naive form won't fit)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g) * 10
    b = torch.randn(n, n, generator=g) * 10
    out = einc.compile("logsumexp(i k, k j -> i j)")(a, b)
    idx = torch.linspace(0, n - 1, rows).long()
    worst = 0.0
    for i in idx.tolist():
        ref = torch.logsumexp(a[i].double()[:, None] + b.double(), 0)
        ok, text = _error(out[i], ref, 1e-5, 1e-5)
        if not ok:
            raise AssertionError(f"logmm-{n}: row {i} differs from the float64 reference: {text}")
        worst = max(worst, float(text))
    return f"{worst:.2g} (on {rows} rows)"


# --------------------------------------------------------------------------- memory probe


def memory_probe(kind: str, n: int) -> dict:
    """Run in a fresh subprocess: peak RSS growth (bytes) of one call, inputs excluded."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g) * 10
    b = torch.randn(n, n, generator=g) * 10
    if kind == "einc":
        fn = einc.compile("logsumexp(i k, k j -> i j)")
        for _ in range(3):  # TorchScript warm-up at a small size (its own peak is reset below)
            fn(a[:8, :8].contiguous(), b[:8, :8].contiguous())
        call = lambda: fn(a, b)  # noqa: E731
    else:
        call = lambda: _logmm_naive(a, b)  # noqa: E731
    nbytes, method = peak_rss_growth(call)
    return {"kind": kind, "n": n, "bytes": nbytes, "method": method}


def run_probe(kind: str, n: int) -> dict:
    return run_memory_probe(__file__, kind, str(n))


# --------------------------------------------------------------------------- allocator


def pin_malloc() -> str:
    """Make glibc keep freed blocks up to 32 MiB for reuse instead of unmapping them.

    torch's CPU allocator calls malloc/free directly.  glibc serves large blocks with
    mmap and adapts that threshold as blocks are freed, so whether a contender gets
    reused (already faulted-in) memory or fresh pages depends on what ran before it;
    on this VM a fresh page costs about 1.5 us, i.e. ~12 ms per call for the 32 MiB
    the softmax case allocates, which swamped the differences being measured.  A fixed
    threshold (glibc's maximum, 32 MiB) and no trimming give every contender the same
    warm-memory regime.  Blocks above 32 MiB (the naive n^3 broadcasts) are still
    mmapped on every call, as in any process.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    if ok:
        return "glibc `mallopt(M_MMAP_THRESHOLD, 32 MiB)`, `mallopt(M_TRIM_THRESHOLD, 1 GiB)` (freed blocks reused)"
    return "glibc defaults (mallopt unavailable)"


# --------------------------------------------------------------------------- targets / report


@dataclass
class Target:
    case: str
    contender: str
    max_ratio: float
    text: str
    einc_name: str = TS


def targets() -> list[Target]:
    return [
        Target("lse-wide", "torch.logsumexp(x, -1)", 0.6, "1. N(0,50²): einc ≤ 0.6x torch.logsumexp"),
        Target("lse-wide", "torch.log(torch.exp(x).sum(-1)) [unstable]", 1.3,
               "1. N(0,50²): einc ≤ 1.3x unstable log(exp(x).sum())"),
        Target("lse-normal", "torch.logsumexp(x, -1)", 1.1, "2. N(0,1): einc ≤ 1.1x torch.logsumexp"),
        Target("logmm-256", "naive torch.logsumexp(a[:, :, None] + b[None], 1)", 0.02,
               "3. log-matmul n=256: einc ≤ 1/50 of naive broadcast"),
        Target("softmax", 'torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1)', 1.1,
               "4. softmax: einc ≤ 1.1x torch.einsum + torch.softmax"),
        Target("maxplus-8x64", "naive (a[..., None] + b[:, None]).amax(2)", 1.05,
               "5. max-plus (8, 64, 64): einc ≤ 1.05x the naive broadcast (issue 11.5: ≤ 1.0x, within noise)"),
        Target("logmm-diagonal-512", "einc (torchscript) on dense N(0,1) data [benign]", 2.0,
               "5. log semiring, structural -inf (diagonal 512²): einc ≤ 2x its dense time"),
        Target("maxplus-256", "naive (a[:, :, None] + b[None]).amax(1)", 1 / 7,
               "5. max-plus 256²: einc ≥ 7x faster than the naive broadcast"),
        *[Target(f"{key}-{kind}", label, 1.2, f"autograd (issue 11.7): {key} {kind}: einc ≤ 1.2x {label}")
          for key, _, _, _, label in AUTOGRAD for kind in ("fwd", "fwdbwd")],
    ]


def machine_info() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}", f"einc {getattr(einc, '__version__', '?')}"]
    versions.append(f"einops {einops.__version__}" if einops is not None else "einops not installed")
    return [
        f"- Machine: {cpu}, {os.cpu_count()} logical cores (shared with other jobs); Python "
        f"{platform.python_version()}; {', '.join(versions)}",
        f"- Threads: torch.set_num_threads(1) (`torch.get_num_threads()` = {torch.get_num_threads()}), "
        "Timer(num_threads=1)",
    ]


def _x(ratio: float) -> str:
    return "—" if ratio != ratio else f"{ratio:.3g}x"


def _verdict(ratio: float, limit: float) -> str:
    if ratio != ratio:  # nan: einc failed
        return "einc FAILED"
    return "met" if ratio <= limit else "**missed**"


def einc_revision() -> str:
    """einc's location and the checkout's commit (read-only git calls)."""
    where = os.path.dirname(os.path.abspath(einc.__file__))
    try:
        commit = subprocess.run(["git", "-C", where, "log", "-1", "--format=%h %s"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += " (einc/ has uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "not a git checkout"
    return f"- einc: `{where}`, commit {commit}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (min_run_time 0.05 s, one round)")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as markdown to PATH")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked_autorange")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (lowest median wins)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only cases whose key contains one of these comma-separated substrings")
    parser.add_argument("--append", metavar="LABEL",
                        help="append to the --markdown file as a supplementary section titled LABEL")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (order-dependent page-fault costs)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], int(args.memory_probe[1]))))
        return 0
    malloc = "glibc defaults (--default-malloc)" if args.default_malloc else pin_malloc()
    revision = einc_revision()  # now: the code that is imported and benchmarked
    quick = args.quick
    min_run_time = args.min_run_time or (0.05 if quick else 0.5)
    rounds = args.rounds or (1 if quick else 5)
    torch.set_num_threads(1)
    started = time.time()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    builders = [
        ("lse-wide", lambda: case_logsumexp(50.0, "lse-wide", quick)),
        ("lse-normal", lambda: case_logsumexp(1.0, "lse-normal", quick)),
        ("logmm-256", lambda: case_logmm(256, quick)),
        ("logmm-adversarial-256", lambda: case_logmm_adversarial(256, quick)),
        ("softmax", lambda: case_softmax(quick)),
        ("maxplus-256", lambda: case_maxplus(256, quick)),
        ("maxplus-8x64", lambda: case_maxplus_batched(8, 64)),
        ("logmm-diagonal-512", lambda: case_logmm_structural(512)),
        *[(f"{key}-{kind}", lambda row=row, kind=kind: case_autograd(f"{row[0]}-{kind}", *row[1:], kind == "fwdbwd"))
          for row in AUTOGRAD for key in row[:1] for kind in ("fwd", "fwdbwd")],
    ]
    cases: dict[str, Case] = {}
    for key, build in builders:
        if args.only and not any(o in key for o in args.only.split(",")):
            continue
        cases[key] = run_case(build(), min_run_time, rounds)

    # Large log-matmul: einc only; time, validation on sampled rows, peak memory per n.
    large: list[dict] = []
    large_failed = ""
    if not args.only or "logmm" in args.only:
        sizes = [512, 1024] if quick else [512, 1024, 2048]
        fn = einc.compile("logsumexp(i k, k j -> i j)")
        for n in sizes:
            g = torch.Generator().manual_seed(1)
            a = torch.randn(n, n, generator=g) * 10
            b = torch.randn(n, n, generator=g) * 10
            try:
                err = validate_logmm_rows(n)
            except Exception as e:  # noqa: BLE001 - report einc's failure, go on
                print(f"logmm einc n={n}: FAILED {type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}")
                large_failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
                break
            for _ in range(3):
                fn(a, b)
            median = min(tbench.Timer(stmt="fn(a, b)", globals={"fn": fn, "a": a, "b": b}, num_threads=1)
                         .blocked_autorange(min_run_time=max(min_run_time, 0.5 if quick else 1.5)).median
                         for _ in range(1 if quick else 2))
            mem = run_probe("einc", n)
            row = {"n": n, "time": median, "err": err, "bytes": mem["bytes"], "method": mem["method"]}
            large.append(row)
            print(f"logmm einc n={n}: {fmt_time(median)}, peak extra memory {mem['bytes'] / 2**20:.1f} MiB "
                  f"= {mem['bytes'] / (4 * n * n):.2f} x (n^2 float32), max err {err}", flush=True)
        naive_mem = [run_probe("naive", n) for n in ([128, 256] if quick else [128, 256, 384])]
        for m in naive_mem:
            print(f"logmm naive n={m['n']}: peak extra memory {m['bytes'] / 2**20:.1f} MiB "
                  f"= {m['bytes'] / (4 * m['n'] ** 3):.2f} x (n^3 float32)", flush=True)
    else:
        naive_mem = []

    firsts = []
    if not args.only or "first" in args.only:
        for key, pattern, shapes, form, label in AUTOGRAD:
            mine, theirs = first_calls(pattern, shapes, form)
            firsts.append((key, pattern, mine, theirs, label))
            print(f"first 3 fwd+bwd calls {key}: einc {fmt_time(mine)} (compile included), {label} {fmt_time(theirs)}")

    checked = []
    for t in targets():
        if t.case in cases:
            r = cases[t.case].ratio(t.einc_name, t.contender)
            checked.append((t, r, _verdict(r, t.max_ratio), cases[t.case].ratio(EAGER, t.contender)))
    print("targets:")
    for t, r, verdict, r_eager in checked:
        print(f"  {verdict:14s} {t.text}: {_x(r)} (eager {_x(r_eager)})")
    elapsed = time.time() - started
    print(f"total {elapsed:.0f} s")

    if args.markdown:
        cmd = shlex.join(["/work/venv/bin/python" if sys.executable.startswith("/work/venv") else "python",
                          "benchmarks/bench_reductions.py", *(argv if argv is not None else sys.argv[1:])])
        if os.environ.get("PYTHONPATH"):
            cmd = f"PYTHONPATH={os.environ['PYTHONPATH']} {cmd}"
        if args.append:
            head = [f"### Supplementary run: {args.append}", ""]
        else:
            head = ["# einc benchmarks: stable reductions, semirings, normalizers", "", HEADING, ""]
        lines = [
            *head,
            f"- Command: `{cmd}`",
            f"- Date: {date}; run took {elapsed:.0f} s",
            *machine_info(),
            revision,
            f"- Allocator: {malloc}; see `pin_malloc` in the script for why.",
            f"- Timing: `torch.utils.benchmark.Timer(..., num_threads=1).blocked_autorange(min_run_time={min_run_time})`, "
            f"float32, CPU; each contender's lowest median over {rounds} interleaved round(s), all contenders of a "
            "case in the same run.",
            "- Ratio columns: einc's time / the row's time (below 1x einc is faster). Every contender was checked "
            "against a float64 reference (same non-finite entries; finite entries allclose, rtol 1e-5, atol 1e-5 "
            "x max |ref|) before timing, except rows marked [unstable]/[benign] (speed bounds: error shown, "
            "not enforced).",
            "",
            "### Targets (default TorchScript backend; eager in brackets)", "",
            "| target | einc (torchscript) | einc (eager) | met |", "|---|---:|---:|:---:|",
        ]
        lines += [f"| {t.text} | {_x(r)} | {_x(re_)} | {verdict} |" for t, r, verdict, re_ in checked]
        lines.append("")
        for case in cases.values():
            lines += [f"### {case.key}", "", case.title, "", markdown_table(case), ""]
            lines += [f"- {n}" for n in case.notes]
            if case.notes:
                lines.append("")
        if firsts:
            lines += ["### First calls under autograd", "",
                      "The first three forward+backward calls of a newly compiled expression (default backend, "
                      "compile included) against the torch form's first three in the same process.", "",
                      "| case | einc | torch form | ratio |", "|---|---:|---:|---:|"]
            lines += [f"| {key} `{pattern}` | {fmt_time(m)} | {fmt_time(t)} ({label}) | {m / t:.2f}x |"
                      for key, pattern, m, t, label in firsts]
            lines.append("")
        if large_failed:
            lines += ["### logmm-large (einc only)", "", f"einc FAILED: `{large_failed}`", ""]
        if large:
            lines += [
                "### logmm-large (einc only)", "",
                "`logsumexp(i k, k j -> i j)`, float32 ~ N(0, 10^2), default TorchScript backend. The naive "
                "broadcast would need n^3 floats (32 GiB at n=2048). Peak memory: growth of the peak RSS of a "
                "fresh subprocess during one call, inputs excluded, output included.", "",
                "| n | median | peak extra memory | / (4 n² bytes) | max abs err vs f64 |", "|---:|---:|---:|---:|---:|",
            ]
            lines += [f"| {r['n']} | {fmt_time(r['time'])} | {r['bytes'] / 2**20:.1f} MiB | "
                      f"{r['bytes'] / (4 * r['n'] ** 2):.2f} | {r['err']} |" for r in large]
            lines.append("")
            if len(large) >= 2:
                x, y = large[-2], large[-1]
                lines.append(f"- n={x['n']} → n={y['n']}: memory x{y['bytes'] / max(x['bytes'], 1):.2f} "
                             f"(n² predicts x{(y['n'] / x['n']) ** 2:.0f}, n³ x{(y['n'] / x['n']) ** 3:.0f}); "
                             f"time x{y['time'] / x['time']:.2f} (n³ predicts x{(y['n'] / x['n']) ** 3:.0f}).")
            if naive_mem:
                lines.append("- for contrast, the naive broadcast's peak: " + ", ".join(
                    f"n={m['n']}: {m['bytes'] / 2**20:.0f} MiB ({m['bytes'] / (4 * m['n'] ** 3):.2f} x 4n³ bytes)"
                    for m in naive_mem) + ".")
            lines.append(f"- memory probe: {large[-1]['method']}, `MALLOC_MMAP_THRESHOLD_=131072`.")
            lines.append("")
        if args.append:
            # Demote the run's own headings one level under the supplementary heading.
            lines = [lines[0], *[("#" + l if l.startswith("### ") else l) for l in lines[1:]]]
        text = "\n".join(lines).rstrip() + "\n"
        if args.append:
            with open(args.markdown, "a") as f:
                f.write("\n" + text)
        else:
            # Replace only this script's section of RESULTS.md (bench_core owns another).
            heading = "## Reductions (issue 3)"
            write_section(args.markdown, heading, text[text.index(heading):], "# einc benchmarks\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
