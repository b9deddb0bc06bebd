"""Reductions, semirings and normalizers: ``op(contraction)`` (SPEC "Reductions and
semirings", "Normalizers").

Every expectation is computed independently of einc, in float64: ``einops.reduce`` for
one-operand reductions (``torch.logsumexp`` as its reducer for logsumexp), a naive
broadcast-and-reduce for the semirings (``torch.logsumexp(a[:, :, None] + b[None], 1)``
and friends), ``torch.einsum`` for sum/mean, ``torch.softmax``/``torch.log_softmax``
over flattened axes for the normalizers.  einc is never compared with einc.
"""

from __future__ import annotations

import math

import einops
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einc

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

F64 = torch.float64
F32 = torch.float32
INF = float("inf")

REDUCERS = ("sum", "mean", "max", "min", "prod", "logsumexp")
SEMIRINGS = ("sum", "mean", "logsumexp", "max", "min")  # the reducers that take several operands
NORMALIZERS = ("softmax", "log_softmax")


# ------------------------------------------------------------------------ helpers


def compile_(pattern: str, backend: str = "eager", **sizes: int) -> einc.Expression:
    return einc.compile(pattern, backend=backend, **sizes)


def rand(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Deterministic normal data, drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def operands(shapes, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    return [rand(*s, seed=seed + 101 * i, scale=scale, dtype=dtype) for i, s in enumerate(shapes)]


def _lse(t: torch.Tensor, dims) -> torch.Tensor:
    dims = tuple(dims)
    return torch.logsumexp(t, dims) if dims else t


def einops_reducer(op: str):
    """einops.reduce's reduction for ``op``; logsumexp (which einops lacks) as a callable."""
    if op == "logsumexp":
        return lambda t, axes: _lse(t, axes)
    return op


def _split(body: str):
    lhs, rhs = body.split("->")
    return [s.split() for s in lhs.split(",")], rhs.split()


def naive(op: str, body: str, *tensors: torch.Tensor) -> torch.Tensor:
    """The semiring contraction, naively, in float64.

    ``body`` is a spaced pattern of plain axis names and ``...`` (no composition, no
    repeated axis).  Every operand is broadcast over all axes; they combine by product
    (sum, mean) or by addition (logsumexp, max, min); the axes missing from the output
    are reduced with ``op``; the rest are permuted into the output's order.
    """
    ins, out = _split(body)
    tensors = [t.to(F64) for t in tensors]
    ell = max((t.dim() - len(ax) + 1 for ax, t in zip(ins, tensors) if "..." in ax), default=0)
    ell_names = [f"...{i}" for i in range(ell)]

    def unfold(ax, rank):
        if "..." not in ax:
            return list(ax)
        p = ax.index("...")
        r = rank - len(ax) + 1 if rank is not None else ell
        return list(ax[:p]) + ell_names[ell - r:] + list(ax[p + 1:])

    ins = [unfold(ax, t.dim()) for ax, t in zip(ins, tensors)]
    out = unfold(out, None)
    names = list(dict.fromkeys(n for ax in ins for n in ax))
    views = []
    for ax, t in zip(ins, tensors):
        assert len(set(ax)) == len(ax) and len(ax) == t.dim(), (ax, t.shape)
        size = dict(zip(ax, t.shape))
        order = sorted(range(len(ax)), key=lambda d: names.index(ax[d]))
        views.append(t.permute(order).reshape([size.get(n, 1) for n in names]))
    total = views[0]
    for v in views[1:]:
        total = total * v if op in ("sum", "mean", "prod") else total + v
    dims = [i for i, n in enumerate(names) if n not in out]
    if op in ("sum", "mean"):
        result = total.sum(dims) if dims else total
        if op == "mean":
            result = result / math.prod(total.shape[d] for d in dims)
    elif op == "logsumexp":
        result = _lse(total, dims)
    elif op in ("max", "min"):
        result = (total.amax if op == "max" else total.amin)(dims) if dims else total
    elif op == "prod":
        result = total
        for d in sorted(dims, reverse=True):
            result = result.prod(d)
    else:
        raise AssertionError(op)
    kept = [n for n in names if n in out]
    return result.permute([kept.index(n) for n in out])


def reference(op: str, body: str, *tensors: torch.Tensor, **sizes: int) -> torch.Tensor:
    """One operand: einops.reduce (composition allowed). Several: :func:`naive`."""
    if len(tensors) == 1:
        return einops.reduce(tensors[0].to(F64), body, einops_reducer(op), **sizes)
    return naive(op, body, *tensors)


def magnitude(op: str, body: str, *tensors: torch.Tensor, **sizes: int) -> torch.Tensor:
    """A per-element bound on the magnitude of the terms (for tolerances).

    sum/mean: the same contraction of absolute values; the others: the largest
    ``|x1| + |x2| + ...`` over the reduced axes.
    """
    absolute = [t.to(F64).abs() for t in tensors]
    if op in ("sum", "mean", "prod"):
        return reference(op, body, *absolute, **sizes).abs()
    return reference("max", body, *absolute, **sizes)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, *, bound=None, tol: float = 1e-9, dtype=None):
    """``out`` equals the float64 ``ref``: same shape and dtype, identical inf/NaN, and
    ``|out - ref| <= tol * (bound + |ref|) + tol`` elsewhere."""
    assert isinstance(out, torch.Tensor)
    if dtype is not None:
        assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    out = out.detach().to(F64)
    ref = ref.detach().to(F64)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"NaN mismatch:\n{out}\nvs reference\n{ref}"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf) and torch.equal(out[inf], ref[inf]), (
        f"inf mismatch:\n{out}\nvs reference\n{ref}"
    )
    finite = torch.isfinite(ref)
    scale = ref.abs() if bound is None else bound.to(F64).abs() + ref.abs()
    err = (out - ref).abs()[finite]
    allowed = (tol * scale + tol)[finite]
    if err.numel():
        worst = int((err - allowed).argmax())
        assert bool((err <= allowed).all()), (
            f"max error {float(err.max()):.3g}; at worst element error {float(err[worst]):.3g} > "
            f"allowed {float(allowed[worst]):.3g}\nout:\n{out}\nreference:\n{ref}"
        )


def normalize(x: torch.Tensor, dims, log: bool) -> torch.Tensor:
    """softmax / log_softmax over ``dims`` jointly: move them last, flatten, normalize, restore."""
    dims = [d % x.dim() for d in dims]
    rest = [d for d in range(x.dim()) if d not in dims]
    perm = rest + dims
    y = x.permute(perm)
    shape = y.shape
    y = y.reshape(*shape[: len(rest)], -1)
    y = (torch.log_softmax if log else torch.softmax)(y, -1).reshape(shape)
    inverse = [perm.index(d) for d in range(x.dim())]
    return y.permute(inverse)


# Tolerances (relative to the term magnitudes) per input dtype.
TOL = {F64: 1e-9, F32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ------------------------------------------------- one operand: as einops.reduce

# (body, input shape, sizes); every reducer is run on every row.
ONE_OPERAND = [
    pytest.param("b c h w -> b c", (2, 3, 4, 5), {}, id="global-pool"),  # reduce trailing spatial axes
    pytest.param("b c h w -> b c 1 1", (2, 3, 4, 5), {}, id="keepdims"),  # unit axes in the output
    pytest.param("b (h d) -> b h", (3, 12), {"h": 4}, id="split-compose"),  # reduce the inner part of a group
    pytest.param("(b1 b2) c -> b1", (6, 5), {"b1": 2}, id="split-two-reduced"),  # reduce b2 and c
    pytest.param("b h q k -> b h q", (2, 3, 4, 5), {}, id="attention-rows"),  # last axis only
    pytest.param("b n -> b", (4, 7), {}, id="batched"),  # README: batched reduction
    pytest.param("a b ->", (3, 4), {}, id="to-scalar"),  # everything reduced
    pytest.param("a b c -> c a", (2, 3, 4), {}, id="reduce-middle-permute"),  # reduce b, then transpose
    pytest.param("b c h w -> (b c)", (2, 3, 4, 2), {}, id="merge-output"),  # composition in the output
    pytest.param("b c -> b c", (3, 4), {}, id="nothing-reduced"),  # op over no axes is the identity
    pytest.param("... c -> ...", (2, 3, 4), {}, id="ellipsis"),  # ellipsis kept, last axis reduced
    pytest.param("b s c -> s", (2, 1, 3), {}, id="size-one-axis"),  # a kept axis of size 1
]


@pytest.mark.parametrize("op", REDUCERS)
@pytest.mark.parametrize("body, shape, sizes", ONE_OPERAND)
def test_one_operand_matches_einops_reduce(op, body, shape, sizes):
    x = rand(*shape, seed=1)
    out = compile_(f"{op}({body})", **sizes)(x)
    assert_matches(out, reference(op, body, x, **sizes), dtype=F64)


@pytest.mark.parametrize(
    "pattern, dims",
    [
        pytest.param("logsumexp(b h q k -> b h q)", (3,), id="spec-example"),  # the SPEC's example
        pytest.param("logsumexp(b c h w -> b)", (1, 2, 3), id="three-axes"),  # several axes jointly
        pytest.param("logsumexp(b c h w -> c)", (0, 2, 3), id="non-adjacent"),  # leading and trailing axes
    ],
)
def test_one_operand_logsumexp_matches_torch(pattern, dims):
    x = rand(2, 3, 4, 5, seed=2, scale=3.0)
    out = compile_(pattern)(x)
    assert_matches(out, torch.logsumexp(x, dims), dtype=F64)


@pytest.mark.parametrize("op", REDUCERS)
def test_one_operand_compact_notation(op):
    # Compact spelling of the same reduction.
    x = rand(3, 4, 5, seed=3)
    out = compile_(f"{op}(abc->ac)")(x)
    assert_matches(out, reference(op, "a b c -> a c", x), dtype=F64)


def test_prod_several_operands_is_a_compile_error():
    with pytest.raises(einc.EincError):
        einc.compile("prod(a b, b c -> a c)", backend="eager")
    with pytest.raises(ValueError):  # EincError is a ValueError
        einc.compile("prod(i, i -> i)")


# --------------------------------------------- several operands: the semirings

# (body, operand shapes); every semiring is run on every row, against the naive
# broadcast reference (product + sum for sum/mean, addition + op for the others).
SEVERAL = [
    pytest.param("i k, k j -> i j", [(3, 4), (4, 5)], id="matmul"),  # the two-operand chain
    pytest.param("i k, k j -> j i", [(3, 4), (4, 5)], id="matmul-transposed"),  # output order differs
    pytest.param("b i k, b k j -> b i j", [(2, 3, 4), (2, 4, 5)], id="batched"),  # batch axis kept
    pytest.param("b i k, b k j -> i j", [(2, 3, 4), (2, 4, 5)], id="batch-reduced"),  # batch reduced too
    pytest.param("a b, b c, c d -> a d", [(3, 4), (4, 5), (5, 2)], id="chain3-hmm"),  # HMM forward
    pytest.param("a b, b c, c d, d e -> a e", [(2, 3), (3, 4), (4, 3), (3, 2)], id="chain4"),  # 4 operands
    pytest.param("i k, j -> i j", [(3, 4), (5,)], id="kept-from-one"),  # j only in B, k only in A
    pytest.param("i, j -> i j", [(3,), (4,)], id="outer"),  # nothing reduced: a + b / a * b
    pytest.param("i k, k j ->", [(3, 4), (4, 5)], id="to-scalar"),  # every axis reduced
    pytest.param("i j, j k, k i -> i", [(3, 4), (4, 5), (5, 3)], id="cycle"),  # i in two operands, kept
    pytest.param("b t s, s u, b t u -> b", [(2, 3, 4), (4, 5), (2, 3, 5)], id="three-mixed"),  # mixed axes
    pytest.param("... i k, ... k j -> ... i j", [(2, 3, 3, 4), (2, 3, 4, 5)], id="ellipsis"),  # ellipsis batch
    pytest.param("... i k, ... k j -> ... i j", [(2, 1, 3, 4), (3, 4, 5)], id="ellipsis-broadcast"),  # broadcast
    pytest.param("x i k, k j -> i x j", [(1, 3, 4), (4, 5)], id="size-one"),  # size-1 axis kept
]


@pytest.mark.parametrize("op", SEMIRINGS)
@pytest.mark.parametrize("body, shapes", SEVERAL)
def test_several_operands_match_naive_semiring(op, body, shapes):
    xs = operands(shapes, seed=4, scale=2.0)
    out = compile_(f"{op}({body})")(*xs)
    assert_matches(out, naive(op, body, *xs), dtype=F64)


def test_log_semiring_spec_examples():
    # The SPEC's formulas, spelled out with torch: log(exp(A) @ exp(B)) and its naive broadcast.
    a, b = rand(3, 4, seed=5), rand(4, 5, seed=6)
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)
    assert_matches(out, torch.log(torch.exp(a) @ torch.exp(b)), dtype=F64)
    assert_matches(out, torch.logsumexp(a[:, :, None] + b[None, :, :], dim=1), dtype=F64)
    # batched
    a, b = rand(2, 3, 4, seed=7), rand(2, 4, 5, seed=8)
    out = compile_("logsumexp(b i k, b k j -> b i j)")(a, b)
    assert_matches(out, torch.logsumexp(a[:, :, :, None] + b[:, None, :, :], dim=2), dtype=F64)
    # HMM-like chain
    a, b, c = rand(2, 3, seed=9), rand(3, 4, seed=10), rand(4, 5, seed=11)
    out = compile_("logsumexp(a b, b c, c d -> a d)")(a, b, c)
    expected = torch.logsumexp(a[:, :, None, None] + b[None, :, :, None] + c[None, None, :, :], dim=(1, 2))
    assert_matches(out, expected, dtype=F64)


@pytest.mark.parametrize("op, reduce", [("max", torch.amax), ("min", torch.amin)])
def test_tropical_spec_examples(op, reduce):
    # max-plus / min-plus (Viterbi): combine by +, reduce by max / min.
    a, b = rand(3, 4, seed=12), rand(4, 5, seed=13)
    out = compile_(f"{op}(i k, k j -> i j)")(a, b)
    assert_matches(out, reduce(a[:, :, None] + b[None], 1), dtype=F64)


def test_sum_and_mean_several_operands_match_torch_einsum():
    a, b, c = rand(2, 3, 4, seed=14), rand(2, 4, 5, seed=15), rand(5, 6, seed=16)
    out = compile_("sum(b i k, b k j, j l -> b i l)")(a, b, c)
    assert_matches(out, torch.einsum("bik,bkj,jl->bil", a, b, c), dtype=F64)
    out = compile_("mean(b i k, b k j, j l -> b i l)")(a, b, c)
    # count of reduced elements: k * j
    assert_matches(out, torch.einsum("bik,bkj,jl->bil", a, b, c) / (4 * 5), dtype=F64)
    out = compile_("mean(b i k, b k j -> i)")(a, b)
    assert_matches(out, torch.einsum("bik,bkj->i", a, b) / (2 * 4 * 5), dtype=F64)


@pytest.mark.parametrize("op", SEMIRINGS)
def test_several_operands_with_composition(op):
    # (h d) split in both operands, d reduced: the same as the reshaped contraction.
    a, b = rand(2, 6, seed=17), rand(2, 6, seed=18)
    out = compile_(f"{op}(b (h d), b (h d) -> b h)", h=2)(a, b)
    expected = naive(op, "b h d, b h d -> b h", a.reshape(2, 2, 3), b.reshape(2, 2, 3))
    assert_matches(out, expected, dtype=F64)


@pytest.mark.parametrize("op", SEMIRINGS)
def test_several_operands_compact_notation(op):
    a, b = rand(3, 4, seed=19), rand(4, 5, seed=20)
    out = compile_(f"{op}(ik,kj->ij)")(a, b)
    assert_matches(out, naive(op, "i k, k j -> i j", a, b), dtype=F64)


@pytest.mark.parametrize(
    "optimize",
    [
        pytest.param("greedy", id="greedy"),
        pytest.param("optimal", id="optimal"),
        pytest.param("dp", id="dp"),
        pytest.param([(0, 1), (0, 1), (0, 1)], id="left-to-right"),  # ((AB)C)D
        pytest.param([(2, 3), (1, 2), (0, 1)], id="right-to-left"),  # A(B(CD))
        pytest.param([(1, 2), (0, 2), (0, 1)], id="middle-first"),  # (A(BC))D
    ],
)
@pytest.mark.parametrize("op", ["logsumexp", "max", "min", "mean"])
def test_semiring_result_independent_of_path(op, optimize):
    # The semirings follow the same path machinery as sum; every path gives the same value.
    body = "a b, b c, c d, d e -> a e"
    xs = operands([(2, 3), (3, 4), (4, 3), (3, 2)], seed=21)
    out = einc.compile(f"{op}({body})", backend="eager", optimize=optimize)(*xs)
    assert_matches(out, naive(op, body, *xs), dtype=F64)


# ------------------------------------------------- hypothesis: random patterns

POOL = "abcde"


@st.composite
def reduction_case(draw, op: str, normalizer: bool = False):
    sizes = {n: draw(st.integers(1, 4)) for n in POOL}
    n_ops = 1 if op == "prod" else draw(st.integers(1, 3))
    inputs = [draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True)) for _ in range(n_ops)]
    union = list(dict.fromkeys(a for ax in inputs for a in ax))
    order = draw(st.permutations(union))
    out = order[: draw(st.integers(1 if normalizer else 0, len(union)))]
    bracketed = []
    if normalizer:
        bracketed = draw(st.lists(st.sampled_from(out), min_size=1, max_size=len(out), unique=True))
    seed = draw(st.integers(0, 2**16))
    return sizes, inputs, out, bracketed, seed


HYPOTHESIS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("op", REDUCERS)
@HYPOTHESIS
@given(data=st.data())
def test_random_patterns_per_reducer(op, data):
    sizes, inputs, out, _, seed = data.draw(reduction_case(op))
    body = ", ".join(" ".join(ax) for ax in inputs) + " -> " + " ".join(out)
    xs = [rand(*(sizes[a] for a in ax), seed=seed + i) for i, ax in enumerate(inputs)]
    f = einc.compile(f"{op}({body})", backend="eager", notation="spaced")
    assert_matches(f(*xs), reference(op, body, *xs), dtype=F64)


@pytest.mark.parametrize("op", NORMALIZERS)
@HYPOTHESIS
@given(data=st.data())
def test_random_patterns_per_normalizer(op, data):
    sizes, inputs, out, bracketed, seed = data.draw(reduction_case(op, normalizer=True))
    body = ", ".join(" ".join(ax) for ax in inputs) + " -> "
    body += " ".join(f"[{a}]" if a in bracketed else a for a in out)
    xs = [rand(*(sizes[a] for a in ax), seed=seed + i) for i, ax in enumerate(inputs)]
    f = einc.compile(f"{op}({body})", backend="eager", notation="spaced")
    inner = naive("sum", ", ".join(" ".join(ax) for ax in inputs) + " -> " + " ".join(out), *xs)
    expected = normalize(inner, [out.index(a) for a in bracketed], log=op == "log_softmax")
    assert_matches(f(*xs), expected, dtype=F64)


# ------------------------------------------------------------------- stability

SCALES = [pytest.param(s, id=f"x{s:g}") for s in (1.0, 50.0, 1e4, 1e30)]

# (body, shape, sizes) for one operand in fp32 at every scale.
ONE_OPERAND_SCALED = [
    pytest.param("b c h w -> b c", (2, 3, 4, 5), {}, id="pool"),  # 20 elements per output
    pytest.param("b (h d) -> b h", (3, 12), {"h": 4}, id="split"),  # composition
    pytest.param("b n -> b", (4, 16), {}, id="rows"),  # one long axis
]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "logsumexp"])
@pytest.mark.parametrize("body, shape, sizes", ONE_OPERAND_SCALED)
def test_one_operand_fp32_stable_at_scale(op, body, shape, sizes, scale):
    x = rand(*shape, seed=22, scale=scale, dtype=F32)
    out = compile_(f"{op}({body})", **sizes)(x)
    ref = reference(op, body, x, **sizes)
    assert torch.isfinite(ref).all()
    assert_matches(out, ref, bound=magnitude(op, body, x, **sizes), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("scale", [pytest.param(s, id=f"x{s:g}") for s in (1.0, 50.0)])
def test_one_operand_prod_fp32(scale):
    # prod only at scales whose true product fits in fp32.
    x = rand(3, 12, seed=23, scale=scale, dtype=F32)
    out = compile_("prod(b (h d) -> b h)", h=4)(x)
    assert_matches(out, einops.reduce(x.double(), "b (h d) -> b h", "prod", h=4), tol=TOL[F32], dtype=F32)


# (body, shapes) for several operands in fp32.
SEVERAL_SCALED = [
    pytest.param("i k, k j -> i j", [(4, 6), (6, 5)], id="matmul"),
    pytest.param("b i k, b k j -> b i j", [(2, 3, 6), (2, 6, 4)], id="batched"),
    pytest.param("a b, b c, c d -> a d", [(3, 5), (5, 4), (4, 3)], id="chain3"),
]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("op", ["logsumexp", "max", "min", "sum", "mean"])
@pytest.mark.parametrize("body, shapes", SEVERAL_SCALED)
def test_several_operands_fp32_stable_at_scale(op, body, shapes, scale):
    if op in ("sum", "mean") and scale > 1e4:
        pytest.skip("products of 1e30-sized fp32 values overflow legitimately")
    xs = operands(shapes, seed=24, scale=scale, dtype=F32)
    out = compile_(f"{op}({body})")(*xs)
    ref = naive(op, body, *xs)
    assert torch.isfinite(ref).all()
    assert_matches(out, ref, bound=magnitude(op, body, *xs), tol=TOL[F32], dtype=F32)


def _gap_operands(gap: float, k: int = 5, i: int = 3, j: int = 4, dtype=F32):
    """Row maxima of A and column maxima of B at different k: exp(-gap) underflows.

    A[:, 0] = 0, A[:, 1:] = -gap; B[1, :] = 0, B[others, :] = -gap.  Terms: k=0 gives
    -gap, k=1 gives -gap, k>=2 gives -2*gap; the answer is about -gap + log 2.  Shifting
    each operand by its own max gives exp(-gap) * exp(-gap) -> 0 -> log 0 = -inf.
    """
    a = torch.full((i, k), -gap, dtype=dtype)
    a[:, 0] = 0
    b = torch.full((k, j), -gap, dtype=dtype)
    b[1, :] = 0
    return a, b


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("gap", [100.0, 1000.0, 1e5])
def test_log_semiring_adversarial_gap(gap, backend):
    a, b = _gap_operands(gap)
    out = compile_("logsumexp(i k, k j -> i j)", backend=backend)(a, b)
    ref = torch.logsumexp(a.double()[:, :, None] + b.double()[None], dim=1)
    assert torch.allclose(ref, torch.full_like(ref, -gap + math.log(2)))
    assert_matches(out, ref, bound=torch.full_like(ref, gap), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_log_semiring_adversarial_gap_batched_and_chain(dtype):
    gap = 200.0
    a, b = _gap_operands(gap, dtype=dtype)
    # batched: each batch a different gap
    ab = torch.stack([a, a * 2]), torch.stack([b, b * 2])
    out = compile_("logsumexp(z i k, z k j -> z i j)")(*ab)
    ref = naive("logsumexp", "z i k, z k j -> z i j", *ab)
    assert_matches(out, ref, bound=torch.full_like(ref, 2 * gap), tol=TOL[dtype], dtype=dtype)
    # chain: A B C with C's maximum again at a different index than B's columns
    c = torch.full((4, 3), -gap, dtype=dtype)
    c[2, :] = 0
    out = compile_("logsumexp(i k, k j, j l -> i l)")(a, b, c)
    ref = naive("logsumexp", "i k, k j, j l -> i l", a, b, c)
    assert torch.isfinite(ref).all()
    assert_matches(out, ref, bound=torch.full_like(ref, 2 * gap), tol=TOL[dtype], dtype=dtype)


@pytest.mark.parametrize(
    "shift_a, shift_b",
    [
        pytest.param(200.0, 300.0, id="exp-overflows"),  # exp(A) overflows fp32 (and fp64 at 1e3)
        pytest.param(-200.0, -300.0, id="exp-underflows"),  # exp(A) @ exp(B) underflows to 0
        pytest.param(1e4, -1e4, id="opposite"),  # huge terms that cancel
    ],
)
def test_log_semiring_large_offsets(shift_a, shift_b):
    a = rand(4, 6, seed=25, dtype=F32) + shift_a
    b = rand(6, 5, seed=26, dtype=F32) + shift_b
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)
    ref = naive("logsumexp", "i k, k j -> i j", a, b)
    assert_matches(out, ref, bound=magnitude("logsumexp", "i k, k j -> i j", a, b), tol=TOL[F32], dtype=F32)


def test_log_semiring_rows_of_different_magnitude():
    # Each row and column on its own scale: any single global shift under/overflows.
    a = rand(4, 6, seed=27, dtype=F32) * torch.tensor([1.0, 50.0, 1e3, 1e4])[:, None]
    b = rand(6, 5, seed=28, dtype=F32) * torch.tensor([1.0, 1e4, 1e2, 30.0, 1e3])[None, :]
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)
    ref = naive("logsumexp", "i k, k j -> i j", a, b)
    assert_matches(out, ref, bound=magnitude("logsumexp", "i k, k j -> i j", a, b), tol=TOL[F32], dtype=F32)


# ------------------------------------------------------------- infinities

@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("op", ["logsumexp", "max"])
def test_one_operand_all_neg_inf_slice(op, backend):
    x = rand(3, 4, seed=29, dtype=F32)
    x[1] = -INF  # a whole slice of -inf
    x[2, 0] = -INF  # and a partly -inf one
    out = compile_(f"{op}(b c -> b)", backend=backend)(x)
    assert out[1].item() == -INF
    assert_matches(out, reference(op, "b c -> b", x), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("op", ["logsumexp", "max", "min", "sum", "mean"])
def test_one_operand_pos_inf_propagates(op):
    x = rand(3, 4, seed=30, dtype=F32)
    x[0, 2] = INF  # +inf in the slice
    x[1, 1], x[1, 3] = INF, -INF if op in ("logsumexp", "max") else INF  # +inf beside -inf
    out = compile_(f"{op}(b c -> b)")(x)
    ref = reference(op, "b c -> b", x)
    if op != "min":
        assert out[0].item() == INF and out[1].item() == INF
    assert_matches(out, ref, tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("op", ["logsumexp", "max"])
def test_one_operand_neg_inf_min_and_to_scalar(op):
    # min with -inf entries gives -inf; a tensor of all -inf reduces to -inf.
    x = torch.full((2, 3), -INF)
    assert compile_(f"{op}(a b ->)")(x).item() == -INF
    y = rand(2, 3, seed=31, dtype=F32)
    y[0, 1] = -INF
    assert_matches(compile_("min(a b -> a)")(y), reference("min", "a b -> a", y), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", ["logsumexp", "max"])
def test_semiring_neg_inf_slices(op, dtype):
    body = "i k, k j -> i j"
    a, b = rand(4, 5, seed=32, dtype=dtype), rand(5, 6, seed=33, dtype=dtype)
    a[0] = -INF  # row 0 of A all -inf -> row 0 of the result -inf
    b[:, 1] = -INF  # column 1 of B all -inf -> column 1 -inf
    a[1, 0] = -INF  # isolated -inf entries elsewhere
    b[3, 4] = -INF
    # row 2 / column 3: every k has -inf in A or in B (per-operand maxima finite)
    a[2, ::2] = -INF
    b[1::2, 3] = -INF
    out = compile_(f"{op}({body})")(a, b)
    ref = naive(op, body, a, b)
    assert (ref[0] == -INF).all() and (ref[:, 1] == -INF).all() and ref[2, 3] == -INF
    assert not torch.isnan(out).any()
    assert_matches(out, ref, bound=magnitude("max", body, a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0)),
                   tol=TOL[dtype], dtype=dtype)


@pytest.mark.parametrize("op", ["logsumexp", "max"])
def test_semiring_all_neg_inf_chain(op):
    # Three operands; the middle one has an all -inf column; batch element 1 is all -inf.
    body = "z a b, z b c, z c d -> z a d"
    xs = operands([(2, 3, 4), (2, 4, 5), (2, 5, 2)], seed=34, dtype=F32)
    xs[1][0, :, 2] = -INF
    xs[0][1] = -INF
    out = compile_(f"{op}({body})")(*xs)
    ref = naive(op, body, *xs)
    assert (out[1] == -INF).all()
    assert_matches(out, ref, bound=magnitude("max", body, *[x.nan_to_num(0, 0, 0) for x in xs]),
                   tol=TOL[F32], dtype=F32)


def test_min_plus_all_pos_inf_slice():
    # The min-plus zero is +inf: a row of +inf gives +inf, not NaN.
    body = "i k, k j -> i j"
    a, b = rand(3, 4, seed=35, dtype=F32), rand(4, 5, seed=36, dtype=F32)
    a[1] = INF
    out = compile_(f"min({body})")(a, b)
    assert (out[1] == INF).all()
    assert_matches(out, naive("min", body, a, b), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("op", ["logsumexp", "max"])
def test_semiring_pos_inf_propagates(op):
    body = "i k, k j -> i j"
    a, b = rand(3, 4, seed=37, dtype=F32), rand(4, 5, seed=38, dtype=F32)
    a[0, 2] = INF  # every (0, j) has a +inf term
    b[1, 3] = INF  # every (i, 3) has a +inf term
    out = compile_(f"{op}({body})")(a, b)
    assert (out[0] == INF).all() and (out[:, 3] == INF).all()
    assert_matches(out, naive(op, body, a, b), tol=TOL[F32], dtype=F32)


# ------------------------------------------------------------ fp16 / bf16

# (pattern, shapes, sizes, reference) for reduced precision; the reference is float64 on
# the exactly-upcast inputs.
LOW_PRECISION = [
    pytest.param("sum(b c -> b)", [(3, 8)], {}, id="sum1"),
    pytest.param("mean(b c h w -> b c)", [(2, 3, 4, 5)], {}, id="mean1"),
    pytest.param("max(b (h d) -> b h)", [(3, 12)], {"h": 4}, id="max1"),
    pytest.param("min(b c -> c)", [(3, 8)], {}, id="min1"),
    pytest.param("prod(b c -> b)", [(3, 4)], {}, id="prod1"),
    pytest.param("logsumexp(b h q k -> b h q)", [(2, 2, 3, 8)], {}, id="logsumexp1"),
    pytest.param("sum(i k, k j -> i j)", [(3, 8), (8, 4)], {}, id="sum2"),
    pytest.param("mean(b i k, b k j -> b i j)", [(2, 3, 8), (2, 8, 4)], {}, id="mean2"),
    pytest.param("logsumexp(i k, k j -> i j)", [(3, 8), (8, 4)], {}, id="logsumexp2"),
    pytest.param("logsumexp(a b, b c, c d -> a d)", [(3, 4), (4, 5), (5, 2)], {}, id="logsumexp3"),
    pytest.param("max(i k, k j -> i j)", [(3, 8), (8, 4)], {}, id="maxplus"),
    pytest.param("min(i k, k j -> i j)", [(3, 8), (8, 4)], {}, id="minplus"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pattern, shapes, sizes", LOW_PRECISION)
def test_reduced_precision_returns_input_dtype(pattern, shapes, sizes, dtype):
    op, body = pattern.split("(", 1)
    body = body[:-1]
    xs = operands(shapes, seed=39, scale=3.0, dtype=dtype)
    out = compile_(pattern, **sizes)(*xs)
    ref = reference(op, body, *xs, **sizes)
    assert_matches(out, ref, bound=magnitude(op, body, *xs, **sizes), tol=TOL[dtype], dtype=dtype)


def test_fp16_accumulates_in_fp32():
    # Intermediates that overflow fp16 (max 65504) but results that fit.
    x = torch.full((2, 4), 60000.0, dtype=torch.float16)
    out = compile_("mean(b c -> b)")(x)  # the sum, 240000, overflows fp16
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2,), 60000.0, dtype=torch.float16))
    a = torch.full((2, 8), 200.0, dtype=torch.float16)
    b = torch.full((8, 3), 200.0, dtype=torch.float16)
    out = compile_("mean(i k, k j -> i j)")(a, b)  # the sum of products, 320000, overflows fp16
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2, 3), 40000.0, dtype=torch.float16))
    y = torch.tensor([[20.0, 20.0, 19.0], [-30.0, 11.0, 11.5]], dtype=torch.float16)
    out = compile_("logsumexp(b c -> b)")(y)  # exp(20) overflows fp16
    assert_matches(out, torch.logsumexp(y.double(), 1), bound=y.double().abs().amax(1), tol=TOL[torch.float16],
                   dtype=torch.float16)
    a = torch.tensor([[12.0, 11.0], [-5.0, 3.0]], dtype=torch.float16)
    b = torch.tensor([[11.5, -2.0], [10.0, 12.0]], dtype=torch.float16)
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)  # exp(a) @ exp(b) ~ e^24 overflows fp16
    ref = naive("logsumexp", "i k, k j -> i j", a, b)
    assert_matches(out, ref, bound=torch.full_like(ref, 24.0), tol=TOL[torch.float16], dtype=torch.float16)


# ------------------------------------------------------------------ normalizers

# (body, shapes, sizes, inner contraction in float64, normalized dims of the output).
NORMALIZED = [
    pytest.param("b [c]", [(3, 5)], {}, lambda x: x, [1], id="rows"),  # README: last axis, no arrow
    pytest.param("b [k] q", [(2, 4, 3)], {}, lambda x: x, [1], id="middle"),  # bracket in the middle
    pytest.param("[c] b", [(5, 3)], {}, lambda x: x, [0], id="first"),  # bracket first
    pytest.param("b [h] [w]", [(2, 3, 4)], {}, lambda x: x, [1, 2], id="joint"),  # normalized jointly
    pytest.param("b [h w]", [(2, 3, 4)], {}, lambda x: x, [1, 2], id="joint-one-bracket"),  # same, one bracket
    pytest.param("[h] b [w]", [(3, 2, 4)], {}, lambda x: x, [0, 2], id="joint-apart"),  # non-adjacent axes
    pytest.param("b c -> [c] b", [(3, 5)], {}, lambda x: x.T, [0], id="arrow-transpose"),  # explicit arrow
    pytest.param("b (h d) -> b h [d]", [(2, 12)], {"h": 4}, lambda x: x.reshape(2, 4, 3), [2],
                 id="split"),  # composition in the input
    pytest.param("b h d -> b [(h d)]", [(2, 3, 4)], {}, lambda x: x.reshape(2, 12), [1],
                 id="merge"),  # composition in the output, normalized as one axis
    pytest.param("... [c]", [(2, 3, 4)], {}, lambda x: x, [2], id="ellipsis1"),  # ellipsis, one operand
    pytest.param("b h q d, b h k d -> b h q [k]", [(2, 2, 3, 4), (2, 2, 5, 4)], {},
                 lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), [3], id="attention"),  # SPEC example
    pytest.param("b q (h d), b k (h d) -> b h q [k]", [(2, 3, 8), (2, 5, 8)], {"h": 2},
                 lambda q, k: torch.einsum("bqhd,bkhd->bhqk", q.reshape(2, 3, 2, 4), k.reshape(2, 5, 2, 4)), [3],
                 id="attention-heads"),  # heads split from the feature axis
    pytest.param("b q d, b k d -> b [q] k", [(2, 3, 4), (2, 5, 4)], {},
                 lambda q, k: torch.einsum("bqd,bkd->bqk", q, k), [1], id="over-queries"),  # middle axis
    pytest.param("b q d, b k d -> b [q] [k]", [(2, 3, 4), (2, 5, 4)], {},
                 lambda q, k: torch.einsum("bqd,bkd->bqk", q, k), [1, 2], id="joint-two-operands"),
    pytest.param("bqd,bkd->bq[k]", [(2, 3, 4), (2, 5, 4)], {},
                 lambda q, k: torch.einsum("bqd,bkd->bqk", q, k), [2], id="compact"),  # compact notation
    pytest.param("... q d, ... k d -> ... q [k]", [(2, 3, 4, 6), (2, 3, 5, 6)], {},
                 lambda q, k: torch.einsum("...qd,...kd->...qk", q, k), [3], id="ellipsis2"),
    pytest.param("i k, k j, j l -> i [l]", [(3, 4), (4, 5), (5, 6)], {},
                 lambda a, b, c: torch.einsum("ik,kj,jl->il", a, b, c), [1], id="chain3"),
]


@pytest.mark.parametrize("op", NORMALIZERS)
@pytest.mark.parametrize("body, shapes, sizes, inner, dims", NORMALIZED)
def test_normalizer_matches_torch(op, body, shapes, sizes, inner, dims):
    xs = operands(shapes, seed=40, scale=2.0)
    out = compile_(f"{op}({body})", **sizes)(*xs)
    expected = normalize(inner(*xs), dims, log=op == "log_softmax")
    assert_matches(out, expected, dtype=F64)


def test_softmax_attention_is_einsum_then_softmax():
    q, k = rand(2, 4, 8, 16, seed=41), rand(2, 4, 6, 16, seed=42)
    out = compile_("softmax(b h q d, b h k d -> b h q [k])")(q, k)
    assert_matches(out, torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), dim=-1), dtype=F64)
    assert torch.allclose(out.sum(-1), torch.ones(2, 4, 8, dtype=F64))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("op", NORMALIZERS)
@pytest.mark.parametrize(
    "body, shape, sizes, inner, dims",
    [
        pytest.param("b [c]", (4, 7), {}, lambda x: x, [1], id="rows"),
        pytest.param("b [h] [w]", (2, 3, 4), {}, lambda x: x, [1, 2], id="joint"),
        pytest.param("b (h d) -> b h [d]", (2, 12), {"h": 4}, lambda x: x.reshape(2, 4, 3), [2], id="split"),
    ],
)
def test_normalizer_large_logits_fp32(op, body, shape, sizes, inner, dims, scale):
    x = rand(*shape, seed=43, scale=scale, dtype=F32)
    out = compile_(f"{op}({body})", **sizes)(x)
    expected = normalize(inner(x.double()), dims, log=op == "log_softmax")
    assert torch.isfinite(expected).all()
    assert_matches(out, expected, tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("op", NORMALIZERS)
def test_normalizer_large_logits_two_operands_fp32(op, scale):
    # Keys of +-1 / 0 and d = 1: the fp32 contraction is exact, only the softmax is tested.
    q = rand(2, 3, 1, seed=44, scale=scale, dtype=F32)
    k = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0])[None, :, None].repeat(2, 1, 1)
    out = compile_(f"{op}(b q d, b k d -> b q [k])")(q, k)
    expected = normalize(torch.einsum("bqd,bkd->bqk", q.double(), k.double()), [2], log=op == "log_softmax")
    assert_matches(out, expected, tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("op", NORMALIZERS)
def test_normalizer_masked_rows(op):
    # Masked attention: rows partly -inf; log_softmax is -inf exactly at the masked entries.
    x = rand(2, 3, 5, seed=45, dtype=F32)
    x[0, 0, 1:] = -INF  # one entry left
    x[1, 2, ::2] = -INF
    x[1, 1, 3] = -INF
    out = compile_(f"{op}(b q [k])")(x)
    expected = normalize(x.double(), [2], log=op == "log_softmax")
    assert_matches(out, expected, tol=TOL[F32], dtype=F32)
    if op == "softmax":
        assert out[0, 0, 0].item() == 1.0 and (out[0, 0, 1:] == 0).all()


@pytest.mark.parametrize("op", NORMALIZERS)
def test_normalizer_all_neg_inf_row_as_torch(op):
    # SPEC: the inner contraction followed by a max-shifted softmax, so an all -inf row
    # gives what torch gives (NaN) and the other rows are unaffected.
    x = rand(3, 4, seed=46, dtype=F32)
    x[1] = -INF
    out = compile_(f"{op}(b [c])")(x)
    torch_out = (torch.softmax if op == "softmax" else torch.log_softmax)(x, -1)
    assert torch.isnan(torch_out[1]).all()
    assert_matches(out, torch_out.double(), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", NORMALIZERS)
@pytest.mark.parametrize(
    "body, shapes, inner, dims, scale",
    [
        pytest.param("b [c]", [(4, 7)], lambda x: x, [1], 3.0, id="rows"),
        pytest.param("b [c]", [(4, 7)], lambda x: x, [1], 5e3, id="rows-large"),  # exp overflows fp16; results fit
        pytest.param("b [h] [w]", [(2, 3, 4)], lambda x: x, [1, 2], 3.0, id="joint"),
        pytest.param("b q d, b k d -> b q [k]", [(2, 3, 4), (2, 5, 4)],
                     lambda q, k: torch.einsum("bqd,bkd->bqk", q, k), [2], 1.0, id="attention"),
    ],
)
def test_normalizer_reduced_precision(op, body, shapes, inner, dims, scale, dtype):
    xs = operands(shapes, seed=47, scale=scale, dtype=dtype)
    out = compile_(f"{op}({body})")(*xs)
    expected = normalize(inner(*[x.double() for x in xs]), dims, log=op == "log_softmax")
    bound = None
    if len(xs) > 1:  # logits rounded to the input dtype are tolerated
        bound = torch.einsum("bqd,bkd->bqk", *[x.double().abs() for x in xs])
    assert_matches(out, expected, bound=bound, tol=TOL[dtype], dtype=dtype)


# ------------------------------------------------------------------- gradients

# (pattern, shapes, sizes) checked with torch.autograd.gradcheck in float64.
GRADCHECK = [
    pytest.param("sum(b c -> b)", [(3, 4)], {}, id="sum1"),
    pytest.param("mean(b c h -> c)", [(2, 3, 4)], {}, id="mean1"),
    pytest.param("max(b (h d) -> b h)", [(3, 6)], {"h": 2}, id="max1"),
    pytest.param("min(b c -> c)", [(3, 4)], {}, id="min1"),
    pytest.param("prod(b c -> b)", [(3, 4)], {}, id="prod1"),
    pytest.param("logsumexp(b h k -> b h)", [(2, 3, 4)], {}, id="logsumexp1"),
    pytest.param("sum(i k, k j -> i j)", [(3, 4), (4, 2)], {}, id="sum2"),
    pytest.param("mean(b i k, b k j -> b i j)", [(2, 3, 4), (2, 4, 2)], {}, id="mean2"),
    pytest.param("logsumexp(i k, k j -> i j)", [(3, 4), (4, 2)], {}, id="logsumexp2"),
    pytest.param("logsumexp(a b, b c, c d -> a d)", [(2, 3), (3, 4), (4, 2)], {}, id="logsumexp3"),
    pytest.param("logsumexp(b i k, b k j -> b i j)", [(2, 3, 4), (2, 4, 2)], {}, id="logsumexp-batched"),
    pytest.param("max(i k, k j -> i j)", [(3, 4), (4, 2)], {}, id="maxplus"),
    pytest.param("min(a b, b c, c d -> a d)", [(2, 3), (3, 4), (4, 2)], {}, id="minplus3"),
    pytest.param("softmax(b [c])", [(3, 4)], {}, id="softmax1"),
    pytest.param("log_softmax(b [h] [w])", [(2, 3, 2)], {}, id="log_softmax-joint"),
    pytest.param("softmax(b q d, b k d -> b q [k])", [(2, 3, 4), (2, 5, 4)], {}, id="softmax2"),
    pytest.param("log_softmax(b q d, b k d -> b [q] k)", [(2, 3, 4), (2, 5, 4)], {}, id="log_softmax2"),
]


@pytest.mark.parametrize("pattern, shapes, sizes", GRADCHECK)
def test_gradcheck(pattern, shapes, sizes):
    xs = [x.requires_grad_() for x in operands(shapes, seed=48)]
    f = compile_(pattern, **sizes)
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-5)


def test_gradcheck_torchscript_backend():
    xs = [x.requires_grad_() for x in operands([(3, 4), (4, 2)], seed=49)]
    assert torch.autograd.gradcheck(compile_("logsumexp(i k, k j -> i j)", backend="torchscript"), xs)


def _grads(fn, xs, weight_seed=50):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    w = rand(*out.shape, seed=weight_seed, dtype=out.dtype)
    (out.where(torch.isfinite(out), torch.zeros((), dtype=out.dtype)) * w).sum().backward()
    return out, [x.grad for x in xs]


def _naive_lse2(a, b):
    return torch.logsumexp(a[:, :, None] + b[None], dim=1)


def test_logsumexp_grad_with_masked_entries():
    # -inf entries, but no slice entirely -inf: torch's gradients are finite, einc's must match.
    a, b = rand(3, 4, seed=51), rand(4, 5, seed=52)
    a[0, 1] = -INF
    a[2, :3] = -INF
    b[2, 0] = -INF
    _, expected = _grads(_naive_lse2, [a, b])
    _, got = _grads(compile_("logsumexp(i k, k j -> i j)"), [a, b])
    for g, e in zip(got, expected):
        assert torch.isfinite(e).all()
        assert_matches(g, e, dtype=F64)


@pytest.mark.parametrize("case", ["one-operand", "two-operands"])
def test_logsumexp_grad_all_neg_inf_row(case):
    # torch.logsumexp's gradient over an all -inf slice is NaN; wherever torch's gradient
    # is finite, einc's must be finite and equal.
    if case == "one-operand":
        x = rand(3, 4, seed=53)
        x[1] = -INF
        xs, ref_fn, f = [x], lambda t: torch.logsumexp(t, 1), compile_("logsumexp(b c -> b)")
    else:
        a, b = rand(3, 4, seed=54), rand(4, 5, seed=55)
        a[1] = -INF
        xs, ref_fn, f = [a, b], _naive_lse2, compile_("logsumexp(i k, k j -> i j)")
    ref_out, expected = _grads(ref_fn, xs)
    out, got = _grads(f, xs)
    assert_matches(out, ref_out, dtype=F64)
    for g, e in zip(got, expected):
        finite = torch.isfinite(e)
        assert torch.isfinite(g[finite]).all()
        assert_matches(g[finite], e[finite], dtype=F64)


@pytest.mark.parametrize("op", ["max", "min"])
def test_tropical_grad_finite_with_infinities(op):
    # Where torch's amax/amin of the naive broadcast has finite gradients, so does einc.
    sign = -1 if op == "max" else 1
    a, b = rand(3, 4, seed=56), rand(4, 5, seed=57)
    a[0, 1] = sign * INF
    a[2] = sign * INF
    reduce = torch.amax if op == "max" else torch.amin
    _, expected = _grads(lambda x, y: reduce(x[:, :, None] + y[None], 1), [a, b])
    _, got = _grads(compile_(f"{op}(i k, k j -> i j)"), [a, b])
    for g, e in zip(got, expected):
        assert torch.isfinite(g[torch.isfinite(e)]).all()


@pytest.mark.parametrize("gap", [100.0, 1000.0])
def test_log_semiring_grad_adversarial_gap_fp32(gap):
    # The adversarial inputs of test_log_semiring_adversarial_gap: finite, correct gradients.
    a, b = _gap_operands(gap)
    _, expected = _grads(_naive_lse2, [a.double(), b.double()])
    _, got = _grads(compile_("logsumexp(i k, k j -> i j)"), [a, b])
    for g, e in zip(got, expected):
        assert g.dtype == F32 and torch.isfinite(g).all()
        assert_matches(g, e, tol=1e-4)


@pytest.mark.parametrize("op", NORMALIZERS)
def test_normalizer_grad_masked_and_large(op):
    x = rand(3, 5, seed=58, scale=1e4, dtype=F32)
    x[0, 2:] = -INF
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    _, expected = _grads(lambda t: fn(t, -1), [x.double()])
    _, got = _grads(compile_(f"{op}(b [c])"), [x])
    assert torch.isfinite(got[0]).all()
    assert_matches(got[0], expected[0], tol=1e-4)


# --------------------------------------------------------------- README recipes

def test_readme_batched_logsumexp():
    x = rand(4, 10, seed=59, scale=5.0, dtype=F32)
    out = einc.einsum("logsumexp(b n -> b)", x)
    assert_matches(out, torch.logsumexp(x.double(), 1), bound=x.double().abs().amax(1), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("op", NORMALIZERS)
def test_readme_softmax_and_log_softmax(op):
    x = rand(4, 10, seed=60, scale=5.0, dtype=F32)
    out = einc.einsum(f"{op}(b [c])", x)
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    assert_matches(out, fn(x.double(), -1), tol=TOL[F32], dtype=F32)


def test_readme_cross_entropy():
    logits = rand(5, 7, seed=61, scale=4.0, dtype=F32)
    target = torch.tensor([0, 6, 3, 3, 1])
    expected = F.cross_entropy(logits.double(), target, reduction="none")
    ce = -einc.einsum("gather(log_softmax(b [c]), b -> b)", logits, target)
    assert_matches(ce, expected, bound=logits.double().abs().amax(1), tol=TOL[F32], dtype=F32)
    assert_matches(-ce.mean(), -F.cross_entropy(logits.double(), target), tol=TOL[F32], dtype=F32)


def test_readme_soft_label_cross_entropy():
    logits = rand(5, 7, seed=62, scale=4.0, dtype=F32)
    labels = torch.softmax(rand(5, 7, seed=63, dtype=F64), 1)
    soft = -einc.einsum("log_softmax(b [c]), b c -> b", logits, labels.float()).mean()
    assert_matches(soft, F.cross_entropy(logits.double(), labels), tol=TOL[F32], dtype=F32)


def test_readme_weighted_token_cross_entropy():
    # README: a weight per token (0 at padding, as ignore_index) with the fused kernel.
    h, w = rand(2, 5, 4, seed=64, dtype=F64), rand(9, 4, seed=65, dtype=F64)
    ids = torch.tensor([[1, 8, 0, -100, -100], [3, 3, 7, 2, -100]])
    masked = einc.compile("sum(gather(log_softmax(b t d, v d -> b t [v]), b t -> b t), b t -> )")
    weights = (ids >= 0).double() / (ids >= 0).sum()
    loss = -masked(h, w, ids.clamp(min=0), weights)
    expected = F.cross_entropy((h @ w.T).reshape(-1, 9), ids.reshape(-1), ignore_index=-100)
    assert_matches(loss, expected, tol=1e-12)


def test_readme_softmax_of_1000_and_0():
    x = torch.tensor([1000.0, 0.0], requires_grad=True)
    y = einc.einsum("softmax([c])", x)
    assert y.dtype == F32 and torch.equal(y.detach(), torch.tensor([1.0, 0.0]))
    (y * torch.tensor([1.0, 2.0])).sum().backward()
    assert torch.isfinite(x.grad).all()
    xr = x.detach().double().requires_grad_()
    (torch.softmax(xr, 0) * torch.tensor([1.0, 2.0], dtype=F64)).sum().backward()
    assert_matches(x.grad, xr.grad, tol=1e-6)


def test_readme_cross_entropy_of_1000_and_0():
    x = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    loss = -einc.einsum("gather(log_softmax(b [c]), b -> b)", x, torch.tensor([1]))
    assert loss.shape == (1,) and loss.item() == 1000.0
    loss.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, -1.0]]))
    x.grad = None
    soft = -einc.einsum("log_softmax(b [c]), b c -> b", x, torch.tensor([[0.5, 0.5]]))
    assert soft.item() == 500.0
    soft.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.5, -0.5]]))


# ------------------------------------------------------------------- validate

# Expression.validate works for every op form and returns a small float.
VALIDATE = [
    pytest.param("sum(b c -> b)", [(3, 4)], {}, id="sum1"),
    pytest.param("mean(b c h w -> b c)", [(2, 3, 4, 5)], {}, id="mean1"),
    pytest.param("max(b (h d) -> b h)", [(3, 8)], {"h": 4}, id="max1"),
    pytest.param("min(b c -> c)", [(3, 4)], {}, id="min1"),
    pytest.param("prod(b c -> b)", [(3, 4)], {}, id="prod1"),
    pytest.param("logsumexp(b h q k -> b h q)", [(2, 3, 4, 5)], {}, id="logsumexp1"),
    pytest.param("sum(i k, k j -> i j)", [(3, 4), (4, 5)], {}, id="sum2"),
    pytest.param("mean(i k, k j -> i j)", [(3, 4), (4, 5)], {}, id="mean2"),
    pytest.param("logsumexp(i k, k j -> i j)", [(3, 4), (4, 5)], {}, id="logsumexp2"),
    pytest.param("logsumexp(... i k, ... k j -> ... i j)", [(2, 3, 4), (2, 4, 5)], {}, id="logsumexp-ellipsis"),
    pytest.param("max(a b, b c, c d -> a d)", [(2, 3), (3, 4), (4, 2)], {}, id="maxplus3"),
    pytest.param("min(b i k, b k j -> b i j)", [(2, 3, 4), (2, 4, 5)], {}, id="minplus-batched"),
    pytest.param("softmax(b [c])", [(3, 4)], {}, id="softmax1"),
    pytest.param("log_softmax(b (h d) -> b h [d])", [(2, 8)], {"h": 2}, id="log_softmax-split"),
    pytest.param("softmax(b h q d, b h k d -> b h q [k])", [(2, 2, 3, 4), (2, 2, 5, 4)], {}, id="attention"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pattern, shapes, sizes", VALIDATE)
def test_validate_every_op_form(pattern, shapes, sizes, dtype):
    xs = operands(shapes, seed=62, dtype=dtype)
    err = compile_(pattern, **sizes).validate(*xs)
    assert isinstance(err, float)
    assert 0.0 <= err < (1e-9 if dtype == F64 else 1e-4)


@pytest.mark.parametrize(
    "pattern",
    ["logsumexp(i k, k j -> i j)", "softmax(b q d, b k d -> b q [k])", "max(b c -> b)"],
)
def test_validate_torchscript_backend(pattern):
    shapes = [(3, 4), (4, 5)] if pattern.startswith("logsumexp") else [(2, 3, 4), (2, 5, 4)]
    if pattern.startswith("max"):
        shapes = [(3, 4)]
    err = einc.compile(pattern).validate(*operands(shapes, seed=63))
    assert isinstance(err, float) and err < 1e-9


def test_validate_with_neg_inf_slices():
    # An all -inf slice: result and reference agree on -inf, validate does not raise.
    a, b = rand(3, 4, seed=64), rand(4, 5, seed=65)
    a[1] = -INF
    err = compile_("logsumexp(i k, k j -> i j)").validate(a, b)
    assert isinstance(err, float) and err < 1e-9
    x = rand(3, 4, seed=66)
    x[0] = -INF
    err = compile_("max(b c -> b)").validate(x)
    assert isinstance(err, float) and err < 1e-9


# --------------------------------------------------------- TorchScript backend

# A few forms under the default backend (the same generated source, scripted).
SCRIPTED = [
    pytest.param("logsumexp(a b, b c, c d -> a d)", [(3, 4), (4, 5), (5, 2)], {}, id="lse-chain"),
    pytest.param("max(b i k, b k j -> b i j)", [(2, 3, 4), (2, 4, 5)], {}, id="maxplus"),
    pytest.param("min(i k, j -> i j)", [(3, 4), (5,)], {}, id="minplus-kept-from-one"),
    pytest.param("mean(i k, k j -> i j)", [(3, 4), (4, 5)], {}, id="mean2"),
    pytest.param("prod(b (h d) -> b h)", [(3, 6)], {"h": 2}, id="prod1"),
    pytest.param("logsumexp(b h q k -> b h q)", [(2, 3, 4, 5)], {}, id="lse1"),
]


@pytest.mark.parametrize("pattern, shapes, sizes", SCRIPTED)
def test_torchscript_backend(pattern, shapes, sizes):
    op, body = pattern.split("(", 1)
    body = body[:-1]
    xs = operands(shapes, seed=67)
    out = einc.compile(pattern, **sizes)(*xs)
    assert_matches(out, reference(op, body, *xs, **sizes), dtype=F64)


@pytest.mark.parametrize("op", NORMALIZERS)
def test_torchscript_backend_normalizers(op):
    q, k = rand(2, 2, 3, 4, seed=68), rand(2, 2, 5, 4, seed=69)
    out = einc.compile(f"{op}(b h q d, b h k d -> b h q [k])")(q, k)
    fn = torch.softmax if op == "softmax" else torch.log_softmax
    assert_matches(out, fn(torch.einsum("bhqd,bhkd->bhqk", q, k), -1), dtype=F64)


# ------------------------------------------------ README: documented choices

def test_logsumexp_all_neg_inf_slice_has_zero_gradient():
    # README: an all -inf slice gives -inf from logsumexp and a gradient of 0 there, not NaN.
    x = rand(3, 4, seed=70)
    x[1] = -INF
    x.requires_grad_()
    out = compile_("logsumexp(b c -> b)")(x)
    assert out[1].item() == -INF
    out[torch.isfinite(out)].sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(4, dtype=F64))
    assert_matches(x.grad[[0, 2]], torch.softmax(x.detach()[[0, 2]], 1), dtype=F64)

    a, b = rand(3, 4, seed=71), rand(4, 5, seed=72)
    a[1] = -INF
    a.requires_grad_(), b.requires_grad_()
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)
    assert (out[1] == -INF).all()
    out[torch.isfinite(out)].sum().backward()
    assert torch.equal(a.grad[1], torch.zeros(4, dtype=F64))
    assert torch.isfinite(b.grad).all()
    # rows 0 and 2 only: the reference without the -inf row
    keep = [0, 2]
    ar, br = a.detach()[keep].clone().requires_grad_(), b.detach().clone().requires_grad_()
    _naive_lse2(ar, br).sum().backward()
    assert_matches(a.grad[keep], ar.grad, dtype=F64)
    assert_matches(b.grad, br.grad, dtype=F64)


@pytest.mark.parametrize("op", ["max", "min"])
def test_tropical_over_empty_axis_is_an_error(op):
    # README: max/min over an axis of size 0 is an EincError (torch.amax refuses too).
    with pytest.raises(einc.EincError):
        compile_(f"{op}(b c -> b)")(torch.zeros(3, 0))


def test_logsumexp_over_empty_axis_is_neg_inf():
    # README: logsumexp over an empty axis is -inf; so is the log semiring over an empty contraction.
    out = compile_("logsumexp(b c -> b)")(torch.zeros(3, 0))
    assert torch.equal(out, torch.full((3,), -INF))
    out = compile_("logsumexp(i k, k j -> i j)")(torch.zeros(2, 0), torch.zeros(0, 3))
    assert torch.equal(out, torch.full((2, 3), -INF))


@pytest.mark.parametrize(
    "pattern, shapes, expected",
    [
        pytest.param("sum(b c -> b)", [(3, 4)], lambda x: x.sum(1), id="sum1"),
        pytest.param("mean(b c -> b)", [(3, 4)], lambda x: x.mean(1), id="mean1"),
        pytest.param("prod(b c -> b)", [(3, 4)], lambda x: x.prod(1), id="prod1"),
        pytest.param("sum(i k, k j -> i j)", [(3, 4), (4, 5)], lambda a, b: a @ b, id="sum2"),
        pytest.param("mean(i k, k j -> i j)", [(3, 4), (4, 5)], lambda a, b: a @ b / 4, id="mean2"),
    ],
)
def test_complex_sums_means_products(pattern, shapes, expected):
    # README: sums, means and products take complex tensors.
    xs = [torch.complex(rand(*s, seed=73 + i), rand(*s, seed=83 + i)) for i, s in enumerate(shapes)]
    out = compile_(pattern)(*xs)
    assert out.dtype == torch.complex128
    torch.testing.assert_close(out, expected(*xs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "pattern, n",
    [
        pytest.param("max(b c -> b)", 1, id="max1"),
        pytest.param("logsumexp(b c -> b)", 1, id="logsumexp1"),
        pytest.param("min(b c, c d -> b d)", 2, id="minplus"),
        pytest.param("logsumexp(b c, c d -> b d)", 2, id="logsumexp2"),
        pytest.param("softmax(b [c])", 1, id="softmax"),
    ],
)
def test_complex_rejected_where_order_is_needed(pattern, n):
    # README: max, min, logsumexp and the normalizers need real tensors.
    xs = [torch.ones(3, 3, dtype=torch.complex64) for _ in range(n)]
    with pytest.raises(einc.EincError):
        compile_(pattern)(*xs)


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("k", [
    1100,  # 128 * 1100 * 128 = 18M: chunks of 16 along k (256K elements each)
    129,   # 2,113,536: just over the one-shot bound (2**21), chunks of 16 with a partial last one
    128,   # 2,097,152: exactly the bound, at once
    100,   # 1.6M: at once
])
def test_tropical_large_contraction_is_chunked_correctly(op, k):
    # README: max/min contractions materialise the broadcast sum at once up to 2M
    # elements, in chunks of about 256K elements beyond; the last chunk may be partial.
    a, b = rand(128, k, seed=90, dtype=F32), rand(k, 128, seed=91, dtype=F32)
    out = compile_(f"{op}(i k, k j -> i j)")(a, b)
    ad, bd = a.double(), b.double()
    reduce = torch.amax if op == "max" else torch.amin
    ref = torch.stack([reduce(ad[:, s:s + 100, None] + bd[None, s:s + 100], 1) for s in range(0, k, 100)])
    ref = reduce(ref, 0)
    assert_matches(out, ref, bound=torch.full_like(ref, 10.0), tol=TOL[F32], dtype=F32)


@pytest.mark.parametrize("structure", [
    "diagonal",   # finite entries sparse on both sides: only they are visited
    "band",
    "half-rows",  # a few dense rows beside structural ones: both kinds at once
    "dense-a",    # A finite everywhere, 3/4 of B's columns all -inf: a sum over B gives the pairs
    "dense-b",    # B finite everywhere, 3/4 of A's rows all -inf
    "blocks",     # two diagonal blocks on both sides (half the entries finite): a bmm of masks
])
@pytest.mark.parametrize("dtype", [F32, torch.float64])
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("n", [
    96,   # few lost entries (x k <= 4M): recomputed exactly
    256,  # many: told structural by counting pairs (sparse finite entries, one side finite, or a bmm)
])
def test_log_semiring_structural_neg_inf_matches_the_naive_form(structure, dtype, backend, n):
    # Forbidden transitions (HMMs, CRFs): entries with no k where both sides are finite
    # are -inf exactly, told from underflow by counting pairs; the finite ones match.
    g = torch.Generator().manual_seed(7)
    a = torch.full((n, n), float("-inf"), dtype=dtype)
    b = torch.full((n, n), float("-inf"), dtype=dtype)
    a.diagonal().copy_(torch.randn(n, generator=g, dtype=dtype) * 10)
    b.diagonal().copy_(torch.randn(n, generator=g, dtype=dtype) * 10)
    if structure == "band":
        a.diagonal(1).copy_(torch.randn(n - 1, generator=g, dtype=dtype) * 10)
    if structure == "half-rows":
        a[: n // 8] = torch.randn(n // 8, n, generator=g, dtype=dtype) * 10
    if structure == "dense-a":
        a = torch.randn(n, n, generator=g, dtype=dtype) * 10
        b = torch.randn(n, n, generator=g, dtype=dtype) * 10
        b[:, n // 4:] = float("-inf")
    if structure == "dense-b":
        a, b = (torch.randn(n, n, generator=g, dtype=dtype) * 10 for _ in range(2))
        a[n // 4:] = float("-inf")
    if structure == "blocks":
        a, b = (torch.randn(n, n, generator=g, dtype=dtype) * 10 for _ in range(2))
        for x in (a, b):
            x[: n // 2, n // 2:] = x[n // 2:, : n // 2] = float("-inf")
    out = compile_("logsumexp(i k, k j -> i j)", backend)(a, b)
    ref = torch.logsumexp(a.double()[:, :, None] + b.double()[None], 1)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


def test_log_semiring_partial_underflow_mixed_with_normal_entries():
    # Some (i, j) underflow in the shifted matmul (row max of A and column max of B at
    # different k), the rest do not; both kinds must be right, values and gradients.
    a, b = rand(40, 300, seed=92, dtype=F32), rand(300, 30, seed=93, dtype=F32)
    a[::3] -= 300.0  # every third row: everything far below ...
    a[::3, 7] = 5.0  # ... its maximum at k = 7
    b[:, ::4] -= 300.0  # every fourth column: maximum at k = 11
    b[11, ::4] = 4.0
    a.requires_grad_(), b.requires_grad_()
    out = compile_("logsumexp(i k, k j -> i j)")(a, b)
    ref_out, expected = _grads(_naive_lse2, [a.detach().double(), b.detach().double()])
    assert torch.isfinite(ref_out).all()
    bound = magnitude("logsumexp", "i k, k j -> i j", a.detach(), b.detach())
    assert_matches(out, ref_out, bound=bound, tol=TOL[F32], dtype=F32)
    _, got = _grads(compile_("logsumexp(i k, k j -> i j)"), [a.detach(), b.detach()])
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        assert_matches(g, e, tol=1e-4)


@pytest.mark.parametrize("order", [[F64, F32, torch.float16], [torch.float16, F32, F64]], ids=["wide-first", "narrow-first"])
def test_one_expression_across_dtypes(order):
    # One Expression called with several dtypes of the same shapes: each dtype gets code
    # (shift floors, underflow thresholds) that is right for it.
    f = einc.compile("logsumexp(i k, k j -> i j)", backend="eager", optimize="greedy")
    for dtype in order:
        a, b = _gap_operands(100.0, dtype=dtype)
        out = f(a, b)
        ref = torch.logsumexp(a.double()[:, :, None] + b.double()[None], dim=1)
        assert_matches(out, ref, bound=torch.full_like(ref, 100.0), tol=TOL[dtype], dtype=dtype)


# ------------------------------------------------ in-place normalization of intermediates

INPLACE = [
    # (pattern, shapes, normalizes an intermediate of its own in place when no grad is needed)
    ("softmax(b [c])", [(3, 5)], False),                                   # the user's tensor: never in place
    ("log_softmax(b c -> b [c])", [(3, 5)], False),                        # the same, with an arrow
    ("softmax(b c -> c [b])", [(3, 5)], False),                            # a transposed view of the input
    ("softmax(b h q d, b h k d -> b h q [k])", [(2, 2, 3, 4), (2, 2, 5, 4)], True),  # matmul result
    ("log_softmax(i j, j k -> i [k])", [(3, 4), (4, 5)], True),           # mm result
    ("softmax(b i j -> b [i])", [(2, 3, 4)], True),                        # a sum's result
    ("softmax(b i, b j -> [b] i j)", [(2, 3), (2, 4)], True),              # a broadcast product's result
    ("softmax(b i, b j -> i j [b])", [(2, 3), (2, 4)], False),             # the product, then a permute
]


@pytest.mark.parametrize("pattern, shapes, inplace", INPLACE, ids=[row[0] for row in INPLACE])
def test_normalizers_never_modify_inputs_and_match_torch(pattern, shapes, inplace):
    f = einc.compile(pattern)
    assert ("out=" in f.explain(*shapes).source) is inplace
    tensors = [torch.randn(s) for s in shapes]
    kept = [t.clone() for t in tensors]
    with torch.no_grad():
        first = f(*tensors)
    assert all(torch.equal(t, k) for t, k in zip(tensors, kept))
    leaves = [t.clone().requires_grad_() for t in tensors]
    second = f(*leaves)
    second.sum().backward()  # the out-of-place branch keeps autograd working
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    torch.testing.assert_close(first, second.detach(), rtol=0, atol=0)
    assert f.validate(*tensors) < 1e-5
