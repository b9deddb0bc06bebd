"""Gradients of every dtype on every backend, IEEE semantics, integer and mixed dtypes.

References: torch.einsum / torch.logsumexp in float64 (complex128) and their autograd,
the naive broadcast form of the log semiring, and torch's own type promotion.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, randn, tolerance, widen

import einc

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

BACKENDS = ["torchscript", "eager", pytest.param("compile", marks=pytest.mark.slow)]

GRADIENT_CASES = [
    # (pattern, torch.einsum equation, shapes)
    ("bdn,bn->bd", "bdn,bn->bd", [(2, 3, 4), (2, 4)]),  # the case: a bmm of a vector
    ("b h q d, b h k d -> b h q k", "bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),  # batched scores
    ("ij,jk,kl->il", "ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)]),  # a chain: two mm steps
    ("i j -> j i * 3", "ij->ji", [(3, 4)]),  # rearrange and an integral scale
    ("mean(i j -> i)", "ij->i", [(3, 4)]),  # a reduction (the reference divides by 4)
]


def _reference_gradients(equation, tensors, scale):
    wide = [widen(t).detach().requires_grad_() for t in tensors]
    out = torch.einsum(equation, *wide) * scale
    loss = (out.real * torch.arange(out.numel()).reshape(out.shape)).sum()
    return torch.autograd.grad(loss, wide)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("pattern, equation, shapes", GRADIENT_CASES, ids=[c[0] for c in GRADIENT_CASES])
def test_gradients_of_every_dtype_on_every_backend_over_several_calls(pattern, equation, shapes, dtype, backend):
    # TorchScript's profiling executor differentiated the graph itself from the second
    # call on and got complex gradients wrong; every call must agree with torch.
    f = einc.compile(pattern, backend=backend)
    scale = 3 if "* 3" in pattern else (1 / 4 if pattern.startswith("mean") else 1)
    for call in range(4):
        tensors = [randn(*s, dtype=dtype).requires_grad_() for s in shapes]
        out = f(*tensors)
        loss = (out.real * torch.arange(out.numel()).reshape(out.shape)).sum()
        grads = torch.autograd.grad(loss, tensors)
        expected = _reference_gradients(equation, tensors, scale)
        for got, want in zip(grads, expected):
            assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_float_gradients_over_several_calls(dtype, backend):
    f = einc.compile("logsumexp(i k, k j -> i j)", backend=backend)
    for _ in range(3):
        a, b = randn(3, 4, dtype=dtype).requires_grad_(), randn(4, 5, dtype=dtype).requires_grad_()
        (ga, gb) = torch.autograd.grad(f(a, b).float().sum(), (a, b))
        wa, wb = widen(a).detach().requires_grad_(), widen(b).detach().requires_grad_()
        torch.logsumexp(wa[:, :, None] + wb[None], 1).sum().backward()
        assert ga.dtype == dtype
        assert_close(ga, wa.grad, rtol=5e-2, atol=5e-2)
        assert_close(gb, wb.grad, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------ scales


SCALE_CASES = [
    # (pattern, shapes, float64 reference from the tensors)
    # 2**64 as a float: an int64 product wrapped to 0 (TorchScript) or overflowed (Python).
    ("a -> a * 4294967296 * 4294967296", [(2,)], lambda x: x * 2.0**64),
    # Just above 2**63: the int64 product flipped sign.
    ("a -> a * 3037000500 * 3037000500", [(2,)], lambda x: x * 3037000500.0**2),
    # A divisor that is an empty summed axis: the sum is 0 and 0 / 0 is NaN, as x.sum(1) / 0
    # (scaling an operand instead gave 0).
    ("a b -> a / b", [(2, 0)], lambda x: x.sum(1) / 0),
    # The same through a square root, with two operands.
    ("a b, b c -> a / sqrt(c)", [(2, 3), (3, 0)], lambda x, y: torch.einsum("ab,bc->a", x, y) / 0),
    # A finite scale is unchanged (and applied to an operand).
    ("a b, b c -> a c * 3 / sqrt(b)", [(2, 4), (4, 3)], lambda x, y: x @ y * 3 / 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, shapes, reference", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_scales_follow_float_semantics(pattern, shapes, reference, backend):
    tensors = [randn(*s, dtype=torch.float32) for s in shapes]
    assert_close(einc.compile(pattern, backend=backend)(*tensors), reference(*map(widen, tensors)),
                 **tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_integer_scale_that_does_not_fit_int64_is_refused(backend):
    f = einc.compile("a -> a * 4294967296 * 4294967296", backend=backend)
    with pytest.raises(einc.EincError, match="does not fit in int64"):
        f(torch.ones(2, dtype=torch.int64))
    # Below 2**63 it is exact.
    g = einc.compile("a -> a * 3037000499 * 3037000499", backend=backend)
    assert torch.equal(g(torch.ones(2, dtype=torch.int64)), torch.full((2,), 3037000499**2))


# ------------------------------------------------------------------ IEEE


INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize(
    "pattern, a, b",
    [
        # inf + -inf is NaN in the log semiring's naive form (one term NaN).
        ("logsumexp(i k, k j -> i j)", [[INF, 0.0]], [[-INF, 1.0], [1.0, 2.0]]),
        ("logsumexp(i k, k j -> i j)", [[INF]], [[-INF]]),
        ("logsumexp(i k, k j -> i j)", [[-INF, 0.0]], [[INF, 1.0], [1.0, 2.0]]),
        # +inf alone stays +inf; -inf everywhere stays -inf.
        ("logsumexp(i k, k j -> i j)", [[INF, 0.0]], [[1.0, 1.0], [1.0, 2.0]]),
        ("logsumexp(i k, k j -> i j)", [[-INF, -INF]], [[1.0, 1.0], [1.0, 2.0]]),
        # max-plus and min-plus, the same rule.
        ("max(i k, k j -> i j)", [[INF, 0.0]], [[-INF, 1.0], [1.0, 2.0]]),
        ("min(i k, k j -> i j)", [[-INF, 0.0]], [[INF, 1.0], [1.0, 2.0]]),
    ],
)
def test_semirings_follow_ieee_like_the_naive_form(pattern, a, b, backend):
    a, b = torch.tensor(a), torch.tensor(b)
    reduce = {"logsumexp": torch.logsumexp, "max": torch.amax, "min": torch.amin}[pattern.split("(")[0]]
    expected = reduce(widen(a)[:, :, None] + widen(b)[None], 1)
    assert_close(einc.compile(pattern, backend=backend)(a, b), expected)


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [
    [[-1e8] * 4],                       # a row masked with a -1e8 fill: softmax gradient 1/4 each
    [[3e7, 3e7, 3e7 - 1.0, 3e7]],       # large values: torch's exp(x - out) loses out's last bits
    [[1e20, 0.0], [1.0, 2.0]],          # one large row beside an ordinary one
    [[200.0, 199.0, 150.0]],            # just past the fast path's bound in float32
])
def test_logsumexp_gradient_of_large_values_is_the_softmax(rows, dtype, backend):
    # The gradient of logsumexp is softmax, whatever the magnitude (reference: softmax
    # in float64); under autograd einc takes torch's kernel only where it is exact enough.
    x = torch.tensor(rows, dtype=dtype, requires_grad=True)
    weight = torch.arange(1.0, len(rows) + 1, dtype=dtype)
    (grad,) = torch.autograd.grad((einc.compile("logsumexp(b n -> b)", backend=backend)(x) * weight).sum(), x)
    expected = torch.softmax(x.detach().double(), 1) * weight.double()[:, None]
    assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("values", [[NAN, 0.0], [0.0, NAN, 1.0], [1e30, NAN]])
def test_logsumexp_gradient_propagates_nan_like_torch(values, backend):
    x = torch.tensor(values, requires_grad=True)
    einc.compile("logsumexp(a -> )", backend=backend)(x).backward()
    y = torch.tensor(values, requires_grad=True)
    torch.logsumexp(y, 0).backward()
    assert torch.equal(torch.isnan(x.grad), torch.isnan(y.grad)), (x.grad, y.grad)


# ------------------------------------------------------------------ integers and bools


INTEGER_CASES = [
    # (pattern, shapes): sums of integers and bools accumulate in int64, as torch.sum.
    ("ij,jk->i", [(2, 3), (3, 4)]),  # the case: a reduction, then a product
    ("ij,jk->ik", [(2, 3), (3, 4)]),  # a plain matmul
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 4)]),  # batched
    ("ij->i", [(2, 3)]),  # a sum
    ("i,i->", [(5,), (5,)]),  # a dot product
    ("prod(i j -> i)", [(2, 3)]),  # torch.prod promotes too
]


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.bool, torch.int64])
@pytest.mark.parametrize("pattern, shapes", INTEGER_CASES, ids=[c[0] for c in INTEGER_CASES])
def test_integer_and_bool_contractions_are_exact_int64(pattern, shapes, dtype, backend):
    low = 0 if dtype in (torch.uint8, torch.bool) else -3
    tensors = [torch.randint(low, 4, s).to(dtype) for s in shapes]
    out = einc.compile(pattern, backend=backend)(*tensors)
    assert out.dtype == torch.int64
    longs = [t.long() for t in tensors]
    if pattern.startswith("prod"):
        expected = longs[0].prod(1)
    else:
        expected = torch.einsum(pattern, *longs)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "pattern, dtype, expected_dtype",
    [
        ("i j -> j i", torch.int8, torch.int8),  # a rearrange keeps the dtype
        ("i, j -> i j", torch.int8, torch.int8),  # a broadcast product too (torch.mul)
        ("i, j -> i j", torch.bool, torch.bool),  # and for bools (logical and)
        ("max(i j -> i)", torch.int16, torch.int16),  # max keeps it (torch.amax)
        ("mean(i j -> i)", torch.int32, torch.float32),  # a mean of integers is a float
        ("i j -> i j / 2", torch.int64, torch.float32),  # so is a fractional scale
    ],
)
def test_integer_results_without_sums_keep_their_dtype(pattern, dtype, expected_dtype):
    tensors = [torch.randint(0, 4, (3,) if len(p.split()) == 1 else (3, 4)).to(dtype)
               for p in pattern.split("->")[0].split("(")[-1].split(",")]
    out = einc.compile(pattern)(*tensors)
    assert out.dtype == expected_dtype
    wide = [t.double() for t in tensors]
    reference = {
        "i j -> j i": lambda x: x.T,
        "i, j -> i j": lambda x, y: x[:, None] * y[None],
        "max(i j -> i)": lambda x: x.amax(1),
        "mean(i j -> i)": lambda x: x.mean(1),
        "i j -> i j / 2": lambda x: x / 2,
    }[pattern](*wide)
    assert_close(out, reference)


def test_bool_semirings_are_refused():
    with pytest.raises(einc.EincError, match="bool"):
        einc.compile("max(i k, k j -> i j)")(torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool))


# ------------------------------------------------------------------ mixed dtypes


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize(
    "pattern, dtypes",
    [
        ("bdl,dn->bdln", (torch.float32, torch.complex64)),  # Mamba's discretization: real delta, complex A
        ("ij,jk->ik", (torch.float32, torch.complex64)),  # real times complex matmul
        ("ij,jk->ik", (torch.float32, torch.float64)),  # float32 and float64
        ("ij,jk->ik", (torch.int64, torch.float32)),  # integers and floats
        ("i,i->", (torch.bfloat16, torch.float32)),  # bfloat16 and float32
        ("ij,jk,kl->il", (torch.float16, torch.float32, torch.complex128)),  # three kinds
    ],
)
def test_mixed_dtypes_follow_torch_type_promotion(pattern, dtypes, backend):
    shapes = {"bdl,dn->bdln": [(2, 3, 4), (3, 5)], "ij,jk->ik": [(2, 3), (3, 4)], "i,i->": [(5,), (5,)],
              "ij,jk,kl->il": [(2, 3), (3, 4), (4, 2)]}[pattern]
    tensors = [torch.randint(-3, 4, s).to(d) for s, d in zip(shapes, dtypes)]
    out = einc.compile(pattern, backend=backend)(*tensors)
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    assert out.dtype == common
    expected = torch.einsum(pattern, *[t.to(torch.complex128 if common.is_complex else torch.float64)
                                       for t in tensors])
    assert_close(out, expected, **tolerance(common if common.is_floating_point or common.is_complex
                                            else torch.float64))


def test_mixed_dtype_gradients_reach_each_operand_in_its_dtype():
    delta = torch.randn(2, 3, 4, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.complex64, requires_grad=True)
    out = einc.compile("bdl,dn->bdln")(delta, a)
    out.abs().sum().backward()
    d2, a2 = delta.detach().double().requires_grad_(), a.detach().to(torch.complex128).requires_grad_()
    torch.einsum("bdl,dn->bdln", d2, a2).abs().sum().backward()
    assert delta.grad.dtype == torch.float32 and a.grad.dtype == torch.complex64
    assert_close(delta.grad, d2.grad, rtol=1e-4, atol=1e-5)
    assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
