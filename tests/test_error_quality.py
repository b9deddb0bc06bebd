"""Error quality: every EincError names what is wrong and where.

One table, one row per error kind, complementing tests/test_errors.py (no row repeats
one of its cases):

- syntax errors: the pattern echoed and the exact caret line under the offending column;
- semantic errors: the offending axis (quoted) or operation, and the exact caret line;
- shape errors: the axis, the operand(s), both sizes, the pattern and the shapes;
- option errors: the option's name and the bad value;
- memory-limit errors: ``memory_limit`` and the numbers (limit and the size over it);
- dtype mismatches: every operand's dtype;
- wrong tensor counts: the expected and the given number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_errors import caret_lines, raises

import einc


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _compile(pattern, **options):
    return lambda: einc.compile(pattern, backend="eager", **options)


def _call(pattern, *tensors, **options):
    return lambda: einc.compile(pattern, backend="eager", **options)(*tensors)


def _explain(pattern, *shapes, **options):
    return lambda: einc.compile(pattern, backend="eager", **options).explain(*shapes)


def _with_global_memory_limit(limit, action):
    def run():
        previous = einc.configure(memory_limit=limit)
        try:
            action()
        finally:
            einc.configure(**previous)
    return run


@dataclass(frozen=True)
class Row:
    action: Callable[[], Any]
    fragments: list[str] = field(default_factory=list)
    """Substrings the message must contain."""
    caret: tuple[str, int, int] | None = None
    """(pattern, column, width): the message must end with the pattern and this caret line."""
    starts: str | None = None
    """What the message's first line must start with."""


def _syntax(pattern: str, column: int, starts: str, width: int = 1, **options) -> Row:
    return Row(_compile(pattern, **options), [], (pattern, column, width), starts)


def _semantic(pattern: str, column: int, width: int, starts: str, *fragments: str, **options) -> Row:
    return Row(_compile(pattern, **options), list(fragments), (pattern, column, width), starts)


ROWS = {
    # ------------------------------------------------------------ syntax errors
    # An unknown operation reads as an axis and a composition, which cannot hold '->':
    # the message names the operation and lists the known ones.
    "syntax-unknown-op": _syntax("foo(a -> a)", 0, "unknown operation 'foo'; the operations are sum, mean", width=3),
    # A misspelt operation gets a suggestion.
    "syntax-misspelt-op": _syntax("softmx(b [c])", 0, "unknown operation 'softmx' (did you mean 'softmax'?)",
                                  width=6),
    # A space between the operation and its parenthesis: the same, further right.
    "syntax-space-before-op-paren": _syntax("sum (a b -> a)", 9, "unexpected '->'"),
    # Empty brackets: a normalized axis is needed before ']'.
    "syntax-empty-brackets": _syntax("softmax(a -> [])", 14, "unexpected ']' (expected '(', an axis name)"),
    # A unit axis cannot be normalized.
    "syntax-unit-in-brackets": _syntax("softmax(a -> [1])", 14, "unexpected '1'"),
    # Neither can the ellipsis.
    "syntax-ellipsis-in-brackets": _syntax("softmax(... a -> ... [...])", 22, "unexpected '...'"),
    # Two dots are no ellipsis: the caret goes under the first stray dot.
    "syntax-two-dots": _syntax("a..b", 1, "unexpected character '.'"),
    # A statement separator: the caret under the ';'.
    "syntax-semicolon": _syntax("a b -> b a;", 10, "unexpected character ';'"),
    # Python call syntax: the caret under the quote.
    "syntax-quote": _syntax("__import__('os')", 11, "unexpected character \"'\""),
    # A fullwidth comma (U+FF0C) looks like ',' but is not.
    "syntax-fullwidth-comma": _syntax("ij\uff0cjk->ik", 2, "unexpected character '\uff0c'"),
    # A Cyrillic 'a' (U+0430) looks like an axis letter but is not one.
    "syntax-cyrillic-letter": _syntax("\u0430b->b", 0, "unexpected character '\u0430'"),
    # A NUL byte is shown escaped in the message.
    "syntax-nul": _syntax("a\x00b", 1, "unexpected character '\\x00'"),
    # Operations do not nest.
    # A normalizer without an arrow takes an axis list, not a nested operation.
    "semantic-nested-arrowless-normalizer": _semantic(
        "softmax(sum(a b -> a))", 0, 7, "softmax without '->' takes an axis list, not a nested operation"),
    # A scale names an axis the contraction does not have.
    "semantic-scale-unknown-axis": _semantic("a b -> a / sqrt(e)", 9, 9, "scale factor axis 'e' is not an axis"),
    # A zero scale factor.
    # Compact and spaced axis lists mixed: told at compile time, at the compact list.
    "semantic-mixed-notation": _semantic("ij, j k -> ik", 0, 2, "the pattern mixes compact and spaced axis lists",
                                         "'i j'", "notation='spaced'"),
    "semantic-scale-zero": _semantic("a b -> a * 0", 11, 1, "a scale factor must be positive"),
    # A scale on a reduction other than a sum of products.
    "semantic-scale-on-logsumexp": _semantic("logsumexp(a b -> a / 2)", 19, 3, "a scale applies to sums of products"),
    # Text after a normalizer's closing parenthesis.
    "syntax-text-after-normalizer": _syntax(
        "log_softmax(a [b]) x", 19, "unexpected 'x'"),
    # A normalizer left open ends too early: the caret just past the end.
    "syntax-open-normalizer": _syntax("softmax(a b -> a [b]", 20, "the pattern ends too early (expected ')')"),
    # A second arrow on a new line: newlines show as spaces, so the caret stays in its column.
    "syntax-arrow-after-newline": _syntax("a -> b\n-> c", 7, "unexpected '->'"),
    # A comment character.
    "syntax-hash": _syntax("i j -> j i # c", 11, "unexpected character '#'"),

    # ---------------------------------------------------------- semantic errors
    # A keyword in the middle of an axis list: the caret spans the keyword.
    "semantic-keyword-middle": _semantic("x if -> x", 2, 2, "axis name 'if' is a Python keyword"),
    # A keyword inside a composition.
    "semantic-keyword-in-group": _semantic("(a None) -> a None", 3, 4, "axis name 'None' is a Python keyword"),
    # A keyword as a new output axis.
    "semantic-keyword-in-output": _semantic("a -> a class", 7, 5, "axis name 'class' is a Python keyword"),
    # The same axis twice in one bracket.
    "semantic-repeat-in-bracket": _semantic("softmax(i j -> [i i])", 18, 1, "axis 'i' appears twice in the output"),
    # An axis in a bracket and again in a composition: the caret spans the composition.
    "semantic-repeat-bracket-and-group": _semantic(
        "softmax(i j -> [i] (j i))", 19, 5, "axis 'i' appears twice in the output"),
    # Brackets on an input when the normalizer has an arrow.
    "semantic-brackets-in-normalizer-input": _semantic(
        "softmax(a [b] -> a [b])", 10, 3, "brackets mark normalized axes", "softmax/log_softmax"),
    # Brackets in a compact reduction.
    "semantic-brackets-in-compact-reduction": _semantic(
        "mean(ij,jk->i[k])", 13, 3, "brackets mark normalized axes"),
    # An arrowless normalizer over two operands: the caret under the operation.
    "semantic-arrowless-two-operands": _semantic(
        "softmax(a [b], b c)", 0, 7, "softmax without '->' takes exactly one operand"),
    # An arrowless normalizer without brackets: the message shows how to mark them.
    "semantic-arrowless-no-brackets": _semantic(
        "log_softmax(a b)", 0, 11, "log_softmax needs the normalized axes in brackets", "'log_softmax(b [c])'"),
    # Two ellipses in the output (test_errors has them in an input).
    "semantic-two-ellipses-in-output": _semantic("...a->......", 9, 3, "'...' may appear once per operand"),
    # A digit glued to compact letters.
    "semantic-digit-in-compact": _semantic("ab1->ab", 2, 1, "compact notation takes letters only",
                                           "use spaces for named axes"),

    # ------------------------------------------------------------- shape errors
    # Two sizes for one axis inside one operand (a diagonal): both dimensions named.
    "shape-diagonal-conflict": Row(_call("ii->i", _t(2, 3)), [
        "'ii->i'", "2x3", "axis 'i'", "size 3", "operand 0 (dimension 1)", "but 2 in operand 0 (dimension 0)"]),
    # A conflict between the third and the second operand of a chain.
    "shape-chain-conflict": Row(_call("ab,bc,cd->ad", _t(2, 3), _t(3, 4), _t(5, 6)), [
        "'ab,bc,cd->ad'", "2x3, 3x4, 5x6", "axis 'c'", "size 5 in operand 2", "but 4 in operand 1"]),
    # The same in the log semiring.
    "shape-log-semiring-conflict": Row(_call("logsumexp(i k, k j -> i j)", _t(2, 3), _t(4, 5)), [
        "'logsumexp(i k, k j -> i j)'", "2x3, 4x5", "axis 'k'", "size 4 in operand 1", "but 3 in operand 0"]),
    # And under a normalizer.
    "shape-normalizer-conflict": Row(_call("softmax(b q d, b k d -> b q [k])", _t(2, 3, 4), _t(2, 5, 6)), [
        "2x3x4, 2x5x6", "axis 'd'", "size 6 in operand 1 (dimension 2)", "but 4 in operand 0 (dimension 2)"]),
    # A three-dimensional ellipsis whose leading dimensions do not broadcast.
    "shape-ellipsis-3d": Row(_call("...i,...i->...", _t(2, 3, 4), _t(5, 3, 4)), [
        "2x3x4, 5x3x4", "'...' (dimension 0 of the broadcast ellipsis)", "size 5 in operand 1",
        "but 2 in operand 0", "do not broadcast"]),
    # A keyword size that does not divide its composition.
    "shape-keyword-does-not-divide": Row(_call("(h d) -> h d", _t(10), h=4), [
        "'(h d) -> h d'", "with shapes 10", "composition (h d)", "operand 0 (dimension 0)", "size 10",
        "product 4", "axis 'd'"]),
    # The second operand has too many dimensions, found by explain().
    "shape-rank-second-operand": Row(_explain("ij,jk->ik", (2, 3), (3, 4, 5)), [
        "'ij,jk->ik'", "2x3, 3x4x5", "operand 1 has 3 dimensions", "[3, 4, 5]", "'jk' has 2"]),
    # Two unknown sizes in a second composition.
    "shape-two-unknowns": Row(_call("(a b) (c d) -> a b c d", _t(4, 6), a=2), [
        "with shapes 4x6", "'c', 'd'", "composition (c d)", "operand 0 (dimension 1)", "size 6"]),
    # max over an empty axis: like every shape error, it names the pattern and the shapes.
    "shape-max-over-empty-axis": Row(_call("max(b c -> b)", _t(3, 0)), [
        "size 0", "'max(b c -> b)'", "3x0"]),

    # ------------------------------------------------------------ option errors
    # memory_limit must be positive.
    "option-memory-limit-zero": Row(_compile("ij->ji", memory_limit=0), ["memory_limit", "not 0", "'64MiB'"]),
    # A float is no element count.
    "option-memory-limit-float": Row(_compile("ij->ji", memory_limit=1.5), ["memory_limit", "1.5"]),
    # True is no element count either.
    "option-memory-limit-bool": Row(_compile("ij->ji", memory_limit=True), ["memory_limit", "True"]),
    # An unknown unit: the message lists the units.
    "option-memory-limit-unit": Row(_compile("ij->ji", memory_limit="64 parsecs"), [
        "memory_limit", "'64 parsecs'", "kib", "gib"]),
    # An unknown path strategy: named with the option, and opt_einsum's list of strategies.
    "option-optimize-name": Row(_compile("ab,bc,cd->ad", optimize="bogus"), [
        "optimize='bogus'", "'greedy'", "'ab,bc,cd->ad'"]),
    # An explicit path with an index out of range.
    "option-optimize-path": Row(_compile("ab,bc,cd->ad", optimize=[(0, 5)]), [
        "optimize=", "(0, 5)"]),
    # cache_size must be a positive int.
    "option-cache-size": Row(lambda: einc.Expression("ij->ji", cache_size=0), ["cache_size", "not 0"]),
    # A constant's position must be an operand's.
    "option-constants-position": Row(_compile("ij,jk->ik", constants={5: _t(3, 4)}), [
        "constants", "5 is not an operand position", "(0..1)"]),
    # A constant must be a tensor.
    "option-constants-value": Row(_compile("ij,jk->ik", constants={1: [1.0]}), [
        "constants", "operand 1", "list", "torch.Tensor"]),
    # constants must be a mapping.
    "option-constants-mapping": Row(_compile("ij,jk->ik", constants=[_t(3, 4)]), [
        "constants must map operand positions to tensors", "{1: weight}"]),
    # configure() names the setting and the value.
    "option-configure-expression-cache": Row(lambda: einc.configure(expression_cache_size=-1), [
        "expression_cache_size", "-1"]),
    "option-configure-plan-cache": Row(lambda: einc.configure(plan_cache_size=2.5), ["plan_cache_size", "2.5"]),
    # notation=None.
    "option-notation-none": Row(_compile("ij->ji", notation=None), ["notation", "'compact'", "None"]),
    # The backend name is case-sensitive.
    "option-backend-case": Row(lambda: einc.compile("ij->ji", backend="Eager"), ["backend", "'eager'", "'Eager'"]),
    # A string is no shape for explain().
    "option-explain-string-shape": Row(_explain("ij,jk->ik", (2, 3), "3x4"), ["operand 1", "non-negative ints", "'3x4'"]),

    # ------------------------------------------------------ memory-limit errors
    # The expression's limit, in elements: the limit and the step's size.
    "memory-elements": Row(_call("i,j->ij", _t(4), _t(5), memory_limit=10), [
        "memory_limit=10 elements", "20 elements", "'i,j->ij'", "4, 5"]),
    # A limit in bytes, converted with the dtype's item size (1 KiB of float32 = 256).
    "memory-bytes": Row(_call("i,j->ij", _t(16), _t(17), memory_limit="1KiB"), [
        "memory_limit=256 elements", "272 elements"]),
    # No pairwise path of a chain fits (and slicing is off): the limit and the output's size.
    "memory-no-path": Row(_call("ab,bc,cd->ad", _t(4, 8), _t(8, 8), _t(8, 4), memory_limit=20, slice=False), [
        "memory_limit=20 elements is too small", "contraction path", "'ab,bc,cd->ad'", "4x8, 8x8, 8x4"]),
    # Nothing fits, sliced or not: the contracted axes sit in compositions (not sliceable),
    # and a one-entry slice of either output axis still builds a 32- or 64-element intermediate.
    "memory-no-slicing-fits": Row(_call("i (j k), (j k) (l n), (l n) m -> i m", _t(4, 32), _t(32, 64), _t(64, 4),
                                        memory_limit=16, k=2, n=2), [
        "memory_limit=16 elements is too small", "no slicing fits it either (tried the axes i, m;",
        "still leave an intermediate of 32 elements",
        "4x32, 32x64, 64x4"]),
    # The output alone is over the limit: the message says so (not "every intermediate").
    "memory-output-alone": Row(_call("ab,bc,cd->ad", _t(8, 8), _t(8, 8), _t(8, 8), memory_limit=20), [
        "memory_limit=20 elements is too small", "the output alone", "64 elements", "'a' 'd'"]),
    # A user's path whose first step is over the limit: the step's axes as every message names axes.
    "memory-step-axes": Row(_call("a b, c d, b d -> a c", _t(2, 5), _t(2, 6), _t(5, 6), memory_limit=20,
                                  optimize=[(0, 1), (0, 1)], slice=False), [
        "memory_limit=20 elements is too small", "step 0 ('a' 'b' 'c' 'd') produces 120 elements"]),
    # A limit in bytes below one element.
    "memory-under-one-element": Row(_call("ij->ji", _t(2, 3), memory_limit="3b"), [
        "memory_limit=0 elements is too small", "2x3"]),
    # The process-wide limit refuses explain() too.
    "memory-configure": Row(_with_global_memory_limit(10, _explain("i,j->ij", (3,), (7,))), [
        "memory_limit=10 elements", "21 elements", "'i,j->ij'"]),

    # ----------------------------------------------------------- dtype errors
    # Three operands, three dtypes: each is listed.
    # Complex tensors have no max.
    "dtype-complex-max": Row(_call("max(a b -> a)", _t(2, 3, dtype=torch.complex64)), [
        "max(...) needs real tensors", "torch.complex64", "'max(a b -> a)'", "2x3"]),
    # Nor a softmax.
    "dtype-complex-softmax": Row(_call("softmax(a [b])", _t(2, 3, dtype=torch.complex128)), [
        "softmax(...) needs real tensors", "torch.complex128"]),

    # ------------------------------------------------------ wrong tensor counts
    # With a constant, the count excludes it: both numbers and why.
    "count-with-constants": Row(_call("ij,jk->ik", _t(2, 3), _t(3, 4), constants={1: _t(3, 4)}), [
        "takes 1 tensors", "1 of its 2 operands are constants", "got 2"]),
    # explain() with one shape too many.
    "count-explain": Row(_explain("ij,jk->ik", (2, 3), (3, 4), (4, 5)), ["2 operands", "3 tensors"]),
    # validate() with one tensor too few.
    "count-validate": Row(lambda: einc.compile("ij,jk->ik", backend="eager").validate(_t(2, 3)), [
        "2 operands", "1 tensors"]),
    # Five tensors for a three-operand pattern.
    "count-five-for-three": Row(_call("a,a,a->a", *[_t(2)] * 5), ["3 operands", "5 tensors"]),
}


def _shown(pattern: str) -> str:
    """The pattern as a caret message shows it: tabs and newlines as spaces."""
    return pattern.translate(str.maketrans({c: " " for c in "\t\n\r\v\f"}))


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_error_message_names_what_and_where(row: Row):
    err = raises(row.action)
    message = str(err)
    if row.starts is not None:
        assert message.splitlines()[0].startswith(row.starts), message
    for fragment in row.fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if row.caret is not None:
        pattern, column, width = row.caret
        shown, marks = caret_lines(message)
        assert shown == "    " + _shown(pattern), "\n" + message
        assert marks == "    " + " " * column + "^" * width, "\n" + message


def test_the_table_covers_every_kind_with_25_rows_or_more():
    kinds = {name.split("-")[0] for name in ROWS}
    assert kinds == {"syntax", "semantic", "shape", "option", "memory", "dtype", "count"}
    assert len(ROWS) >= 25
