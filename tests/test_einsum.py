"""einsum equations: results against torch.einsum in float64, both spellings; optimize=
forms; explain() against opt_einsum; validate(); caching."""

from __future__ import annotations

import math

import opt_einsum as oe
import pytest
import torch

import einc
import einc.api
from conftest import assert_close, default_strategy, operands, reference_einsum, to_spaced

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

# (equation, operand shapes): one row per einsum feature.
CASES = [
    ("i,i->", [(5,), (5,)]),  # vector dot
    ("i,j->ij", [(3,), (4,)]),  # outer product
    ("ij,j->i", [(3, 4), (4,)]),  # matrix-vector
    ("i,ij->j", [(3,), (3, 4)]),  # vector-matrix
    ("ij,jk->ik", [(3, 4), (4, 5)]),  # matmul
    ("ij,jk->ki", [(3, 4), (4, 5)]),  # matmul, transposed output
    ("ij,kj->ik", [(3, 4), (5, 4)]),  # A @ B.T
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),  # batch matmul
    ("bij,jk->bik", [(2, 3, 4), (4, 5)]),  # batched times shared matrix
    ("ij->ji", [(3, 4)]),  # transpose
    ("ijk->kij", [(2, 3, 4)]),  # permutation
    ("ij->", [(3, 4)]),  # total sum
    ("ij->j", [(3, 4)]),  # column sums
    ("i->", [(4,)]),  # vector sum
    ("ii->i", [(4, 4)]),  # diagonal
    ("ii", [(4, 4)]),  # trace (implicit output)
    ("ii->", [(4, 4)]),  # trace (explicit)
    ("iij->j", [(3, 3, 4)]),  # partial trace
    ("iji->j", [(3, 4, 3)]),  # diagonal of non-adjacent dims
    ("iii->i", [(3, 3, 3)]),  # triple diagonal
    ("aab,bcc->ac", [(3, 3, 4), (4, 5, 5)]),  # diagonals in both operands
    ("ii,ij->j", [(3, 3), (3, 4)]),  # diagonal times matrix
    ("ij,ij->ij", [(3, 4), (3, 4)]),  # Hadamard product
    ("ij,ij->", [(3, 4), (3, 4)]),  # Frobenius inner product
    ("ij,ji->", [(3, 4), (4, 3)]),  # trace of a product
    ("ij,kl->ijkl", [(2, 3), (4, 5)]),  # tensor product
    ("ijk,jkl->il", [(2, 3, 4), (3, 4, 5)]),  # two contracted axes
    ("ijk,jkl,lm->im", [(2, 3, 4), (3, 4, 5), (5, 6)]),  # three operands
    ("ij,j,jk->ik", [(2, 3), (3,), (3, 4)]),  # diagonal scaling between matmuls
    ("a,a,a->a", [(4,), (4,), (4,)]),  # elementwise triple product
    ("i,i,i,i->", [(3,), (3,), (3,), (3,)]),  # four-way dot
    ("ab,bc,cd,de,ef->af", [(2, 3), (3, 4), (4, 5), (5, 6), (6, 2)]),  # 5-operand chain
    ("ab,bc,ca->", [(2, 3), (3, 4), (4, 2)]),  # ring (trace of a product of three)
    ("abc,cd,de->abe", [(2, 3, 4), (4, 5), (5, 6)]),  # MPS-like
    ("pqr,rs,sqt,tu->pu", [(2, 3, 4), (4, 2), (2, 3, 3), (3, 2)]),  # tensor network
    ("ea,fb,abcd,gc,hd->efgh", [(2, 3), (2, 3), (3, 3, 3, 3), (2, 3), (2, 3)]),  # 4-index transform
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),  # attention scores
    ("bhqk,bhkd->bhqd", [(2, 3, 4, 6), (2, 3, 6, 5)]),  # attention values
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output: matmul
    ("ba", [(3, 4)]),  # implicit output: alphabetical, so a transpose
    ("ij,jk,kl", [(2, 3), (3, 4), (4, 5)]),  # implicit output, chain
    ("a,B", [(2,), (3,)]),  # implicit output: upper case sorts first
    ("zA", [(2, 3)]),  # implicit output, mixed case transpose
    ("...a,B...", [(2, 3), (4, 2)]),  # implicit output with ellipsis first
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)]),  # broadcast size-1 batch dim, ranks 2 vs 1
    ("...ij,...jk->...ik", [(3, 4), (2, 4, 6)]),  # ellipsis rank 0 vs 1
    ("...ij,...jk->...ik", [(2, 3, 3, 4), (2, 3, 4, 6)]),  # same ellipsis rank 2
    ("...ij,...jk->ik", [(2, 1, 3, 4), (5, 4, 6)]),  # ellipsis summed when absent from output
    ("...ij,...jk", [(2, 1, 3, 4), (5, 4, 6)]),  # implicit output keeps the ellipsis first
    ("...i,...i->...", [(2, 1, 3), (4, 3)]),  # batched dot, broadcast
    ("...i,...i->i", [(2, 1, 3), (1, 4, 3)]),  # broadcast on both sides, summed
    ("i...,i...->...", [(3, 2), (3, 4, 1)]),  # ellipsis after the named axis
    ("a...c,a...c->a...", [(2, 3, 1, 4), (2, 5, 4)]),  # ellipsis in the middle
    ("...ii->...i", [(2, 3, 3)]),  # batched diagonal
    ("...ii,...i->...i", [(1, 3, 3), (4, 3)]),  # diagonal with a broadcast batch
    ("b...i,bi->b...", [(2, 3, 4, 5), (2, 5)]),  # ellipsis on one operand only
    ("...,...->...", [(2, 3), (3,)]),  # pure broadcasting multiply
    (",->", [(), ()]),  # two scalars
    ("i,->i", [(3,), ()]),  # vector times scalar
    (",i->", [(), (3,)]),  # scalar times summed vector
    ("->", [()]),  # scalar identity
    ("ij,jk->ik", [(0, 4), (4, 5)]),  # zero-size output rows
    ("ij,jk->ik", [(3, 0), (0, 5)]),  # zero-size contracted axis: zeros
    ("ab,bc->", [(0, 3), (3, 2)]),  # zero-size, fully reduced
    ("ii->i", [(0, 0)]),  # zero-size diagonal
    ("...ij,...jk->...ik", [(0, 3, 4), (1, 4, 6)]),  # zero-size ellipsis dim broadcast against 1
]


def _ids(cases):
    return [f"{eq or 'empty'}-{'_'.join('x'.join(map(str, s)) or 's' for s in shapes)}" for eq, shapes in cases]


@pytest.mark.parametrize("equation, shapes", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("spelling", ["compact", "spaced"])
def test_equation_matches_torch_einsum(equation, shapes, spelling):
    xs = operands(shapes)
    pattern = equation if spelling == "compact" else to_spaced(equation)
    expected = reference_einsum(equation, *xs)
    assert_close(einc.compile(pattern)(*xs), expected)
    if spelling == "spaced":
        # Forced spaced notation too (auto picks compact when no operand has two axes).
        assert_close(einc.compile(pattern, notation="spaced")(*xs), expected)


@pytest.mark.parametrize("equation, shapes", CASES[::4], ids=_ids(CASES[::4]))
def test_eager_backend_and_float32(equation, shapes):
    xs = operands(shapes, torch.float32)
    out = einc.compile(equation, backend="eager")(*xs)
    assert out.dtype == torch.float32
    assert_close(out, reference_einsum(equation, *xs), rtol=1e-5, atol=1e-5)


def test_spaced_multi_letter_names():
    q, k = operands([(2, 3, 4, 5), (2, 3, 6, 5)])
    out = einc.compile("batch head query dim, batch head key dim -> batch head query key")(q, k)
    assert_close(out, reference_einsum("bhqd,bhkd->bhqk", q, k))


def test_compact_notation_forced_on_single_names():
    # "ab" compact is two axes; spaced it is one axis named "ab".
    x = operands([(3, 4)])[0]
    assert_close(einc.compile("ab->ba", notation="compact")(x), x.T)
    y = operands([(3,)])[0]
    assert_close(einc.compile("ab -> ab", notation="spaced")(y), y)


def test_einsum_function():
    a, b = operands([(3, 4), (4, 5)])
    assert_close(einc.einsum("ij,jk->ik", a, b), reference_einsum("ij,jk->ik", a, b))
    assert_close(einc.einsum("i j, j k -> i k", a, b), reference_einsum("ij,jk->ik", a, b))
    x = operands([(2, 12)])[0]
    out = einc.einsum("b (h d) -> b h d", x, h=3)
    assert torch.equal(out, x.reshape(2, 3, 4))


# ----------------------------------------------------------------------- optimize=

CHAIN = "ab,bc,cd,de,ef->af"
CHAIN_SHAPES = [(2, 3), (3, 4), (4, 5), (5, 6), (6, 2)]
NETWORK = "pqr,rs,sqt,tu->pu"
NETWORK_SHAPES = [(2, 3, 4), (4, 2), (2, 3, 3), (3, 2)]


@pytest.mark.parametrize("strategy", ["auto", "greedy", "optimal", "dp", "branch-2", "branch-all"])
@pytest.mark.parametrize("equation, shapes", [(CHAIN, CHAIN_SHAPES), (NETWORK, NETWORK_SHAPES)], ids=["chain", "network"])
def test_optimize_strategy_names(strategy, equation, shapes):
    xs = operands(shapes)
    expr = einc.compile(equation, optimize=strategy)
    assert_close(expr(*xs), reference_einsum(equation, *xs))
    path, info = oe.contract_path(equation, *shapes, shapes=True, optimize=strategy)
    plan = expr.explain(*shapes)
    assert plan.path == [tuple(p) for p in path]
    assert plan.flops == int(info.opt_cost)
    assert plan.naive_flops == int(info.naive_cost)


@pytest.mark.parametrize("strategy", ["auto", "greedy", "optimal", "dp", "branch-2"])
@pytest.mark.parametrize(
    "equation, shapes",
    [
        (",a,af->", [(), (2,), (2, 0)]),  # every contraction costs 0 flops
        ("ab,bc,cd->ad", [(2, 0), (0, 3), (3, 4)]),  # empty contracted axis in a chain
        ("a,ab,bc->c", [(0,), (0, 3), (3, 2)]),  # empty axis summed away
    ],
    ids=["scalar-vector-empty", "chain-empty", "summed-empty"],
)
def test_optimize_strategies_with_zero_size_dims(strategy, equation, shapes):
    xs = operands(shapes)
    out = einc.compile(equation, optimize=strategy)(*xs)
    assert_close(out, reference_einsum(equation, *xs))


def test_optimize_path_optimizer_instance():
    xs = operands(NETWORK_SHAPES)
    expr = einc.compile(NETWORK, optimize=oe.paths.DynamicProgramming())
    assert_close(expr(*xs), reference_einsum(NETWORK, *xs))
    path, info = oe.contract_path(NETWORK, *NETWORK_SHAPES, shapes=True, optimize=oe.paths.DynamicProgramming())
    plan = expr.explain(*NETWORK_SHAPES)
    assert plan.path == [tuple(p) for p in path]
    assert plan.flops == int(info.opt_cost)


# (equation, shapes, explicit path in opt_einsum's linear format)
EXPLICIT_PATHS = [
    (CHAIN, CHAIN_SHAPES, [(0, 1), (0, 1), (0, 1), (0, 1)]),  # left to right
    (CHAIN, CHAIN_SHAPES, [(3, 4), (1, 2), (0, 2), (0, 1)]),  # from both ends
    (CHAIN, CHAIN_SHAPES, [(0, 1, 2), (0, 1, 2)]),  # two 3-operand steps
    (CHAIN, CHAIN_SHAPES, [(0, 1, 2, 3, 4)]),  # everything in one step
    ("ijk,jkl,lm->im", [(2, 3, 4), (3, 4, 5), (5, 6)], [(0, 1, 2)]),  # one 3-operand step
    ("ab,bc,ca->", [(2, 3), (3, 4), (4, 2)], [(0, 2), (0, 1)]),  # ring, non-adjacent first
    ("i,i,i,i->", [(3,), (3,), (3,), (3,)], [(1, 3), (0, 2), (0, 1)]),  # pairs
    ("ij,kl->ijkl", [(2, 3), (4, 5)], [(1, 0)]),  # indices given in descending order
]


@pytest.mark.parametrize(
    "equation, shapes, path", EXPLICIT_PATHS, ids=[f"{e}-{p}" for e, _, p in EXPLICIT_PATHS]
)
def test_optimize_explicit_path(equation, shapes, path):
    xs = operands(shapes)
    for backend in ("torchscript", "eager"):
        expr = einc.compile(equation, optimize=path, backend=backend)
        assert_close(expr(*xs), reference_einsum(equation, *xs))
        plan = expr.explain(*shapes)
        assert plan.path == [tuple(p) for p in path]
    _, info = oe.contract_path(equation, *shapes, shapes=True, optimize=path)
    assert plan.flops == int(info.opt_cost)


def test_optimize_explicit_path_as_tuple_of_lists():
    xs = operands(CHAIN_SHAPES)
    expr = einc.compile(CHAIN, optimize=([3, 4], [2, 3], [0, 1], [0, 1]))
    assert_close(expr(*xs), reference_einsum(CHAIN, *xs))
    assert expr.explain(*CHAIN_SHAPES).path == [(3, 4), (2, 3), (0, 1), (0, 1)]


# -------------------------------------------------------------------- explain()

# Equations without repeated axes: einc's contraction equals opt_einsum's on the
# same equation, so its cost numbers must be opt_einsum's.
EXPLAIN_CASES = [
    ("ij,jk->ik", [(8, 16), (16, 4)]),  # one matmul
    ("ab,bc,cd->ad", [(8, 64), (64, 8), (8, 64)]),  # chain where order matters
    (CHAIN, CHAIN_SHAPES),  # 5 operands
    (NETWORK, NETWORK_SHAPES),  # tensor network
    ("bhqd,bhkd->bhqk", [(2, 4, 8, 16), (2, 4, 8, 16)]),  # attention (bmm)
    ("ij,kl->ijkl", [(2, 3), (4, 5)]),  # outer product (mul)
    ("ijk->", [(2, 3, 4)]),  # single operand reduction
    ("ea,fb,abcd,gc,hd->efgh", [(4, 3), (4, 3), (3, 3, 3, 3), (4, 3), (4, 3)]),  # 4-index transform
]


@pytest.mark.parametrize("equation, shapes", EXPLAIN_CASES, ids=_ids(EXPLAIN_CASES))
def test_explain_matches_opt_einsum(equation, shapes):
    expr = einc.compile(equation)
    plan = expr.explain(*shapes)
    # einc's default strategy, in opt_einsum's terms (README).
    path, info = oe.contract_path(equation, *shapes, shapes=True, optimize=default_strategy(len(shapes)))
    assert isinstance(plan, einc.Plan)
    assert plan.path == [tuple(p) for p in path]
    assert plan.flops == int(info.opt_cost)
    assert plan.naive_flops == int(info.naive_cost)
    assert plan.largest_intermediate == int(info.largest_intermediate)
    assert plan.speedup == pytest.approx(int(info.naive_cost) / int(info.opt_cost))
    assert plan.shapes == tuple(tuple(s) for s in shapes)
    assert plan.output_shape == tuple(reference_einsum(equation, *operands(shapes)).shape)
    # One PlanStep per contraction, in path order, with opt_einsum's per-step costs.
    assert len(plan.steps) == len(path)
    assert sum(step.flops for step in plan.steps) == plan.flops
    for step, operand_positions, contraction in zip(plan.steps, path, info.contraction_list):
        assert isinstance(step, einc.PlanStep)
        assert step.operands == tuple(operand_positions)
        assert step.kernel in {"mm", "bmm", "matmul", "mul", "sum", "none"}
        ins, out = step.equation.split("->")
        assert len(ins.split(",")) == len(step.shapes) == len(operand_positions)
        assert len(out) == len(step.output_shape)
        for axes, shape in zip(ins.split(","), step.shapes):
            assert len(axes) == len(shape)
        # Same operands and result axes as opt_einsum's step (axis order may differ).
        oe_ins, oe_out = contraction[2].split("->")
        assert sorted(map(sorted, ins.split(","))) == sorted(map(sorted, oe_ins.split(",")))
        assert sorted(out) == sorted(oe_out)
    # The final step produces the output's axes (possibly in another order).
    assert sorted(plan.steps[-1].output_shape) == sorted(plan.output_shape)
    assert math.prod(plan.steps[-1].output_shape) == math.prod(plan.output_shape)
    assert "def einc_fn(" in plan.source
    text = str(plan)
    assert str(plan.path) in text and "def einc_fn(" in text and equation in text


def test_explain_step_equations_and_kernels():
    plan = einc.compile("ab,bc,cd->ad").explain((8, 64), (64, 8), (8, 64))
    assert plan.path == [(0, 1), (0, 1)]
    # After step 0 the live operands are [cd, ac] (opt_einsum appends results); the last
    # product takes them as (ac, cd) so that it lands in the output's order.
    assert [s.equation for s in plan.steps] == ["ab,bc->ac", "ac,cd->ad"]
    assert [s.shapes for s in plan.steps] == [((8, 64), (64, 8)), ((8, 8), (8, 64))]
    assert [s.output_shape for s in plan.steps] == [(8, 8), (8, 64)]
    assert [s.kernel for s in plan.steps] == ["mm", "mm"]
    assert einc.compile("bij,bjk->bik").explain((2, 3, 4), (2, 4, 5)).steps[0].kernel in ("bmm", "matmul")
    assert einc.compile("i,j->ij").explain((3,), (4,)).steps[0].kernel == "mul"


def test_explain_spaced_step_equation_uses_axis_names():
    plan = einc.compile("batch i j, batch j k -> batch i k").explain((2, 3, 4), (2, 4, 5))
    assert plan.steps[0].equation == "batch i j, batch j k -> batch i k"


def test_explain_accepts_tensors_or_shapes():
    xs = operands(CHAIN_SHAPES)
    expr = einc.compile(CHAIN)
    by_tensor, by_shape = expr.explain(*xs), expr.explain(*CHAIN_SHAPES)
    assert by_tensor.path == by_shape.path and by_tensor.source == by_shape.source
    assert expr.explain(torch.Size([2, 3]), [3, 4], (4, 5), (5, 6), (6, 2)).path == by_shape.path


def test_explain_source_is_what_runs():
    # The generated source, executed independently, gives torch.einsum's result.
    xs = operands(NETWORK_SHAPES)
    plan = einc.compile(NETWORK).explain(*xs)
    namespace = {"torch": torch, "List": list}
    exec(plan.source, namespace)  # noqa: S102 - the generated code under test
    assert_close(namespace["einc_fn"](*xs), reference_einsum(NETWORK, *xs))


# ------------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    "pattern, shapes, sizes",
    [
        ("ij,jk->ik", [(3, 4), (4, 5)], {}),  # matmul
        ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)], {}),  # broadcast ellipsis
        ("ii->i", [(4, 4)], {}),  # diagonal
        ("b (h d) -> b h d", [(2, 12)], {"h": 3}),  # split
        ("h w -> h w c", [(3, 4)], {"c": 2}),  # repeat (new axis)
        ("b q (h d), b k (h d) -> b h q k", [(2, 3, 8), (2, 5, 8)], {"h": 2}),  # split + contract
    ],
    ids=["matmul", "ellipsis", "diagonal", "split", "repeat", "split-contract"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_validate_passes_on_correct_results(pattern, shapes, sizes, dtype):
    err = einc.compile(pattern, **sizes).validate(*operands(shapes, dtype))
    assert isinstance(err, float)
    assert 0.0 <= err < (1e-12 if dtype == torch.float64 else 1e-5)


def test_validate_raises_on_zero_tolerance_with_rounding():
    # A float32 product of 64-long dot products is not exactly the float64 one.
    a, b = operands([(16, 64), (64, 16)], torch.float32)
    expr = einc.compile("ij,jk->ik")
    assert expr.validate(a, b) > 0.0
    with pytest.raises(einc.EincError, match="differs from the float64 reference"):
        expr.validate(a, b, rtol=0, atol=0)


def test_validate_raises_when_the_compiled_function_is_wrong():
    a, b = operands([(3, 4), (4, 5)])
    expr = einc.Expression("ij,jk->ik")
    for _ in range(einc.api.GENERIC_CALLS + 1):  # the signature's own code from now on
        expr(a, b)
    entry = expr._entry((a, b))
    right = entry.fn
    entry.fn = lambda x, y: right(x, y) + 1e-6
    with pytest.raises(einc.EincError, match="differs"):
        expr.validate(a, b)
    entry.fn = lambda x, y: right(x, y).T.contiguous()
    with pytest.raises(einc.EincError, match="shape"):
        expr.validate(a, b)
    entry.fn = lambda x, y: right(x, y) * float("nan")
    with pytest.raises(einc.EincError):
        expr.validate(a, b)


def test_validate_agrees_on_inf_and_nan():
    a = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64)
    b = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    assert einc.compile("i,i->i").validate(a, b) == 0.0


# ---------------------------------------------------------------------- caching


@pytest.fixture
def plan_calls(monkeypatch):
    """Counts calls of the planner behind einc.api."""
    calls = []
    real = einc.api.plan

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(einc.api, "plan", counting)
    return calls


def test_same_shapes_plan_once(plan_calls):
    expr = einc.Expression("ij,jk->ik")
    a, b = operands([(3, 4), (4, 5)])
    for _ in range(einc.api.GENERIC_CALLS + 2):  # shared generic code, then the signature's own
        expr(a, b)
    expr(a.clone(), b.clone())
    expr.explain(a, b)
    assert len(plan_calls) == 1
    info = expr._lookup.cache_info()
    assert (info.hits, info.misses) == (einc.api.GENERIC_CALLS + 2, 1)
    expr(a.float(), b.float())  # a new dtype, same shapes: no new plan
    assert len(plan_calls) == 1
    assert_close(expr(a.float(), b.float()), reference_einsum("ij,jk->ik", a, b), rtol=1e-5, atol=1e-5)


@pytest.fixture
def compilations(monkeypatch):
    """Counts the eager backend's compilations of generated source."""
    calls = []
    real = einc.backends.BACKENDS["eager"]

    def counting(code):
        calls.append(code.source)
        return real(code)

    monkeypatch.setitem(einc.backends.BACKENDS, "eager", counting)
    einc.backends._compiled.clear()  # the process-wide cache of compiled sources
    return calls


@pytest.mark.parametrize("both_codes", ["shared"], indirect=True)  # about the shared code
def test_a_new_shape_of_two_operands_neither_plans_nor_compiles(plan_calls, compilations):
    # Issue 11.2: one level of two operands has one path whatever the sizes, so new
    # shapes run the shared shape-generic code at once.
    expr = einc.Expression("b i j, b j k -> b i k", backend="eager")
    for n in range(1, 30):
        a, b = operands([(2, n, 3), (2, 3, n + 1)])
        assert_close(expr(a, b), reference_einsum("bij,bjk->bik", a, b))
    # The first shape's own code; generic code planned for the second, shared by the rest.
    assert len(plan_calls) == 2 and len(compilations) == 2
    a, b = operands([(2, 4, 3), (2, 3, 6)])
    for _ in range(einc.api.GENERIC_CALLS + 1):  # a recurring shape gets code of its own
        assert_close(expr(a, b), reference_einsum("bij,bjk->bik", a, b))
    # Planned; its literal source (one matmul, no sizes in it) is the first shape's: compiled once.
    assert len(plan_calls) == 3 and len(compilations) == 2


@pytest.mark.parametrize("both_codes", ["shared"], indirect=True)  # about the shared code
def test_a_new_shape_with_the_same_plan_shares_compiled_code(plan_calls, compilations):
    # Three operands: a new shape is planned again; where the plan is the same, so is
    # the generic source, compiled once (and shared with other spellings of the pattern).
    first = einc.Expression("ab,bc,cd->ad", backend="eager")
    other = einc.Expression("pq,qr,rs->ps", backend="eager")
    for n in range(2, 12):
        xs = operands([(n, 3), (3, 4), (4, 2)])
        assert_close(first(*xs), reference_einsum("ab,bc,cd->ad", *xs))
        assert_close(other(*xs), reference_einsum("ab,bc,cd->ad", *xs))
    # Each expression's first shape compiles its own (literal, shared by the spellings)
    # code; every later one is planned and runs the one shared generic code.
    assert len(plan_calls) == 20 and len(compilations) == 2
    xs = operands([(2, 64), (64, 64), (64, 64)])  # a different path: different code
    assert_close(first(*xs), reference_einsum("ab,bc,cd->ad", *xs))
    assert len(compilations) == 3


def test_wrong_shapes_on_shared_code_get_the_planners_message():
    expr = einc.Expression("ij,jk->ik", backend="eager")
    expr(*operands([(2, 3), (3, 4)]))
    with pytest.raises(einc.EincError, match=r"with shapes 2x3, 4x5: axis 'j' has size 4 in operand 1"):
        expr(*operands([(2, 3), (4, 5)]))
    with pytest.raises(einc.EincError, match="cannot take max over"):
        maxed = einc.Expression("max(b c -> b)")
        maxed(torch.zeros(2, 3))
        maxed(torch.zeros(3, 0))


def test_caches_are_bounded(plan_calls):
    expr = einc.Expression("i,i,i->", cache_size=2)
    for n in (1, 2, 3, 1):
        x = operands([(n,)])[0]
        assert_close(expr(x, x, x), reference_einsum("i,i,i->", x, x, x))
    # (1,) was evicted by (3,) with room for two signatures: planned again.
    assert len(plan_calls) == 4
    assert einc.Expression("i->i")._lookup.cache_info().maxsize is not None


def test_einsum_function_reuses_the_compiled_expression(plan_calls):
    a, b = operands([(7, 11), (11, 13)])
    first = einc.einsum("xq,qz->zx", a, b)
    second = einc.einsum("xq,qz->zx", a, b)
    assert len(plan_calls) == 1
    assert_close(first, reference_einsum("xq,qz->zx", a, b))
    assert torch.equal(first, second)


def test_compile_returns_the_cached_expression():
    assert einc.compile("ij,jk->ik") is einc.compile("ij,jk->ik")
    assert einc.compile("b (h d) -> b h d", h=2) is einc.compile("b (h d) -> b h d", h=2)
    assert einc.compile("ij,jk->ik", backend="eager") is einc.compile("ij,jk->ik", backend="eager")
    assert einc.compile(CHAIN, optimize=[(0, 1)] * 4) is einc.compile(CHAIN, optimize=[(0, 1)] * 4)
    # Different options are different expressions.
    assert einc.compile("ij,jk->ik", backend="eager") is not einc.compile("ij,jk->ik")
    assert einc.compile("b (h d) -> b h d", h=2) is not einc.compile("b (h d) -> b h d", h=4)
    assert isinstance(einc.compile("ij,jk->ik"), einc.Expression)


def test_compile_cache_keeps_size_types():
    # 2.0 == 2 and True == 1 as cache keys, but they are different keyword sizes: an
    # invalid size must not reuse (nor poison) the expression of a valid one.
    x = operands([(2, 3)])[0]
    assert einc.compile("h w -> h w cache_c", cache_c=2)(x).shape == (2, 3, 2)
    with pytest.raises(einc.EincError, match="non-negative int"):
        einc.compile("h w -> h w cache_c", cache_c=2.0)
    with pytest.raises(einc.EincError, match="non-negative int"):
        einc.compile("h w -> h w cache_c", cache_c=True)
    # The other order: an invalid size first, then the valid one.
    with pytest.raises(einc.EincError, match="non-negative int"):
        einc.compile("h w -> h w cache_d", cache_d=1.0)
    out = einc.compile("h w -> h w cache_d", cache_d=1)(x)
    assert torch.equal(out, x[..., None])
