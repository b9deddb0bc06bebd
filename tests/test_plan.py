"""Path inspection (issue "Path inspection"): strategies, costs, memory limits, constants.

Every number einc reports is checked against opt_einsum's own ``contract_path`` for
the same equation and path, and every result against ``torch.einsum`` in float64
(``conftest.reference_einsum``).  einc's default ``optimize="auto"`` is opt_einsum's
``"dp"`` up to 20 operands (``einc/planner.py``), which is *not* opt_einsum's
``"auto"``; the tests below compare it with ``"optimal"`` where that is feasible and
with opt_einsum's ``"auto"`` where it is not.
"""

from __future__ import annotations

import json
import math
import random
import time

import opt_einsum as oe
import pytest
import torch
from conftest import assert_close, default_strategy, examples, operands, reference_einsum
from hypothesis import given, settings
from hypothesis import strategies as st
from opt_einsum.testing import rand_equation
from torch.profiler import ProfilerActivity, profile

import einc

# ------------------------------------------------------------------- helpers


def oe_path(equation, shapes, optimize, **kw):
    """opt_einsum's (path as a list of tuples, PathInfo) for ``shapes``."""
    path, info = oe.contract_path(equation, *shapes, shapes=True, optimize=optimize, **kw)
    return [tuple(step) for step in path], info


def rand_case(n: int, seed: int):
    """A random tensor network (opt_einsum's generator): n operands, each index in 3, 2 outputs."""
    equation, shapes = rand_equation(n, 3, seed=seed, n_out=2)
    return equation, [tuple(s) for s in shapes]


def chain(n: int, seed: int, low: int = 2, high: int = 40):
    """An n-matrix chain ``ab,bc,...->a?`` with seeded random dimensions."""
    letters = oe.get_symbol
    rng = random.Random(seed)
    dims = [rng.randint(low, high) for _ in range(n + 1)]
    inputs = [letters(i) + letters(i + 1) for i in range(n)]
    equation = ",".join(inputs) + "->" + letters(0) + letters(n)
    return equation, [(dims[i], dims[i + 1]) for i in range(n)]


def oe_step_costs(info) -> list[int]:
    """opt_einsum's FLOP count of each contraction in ``info`` (as contract_path computes it)."""
    costs = []
    for positions, removed, einsum_str, *_ in info.contraction_list:
        involved = set(einsum_str.split("->")[0].replace(",", ""))
        costs.append(int(oe.helpers.flop_count(involved, bool(removed), len(positions), info.size_dict)))
    return costs


def ids(cases):
    return [c[0] if len(c[0]) <= 40 else c[0][:37] + "..." for c in cases]


# --------------------------------------------- 1. default plan = optimal cost

FOUR_INDEX = "ea,fb,abcd,gc,hd->efgh"

# (equation, shapes): the default plan must cost what opt_einsum's exhaustive
# "optimal" finds (feasible up to 8 operands).
OPTIMAL_CASES = [
    ("ab,bc,cd->ad", [(8, 64), (64, 8), (8, 64)]),  # 3-chain: the order matters 8x
    ("ab,bc,cd,de,ef->af", [(5, 50), (50, 2), (2, 40), (40, 3), (3, 60)]),  # 5-chain, uneven sizes
    ("ab,bc,cd,de,ef,fg,gh,hi->ai",  # 8-chain: the largest exhaustive search here
     [(5, 50), (50, 2), (2, 40), (40, 3), (3, 60), (60, 4), (4, 30), (30, 7)]),
    (FOUR_INDEX, [(10, 3), (10, 3), (3, 3, 3, 3), (10, 3), (10, 3)]),  # AO->MO 4-index transform
    (FOUR_INDEX, [(4, 12), (4, 12), (12, 12, 12, 12), (4, 12), (4, 12)]),  # transform that shrinks
    ("ab,bc,cd,da->", [(9, 2), (2, 9), (9, 2), (2, 9)]),  # ring to a scalar
    ("bij,bjk,bkl,blm->bim", [(3, 4, 20), (3, 20, 2), (3, 2, 20), (3, 20, 5)]),  # batched chain
    *[rand_case(n, seed) for n in range(4, 9) for seed in (0, 1)],  # random networks, 4-8 operands
]


@pytest.mark.parametrize("equation, shapes", OPTIMAL_CASES, ids=ids(OPTIMAL_CASES))
def test_default_plan_costs_what_optimal_costs(equation, shapes):
    expr = einc.compile(equation)
    plan = expr.explain(*shapes)
    _, optimal = oe_path(equation, shapes, "optimal")
    assert plan.flops == int(optimal.opt_cost)
    assert plan.naive_flops == int(optimal.naive_cost)
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))


# (equation, shapes): the cheapest path takes an outer product, which opt_einsum's
# "dp" (einc's default; search_outer=False) never considers; "optimal" does.
OUTER_PRODUCT_CASES = [
    ("cd,fe,ebcfad->ba", [(8, 2), (4, 7), (7, 9, 8, 4, 3, 2)]),  # fe,cd->fecd first: 24640 vs dp's 25056
    rand_case(8, 7),  # h,j->hj late in the path: 92367 vs dp's 92664
]


@pytest.mark.parametrize("equation, shapes", OUTER_PRODUCT_CASES, ids=ids(OUTER_PRODUCT_CASES))
def test_default_plan_is_optimal_when_the_best_path_has_an_outer_product(equation, shapes):
    _, optimal = oe_path(equation, shapes, "optimal")
    assert any(not removed for _, removed, *_ in optimal.contraction_list)  # the case's premise
    assert einc.compile(equation).explain(*shapes).flops == int(optimal.opt_cost)


# ------------------------------------------------------- 2. every strategy

DETERMINISTIC = ["optimal", "dp", "dynamic-programming", "greedy", "branch-all", "branch-2",
                 "branch-1", "auto-hq", "eager", "opportunistic"]
RANDOMIZED = ["random-greedy", "random-greedy-128"]
STRATEGY_CASES = [
    (FOUR_INDEX, [(6, 3), (6, 3), (3, 3, 3, 3), (6, 3), (6, 3)]),  # 4-index transform
    rand_case(6, 2),  # random 6-operand network
]


@pytest.mark.parametrize("equation, shapes", STRATEGY_CASES, ids=ids(STRATEGY_CASES))
@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_deterministic_strategy_gives_opt_einsums_path(strategy, equation, shapes):
    expr = einc.compile(equation, optimize=strategy, backend="eager")
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))
    path, info = oe_path(equation, shapes, strategy)
    plan = expr.explain(*shapes)
    assert plan.path == path
    assert plan.flops == int(info.opt_cost)


@pytest.mark.parametrize("equation, shapes", STRATEGY_CASES, ids=ids(STRATEGY_CASES))
def test_auto_follows_the_documented_strategy(equation, shapes):
    plan = einc.compile(equation).explain(*shapes)
    path, info = oe_path(equation, shapes, default_strategy(len(shapes)))
    assert plan.path == path and plan.flops == int(info.opt_cost)


def test_einc_auto_differs_from_opt_einsums_auto_beyond_8_operands():
    # opt_einsum's "auto" goes greedy beyond 8 operands; einc's does not (dp up to 20).
    equation, shapes = chain(12, seed=3)
    plan = einc.compile(equation).explain(*shapes)
    dp_path, dp_info = oe_path(equation, shapes, "dp")
    _, auto_info = oe_path(equation, shapes, "auto")
    assert plan.path == dp_path and plan.flops == int(dp_info.opt_cost)
    assert int(auto_info.opt_cost) > int(dp_info.opt_cost)  # else the case shows nothing


@pytest.mark.parametrize("equation, shapes", STRATEGY_CASES, ids=ids(STRATEGY_CASES))
@pytest.mark.parametrize("strategy", RANDOMIZED)
def test_randomized_strategy_plans_a_valid_path(strategy, equation, shapes):
    expr = einc.compile(equation, optimize=strategy, backend="eager")
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))
    plan = expr.explain(*shapes)
    # The path is random; what einc reports about it must be opt_einsum's account of it.
    _, info = oe_path(equation, shapes, plan.path)
    assert plan.flops == int(info.opt_cost)
    assert plan.flops >= int(oe_path(equation, shapes, "optimal")[1].opt_cost)


@pytest.mark.parametrize("equation, shapes", STRATEGY_CASES, ids=ids(STRATEGY_CASES))
def test_path_optimizer_instance(equation, shapes):
    expr = einc.compile(equation, optimize=oe.paths.DynamicProgramming(minimize="size"))
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))
    path, info = oe_path(equation, shapes, oe.paths.DynamicProgramming(minimize="size"))
    plan = expr.explain(*shapes)
    assert plan.path == path
    assert plan.largest_intermediate == int(info.largest_intermediate)
    # minimize="size" must have been used: no path has a smaller largest intermediate.
    assert plan.largest_intermediate <= int(oe_path(equation, shapes, "dp")[1].largest_intermediate)


@pytest.mark.filterwarnings("ignore:Couldn't import `kahypar`")
@pytest.mark.parametrize("equation, shapes", STRATEGY_CASES, ids=ids(STRATEGY_CASES))
def test_cotengra(equation, shapes):
    pytest.importorskip("cotengra")
    expr = einc.compile(equation, optimize="cotengra")
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))
    plan = expr.explain(*shapes)
    _, info = oe_path(equation, shapes, plan.path)
    assert plan.flops == int(info.opt_cost)
    assert len(plan.path) == len(shapes) - 1  # pairwise


# ------------------------------------------------------- 3. explicit paths

CHAIN5 = "ab,bc,cd,de,ef->af"
CHAIN5_SHAPES = [(2, 3), (3, 4), (4, 5), (5, 6), (6, 2)]
# (equation, shapes, path)
EXPLICIT = [
    (CHAIN5, CHAIN5_SHAPES, [(0, 1), (0, 1), (0, 1), (0, 1)]),  # left to right
    (CHAIN5, CHAIN5_SHAPES, [(3, 4), (0, 1), (0, 2), (0, 1)]),  # right end first, then left
    (CHAIN5, CHAIN5_SHAPES, [(0, 4), (0, 1), (0, 1), (0, 1)]),  # an outer product first
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], [(0, 1, 2)]),  # one 3-operand step
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)], [(2, 1, 0)]),  # the same, indices descending
    (FOUR_INDEX, [(4, 3), (4, 3), (3, 3, 3, 3), (4, 3), (4, 3)], [(0, 2), (0, 3), (0, 2), (0, 1)]),
]


@pytest.mark.parametrize("equation, shapes, path", EXPLICIT, ids=[f"{e}-{p}" for e, _, p in EXPLICIT])
def test_explicit_path_is_honoured(equation, shapes, path):
    expr = einc.compile(equation, optimize=path)
    plan = expr.explain(*shapes)
    assert plan.path == [tuple(p) for p in path]
    _, info = oe_path(equation, shapes, path)
    assert plan.flops == int(info.opt_cost)
    assert [s.operands for s in plan.steps if s.operands] == [tuple(p) for p in path]
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))


INVALID_PATHS = [
    ([(0, 1)], "leaves two operands"),
    ([(0, 1), (0, 1), (0, 1)], "one step too many"),
    ([(0, 5), (0, 1)], "index out of range"),
    ([(-1, 0), (0, 1)], "negative index"),
    ([(0, 0), (0, 1)], "repeated index"),
    ([(), (0, 1, 2)], "empty step"),
    ([("a", 1), (0, 1)], "not an int"),
    ([(0, 1.0), (0, 1)], "a float"),
]


@pytest.mark.parametrize("path", [p for p, _ in INVALID_PATHS], ids=[i for _, i in INVALID_PATHS])
def test_invalid_explicit_path_raises_at_compile_time(path):
    # A path is checked against the operand count when the expression is made.
    with pytest.raises(einc.EincError, match="optimize|path"):
        einc.compile("ab,bc,cd->ad", optimize=path)
    with pytest.raises(einc.EincError, match="optimize|path"):
        einc.Expression("ab,bc,cd->ad", optimize=path)


def test_a_rejected_path_does_not_shadow_an_equal_valid_one():
    # [(0, 1.0), (0, 1)] == [(0, 1), (0, 1)] in Python (and hashes alike): compile's
    # cache must not hand the invalid expression back for the valid path.
    equation, shapes = "ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)]
    with pytest.raises(einc.EincError):
        einc.compile(equation, optimize=[(0, 1.0), (0, 1)]).explain(*shapes)
    plan = einc.compile(equation, optimize=[(0, 1), (0, 1)]).explain(*shapes)
    assert plan.path == [(0, 1), (0, 1)]


def test_explicit_multi_operand_step_under_a_generous_memory_limit():
    # einc runs a 3-operand step as two products (2x4 then 2x5 here); a limit of 10^9
    # elements holds them, so the explicit path must be planned, not refused.
    equation, shapes = "ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)]
    expr = einc.compile(equation, optimize=[(0, 1, 2)], memory_limit=10**9)
    assert expr.explain(*shapes).path == [(0, 1, 2)]
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))


# -------------------------------------------------- 4. what a Plan reports

# (equation, shapes, optimize): plans whose bookkeeping is checked against opt_einsum.
PLAN_CASES = [
    ("ab,bc,cd->ad", [(8, 64), (64, 8), (8, 64)], "auto"),  # 3-chain
    (FOUR_INDEX, [(10, 3), (10, 3), (3, 3, 3, 3), (10, 3), (10, 3)], "auto"),  # 4-index transform
    (*rand_case(7, 3), "auto"),  # random network
    (*rand_case(6, 4), "greedy"),  # another strategy
    ("bhqd,bhkd->bhqk", [(2, 4, 8, 16), (2, 4, 8, 16)], "auto"),  # one bmm
    ("ab,cd->abcd", [(3, 4), (5, 6)], "auto"),  # outer product: speedup exactly 1
]


@pytest.mark.parametrize("equation, shapes, optimize", PLAN_CASES, ids=ids(PLAN_CASES))
def test_plan_numbers_are_opt_einsums(equation, shapes, optimize):
    plan = einc.compile(equation, optimize=optimize).explain(*shapes)
    _, info = oe_path(equation, shapes, plan.path)
    assert sum(step.flops for step in plan.steps) == plan.flops == int(info.opt_cost)
    assert plan.naive_flops == int(info.naive_cost)
    assert plan.largest_intermediate == int(info.largest_intermediate)
    # opt_einsum's largest intermediate is the largest step output (the output included).
    assert plan.largest_intermediate == max(math.prod(s.output_shape) for s in plan.steps)
    # Step by step: opt_einsum's cost and result size of each contraction of the path.
    assert [s.flops for s in plan.steps] == oe_step_costs(info)
    assert [math.prod(s.output_shape) for s in plan.steps] == [int(n) for n in info.size_list]
    assert plan.speedup == int(info.naive_cost) / int(info.opt_cost)
    assert plan.output_shape == tuple(reference_einsum(equation, *operands(shapes)).shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128],
                         ids=str)
def test_largest_intermediate_bytes_use_the_dtype(dtype):
    equation, shapes = FOUR_INDEX, [(10, 3), (10, 3), (3, 3, 3, 3), (10, 3), (10, 3)]
    plan = einc.compile(equation).explain(*shapes, dtype=dtype)
    elements = int(oe_path(equation, shapes, "dp")[1].largest_intermediate)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert plan.largest_intermediate == elements
    assert plan.largest_intermediate_bytes == elements * itemsize
    assert plan.dtype == str(dtype).removeprefix("torch.")
    # dtype= overrides the tensors' own dtype.
    xs = operands(shapes, torch.float32)
    assert einc.compile(equation).explain(*xs, dtype=dtype).largest_intermediate_bytes == elements * itemsize
    assert einc.compile(equation).explain(*xs).largest_intermediate_bytes == elements * 4


def test_to_dict_survives_json():
    equation, shapes = FOUR_INDEX, [(10, 3), (10, 3), (3, 3, 3, 3), (10, 3), (10, 3)]
    plan = einc.compile(equation).explain(*shapes, dtype=torch.float16)
    back = json.loads(json.dumps(plan.to_dict()))
    assert back["pattern"] == equation
    assert [tuple(s) for s in back["shapes"]] == list(plan.shapes)
    assert [tuple(p) for p in back["path"]] == plan.path
    assert back["flops"] == plan.flops and back["naive_flops"] == plan.naive_flops
    assert back["speedup"] == pytest.approx(plan.speedup)
    assert back["largest_intermediate"] == plan.largest_intermediate
    assert back["largest_intermediate_bytes"] == plan.largest_intermediate * 2
    assert back["dtype"] == "float16"
    assert back["source"] == plan.source
    assert tuple(back["output_shape"]) == plan.output_shape
    assert len(back["steps"]) == len(plan.steps)
    for d, step in zip(back["steps"], plan.steps):
        assert d["equation"] == step.equation and d["flops"] == step.flops and d["kernel"] == step.kernel
        assert tuple(d["operands"]) == step.operands
        assert [tuple(s) for s in d["shapes"]] == list(step.shapes)
        assert d["output_size"] == math.prod(step.output_shape)


def test_str_shows_path_steps_and_source():
    equation, shapes = FOUR_INDEX, [(10, 3), (10, 3), (3, 3, 3, 3), (10, 3), (10, 3)]
    plan = einc.compile(equation).explain(*shapes)
    text = str(plan)
    assert str(plan.path) in text
    assert equation in text
    assert len(plan.steps) == 4
    for step in plan.steps:
        assert step.equation in text
        assert f"{step.flops:,}" in text
    assert plan.source.strip() in text
    assert f"{plan.flops:,}" in text and f"{plan.naive_flops:,}" in text


# --------------------------------------------------------- 5. memory_limit

# (equation, shapes, limit in elements): a limit below the default plan's largest
# intermediate that a pairwise path still meets (opt_einsum "optimal" finds one).
FITTING_LIMITS = [
    ("ab,bc,cd,de,ef->af", [(2, 100), (100, 100), (100, 100), (100, 100), (100, 2)], 200),  # exactly tight
    ("ihjea,dcf,kb,cfhd,kg,ijeg->ab", [(7, 7, 5, 2, 4), (5, 3, 2), (4, 2), (3, 2, 7, 5), (4, 2), (7, 5, 2, 2)],
     279),  # one below the default plan's 280: another path
    ("i,j,ijk->k", [(2,), (2,), (2, 2, 1000)], 1000),  # only the outer product i,j->ij fits
    ("dahe,ij,fjd,cg,ebhkfi,gck->ab",  # random network: opt_einsum's dp finds nothing, greedy does
     [(9, 6, 2, 4), (8, 5), (2, 5, 9), (5, 3), (4, 6, 2, 4, 2, 8), (3, 5, 4)], 767),
]


@pytest.mark.parametrize("equation, shapes, limit", FITTING_LIMITS, ids=ids(FITTING_LIMITS))
def test_memory_limit_that_fits(equation, shapes, limit):
    # The reference: opt_einsum's exhaustive search finds a pairwise path within the limit.
    path, info = oe_path(equation, shapes, "optimal", memory_limit=limit)
    assert all(len(step) <= 2 for step in path) and int(info.largest_intermediate) <= limit
    expr = einc.compile(equation, memory_limit=limit)
    plan = expr.explain(*shapes)
    assert all(math.prod(step.output_shape) <= limit for step in plan.steps)
    assert plan.largest_intermediate <= limit
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))


HUGE_CHAIN = "ab,bc,cd,de,ef,fg->ag"  # 6 x (1000, 1000): the naive product has 10^21 terms


@pytest.mark.parametrize("optimize", ["auto", "greedy", "optimal", "branch-2"])
@pytest.mark.parametrize("limit", [10, 999_999], ids=["tiny", "one-below"])
def test_memory_limit_too_small_refuses_before_allocating(optimize, limit):
    shapes = [(1000, 1000)] * 6
    # Zero-stride views: the inputs themselves allocate nothing either.
    xs = [torch.zeros((), dtype=torch.float64).expand(1000, 1000) for _ in shapes]
    expr = einc.compile(HUGE_CHAIN, optimize=optimize, memory_limit=limit)
    start = time.perf_counter()
    with pytest.raises(einc.EincError, match="memory_limit"):
        expr.explain(*shapes)
    with pytest.raises(einc.EincError, match="memory_limit"):
        expr(*xs)
    assert time.perf_counter() - start < 1.0
    # The limit is the reason: every path needs 10^6-element intermediates.
    assert einc.compile(HUGE_CHAIN, optimize=optimize, memory_limit=1_000_000).explain(*shapes).largest_intermediate \
        == 1_000_000


def test_memory_limit_refusal_when_only_the_intermediates_do_not_fit():
    # The output (2x2) fits in 1999 elements, but every path builds a 2000-element
    # intermediate; the naive product has 4 * 10^12 terms.
    shapes = [(2, 1000), (1000, 1000), (1000, 1000), (1000, 1000), (1000, 2)]
    xs = [torch.zeros((), dtype=torch.float64).expand(*s) for s in shapes]
    expr = einc.compile(CHAIN5, memory_limit=1999, slice=False)
    start = time.perf_counter()
    with pytest.raises(einc.EincError, match="memory_limit"):
        expr(*xs)
    assert time.perf_counter() - start < 1.0
    assert einc.compile(CHAIN5, memory_limit=2000).explain(*shapes).largest_intermediate == 2000


# (limit, its bytes, dtype, fits): "ab,bc,cd,de,ef->af" on the shapes below needs 2000 elements.
BYTE_LIMITS = [
    ("16KB", 16_000, torch.float64, True),  # 2000 elements
    ("15KB", 15_000, torch.float64, False),  # 1875 elements
    ("15KB", 15_000, torch.float32, True),  # 3750 elements
    ("7.9KB", 7_900, torch.float32, False),  # 1975 elements
    ("8KB", 8_000, torch.float32, True),  # 2000 elements
    ("15.625KiB", 16_000, torch.float64, True),  # binary units
    ("4kB", 4_000, torch.float16, True),  # units are case-insensitive: 2000 half floats
    (" 1 MiB ", 2**20, torch.float64, True),  # spaces around are fine
]


@pytest.mark.parametrize("limit, size, dtype, fits", BYTE_LIMITS,
                         ids=[f"{l.strip()}-{str(d)[6:]}" for l, _, d, _ in BYTE_LIMITS])
def test_memory_limit_in_bytes_uses_the_itemsize(limit, size, dtype, fits):
    shapes = [(2, 1000), (1000, 1000), (1000, 1000), (1000, 1000), (1000, 2)]
    expr = einc.compile(CHAIN5, memory_limit=limit, slice=False)
    if fits:
        plan = expr.explain(*shapes, dtype=dtype)
        assert plan.largest_intermediate_bytes <= size
        assert all(math.prod(s.output_shape) * plan.itemsize <= size for s in plan.steps)
    else:
        with pytest.raises(einc.EincError, match="memory_limit"):
            expr.explain(*shapes, dtype=dtype)


@pytest.mark.parametrize("dtype, limit, fits", [
    (torch.float64, "1KiB", True),  # 128 elements x 8 B = 1024 B
    (torch.float64, "1KB", False),  # 1000 B: 125 elements
    (torch.float32, "1KB", True),  # 250 elements
    (torch.float32, "511B", False),  # 127.75 elements
], ids=["f64-1KiB", "f64-1KB", "f32-1KB", "f32-511B"])
def test_byte_limit_on_a_call(dtype, limit, fits):
    a, b = operands([(8, 16), (16, 16)], dtype)  # output 8x16 = 128 elements
    expr = einc.compile("ab,bc->ac", memory_limit=limit)
    if fits:
        assert_close(expr(a, b), reference_einsum("ab,bc->ac", a, b), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(einc.EincError, match="memory_limit"):
            expr(a, b)


def test_byte_limit_below_one_element_refuses():
    # A float64 scalar output takes 8 bytes; a 4-byte limit cannot hold it.
    with pytest.raises(einc.EincError, match="memory_limit"):
        einc.compile("i,i->", memory_limit="4B").explain((3,), (3,), dtype=torch.float64)


@pytest.mark.parametrize("limit", [-1, 0, "lots", 1.5, True, "12 parsecs", "-1MB", "MB", [100]], ids=repr)
def test_invalid_memory_limit(limit):
    with pytest.raises(einc.EincError, match="memory_limit"):
        einc.compile("ab,bc->ac", memory_limit=limit)
    with pytest.raises(einc.EincError, match="memory_limit"):
        einc.Expression("ab,bc->ac", memory_limit=limit)


@settings(max_examples=examples(25))
@given(n=st.integers(3, 7), seed=st.integers(0, 10**6), fraction=st.sampled_from([0.25, 0.5, 0.99]))
def test_memory_limit_property(n, seed, fraction):
    """Any limit: either a plan that keeps every step under it and is right, or a refusal;
    a limit equal to the unconstrained plan's largest intermediate always plans."""
    equation, shapes = rand_case(n, seed)
    default = einc.Expression(equation).explain(*shapes)
    output = math.prod(default.output_shape)
    largest = default.largest_intermediate
    assert largest == int(oe_path(equation, shapes, default.path)[1].largest_intermediate)
    assert einc.Expression(equation, memory_limit=largest).explain(*shapes).largest_intermediate <= largest
    limit = max(output, int(largest * fraction))
    expr = einc.Expression(equation, memory_limit=limit, backend="eager")
    try:
        plan = expr.explain(*shapes)
    except einc.EincError as err:
        assert "memory_limit" in str(err)
        return
    assert all(math.prod(s.output_shape) <= limit for s in plan.steps)
    if plan.slicing is None:
        _, info = oe_path(equation, shapes, plan.path)
        assert int(info.largest_intermediate) <= limit and plan.flops == int(info.opt_cost)
    else:  # the plan is one slice's: its shapes are the slice's
        assert plan.slicing.largest_intermediate <= limit and plan.largest_intermediate <= limit
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))


# ------------------------------------------------------------- 6. constants

CHAIN4 = "ab,bc,cd,de->ae"
CHAIN4_SHAPES = [(8, 32), (32, 256), (256, 32), (32, 8)]  # B @ C (32x32) is worth folding
# (equation, shapes, constant positions)
CONSTANT_CASES = [
    (CHAIN4, CHAIN4_SHAPES, (1, 2)),  # middle pair: folded to one 32x32 matrix
    (CHAIN4, CHAIN4_SHAPES, (0,)),  # first
    (CHAIN4, CHAIN4_SHAPES, (3,)),  # last
    (CHAIN4, CHAIN4_SHAPES, (0, 3)),  # both ends, nothing to fold between them
    (CHAIN4, CHAIN4_SHAPES, (0, 1, 2)),  # all but the last
    (CHAIN4, CHAIN4_SHAPES, (1, 2, 3)),  # all but the first
    (CHAIN4, CHAIN4_SHAPES, (0, 1, 2, 3)),  # all: the call takes no tensors
    (FOUR_INDEX, [(6, 3), (6, 3), (3, 3, 3, 3), (6, 3), (6, 3)], (0, 1, 3, 4)),  # the 4 transform matrices
    (FOUR_INDEX, [(6, 3), (6, 3), (3, 3, 3, 3), (6, 3), (6, 3)], (2,)),  # the 4-index tensor
    ("bij,jk,bkl->bil", [(3, 4, 5), (5, 6), (3, 6, 7)], (1,)),  # a shared weight between batched operands
    ("i,ij,jk,k->", [(5,), (5, 6), (6, 7), (7,)], (1, 2)),  # matrix pair under two vectors
]


def _split(tensors, positions):
    constants = {i: t for i, t in enumerate(tensors) if i in positions}
    rest = [t for i, t in enumerate(tensors) if i not in positions]
    return constants, rest


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("equation, shapes, positions", CONSTANT_CASES,
                         ids=[f"{e}-{p}" for e, _, p in CONSTANT_CASES])
def test_constants_give_torch_einsums_result(equation, shapes, positions, backend):
    xs = operands(shapes)
    constants, rest = _split(xs, positions)
    expr = einc.compile(equation, constants=constants, backend=backend)
    expected = reference_einsum(equation, *xs)
    assert_close(expr(*rest), expected)
    assert_close(expr(*rest), expected)  # second call: folded values reused
    plan = expr.explain(*rest)
    assert plan.constants == tuple(sorted(positions))
    assert plan.shapes == tuple(shapes)
    assert "def einc_constants(" in plan.source
    _, info = oe_path(equation, shapes, plan.path)
    assert plan.flops == int(info.opt_cost)


def test_constant_only_product_is_folded():
    A, B, C, D = operands(CHAIN4_SHAPES)
    plain = einc.compile(CHAIN4).explain(A, B, C, D)
    expr = einc.compile(CHAIN4, constants={1: B, 2: C})
    plan = expr.explain(A, D)
    folding, main = plan.source.split("def einc_fn(")
    assert "def einc_constants(" in folding
    assert plain.source.count("torch.mm(") == 3
    assert main.count("torch.mm(") == 2  # one fewer product per call
    assert folding.count("torch.mm(") == 1  # B @ C, once
    # The first step contracts the two constants (positions 1 and 2) alone.
    assert plan.path[0] == (1, 2) and plan.steps[0].shapes == ((32, 256), (256, 32))
    assert_close(expr(A, D), reference_einsum(CHAIN4, A, B, C, D))


def _mm_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::mm")


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_constants_are_folded_once_per_signature(backend):
    A, B, C, D = operands(CHAIN4_SHAPES)
    expr = einc.compile(CHAIN4, constants={1: B, 2: C}, backend=backend)
    A2 = operands([(3, 32)])[0]  # a second signature
    counts = [_mm_calls(lambda a=a: expr(a, D)) for a in (A, A, A.clone(), A2, A2)]
    # First call of a signature: B @ C plus the two per-call products; then two.
    assert counts == [3, 2, 2, 3, 2]
    assert_close(expr(A2, D), reference_einsum(CHAIN4, A2, B, C, D))


def test_all_constant_result_is_not_the_cached_tensor():
    # With every operand constant the result is folded once; handing out that very
    # tensor lets a caller's in-place update corrupt every later call.
    xs = operands(CHAIN4_SHAPES)
    expr = einc.compile(CHAIN4, constants=dict(enumerate(xs)))
    first = expr()
    first.zero_()
    assert_close(expr(), reference_einsum(CHAIN4, *xs))


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_constants_wrong_number_of_tensors(count):
    A, B, C, D = operands(CHAIN4_SHAPES)
    expr = einc.compile(CHAIN4, constants={1: B, 2: C})
    given_ = [A, D, B, C][:count]
    with pytest.raises(einc.EincError, match="takes 2 tensors"):
        expr(*given_)
    with pytest.raises(einc.EincError, match="takes 2 tensors"):
        expr.explain(*given_)


BAD_CONSTANTS = [
    ({5: "tensor"}, "position out of range"),
    ({-1: "tensor"}, "negative position"),
    ({"a": "tensor"}, "not an int"),
    ({True: "tensor"}, "a bool"),
    ({1.0: "tensor"}, "a float"),
    ({0: [1, 2]}, "a list, not a tensor"),
    ([("tensor")], "not a mapping"),
]


@pytest.mark.parametrize("constants", [c for c, _ in BAD_CONSTANTS], ids=[i for _, i in BAD_CONSTANTS])
def test_bad_constants(constants):
    t = torch.randn(8, 32)

    def real(value):
        return t if value == "tensor" else value

    if isinstance(constants, dict):
        constants = {k: real(v) for k, v in constants.items()}
    else:
        constants = [real(v) for v in constants]
    with pytest.raises(einc.EincError, match="constants"):
        einc.compile(CHAIN4, constants=constants)


def test_constants_of_another_dtype_are_promoted():
    # Operands and constants of different dtypes meet in torch's promoted dtype.
    A, B, C, D = operands(CHAIN4_SHAPES)
    expr = einc.compile(CHAIN4, constants={1: B, 2: C})
    out = expr(A.float(), D.float())
    assert out.dtype == torch.float64
    assert_close(out, reference_einsum(CHAIN4, A.float(), B, C, D.float()))


def test_validate_with_constants():
    A, B, C, D = operands(CHAIN4_SHAPES)
    expr = einc.compile(CHAIN4, constants={1: B, 2: C})
    error = expr.validate(A, D)
    expected = float((expr(A, D) - reference_einsum(CHAIN4, A, B, C, D)).abs().max())
    assert error == pytest.approx(expected, rel=1e-6, abs=1e-15)
    assert error < 1e-9
    # float32 operands against float64 constants would not share a dtype; float32 all round works.
    expr32 = einc.compile(CHAIN4, constants={1: B.float(), 2: C.float()})
    assert expr32.validate(A.float(), D.float()) < 1e-2


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("equation, shapes, positions", [CONSTANT_CASES[0], CONSTANT_CASES[4], CONSTANT_CASES[7]],
                         ids=["chain-middle", "chain-all-but-last", "four-index-matrices"])
def test_gradients_reach_the_operands(equation, shapes, positions, backend):
    xs = operands(shapes)
    constants, rest = _split(xs, positions)
    expr = einc.compile(equation, constants=constants, backend=backend)
    ours = [t.clone().requires_grad_() for t in rest]
    theirs = [t.clone().requires_grad_() for t in rest]
    out = expr(*ours)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, ours, grad_out)
    full, it = [], iter(theirs)
    for i, t in enumerate(xs):
        full.append(t if i in positions else next(it))
    want = torch.autograd.grad(torch.einsum(equation, *full), theirs, grad_out)
    for g, w in zip(got, want):
        assert_close(g, w)


# --------------------------------------------- 7. why dp is einc's default


@pytest.mark.parametrize("n, seed", [(10, 0), (10, 1), (16, 0), (16, 1)], ids=lambda v: str(v))
def test_default_is_no_worse_than_opt_einsums_auto_on_long_chains(n, seed):
    equation, shapes = chain(n, seed)
    plan = einc.compile(equation).explain(*shapes)
    _, auto = oe_path(equation, shapes, "auto")
    assert plan.flops <= int(auto.opt_cost)
    _, info = oe_path(equation, shapes, plan.path)
    assert plan.flops == int(info.opt_cost)
    xs = operands(shapes)
    assert_close(einc.compile(equation, backend="eager")(*xs), reference_einsum(equation, *xs))


@settings(max_examples=examples(20))
@given(n=st.integers(2, 9), seed=st.integers(0, 10**6))
def test_default_plan_property(n, seed):
    """On random networks: opt_einsum's dp path and its costs, and the right result."""
    equation, shapes = rand_case(n, seed)
    expr = einc.Expression(equation, backend="eager")
    plan = expr.explain(*shapes)
    path, info = oe_path(equation, shapes, "dp")
    assert plan.path == path
    assert plan.flops == int(info.opt_cost) == sum(s.flops for s in plan.steps)
    assert plan.largest_intermediate == int(info.largest_intermediate)
    if n <= 7:  # no path is cheaper than the exhaustive search's
        assert plan.flops >= int(oe_path(equation, shapes, "optimal")[1].opt_cost)
    xs = operands(shapes)
    assert_close(expr(*xs), reference_einsum(equation, *xs))

