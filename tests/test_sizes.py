"""Stage test: axis sizes from shapes, keyword sizes, compositions and the ellipsis
(:mod:`einc.sizes`).

References: sizes worked out by hand from the README's rules (one name one size,
compositions row-major, ``...`` right-aligned as torch broadcasts).
"""

from __future__ import annotations

import pytest

import einc
from einc import ir
from einc.parser import parse
from einc.sizes import check_new_axes, learn_leaf_sizes, merge_ellipsis, resolve


def _resolve(pattern, shapes, keyword=None):
    parsed = parse(pattern)
    return resolve(parsed, shapes, [f"operand {i}" for i in range(len(shapes))], keyword or {}, {})


RESOLVED = [
    # (pattern, shapes, keyword sizes, expected sizes of the named axes)
    ("i j, j k -> i k", [(2, 3), (3, 4)], {}, {"i": 2, "j": 3, "k": 4}),
    ("b (h d) -> b h d", [(2, 12)], {"h": 3}, {"b": 2, "h": 3, "d": 4}),  # split by one keyword
    ("(a b) (b c) -> a c", [(6, 12)], {"a": 2}, {"a": 2, "b": 3, "c": 4}),  # one group unlocks another
    ("b 1 d -> b d", [(2, 1, 4)], {}, {"b": 2, "d": 4}),  # a unit dimension
    ("h w -> h w c", [(2, 3)], {"c": 5}, {"h": 2, "w": 3, "c": 5}),  # a new axis from its keyword
    ("mean(b (h 2) -> b h)", [(3, 8)], {}, {"b": 3, "h": 4}),  # an anonymous axis knows its size
]


@pytest.mark.parametrize("pattern, shapes, keyword, expected", RESOLVED, ids=[r[0] for r in RESOLVED])
def test_sizes_resolve(pattern, shapes, keyword, expected):
    level = _resolve(pattern, shapes, keyword)
    assert {a: n for a, n in level.sizes.items() if ir.anonymous_size(a) is None} == expected


def test_ellipsis_is_spelled_out_right_aligned_and_broadcast():
    level = _resolve("... i, ... i -> ... i", [(2, 3, 4), (3, 4)])
    e0, e1 = ir.ellipsis_axis(0), ir.ellipsis_axis(1)
    assert level.input_dims == (((e0,), (e1,), ("i",)), ((e1,), ("i",)))
    assert level.output_dims == ((e0,), (e1,), ("i",))
    assert level.sizes[e0] == 2 and level.sizes[e1] == 3
    # A size-1 dimension broadcast against a larger one is dropped from its operand.
    broadcast = _resolve("... i, ... i -> ... i", [(2, 3, 4), (1, 3, 4)])
    assert broadcast.dropped == {(1, 0)}


def test_merged_ellipsis_in_the_output():
    level = _resolve("b ... d -> (b ...) d", [(2, 3, 4, 5)])
    assert level.output_dims == (("b", ir.ellipsis_axis(0), ir.ellipsis_axis(1)), ("d",))


ERRORS = [
    # (pattern, shapes, keyword sizes, fragments of the message)
    ("i j, j k -> i k", [(2, 3), (4, 5)], {}, ["axis 'j' has size 4 in operand 1 (dimension 0)",
                                                "but 3 in operand 0 (dimension 1)"]),
    ("b (h d) -> b h d", [(2, 12)], {"h": 5}, ["composition (h d)", "size 12", "product 5", "axis 'd'"]),
    ("(a b) (c d) -> a b c d", [(4, 6)], {"a": 2}, ["cannot infer the sizes of 'c', 'd'", "--size c=N"]),
    ("b 1 d -> b d", [(2, 3, 4)], {}, ["operand 0 (dimension 1) is the unit axis '1' but has size 3"]),
    ("i j -> i", [(2,)], {}, ["operand 0 has 1 dimensions (shape [2]) but its axis list 'i j' has 2"]),
    ("... i, ... i -> ... i", [(2, 4), (3, 4)], {}, ["has size 3 in operand 1", "2 in operand 0",
                                                       "do not broadcast"]),
    ("mean(b 3 -> b)", [(2, 4)], {}, ["anonymous axis 3 has size 4 in operand 0 (dimension 1)",
                                      "but 3 in the pattern"]),
    ("h w -> h w c", [(2, 3)], {}, ["output axis 'c' is in no input", "c=4 as a keyword"]),
]


@pytest.mark.parametrize("pattern, shapes, keyword, fragments", ERRORS, ids=[r[0] for r in ERRORS])
def test_size_errors_name_both_places(pattern, shapes, keyword, fragments):
    with pytest.raises(einc.EincError) as err:
        _resolve(pattern, shapes, keyword)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_leaf_sizes_reach_nested_levels():
    # h is learned from v (b k h e) and splits (h d) in the nested q and k.
    pattern = parse("softmax(b q (h d), b k (h d) -> b h q [k]), b k h e -> b q h e")
    known: dict[str, tuple[int, str]] = {}
    learn_leaf_sizes(pattern, [(2, 5, 12), (2, 7, 12), (2, 7, 3, 8)], {}, known)
    assert known["h"] == (3, "operand 2 (dimension 2)")
    assert "d" not in known  # only in compositions


def test_merge_ellipsis_refuses_different_ellipses():
    pattern = parse("... i, ... i -> ...")
    assert merge_ellipsis(pattern, [(2, 3, 4), (2, 3, 4)]) == ((6, 4), (6, 4))
    assert merge_ellipsis(pattern, [(4,), (4,)]) == ((1, 4), (1, 4))  # no dimensions: size 1
    with pytest.raises(einc.EincError, match="cannot broadcast size-1"):
        merge_ellipsis(pattern, [(1, 4), (3, 4)])


def test_new_axes_of_nested_levels_need_sizes():
    check_new_axes(parse("sum(a -> a 3), a -> a"), {})  # anonymous: sized by its spelling
    with pytest.raises(einc.EincError, match="output axis 'n'"):
        check_new_axes(parse("sum(a -> a n), a -> a"), {})
