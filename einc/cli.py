"""The ``einc`` command line (also ``python -m einc``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .api import Expression
from .errors import EincError

__all__ = ["main"]


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
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write AXIS=N, e.g. h=8")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: {value!r} is not an integer") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="einc",
        description="Compile einsum/einops patterns to fast PyTorch code and inspect the plans.",
        epilog='example: einc explain "b h q d, b h k d -> b h q k" --shapes 2x4x8x16 2x4x8x16',
    )
    parser.add_argument("--version", action="version", version=f"einc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain",
        help="print the contraction plan and the generated code",
        description="Plan PATTERN for tensors of the given shapes; print the path, "
        "each step with its FLOPs and torch kernel, and the generated code.",
    )
    explain.add_argument("pattern", help='an einc pattern, e.g. "bhqd,bhkd->bhqk"')
    explain.add_argument("--shapes", nargs="+", type=_shape, required=True, metavar="SHAPE",
                         help="one shape per operand, sizes joined by 'x' (2x4x8x16; 'scalar' for ())")
    explain.add_argument("--size", action="append", type=_size, default=[], metavar="AXIS=N",
                         help="an axis size by name (repeatable), e.g. --size h=8")
    explain.add_argument("--optimize", default="auto",
                         help="opt_einsum path strategy: auto, dp, optimal, greedy, branch-2, ... (default auto)")
    explain.add_argument("--notation", default="auto", choices=("auto", "compact", "spaced"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        expression = Expression(args.pattern, backend="eager", optimize=args.optimize,
                                notation=args.notation, **dict(args.size))
        print(expression.explain(*args.shapes))
    except EincError as err:
        print(f"einc: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
