"""Stage test: IR + shapes -> Program (:mod:`einc.planner`, :mod:`einc.paths`).

Programs, paths and steps asserted directly.  References: opt_einsum's ``contract_path``
on the same network (paths and FLOP counts), and each step's axis bookkeeping worked
out by hand from its inputs.
"""

from __future__ import annotations

import time

import opt_einsum as oe
import pytest

import einc
from einc.parser import parse
from einc.paths import check_path, ssa_to_linear
from einc.planner import plan


def test_a_chain_follows_opt_einsums_path():
    shapes = [(8, 64), (64, 8), (8, 64)]
    program = plan(parse("ab,bc,cd->ad"), shapes, {})
    path, info = oe.contract_path("ab,bc,cd->ad", *shapes, shapes=True, optimize="optimal")
    assert list(program.path) == [tuple(p) for p in path]
    assert program.flops == int(info.opt_cost) and program.naive_flops == int(info.naive_cost)
    # Values: tensors 0..2, then one per step; the first step consumes two tensors.
    first, second = program.steps
    assert (first.inputs, first.value, second.value) == ((0, 1), 3, 4)
    assert set(second.inputs) == {2, 3}
    assert program.result == 4 and program.operands == (0, 1, 2)


def test_a_step_records_its_axis_bookkeeping():
    program = plan(parse("b i j, b j k -> b i k"), [(2, 3, 4), (2, 4, 5)], {})
    (step,) = program.steps
    assert step.input_axes == (("b", "i", "j"), ("b", "j", "k"))
    assert (step.batch, step.left, step.right, step.contracted) == (("b",), ("i",), ("k",), ("j",))
    assert step.output_axes == ("b", "i", "k")


@pytest.mark.parametrize("pattern, shapes, left, right", [
    # Neither order lands in output order; the one ending in the output's innermost axis
    # 'd' puts the wide d on the GEMM's N (the other order ends in v and has N = 3).
    ("l b n d, v b n l -> v b n d", [(4, 2, 3, 16), (3, 2, 3, 4)], ("v",), ("d",)),
    # Output order decides first: the order as written lands in it.
    ("b i j, b j k -> b i k", [(2, 30, 4), (2, 4, 5)], ("i",), ("k",)),
    # ... also when that puts the narrow side right.
    ("b j k, b i j -> b i k", [(2, 4, 30), (2, 5, 4)], ("i",), ("k",)),
    # Unfused attention's second product: the result ends in the output's innermost 'd'
    # (a straight final copy, not a transposing one), though q is wider than d.
    ("b h q k, b k h d -> b q (h d)", [(2, 2, 9, 7), (2, 7, 2, 4)], ("q",), ("d",)),
    # Neither lands nor ends in the output's innermost axis (b): the wider free side goes right.
    ("b a x, b x c -> a c b", [(2, 3, 5), (2, 5, 40)], ("a",), ("c",)),
    ("b a x, b x c -> a c b", [(2, 40, 5), (2, 5, 3)], ("c",), ("a",)),
])
def test_the_last_product_orients_its_operands(pattern, shapes, left, right):
    step = plan(parse(pattern), shapes, {}).steps[-1]
    assert (step.left, step.right) == (left, right)


def test_an_intermediate_puts_the_output_axes_first():
    # The weight comes first in the pattern, but the intermediate is laid out [b, j, o]:
    # b (an output axis) is the next product's batch axis and must be outer.
    program = plan(parse("i j o, b i, b j -> b o"), [(8, 8, 4), (16, 8), (16, 8)], {})
    first = program.steps[0]
    assert first.output_axes == ("b", "j", "o")
    assert program.steps[-1].batch == ("b",)


def test_axes_of_one_side_are_reduced_before_the_product():
    program = plan(parse("i j, j k -> i"), [(2, 3), (3, 4)], {})
    (step,) = program.steps
    # (The last product may take its operands in either order, whichever lands in output order.)
    assert step.a_reduce + step.b_reduce == ("k",) and step.contracted == ("j",)


def test_diagonals_and_compositions_in_the_preparation():
    program = plan(parse("(a b) a c -> b c"), [(6, 2, 5)], {"a": 2})
    (prep,) = program.preps
    assert prep.split == ("a", "b", "a", "c")
    assert prep.diagonals == ((0, 2),) and prep.axes == ("b", "c", "a")


def test_nested_levels_are_numbered_across_the_pattern():
    pattern = parse("softmax(i j, j k -> i [k]), k l -> i l")
    program = plan(pattern, [(2, 3), (3, 4), (4, 5)], {})
    (index, inner), = program.nested
    assert index == 0 and inner.operands == (0, 1) and inner.result == 3
    assert program.operands == (3, 2)  # the nested result, then tensor 2
    assert program.steps[0].value == 4
    assert program.path_over_tensors() == [(0, 1), (1, 0)]  # tensor 2 and the result of step 0


def test_an_explicit_path_is_kept_in_its_order():
    program = plan(parse("ab,bc,cd->ad"), [(2, 3), (3, 4), (4, 5)], {}, optimize=((2, 1), (0, 1)))
    assert program.path_over_tensors() == [(2, 1), (0, 1)]
    # An entry of three operands runs as two pairwise steps; the second continues it.
    chain = plan(parse("ab,bc,cd->ad"), [(2, 3), (3, 4), (4, 5)], {}, optimize=((0, 1, 2),))
    assert [step.entry for step in chain.steps] == [0, None]


@pytest.mark.parametrize(
    "path, message",
    [
        ([(0, 1)], "leaves 2 operands"),
        ([(0, 5), (0, 1)], "invalid contraction (0, 5)"),
        ([(0, 0), (0, 1)], "invalid contraction (0, 0)"),
        ([(), (0, 1, 2)], "invalid contraction ()"),
    ],
)
def test_check_path(path, message):
    with pytest.raises(einc.EincError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_path(path, 3)


def test_ssa_to_linear_keeps_each_entrys_order():
    ssa = oe.paths.linear_to_ssa([(2, 0), (1, 0)])
    assert ssa_to_linear(ssa, 3) == [(2, 0), (1, 0)]


def test_constants_are_contracted_among_themselves_first():
    # B and C are constants: folding them first leaves one product per call.
    shapes = [(4, 32), (32, 32), (32, 32), (32, 4)]
    program = plan(parse("ab,bc,cd,de->ae"), shapes, {}, constants=frozenset({1, 2}))
    folded = program.constant_values()
    assert program.steps[0].inputs == (1, 2) and program.steps[0].value in folded
    assert sum(1 for step in program.steps if step.value not in folded) == 2


MEMORY = [
    # (pattern, shapes, limit, message fragment)
    ("i,j->ij", [(4,), (5,)], 10, "the output alone ('i' 'j') has 20 elements"),
    ("ab,bc,cd->ad", [(4, 8), (8, 8), (8, 4)], 20, "no pairwise contraction path"),
    ("ab,bc->ac", [(2, 3), (3, 4)], 0, "it holds no element"),
]


@pytest.mark.parametrize("pattern, shapes, limit, fragment", MEMORY, ids=[m[0] for m in MEMORY])
def test_memory_limit_refusals(pattern, shapes, limit, fragment):
    with pytest.raises(einc.EincError, match=f"memory_limit={limit} elements is too small") as err:
        plan(parse(pattern), shapes, {}, memory_limit=limit)
    assert fragment in str(err.value)


def test_auto_strategy_by_operand_count():
    # einc's documented "auto": optimal up to 6 operands, dynamic programming to 20,
    # the cheaper of seeded random-greedy and cotengra trials beyond.
    from einc import paths

    assert paths._auto(6) == "optimal"
    assert isinstance(paths._auto(10), oe.paths.DynamicProgramming) and paths._auto(10).search_outer
    assert not paths._auto(20).search_outer and isinstance(paths._auto(21), paths._Cheapest)
    assert "cotengra" in paths.STRATEGY_NAMES and "greedy" in paths.STRATEGY_NAMES


def test_large_networks_plan_within_a_second_the_same_path_every_time():
    # Beyond 20 operands: bounded planning time, deterministic, and no costlier than greedy
    # (opt_einsum's own FLOP counts on the same network are the reference).
    from opt_einsum.testing import rand_equation

    eq, shapes = rand_equation(40, 3, seed=2, d_min=2, d_max=6, n_out=2)
    # opt_einsum's letters run into symbols the pattern language does not take: spaced names.
    names = {c: f"x{i}" for i, c in enumerate(sorted(set(eq) - set(",->")))}
    inputs, output = eq.split("->")
    pattern = parse(", ".join(" ".join(names[c] for c in term) for term in inputs.split(","))
                    + " -> " + " ".join(names[c] for c in output))
    start = time.perf_counter()
    first = plan(pattern, shapes, {})
    assert time.perf_counter() - start < 5.0  # about 0.3 s here; loose for a shared machine
    assert plan(pattern, shapes, {}).path == first.path
    _, greedy = oe.contract_path(eq, *shapes, shapes=True, optimize="greedy")
    assert first.flops <= int(greedy.opt_cost)


@pytest.mark.parametrize("n, seed", [(8, 0), (25, 1), (40, 2)])
def test_path_costs_are_counted_as_opt_einsum_counts_them(n, seed):
    # auto picks the cheaper of its candidates by this count: it must be opt_einsum's.
    from opt_einsum.testing import rand_equation

    from einc import paths

    eq, shapes, size_dict = rand_equation(n, 3, seed=seed, d_min=2, d_max=6, n_out=2, return_size_dict=True)
    inputs, output = eq.split("->")
    path, info = oe.contract_path(eq, *shapes, shapes=True, optimize="greedy")
    assert paths._flops(path, inputs.split(","), output, size_dict) == int(info.opt_cost)


def test_cheapest_is_seeded_and_leaves_the_global_random_states_alone():
    import random

    import numpy
    from opt_einsum.testing import rand_equation

    from einc import paths

    eq, _, size_dict = rand_equation(30, 3, seed=1, d_min=2, d_max=6, n_out=2, return_size_dict=True)
    inputs, output = eq.split("->")
    terms = [set(t) for t in inputs.split(",")]
    random.seed(123)
    numpy.random.seed(123)
    expected = random.random(), numpy.random.random()
    random.seed(123)
    numpy.random.seed(123)
    first = paths._Cheapest()(terms, set(output), size_dict)
    assert (random.random(), numpy.random.random()) == expected
    assert paths._Cheapest()(terms, set(output), size_dict) == first
    greedy = oe.path_random.RandomGreedy(max_repeats=32)(terms, set(output), size_dict)
    assert paths._flops(first, terms, output, size_dict) <= paths._flops(greedy, terms, output, size_dict)
