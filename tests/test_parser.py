"""Stage test: pattern text -> IR (:func:`einc.parser.parse`), and the IR's rules.

References: the IR written out by hand for each pattern (the notation's documented
meaning), and the README's rules with the caret under the part that breaks them.
"""

from __future__ import annotations

import pytest

import einc
from einc import ir
from einc.errors import PatternError
from einc.parser import parse

A = ir.AxisList
E, M = ir.ELLIPSIS, ir.MERGED_ELLIPSIS


def dims(*groups):
    """An AxisList from groups: a string is one axis, a tuple a composition."""
    return A(tuple((g,) if isinstance(g, str) else tuple(g) for g in groups))


PARSED = [
    # (pattern, notation, expected IR)
    ("ij,jk->ik", "auto",  # compact: one letter per axis
     ir.Pattern((dims("i", "j"), dims("j", "k")), dims("i", "k"), compact=True)),
    ("b h q d, b h k d -> b h q k", "auto",  # spaced
     ir.Pattern((dims("b", "h", "q", "d"), dims("b", "h", "k", "d")), dims("b", "h", "q", "k"))),
    ("ij,jk", "auto",  # implicit output: axes once, sorted
     ir.Pattern((dims("i", "j"), dims("j", "k")), dims("i", "k"), compact=True)),
    ("...ij->...ji", "auto",  # compact ellipsis
     ir.Pattern((dims(E, "i", "j"),), dims(E, "j", "i"), compact=True)),
    ("abc -> cba", "auto",  # three compact axes, spaces around the arrow only
     ir.Pattern((dims("a", "b", "c"),), dims("c", "b", "a"), compact=True)),
    ("abc -> cba", "spaced",  # forced: one axis each side
     ir.Pattern((dims("abc"),), dims("cba"))),
    ("b (h d) -> b h d", "auto",  # composition
     ir.Pattern((dims("b", ("h", "d")),), dims("b", "h", "d"))),
    ("b 1 d -> b d", "auto",  # unit axis: an empty group
     ir.Pattern((A((("b",), (), ("d",))),), dims("b", "d"))),
    ("h w -> (h 2) w 3", "auto",  # anonymous axes, numbered across the pattern
     ir.Pattern((dims("h", "w"),), dims(("h", ir.anonymous_axis(2, 0)), "w", ir.anonymous_axis(3, 1)))),
    ("mean(b (h 2) c -> b h c)", "auto",  # an anonymous input axis, reduced by the operation
     ir.Pattern((dims("b", ("h", ir.anonymous_axis(2, 0)), "c"),), dims("b", "h", "c"), op="mean")),
    ("b ... d -> b (...) d", "auto",  # the ellipsis merged in the output
     ir.Pattern((dims("b", E, "d"),), dims("b", (M,), "d"))),
    ("b ... d -> (b ...) d", "auto",  # merged with a named axis
     ir.Pattern((dims("b", E, "d"),), dims(("b", M), "d"))),
    ("logsumexp(b n -> b)", "auto",  # a reduction
     ir.Pattern((dims("b", "n"),), dims("b"), op="logsumexp")),
    ("log_softmax(b [c])", "auto",  # an arrowless normalizer keeps the input's axes
     ir.Pattern((dims("b", "c"),), dims("b", "c"), op="log_softmax", normalized=("c",))),
    ("softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e", "auto",  # nested, with a scale
     ir.Pattern((ir.Pattern((dims("b", "q", "d"), dims("b", "k", "d")), dims("b", "q", "k"), op="softmax",
                            normalized=("k",), scale=(ir.Factor(True, "d", sqrt=True),)),
                 dims("b", "k", "e")), dims("b", "q", "e"))),
    ("i j, j k -> i k * 3 / 2", "auto",  # a scale of ints
     ir.Pattern((dims("i", "j"), dims("j", "k")), dims("i", "k"),
                scale=(ir.Factor(False, 3), ir.Factor(True, 2)))),
    ("softmax(b [(h w)])", "auto",  # a bracketed composition: both axes normalized
     ir.Pattern((dims("b", ("h", "w")),), dims("b", ("h", "w")), op="softmax", normalized=("h", "w"))),
]


@pytest.mark.parametrize("pattern, notation, expected", PARSED, ids=[f"{p}|{n}" for p, n, _ in PARSED])
def test_pattern_parses_to_the_documented_ir(pattern, notation, expected):
    assert parse(pattern, notation) == expected


@pytest.mark.parametrize("pattern", [p for p, n, _ in PARSED if n == "auto"])
def test_render_parses_back_to_the_same_ir(pattern):
    parsed = parse(pattern)
    assert parse(parsed.render(), "compact" if parsed.compact else "spaced") == parsed


CARETS = [
    # (pattern, message start, caret column, caret width): the IR states the rule,
    # the parser puts the caret under what broke it.
    ("a b -> a a", "axis 'a' appears twice in the output", 9, 1),
    ("(a b a) -> a b", "axis 'a' appears twice in one composition", 5, 1),
    ("a b -> ... a", "the output has '...' but no input has", 7, 3),
    ("logsumexp(a b -> a / 2)", "a scale applies to sums of products", 19, 3),
    ("a b -> a / sqrt(e)", "scale factor axis 'e' is not an axis", 9, 9),
    ("prod(a, b -> a)", "prod takes one operand only", 0, 4),
    ("softmax(a b -> a b)", "softmax needs the normalized axes in brackets", 0, 7),
    ("b (h 2) -> b h", "an anonymous axis in an input is reduced", 2, 5),
    ("b (... d) -> b", "'...' inside parentheses merges dimensions", 2, 7),
    ("a b -> a * 0", "a scale factor must be positive", 11, 1),
    ("for b -> b", "axis name 'for' is a Python keyword", 0, 3),
    ("a 0 -> a", "an anonymous axis needs a positive size", 2, 1),
]


@pytest.mark.parametrize("pattern, starts, column, width", CARETS, ids=[c[0] for c in CARETS])
def test_rule_errors_point_at_the_part_that_broke_them(pattern, starts, column, width):
    with pytest.raises(einc.EincError) as err:
        parse(pattern)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(starts), lines[0]
    assert lines[-1] == "    " + " " * column + "^" * width, str(err.value)


@pytest.mark.parametrize(
    "build, subject",
    [
        # The IR raises PatternError with what broke the rule, whoever builds it.
        (lambda: ir.Pattern((dims("a"),), dims("a", "a")), ("output", "a")),
        (lambda: ir.Pattern((dims("a"), dims("b")), dims("a"), op="prod"), ("op",)),
        (lambda: ir.Pattern((dims("a", "b"),), dims("a"), scale=(ir.Factor(False, "c"),)), ("scale", 0)),
        (lambda: dims(("a", "a")), ("axis", "a")),
        (lambda: ir.Factor(False, 0), ("factor",)),
        (lambda: ir.Pattern((dims("a"),), dims("a", (M,))), ("output", E)),
    ],
)
def test_ir_rules_say_what_broke_them(build, subject):
    with pytest.raises(PatternError) as err:
        build()
    assert err.value.subject == subject


def test_levels_list_nested_operations_first():
    pattern = parse("sum(softmax(i j, j k -> i [k]), k l -> i l), l m -> i m")
    assert [level.op for level in pattern.levels()] == ["softmax", "sum", None]
    assert pattern.leaves == 4


def test_spans_place_the_ellipsis():
    axes = dims("b", E, ("h", "d"))
    assert axes.spans(5) == ((("b",), 0, 1), ((E,), 1, 3), (("h", "d"), 4, 1))
    assert axes.spans(2) == ((("b",), 0, 1), ((E,), 1, 0), (("h", "d"), 1, 1))


def test_shipped_tables_match_the_grammar(tmp_path):
    # The LALR tables ship beside the grammar (building them takes ~100 ms): they must be
    # the grammar's.  Stale?  python -c "from einc.parser import write_tables; write_tables()"
    from einc import parser

    grammar = parser.grammar_path().read_text(encoding="utf-8")
    with open(parser.tables_path(), "rb") as f:
        assert f.readline() == parser._tables_key(grammar), "stale tables: run write_tables()"
    from lark import Lark

    with open(parser.tables_path(), "rb") as f:
        f.readline()
        shipped = Lark.load(f)
    built = Lark(grammar, **parser._OPTIONS)
    for pattern, _, _ in PARSED + [(c[0], None, None) for c in CARETS if c[0] != "a 0 -> a"]:
        assert shipped.parse(pattern) == built.parse(pattern), pattern


def test_missing_tables_fall_back_to_building(monkeypatch, tmp_path):
    from einc import parser

    monkeypatch.setattr(parser, "tables_path", lambda: tmp_path / "none")
    parser._lark.cache_clear()
    try:
        assert parse("b h q d, b h k d -> b h q k") == PARSED[1][2]
    finally:
        parser._lark.cache_clear()
