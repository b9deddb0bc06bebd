"""The ``einc`` command line (also ``python -m einc``).

``einc explain`` prints a plan (text, ``--json``) and can draw its contraction tree
(``--plot``); ``einc bench`` times einc against torch.einsum and its peers.  Bad input
exits with status 2 and ``einc: error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from . import __version__, ir
from .api import Expression
from .errors import EincError, format_shape
from .reference import LETTERS, compare, letters
from .report import table

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EINC_BACKENDS = ("torchscript", "eager")

_MAIN_EPILOG = """\
examples:
  einc explain "b h q d, b h k d -> b h q k" --shapes 2x4x8x16 2x4x8x16
  einc explain "ab,bc,cd->ad" --shapes 8x64 64x8 8x64 --json
  einc bench "logsumexp(i k, k j -> i j)" --shapes 64x128 128x32

run 'einc COMMAND --help' for a command's options"""

_EXPLAIN_EPILOG = """\
examples:
  einc explain "b q (h d), b k (h d) -> b h q k" --shapes 2x8x64 2x6x64 --size h=8
  einc explain "ab,bc,cd,de->ae" --shapes 8x64 64x8 8x64 64x8 --optimize greedy --plot tree.png
  einc explain "ij,jk->ik" --shapes 4096x4096 4096x4096 --memory-limit 64MiB --json
  einc explain "logsumexp(sum(b d, v d -> b v) -> b)" --shapes 1x1024 131072x1024 --world-size 4"""

_BENCH_EPILOG = """\
Contenders: einc (TorchScript and eager backends), torch.einsum, opt_einsum's prebuilt
contract_expression (backend torch) and einops.einsum.  Patterns torch.einsum cannot
spell (op(...), compositions, unit axes, new output axes) are timed against einc's
reference torch form instead, and the skipped contenders are named.  Every result is
first checked against a float64 reference (as Expression.validate); a contender that
fails the check is not timed, and an einc backend that fails it makes the exit status 1.
Ratios are einc time / contender time: below 1x, einc is faster.

examples:
  einc bench "b h q d, b h k d -> b h q k" --shapes 8x8x128x64 8x8x128x64
  einc bench "ab,bc,cd->ad" --shapes 64x512 512x64 64x512 --threads 2 --repeat-time 1
  einc bench "logsumexp(i k, k j -> i j)" --shapes 64x128 128x32 --dtype float64"""


class _Parser(argparse.ArgumentParser):
    """argparse with einc's error line: usage, then ``einc: error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``einc: error: message`` on stderr; exit with status 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"einc: error: {message}\n")


# ------------------------------------------------------------ argument types


def _shape(text: str) -> tuple[int, ...]:
    """``2x4x8`` -> (2, 4, 8); ``scalar`` or ``()`` -> ()."""
    if text in ("scalar", "()", ""):
        return ()
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: write sizes joined by 'x', e.g. 2x4x8") from None
    if any(n < 0 for n in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: sizes must be non-negative")
    return shape


def _size(text: str) -> tuple[str, int]:
    """``h=8`` -> ("h", 8)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write AXIS=N, e.g. h=8")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: {value!r} is not an integer") from None


def _memory_limit(text: str) -> int | str:
    """``1000000`` -> elements (int); ``64MiB`` -> bytes (checked by :class:`Expression`)."""
    return int(text) if text.strip().isdigit() else text


def _positive(kind: type[int | float]) -> Callable[[str], int | float]:
    """An argparse type: a positive ``kind``."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return convert


MAX_THREADS = 4 * (os.cpu_count() or 1)
"""More threads than this only oversubscribe the machine (and torch crashes on absurd counts)."""


def _threads(text: str) -> int:
    value = int(_positive(int)(text))
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value} threads: at most {MAX_THREADS} on this machine "
                                         f"({os.cpu_count()} CPUs)")
    return value


# ------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    """``einc`` with its commands ``explain`` and ``bench`` (each runs ``args.run(args)``)."""
    parser = _Parser(
        prog="einc",
        description="Compile einsum/einops patterns to fast PyTorch code; inspect and time the plans.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"einc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument("pattern", metavar="PATTERN",
                        help='an einc pattern, e.g. "bhqd,bhkd->bhqk" or "b h q d, b h k d -> b h q k"')
    common.add_argument("--shapes", nargs="+", type=_shape, required=True, metavar="SHAPE",
                        help="one shape per operand, sizes joined by 'x' (2x4x8x16; 'scalar' for ())")
    common.add_argument("--size", action="append", type=_size, default=[], metavar="AXIS=N",
                        help="an axis size by name (repeatable), e.g. --size h=8")
    common.add_argument("--notation", default="auto", choices=("auto", "compact", "spaced"),
                        help="how to read axis lists (default auto)")
    common.add_argument("--dtype", default="float32", choices=tuple(_DTYPES),
                        help="element type (default float32)")
    common.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="allow fused rewrites such as attention -> scaled_dot_product_attention "
                             "(default on; --no-fuse shows the plain lowering)")

    explain = commands.add_parser(
        "explain", parents=[common], epilog=_EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the contraction plan and the generated code",
        description="Plan PATTERN for tensors of the given shapes; print the path, each step with its\n"
        "FLOPs and torch kernel, and the generated code (or the plan as JSON, --json), and\n"
        "optionally draw the contraction tree (--plot).",
    )
    explain.add_argument("--optimize", default="auto", metavar="STRATEGY",
                         help="path strategy: an opt_einsum name (auto, dp, optimal, greedy, branch-2, ...) "
                         "or cotengra (default auto)")
    explain.add_argument("--memory-limit", type=_memory_limit, metavar="N|SIZE",
                         help="cap every intermediate: N elements, or bytes such as 64MiB or 1GB; a plan "
                         "over it runs in slices (shown), or is refused with --no-slice")
    explain.add_argument("--slice", action=argparse.BooleanOptionalAction, default=True,
                         help="run a plan over --memory-limit in slices (default on; --no-slice refuses it)")
    explain.add_argument("--world-size", type=_positive(int), metavar="N",
                         help="also show how a distributed call spreads over N ranks: the split axis, each "
                         "rank's part, FLOPs and slices, and the bytes each rank communicates (no processes "
                         "are started)")
    explain.add_argument("--json", action="store_true",
                         help="print the plan as JSON (Plan.to_dict()) instead of the table")
    explain.add_argument("--plot", metavar="PATH",
                         help="draw the contraction tree to a PNG (needs matplotlib: pip install 'einc[plot]')")
    explain.set_defaults(run=_explain)

    bench = commands.add_parser(
        "bench", parents=[common], epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time einc against torch.einsum, opt_einsum and einops",
        description="Time PATTERN on random tensors of the given shapes with einc and its peers;\n"
        "print each median time and the ratios einc / contender.",
    )
    bench.add_argument("--repeat-time", type=_positive(float), default=0.5, metavar="SECONDS",
                       help="seconds of timing per contender (blocked_autorange's min_run_time; default 0.5)")
    bench.add_argument("--threads", type=_threads, default=1, metavar="N",
                       help=f"torch threads while timing, 1 to {MAX_THREADS} (default 1)")
    bench.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show '[i/n] timing ...' lines on stderr (default: only when stderr is a terminal)")
    bench.set_defaults(run=_bench)
    return parser


def _expression(args: argparse.Namespace, backend: str) -> Expression:
    """The :class:`Expression` the arguments describe, on ``backend``."""
    sizes: dict[str, Any] = {}
    for name, value in args.size:
        if sizes.setdefault(name, value) != value:
            raise EincError(f"--size {name} given twice, as {sizes[name]} and {value}")
    options: dict[str, Any] = {"backend": backend, "optimize": getattr(args, "optimize", "auto"),
                               "notation": args.notation, "memory_limit": getattr(args, "memory_limit", None),
                               "fuse": args.fuse, "slice": getattr(args, "slice", True)}
    return Expression(args.pattern, **options, **sizes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a wrong result, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except EincError as err:
        print(f"einc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("einc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (``einc explain ... | head``): quietly stop writing.
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # a stdout without a file descriptor (captured) needs nothing


# ------------------------------------------------------------------ explain


def _explain(args: argparse.Namespace) -> int:
    """``einc explain``: the plan as text or JSON on stdout; the tree drawn with ``--plot``."""
    plan = _expression(args, "eager").explain(*args.shapes, dtype=_DTYPES[args.dtype], world_size=args.world_size)
    if args.plot:
        from .plot import plot_plan

        plot_plan(plan, args.plot)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


# -------------------------------------------------------------------- bench


def _einsum_equation(pattern: ir.Pattern) -> tuple[str | None, str]:
    """``(torch.einsum equation, "")``, or ``(None, why not)`` where torch.einsum cannot spell it."""
    if pattern.op not in (None, "sum"):
        return None, f"cannot express {pattern.op}(...)"
    if pattern.nested:
        return None, "cannot express nested operations"
    if pattern.scale:
        return None, "cannot express a scale"
    lists = [*pattern.operands, pattern.output]
    if any(len(dim) != 1 for axes in lists for dim in axes.dims):
        return None, "cannot express compositions or unit axes"
    if pattern.new_axes:
        return None, f"cannot create new output axes ({', '.join(pattern.new_axes)})"
    names = [a for axes in lists for a in axes.axes]
    try:
        letter = {a: a for a in names} if pattern.compact else letters(names)
    except EincError:
        return None, f"at most {len(LETTERS)} distinct axes"
    letter[ir.ELLIPSIS] = ir.ELLIPSIS
    spell = lambda axes: "".join(letter[dim[0]] for dim in axes.dims)  # noqa: E731
    return ",".join(spell(axes) for axes in pattern.operands) + "->" + spell(pattern.output), ""


def _peers(pattern: ir.Pattern, reference: Callable[[], torch.Tensor], tensors: Sequence[torch.Tensor],
           shapes: Sequence[tuple[int, ...]]) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str]]:
    """The other contenders that can run ``pattern``, and a note for each that cannot."""
    equation, why = _einsum_equation(pattern)
    if equation is None:
        return {"torch (reference form)": reference}, [f"torch.einsum, opt_einsum, einops.einsum: {why}"]
    import opt_einsum  # type: ignore[import-untyped]

    prebuilt = opt_einsum.contract_expression(equation, *shapes)
    peers = {
        "torch.einsum": lambda: torch.einsum(equation, *tensors),
        "opt_einsum": lambda: prebuilt(*tensors, backend="torch"),
    }
    try:
        import einops
    except ImportError:
        return peers, ["einops.einsum: einops is not installed (pip install 'einc[bench]')"]
    spaced = ", ".join(axes.render(False) for axes in pattern.operands) + " -> " + pattern.output.render(False)
    peers["einops.einsum"] = lambda: einops.einsum(*tensors, spaced)  # type: ignore[call-overload]
    return peers, []


def _check(fn: Callable[[], torch.Tensor], reference: torch.Tensor, bound: torch.Tensor,
           dtype: torch.dtype) -> tuple[float, str]:
    """Run ``fn`` once: ``(max abs error, "")`` when its result is ``reference`` within
    einc's tolerance for ``dtype`` (as :meth:`Expression.validate`), else ``(nan, why not)``."""
    try:
        result = fn()
    except EincError:
        raise
    except Exception as err:  # a contender that cannot run this case is reported, not fatal
        return math.nan, " ".join([f"failed: {type(err).__name__}", *str(err).strip().splitlines()[:1]])
    if not isinstance(result, torch.Tensor) or result.shape != reference.shape:
        return math.nan, f"returned shape {list(getattr(result, 'shape', []))}, expected {list(reference.shape)}"
    try:
        return compare(result, reference, bound, dtype), ""
    except EincError as err:
        return math.nan, str(err)


def _seconds(value: float) -> str:
    """A duration with a readable unit: ``12.3 us``, ``4.567 ms``, ``1.234 s``."""
    if value < 1e-3:
        return f"{value * 1e6:.1f} us"
    return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.3f} s"


def _bench(args: argparse.Namespace) -> int:
    """``einc bench``: check, then time each contender; print medians and ratios."""
    from torch.utils import benchmark

    dtype = _DTYPES[args.dtype]
    shapes = [tuple(s) for s in args.shapes]
    expressions = {f"einc ({backend})": _expression(args, backend) for backend in _EINC_BACKENDS}
    first = next(iter(expressions.values()))
    first.explain(*shapes, dtype=dtype)  # input errors surface before any tensor is made
    generator = torch.Generator().manual_seed(0)
    try:
        tensors = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]
        for position, modifier in first.ir.modifier_leaves():  # a mask is bool: about 3 in 4 attend
            if modifier.kind == "mask" and position < len(tensors):
                tensors[position] = tensors[position] > -0.67
        given = [torch.int64 if i in first._indices else t.dtype for i, t in enumerate(tensors)]
        for position, n in first._index_sizes(tuple(shapes), given).items():
            tensors[position] = torch.randint(0, max(1, n), shapes[position], generator=generator)  # gather's indices
    except (RuntimeError, MemoryError) as err:  # torch's allocation failure
        raise EincError(f"cannot allocate random tensors of shapes {', '.join(format_shape(s) for s in shapes)}: "
                        f"{str(err).splitlines()[0]}") from None
    reference = first.reference(*tensors)
    bound = first.reference(*tensors, absolute=True)

    contenders: dict[str, Callable[[], torch.Tensor]] = {
        name: functools.partial(expression, *tensors) for name, expression in expressions.items()
    }
    peers, notes = _peers(first.ir, lambda: first.reference(*tensors, widen=False), tensors, shapes)
    contenders.update(peers)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    timed: dict[str, tuple[float, float]] = {}  # name -> (median seconds, max abs error)
    for number, (name, fn) in enumerate(contenders.items(), start=1):
        if progress:
            print(f"[{number}/{len(contenders)}] timing {name} ...", file=sys.stderr, flush=True)
        error, problem = _check(fn, reference, bound, dtype)
        if problem:
            notes.append(f"{name}: {problem}")
            continue
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=args.threads, description=name)
        timed[name] = timer.blocked_autorange(min_run_time=args.repeat_time).median, error

    einc_names = [name for name in expressions if name in timed]
    rows = [["contender", "median", *(f"{name} / this" for name in einc_names), "max error"]]
    for name, (median, error) in timed.items():
        ratios = ("-" if e == name else f"{timed[e][0] / median:.2f}x" for e in einc_names)
        rows.append([name, _seconds(median), *ratios, f"{error:.1e}"])
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"einc bench {args.pattern!r}: shapes {', '.join(format_shape(s) for s in shapes)}, "
          f"{args.dtype}, {threads}")
    print("\n".join(table(rows, rule=True)))
    for note in notes:
        print(f"not timed: {note}")
    print("ratios: einc time / contender time (below 1x, einc is faster); "
          "max error: against a float64 reference")
    return 0 if len(einc_names) == len(expressions) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
