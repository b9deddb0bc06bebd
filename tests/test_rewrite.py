"""Stage test: the rewrite passes (:mod:`einc.rewrite`), and how the planner applies them.

References: the roles of each axis of an attention pattern worked out by hand (SDPA's
``(N..., L, E)`` layout), and the plain lowering of the same pattern.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randn

import einc
from einc.parser import parse
from einc.planner import plan
from einc.rewrite import PASSES, attention, fusions

ROLES = [
    # (pattern, batch, query, key, head, value, (q, k, v) positions)
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", ("b",), ("q",), ("k",), ("d",), ("e",), (0, 1, 2)),
    # heads by composition: h joins the batch axes
    ("softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h e) -> b q (h e)",
     ("b", "h"), ("q",), ("k",), ("d",), ("e",), (0, 1, 2)),
    # k before q inside the softmax
    ("softmax(b k d, b q d -> b q [k]), b k e -> b q e", ("b",), ("q",), ("k",), ("d",), ("e",), (1, 0, 2)),
    # v first
    ("b k e, softmax(b q d, b k d -> b q [k]) -> b q e", ("b",), ("q",), ("k",), ("d",), ("e",), (1, 2, 0)),
    # no batch axis at all, other names
    ("softmax(s x, t x -> s [t]), t y -> s y", (), ("s",), ("t",), ("x",), ("y",), (0, 1, 2)),
]


@pytest.mark.parametrize("pattern, batch, query, key, head, value, positions", ROLES, ids=[r[0] for r in ROLES])
def test_attention_roles(pattern, batch, query, key, head, value, positions):
    roles = attention(parse(pattern))
    assert roles is not None
    assert (roles.batch, roles.query, roles.key, roles.head, roles.value) == (batch, query, key, head, value)
    assert (roles.q, roles.k, roles.v) == positions


@pytest.mark.parametrize(
    "pattern",
    [
        "log_softmax(b q d, b k d -> b q [k]), b k e -> b q e",  # SDPA computes softmax only
        "softmax(b q d, b k d -> b [q k]), b k e -> b q e",  # joint normalization
        "softmax(b q d, b k d -> b q [k]), b k e -> b q e / 2",  # a scale outside the softmax
        "softmax(... q d, ... k d -> ... q [k]), ... k e -> ... q e",  # an ellipsis
        "softmax(b q d, b k d -> b q [k]), k e -> b q e",  # v lacks the batch axis
        "max(softmax(b q d, b k d -> b q [k]), b k e -> b q e)",  # not a sum of products
    ],
)
def test_patterns_that_are_not_sdpa(pattern):
    assert attention(parse(pattern)) is None
    assert fusions(parse(pattern)) == {}


def test_fusions_find_nested_levels():
    inner = "softmax(b q d, b k d -> b q [k]), b k e -> b q e"
    pattern = parse(f"sum({inner}), b q e -> b e")
    found = fusions(pattern)
    (level,) = found
    assert level == pattern.inputs[0]
    assert "attention" in PASSES


def test_the_planner_turns_a_fused_level_into_one_step():
    pattern = parse("softmax(b q d, b k d -> b q [k]), b k e -> b q e")
    shapes = [(2, 3, 4), (2, 5, 4), (2, 5, 6)]
    fused = plan(pattern, shapes, {}, fusions=fusions(pattern))
    plain = plan(pattern, shapes, {})
    (step,) = fused.steps
    assert step.fused and step.inputs == (0, 1, 2) and fused.fused is not None
    assert fused.path_over_tensors() == [(0, 1, 2)]
    # The products SDPA computes, counted the same (the unfused count spreads over two levels).
    assert sum(p.flops for p in fused.programs()) == sum(p.flops for p in plain.programs()) == fused.flops
    assert fused.largest_intermediate == 2 * 3 * 6  # the output: SDPA keeps no scores of einc's
    assert len(plain.steps) == 1 and len(plain.nested[0][1].steps) == 1


def test_an_empty_axis_keeps_the_plain_lowering():
    pattern = parse("softmax(b q d, b k d -> b q [k]), b k e -> b q e")
    program = plan(pattern, [(2, 3, 0), (2, 5, 0), (2, 5, 6)], {}, fusions=fusions(pattern))
    assert program.fused is None


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_fused_and_plain_lowerings_agree(backend):
    pattern = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"
    q, k, v = randn(2, 5, 12), randn(2, 7, 12), randn(2, 7, 12)
    fused = einc.compile(pattern, backend=backend, h=3)
    plain = einc.compile(pattern, backend=backend, h=3, fuse=False)
    assert fused.explain(q, k, v).rewrite == "sdpa" and plain.explain(q, k, v).rewrite == ""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.reshape(2, 5, 3, 4), k.reshape(2, 7, 3, 4)) / 2
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.reshape(2, 7, 3, 4)).reshape(2, 5, 12)
    assert_close(fused(q, k, v), expected)
    assert_close(plain(q, k, v), expected)
