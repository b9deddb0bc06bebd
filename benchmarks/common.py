"""A small benchmark harness: time contenders of one case side by side, print ratios.

Every case names its contenders (``name -> zero-argument callable``) and a reference
(torch.einsum's result).  Before timing, every contender's result is compared with the
reference; a wrong result aborts the case, since timing it would be meaningless.

Timing uses ``torch.utils.benchmark.Timer(...).blocked_autorange`` with one thread.  The
contenders of a case are timed in the same run, interleaved over ``rounds`` rounds; each
round gives a median per contender and the lowest of those medians is reported (on a
shared machine the lowest median is the one least disturbed by neighbours).

Ratios are ``einc / contender``: ``0.25x`` against torch.einsum means einc takes a quarter
of torch.einsum's time (lower is better for einc).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import time
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as tbench

__all__ = [
    "PREAMBLE",
    "Contender",
    "Case",
    "Result",
    "Target",
    "parse_args",
    "run_case",
    "run_cases",
    "script",
    "machine_info",
    "format_time",
    "markdown_report",
    "console_table",
    "check_targets",
    "finish",
    "print_targets",
    "peak_rss_growth",
    "run_memory_probe",
]

PREAMBLE = (
    "# einc benchmarks\n\n"
    "Each section is written by one benchmark script (`python benchmarks/<script>.py --markdown "
    "benchmarks/RESULTS.md` replaces only its own section). Ratios are einc's time divided by the "
    "contender's: below 1x einc is faster.\n"
)
"""What ``write_section`` starts RESULTS.md with when the file does not exist yet."""


@dataclass
class Contender:
    """A zero-argument callable; ``context`` (optional) is entered around its check and timing."""

    fn: Callable[[], torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager] | None = None


@dataclass
class Case:
    name: str
    description: str
    contenders: Mapping[str, Callable[[], torch.Tensor] | Contender]
    reference: Callable[[], torch.Tensor]
    einc: Sequence[str]
    """Contender names that are einc; each gets a ratio column."""
    notes: Sequence[str] = ()


@dataclass
class Result:
    case: Case
    medians: dict[str, float]
    """Seconds per call, per contender (lowest of the rounds' medians)."""
    max_errors: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, list[float]] = field(default_factory=dict)
    """Each round's median, per contender."""

    def spread(self, einc: str, other: str) -> tuple[float, float]:
        """The lowest and highest of the rounds' ratios ``einc / other``."""
        ratios = [a / b for a, b in zip(self.rounds[einc], self.rounds[other])]
        return min(ratios), max(ratios)

    def ratio(self, einc: str, other: str) -> float:
        return self.medians[einc] / self.medians[other]


@dataclass
class Target:
    case: str
    einc: str
    contender: str
    max_ratio: float
    text: str

    def evaluate(self, results: Mapping[str, Result]) -> tuple[float, bool]:
        ratio = results[self.case].ratio(self.einc, self.contender)
        return ratio, ratio <= self.max_ratio


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short runs (min_run_time 0.05 s, one round)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per blocked_autorange (default 0.4, --quick 0.05)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per case; lowest median wins (default 5, --quick 1)")
    parser.add_argument("--markdown", metavar="PATH", default=None,
                        help="write the results as markdown to PATH (replacing this script's section)")
    parser.add_argument("--only", metavar="SUBSTRING", default=None, help="run only cases whose name contains this")
    parser.add_argument("--memory-probe", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # run_memory_probe
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 0.4
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    return args


def _as_contender(value: Callable[[], torch.Tensor] | Contender) -> Contender:
    return value if isinstance(value, Contender) else Contender(value)


@contextlib.contextmanager
def _entered(contender: Contender) -> Iterator[None]:
    if contender.context is None:
        yield
    else:
        with contender.context():
            yield


def _check(case: Case, rtol: float) -> dict[str, float]:
    """Each contender's max abs error against the reference, relative to the reference's scale."""
    reference = case.reference().double()
    scale = float(reference.abs().max()) or 1.0
    errors: dict[str, float] = {}
    for name, value in case.contenders.items():
        contender = _as_contender(value)
        with _entered(contender):
            out = contender.fn()
        if tuple(out.shape) != tuple(reference.shape):
            raise AssertionError(
                f"{case.name}: {name} returned shape {tuple(out.shape)}, reference has {tuple(reference.shape)}"
            )
        error = float((out.double() - reference).abs().max()) / scale if out.numel() else 0.0
        if not torch.allclose(out.double(), reference, rtol=rtol, atol=rtol * scale):
            raise AssertionError(f"{case.name}: {name} differs from torch.einsum (max error {error:.3g} of scale)")
        errors[name] = error
    return errors


def run_case(case: Case, min_run_time: float, rounds: int = 1, rtol: float = 1e-4, verbose: bool = True) -> Result:
    torch.set_num_threads(1)
    errors = _check(case, rtol)
    contenders = {name: _as_contender(v) for name, v in case.contenders.items()}
    medians: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, contender in contenders.items():
            with _entered(contender):
                contender.fn()  # warm up (first-call compile, allocator)
                timer = tbench.Timer(stmt="fn()", globals={"fn": contender.fn}, num_threads=1,
                                     label=case.name, description=name)
                medians[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    result = Result(case, {name: min(values) for name, values in medians.items()}, errors, medians)
    if verbose:
        print(console_table(result))
        print()
        sys.stdout.flush()
    return result


def run_cases(makers: Sequence[Callable[[], Case]], args: argparse.Namespace) -> dict[str, Result]:
    """Make and run each case (those whose name contains ``--only``), in order."""
    results = {}
    for make in makers:
        case = make()
        if args.only and args.only not in case.name:
            continue
        results[case.name] = run_case(case, args.min_run_time, args.rounds)
    return results


def script(argv: Sequence[str] | None, doc: str, makers: Sequence[Callable[[], Case]], targets: Sequence[Target],
           heading: str, intro: Sequence[str],
           after: Callable[[dict[str, Result], argparse.Namespace], list[str]] | None = None,
           probe: Callable[[str, bool], dict] | None = None) -> int:
    """A benchmark script of plain cases: arguments, one thread, the cases, ``after``
    (notes on the results, and markdown lines to add to the intro), then :func:`finish`.
    In a fresh process started by :func:`probe_contenders` (``--memory-probe NAME
    quick|full``) it prints ``probe(NAME, quick)`` as JSON instead."""
    args = parse_args(argv, description=doc.splitlines()[0])
    if probe is not None and args.memory_probe:
        name, size = args.memory_probe
        print(json.dumps(probe(name, size == "quick")))
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = run_cases(makers, args)
    extra = after(results, args) if after is not None else []
    return finish(args, results, targets, heading, [*intro, *extra], started)


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _rows(result: Result) -> tuple[list[str], list[list[str]]]:
    header = ["contender", "median"] + [f"{e} / this" for e in result.case.einc]
    rows = []
    for name, median in result.medians.items():
        row = [name, format_time(median)]
        for e in result.case.einc:
            row.append("—" if e == name else f"{result.ratio(e, name):.2f}x")
        rows.append(row)
    return header, rows


def render_console(title: str, header: list[str], rows: list[list[str]], notes: Sequence[str] = ()) -> str:
    """A titled text table: first column left-aligned, the rest right-aligned, then notes."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [f"== {title}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [f"   note: {n}" for n in notes]
    return "\n".join(out)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, the first column in code spans, the rest right-aligned."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows]
    return "\n".join(out)


def console_table(result: Result) -> str:
    return render_console(f"{result.case.name}: {result.case.description}", *_rows(result), result.case.notes)


def markdown_table(result: Result) -> str:
    return render_markdown(*_rows(result))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _einc_revision() -> str:
    """The git commit of the einc checkout, flagged when einc/ has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "einc"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {commit}" + (" + uncommitted changes in einc/" if dirty else "")


def machine_info() -> dict[str, str]:
    info = {
        "CPU": f"{_cpu_model()} ({os.cpu_count()} logical cores, shared)",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "torch.backends.opt_einsum": (
            f"enabled={torch.backends.opt_einsum.enabled}, strategy={torch.backends.opt_einsum.strategy!r}"
        ),
    }
    info["einc"] = _einc_revision()
    for module in ("opt_einsum", "einops", "einx", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - report what is there
            info[module] = "not installed"
    return info


def check_targets(targets: Sequence[Target], results: Mapping[str, Result]) -> list[tuple[Target, float, bool]]:
    return [(t, *t.evaluate(results)) for t in targets if t.case in results]


def print_targets(checked: Sequence[tuple[Target, float, bool]]) -> None:
    """Print ``check_targets``'s verdicts, one line each."""
    print("Targets:")
    for target, ratio, ok in checked:
        print(f"  [{'met' if ok else 'MISSED'}] {target.text}: {ratio:.2f}x")


def markdown_report(
    heading: str,
    results: Sequence[Result],
    targets: Sequence[tuple[Target, float, bool]],
    args: argparse.Namespace,
    intro: Sequence[str] = (),
    reference: str = "torch.einsum",
) -> str:
    info = machine_info()
    lines = [heading, ""]
    lines += list(intro)
    lines += [
        "",
        f"- Command: `{' '.join(['python', *sys.argv])}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
    ]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- Timing: `torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time={args.min_run_time})`, "
        f"one thread, float32; lowest median of {args.rounds} interleaved round(s).",
        "- Ratio columns are einc's time divided by the row's time: `0.25x` means einc takes a quarter "
        f"of that contender's time. Every contender was checked against {reference} (allclose) first.",
        "",
    ]
    if targets:
        lines += ["### Targets", "", "| target | ratio | met |", "|---|---:|:---:|"]
        lines += [f"| {t.text} | {r:.2f}x | {'yes' if ok else '**no**'} |" for t, r, ok in targets]
        lines.append("")
    for result in results:
        lines += [f"### {result.case.name}", "", result.case.description, "", markdown_table(result), ""]
        lines += [f"- {n}" for n in result.case.notes]
        if result.case.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def finish(args: argparse.Namespace, results: Mapping[str, Result], targets: Sequence[Target], heading: str,
           intro: Sequence[str], started: float) -> int:
    """A script's end: the targets' verdicts, the total time and, with ``--markdown``, its
    section of RESULTS.md rewritten.  Returns the exit status."""
    checked = check_targets(targets, results)
    print_targets(checked)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.markdown:
        section = markdown_report(heading, list(results.values()), checked, args, intro)
        write_section(args.markdown, heading, section, PREAMBLE)
        print(f"wrote {args.markdown}")
    return 0


def write_section(path: str, heading: str, section: str, preamble: str) -> None:
    """Replace the ``heading`` section of ``path`` (up to the next ``## `` heading), or append it."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = preamble
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == heading), None)
    if start is None:
        new = text.rstrip() + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    with open(path, "w") as f:
        f.write(new)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_rss_growth(call: Callable[[], object]) -> tuple[int, str]:
    """Bytes by which the process's peak RSS grows during ``call()``, and how that was measured.

    The peak (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the call, so
    what the process already holds (torch, the inputs) is not counted and what ``call``
    returns is.  Where ``clear_refs`` is unavailable, the growth of ``ru_maxrss`` is used: it
    only sees a new all-time peak.  Meant for a fresh process: see ``run_memory_probe``.
    """
    method = "VmHWM after clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        out = call()
        peak = _status_kib("VmHWM")
    except OSError:
        method = "ru_maxrss growth"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return (peak - base) * 1024, method


def probe_contenders(script: str, names: Sequence[str], quick: bool) -> dict[str, dict]:
    """What ``script``'s probe (:func:`script`'s ``probe``) gives for each contender, a fresh
    process each."""
    return {name: run_memory_probe(script, name, "quick" if quick else "full") for name in names}


def run_memory_probe(script: str, *args: str) -> dict:
    """Run ``script --memory-probe ARGS...`` in a fresh interpreter; return the JSON its last line prints.

    glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed temporaries go
    back to the kernel and each call's own footprint is seen; OpenMP gets one thread.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--memory-probe", *args],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
