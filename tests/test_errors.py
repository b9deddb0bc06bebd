"""Error messages, anchored on their text: every user error is an einc.EincError (and so
a ValueError); malformed patterns show the pattern with a caret; shape errors name the
axis, the operand and both sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import einc
from einc import ir
from conftest import examples


def raises(fn, *args, **kwargs) -> einc.EincError:
    """Call ``fn``; it must raise an EincError (also a ValueError), which is returned."""
    with pytest.raises(einc.EincError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def caret_lines(message: str) -> tuple[str, str]:
    """The last two lines of a caret message: the pattern and the carets."""
    lines = message.splitlines()
    assert len(lines) >= 3, message
    return lines[-2], lines[-1]


def check_caret(err: Exception, pattern: str, column: int, width: int = 1) -> None:
    shown, marks = caret_lines(str(err))
    assert shown == "    " + pattern, str(err)
    assert marks == "    " + " " * column + "^" * width, "\n" + str(err)


# (pattern, caret column, caret width, message start): malformed patterns.
SYNTAX = [
    ("ij,jk->ik)", 9, 1, "unexpected ')' (expected the end of the pattern)"),  # stray close paren
    ("a -> b -> c", 7, 1, "unexpected '->'"),  # two arrows
    ("ij->ik->", 6, 1, "unexpected '->'"),  # two arrows, compact
    ("a$b", 1, 1, "unexpected character '$'"),  # bad character
    ("ij-jk", 2, 1, "unexpected character '-'"),  # half an arrow
    ("ij->i.j", 5, 1, "unexpected character '.'"),  # lone dot
    ("ab\u2192ba", 2, 1, "unexpected character '\u2192'"),  # unicode arrow
    ("(a (b)) -> a b", 3, 1, "unexpected '('"),  # nested composition
    ("i j -> i j]", 10, 1, "unexpected ']'"),  # stray bracket
    ("ij,jk->ik,", 9, 1, "unexpected ','"),  # comma in the output
    ("a, b -> a b)", 11, 1, "unexpected ')'"),  # stray close paren, spaced
    ("sum(a b -> a) b", 14, 1, "unexpected 'b' (expected '*' or '/', ',', '->', the end of the pattern)"),  # text after an op call
]


@pytest.mark.parametrize("pattern, column, width, message", SYNTAX, ids=[s[0] for s in SYNTAX])
def test_syntax_error_caret(pattern, column, width, message):
    err = raises(einc.compile, pattern)
    assert str(err).startswith(message), str(err)
    check_caret(err, pattern, column, width)


# The pattern ends while something is still open: the caret goes where the missing
# part belongs, just past the end of the pattern.
EARLY_END = [
    ("(a", "')'"),  # open composition
    ("(abc", "')'"),  # open composition, longer name
    ("ij,jk->(", "')'"),  # open composition in the output
    ("a b -> (a b", "')'"),  # open composition, spaced
    ("sum(i j -> i", "')'"),  # open op call
    ("a [b", "']'"),  # open bracket
]


@pytest.mark.parametrize("pattern, expected", EARLY_END, ids=[e[0] for e in EARLY_END])
def test_pattern_ends_too_early_caret_at_the_end(pattern, expected):
    err = raises(einc.compile, pattern)
    assert str(err).startswith("the pattern ends too early"), str(err)
    assert expected in str(err).splitlines()[0]
    check_caret(err, pattern, len(pattern))


def test_caret_under_the_right_character_with_tabs_and_newlines():
    # Whitespace other than spaces must not shift the caret off the offending ')'.
    pattern = "a\tb ->\nb a)"
    err = raises(einc.compile, pattern)
    shown, marks = caret_lines(str(err))
    column = marks.index("^")
    assert shown[column] == ")", "\n" + str(err)


# (pattern, options, caret column, caret width, message start): semantic pattern errors.
SEMANTIC = [
    ("ij->ii", {}, 5, 1, "axis 'i' appears twice in the output"),  # repeated output axis
    ("i j -> i j i", {}, 11, 1, "axis 'i' appears twice in the output"),  # repeated, spaced
    ("b h -> (b h) b", {}, 13, 1, "axis 'b' appears twice in the output"),  # repeated via a composition
    ("(ab)c->abc", {"notation": "compact"}, 0, 4, "composition '( )' needs spaced notation"),  # group, compact
    ("a b -> (a b)", {"notation": "compact"}, 7, 5, "composition '( )' needs spaced notation"),  # group in output
    ("i1j->ij", {}, 1, 1, "compact notation takes letters only"),  # digit in a compact name
    ("ij,k_l->ijkl", {}, 4, 1, "compact notation takes letters only"),  # underscore, compact
    ("a 1 -> a", {"notation": "compact"}, 2, 1, "unit axis '1' needs spaced notation"),  # unit, compact
    ("...i...->i", {}, 4, 3, "'...' may appear once per operand"),  # two ellipses, compact
    ("... a ... -> a", {}, 6, 3, "'...' may appear once per operand"),  # two ellipses, spaced
    ("ij->...ij", {}, 4, 3, "the output has '...' but no input has"),  # output ellipsis only
    ("a b -> ... a b", {}, 7, 3, "the output has '...' but no input has"),  # same, spaced
    ("[i]j->ij", {}, 0, 3, "brackets mark normalized axes"),  # brackets in an input
    ("i j -> [i] j", {}, 7, 3, "brackets mark normalized axes"),  # brackets without softmax
    ("sum(i j -> [i])", {}, 11, 3, "brackets mark normalized axes"),  # brackets in a reduction
    ("prod(a b, b c -> a c)", {}, 0, 4, "prod takes one operand only"),  # prod of several operands
    ("softmax(i j -> i j)", {}, 0, 7, "softmax needs the normalized axes in brackets"),  # no brackets
    ("lambda x -> x", {}, 0, 6, "axis name 'lambda' is a Python keyword"),  # keyword as axis name
    ("(a b a) -> a b", {}, 5, 1, "axis 'a' appears twice in one composition"),  # repeat inside a group
]


@pytest.mark.parametrize(
    "pattern, options, column, width, message", SEMANTIC, ids=[f"{s[0]}{s[1] or ''}" for s in SEMANTIC]
)
def test_semantic_error_caret(pattern, options, column, width, message):
    err = raises(einc.compile, pattern, **options)
    assert str(err).startswith(message), str(err)
    check_caret(err, pattern, column, width)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


# (name, pattern, keyword sizes, call arguments, fragments the message must contain)
CALL_ERRORS = [
    ("axis-size-conflict", "ij,jk->ik", {}, [_t(2, 3), _t(4, 5)],
     ["'ij,jk->ik'", "2x3, 4x5", "axis 'j'", "operand 1", "operand 0", "size 4", "3"]),
    ("axis-size-conflict-spaced", "b q d, b k d -> b q k", {}, [_t(2, 3, 8), _t(2, 5, 7)],
     ["axis 'd'", "operand 1", "operand 0", "7", "8"]),
    ("keyword-conflict", "i j -> j i", {"i": 4}, [_t(2, 3)],
     ["axis 'i'", "operand 0", "2", "keyword i=4"]),
    ("ellipsis-broadcast", "...i,...i->...i", {}, [_t(2, 3), _t(4, 3)],
     ["'...'", "operand 1", "operand 0", "4", "2", "do not broadcast"]),
    ("too-few-tensors", "ij,jk->ik", {}, [_t(2, 3)], ["2 operands", "1 tensors"]),
    ("too-many-tensors", "ij->ji", {}, [_t(2, 3), _t(2, 3)], ["1 operands", "2 tensors"]),
    ("no-tensors", "ij->ji", {}, [], ["1 operands", "0 tensors"]),
    ("rank-too-high", "ij,jk->ik", {}, [_t(2, 3, 1), _t(3, 4)],
     ["operand 0 has 3 dimensions", "[2, 3, 1]", "'ij' has 2"]),
    ("rank-too-low", "b h w -> w h b", {}, [_t(2, 3)], ["operand 0 has 2 dimensions", "has 3"]),
    ("rank-ellipsis", "...ij->...ji", {}, [_t(2)], ["operand 0 has 1 dimensions"]),
    ("not-divisible", "b (h d) -> b h d", {"h": 3}, [_t(2, 10)],
     ["composition (h d)", "operand 0", "size 10", "do not divide", "'d'"]),
    ("composition-mismatch", "b (h d) -> b h d", {"h": 3, "d": 5}, [_t(2, 12)],
     ["composition (h d)", "size 12", "h=3 * d=5 = 15"]),
    ("underdetermined", "b (h d) -> b h d", {}, [_t(2, 12)],
     ["cannot infer the sizes of 'h', 'd'", "(h d)", "operand 0", "size 12"]),
    ("unit-axis-not-1", "b 1 d -> b d", {}, [_t(2, 3, 4)], ["unit axis '1'", "size 3", "operand 0 (dimension 1)"]),
    ("list-argument", "ij,jk->ik", {}, [[[1.0]], _t(1, 1)], ["operand 0", "list", "torch.Tensor"]),
    ("none-argument", "ij,jk->ik", {}, [_t(1, 1), None], ["operand 1", "NoneType", "torch.Tensor"]),
    ("int-argument", "i->i", {}, [3], ["operand 0", "int", "torch.Tensor"]),
    ("numpy-argument", "ij,jk->ik", {}, [np.ones((2, 3)), np.ones((3, 4))], ["operand 0", "ndarray", "torch.Tensor"]),
]


@pytest.mark.parametrize("name, pattern, sizes, args, fragments", CALL_ERRORS, ids=[c[0] for c in CALL_ERRORS])
def test_call_errors(name, pattern, sizes, args, fragments):
    expr = einc.compile(pattern, **sizes)
    err = raises(expr, *args)
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in: {err}"
    # The same error through einc.einsum.
    raises(einc.einsum, pattern, *args, **sizes)


def test_validate_and_explain_report_the_same_errors():
    expr = einc.compile("ij,jk->ik")
    err = raises(expr.validate, _t(2, 3), _t(4, 5))
    assert "axis 'j'" in str(err)
    err = raises(expr.explain, (2, 3), (4, 5))
    assert "axis 'j'" in str(err) and "operand 1" in str(err)
    raises(expr.explain, (2, 3))
    assert "non-negative ints" in str(raises(expr.explain, (2, -3), (3, 4)))
    assert "non-negative ints" in str(raises(expr.explain, (2.0, 3), (3, 4)))
    raises(expr.explain, None, (3, 4))


# (name, compile options, fragments): bad options, rejected by compile().
OPTION_ERRORS = [
    ("bad-backend", {"backend": "bogus"}, ["backend must be one of", "'torchscript'", "'bogus'"]),
    ("none-backend", {"backend": None}, ["backend must be one of"]),
    ("bad-notation", {"notation": "bogus"}, ["notation must be", "'compact'", "'bogus'"]),
    ("unknown-size", {"q": 3}, ["size given for axis 'q'", "not in the pattern"]),
    ("unhashable-size", {"i": [3]}, ["axis 'i'"]),
    # Bad sizes are refused by compile() itself, before its cache sees them.
    ("size-not-int", {"i": "3"}, ["axis 'i'", "non-negative int", "'3'"]),
    ("size-float", {"i": 2.0}, ["axis 'i'", "non-negative int", "2.0"]),
    ("size-negative", {"i": -1}, ["axis 'i'", "non-negative int", "-1"]),
    ("size-bool", {"i": True}, ["axis 'i'", "non-negative int", "True"]),
]


@pytest.mark.parametrize("name, options, fragments", OPTION_ERRORS, ids=[o[0] for o in OPTION_ERRORS])
def test_option_errors(name, options, fragments):
    err = raises(einc.compile, "ij->ji", **options)
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in: {err}"


@pytest.mark.parametrize(
    "pattern, fragments",
    [
        # Output axes in no input need their size when the expression is made.
        ("h w -> h w c", ["output axis 'c'", "keyword", "c=4", "--size c=4"]),
        ("h w -> (h r) w", ["output axis 'r'", "keyword"]),
        # Nested levels too.
        ("sum(a -> a n), a -> a", ["output axis 'n'"]),
    ],
)
def test_new_axes_need_a_size_at_compile_time(pattern, fragments):
    err = raises(einc.compile, pattern)
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in: {err}"
    raises(einc.einsum, pattern, _t(2, 3))


@pytest.mark.parametrize(
    "optimize",
    [
        "bogus",  # unknown strategy name
        "fast",  # unknown too (the example): rejected before any call
        [(0, 5)],  # index out of range
        [(0, 1)],  # leaves operands uncontracted
        [()],  # empty contraction
        [("a", "b")],  # not integers
        5,  # not a path at all
    ],
    ids=["unknown-name", "fast", "out-of-range", "incomplete", "empty-step", "not-ints", "int"],
)
def test_bad_optimize_is_refused_at_compile_time(optimize):
    err = raises(einc.compile, "ab,bc,cd->ad", optimize=optimize)
    assert "ab,bc,cd->ad" in str(err) and "optimize" in str(err)


def test_pattern_must_be_a_string():
    assert "must be a string" in str(raises(einc.compile, b"ij->ji"))
    raises(einc.compile, 5)
    raises(einc.compile, None)


def test_errors_are_not_chained():
    # Users see one clear EincError, not lark's or the planner's internals.
    for call in (lambda: einc.compile("ij,jk->ik)"), lambda: einc.compile("ij,jk->ik")(_t(2, 3), _t(4, 5))):
        with pytest.raises(einc.EincError) as info:
            call()
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__ or info.value.__context__ is None


# ------------------------------------------------------------------- fuzzing


def _tensors_for(expr: einc.Expression) -> list[torch.Tensor]:
    """Tensors that fit the parsed pattern: every axis of size 2, empty ellipsis."""
    shapes = []
    for operand in expr.ir.operands:
        shapes.append([2 ** len(dim) for dim in operand.dims if dim != (ir.ELLIPSIS,)])
    return [torch.randn(shape) for shape in shapes]


def _compile_and_run(pattern: str) -> None:
    """Either a pattern compiles and its Expression produces a tensor, or EincError."""
    try:
        expr = einc.compile(pattern, backend="eager")
    except einc.EincError:
        return
    try:
        out = expr(*_tensors_for(expr))
    except einc.EincError:
        return
    assert isinstance(out, torch.Tensor)


PATTERN_PIECES = st.sampled_from(
    list("ijkab ,->.()[]1_xX") + ["...", "->", " -> ", ", ", "sum(", "mean(", "max(", "logsumexp(", "prod(",
                                  "softmax(", "log_softmax(", "min(", "lambda", "2", "\t", "\u00e9", "$"]
)


@settings(max_examples=examples(400))
@given(st.lists(PATTERN_PIECES, max_size=14).map("".join))
def test_pattern_like_strings_give_a_result_or_einc_error(pattern):
    _compile_and_run(pattern)


@settings(max_examples=examples(200))
@given(st.text(max_size=30))
def test_arbitrary_strings_give_a_result_or_einc_error(pattern):
    _compile_and_run(pattern)
