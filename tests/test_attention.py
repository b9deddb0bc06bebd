"""Nested operations, scale factors, the attention (SDPA) rewrite and shape-generic modules.

References are written out in plain torch, in float64: einsum, softmax, logsumexp and
``torch.nn.functional.scaled_dot_product_attention`` -- never einc.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import examples, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import einc
from einc.parser import parse
from einc.rewrite import attention

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

E = torch.einsum
F = torch.nn.functional

ATTENTION = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"
"""The issue's example: heads split and merged by composition, scaled logits."""


def split_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(b, l, (h d)) -> (b, h, l, d)."""
    b, length, hd = x.shape
    return x.reshape(b, length, h, hd // h).transpose(1, 2)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int) -> torch.Tensor:
    """ATTENTION in plain float64 torch: einsum, softmax, einsum."""
    q4, k4, v4 = (split_heads(x.double(), h) for x in (q, k, v))
    p = torch.softmax(E("bhqd,bhkd->bhqk", q4, k4) / math.sqrt(q4.shape[-1]), -1)
    out = E("bhqk,bhkd->bhqd", p, v4)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


# ---------------------------------------------------------------- notation


@pytest.mark.parametrize("pattern", [
    ATTENTION,                                                        # the issue's attention pattern
    "softmax(b q d, b k d -> b q [k]), b k e -> b q e",               # no scale
    "i j, j k -> i k / 2",                                            # a plain scaled contraction
    "i j, j k -> i k * 3 / sqrt(j)",                                  # several factors
    "log_softmax(sum(a b c -> a b), b d -> a [d])",                   # a reduction nested in a normalizer
    "sum(softmax(i j, j k -> i [k]), k l -> i l), l m -> i m",        # nested twice
    "b k e, softmax(b q d, b k d -> b q [k] * 2) -> b q e",           # the nested operand second
    "softmax(b c -> b [c] / 2)",                                      # arrowless normalizer with a scale
])
def test_nested_and_scaled_patterns_render_and_reparse(pattern):
    parsed = parse(pattern)
    assert parse(parsed.render()) == parsed
    assert hash(parsed) == hash(parse(parsed.render()))


def test_the_operation_alone_is_the_pattern_not_a_nested_operand():
    assert not parse("softmax(b [c])").nested
    assert parse("softmax(b [c]), c -> b").nested


# ---------------------------------------------------------------- nested = step by step

NESTED = [
    # (nested pattern, sizes, shapes, float64 reference from the tensors)
    pytest.param(ATTENTION, {"h": 2}, [(2, 5, 8), (2, 7, 8), (2, 7, 8)],
                 lambda q, k, v: attention_reference(q, k, v, 2), id="attention-heads-by-composition"),
    pytest.param("log_softmax(i j, j k -> i [k]), k l -> i l", {}, [(3, 4), (4, 5), (5, 2)],
                 lambda a, b, c: torch.log_softmax(a @ b, -1) @ c, id="log-softmax-then-matmul"),
    pytest.param("logsumexp(a b c -> a b), b d -> a d", {}, [(2, 3, 4), (3, 5)],
                 lambda x, w: torch.logsumexp(x, -1) @ w, id="logsumexp-then-matmul"),
    pytest.param("softmax(sum(i j k -> i j), j l -> i [l])", {}, [(2, 3, 4), (3, 5)],
                 lambda x, w: torch.softmax(x.sum(-1) @ w, -1), id="sum-inside-softmax"),
    pytest.param("max(i j -> i), i k -> k", {}, [(4, 3), (4, 2)],
                 lambda x, w: x.amax(-1) @ w, id="max-then-contract"),
    pytest.param("sum(softmax(i j, j k -> i [k]), k l -> i l), l m -> i m", {}, [(2, 3), (3, 4), (4, 5), (5, 2)],
                 lambda a, b, c, d: (torch.softmax(a @ b, -1) @ c) @ d, id="nested-twice"),
    pytest.param("softmax(... q d, ... k d -> ... q [k]), ... k e -> ... q e", {}, [(2, 3, 4), (2, 5, 4), (2, 5, 6)],
                 lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v, id="ellipsis"),
    pytest.param("b k e, softmax(b q d, b k d -> b q [k]) -> b q e", {}, [(2, 5, 3), (2, 4, 6), (2, 5, 6)],
                 lambda v, q, k: torch.softmax(q @ k.transpose(1, 2), -1) @ v, id="value-first"),
    pytest.param("mean(softmax(i j -> [i] j) -> j)", {}, [(4, 3)],
                 lambda x: torch.softmax(x, 0).mean(0), id="mean-of-softmax"),
    pytest.param("softmax(b q (h d), b k (h d) -> b h q [k]), b h k e -> b q (h e)", {}, [(2, 3, 8), (2, 4, 8), (2, 2, 4, 3)],
                 lambda q, k, v: E("bhqk,bhke->bqhe", torch.softmax(E("bqhd,bkhd->bhqk", q.reshape(2, 3, 2, 4),
                                                                      k.reshape(2, 4, 2, 4)), -1), v).reshape(2, 3, 6),
                 id="heads-learned-from-the-outer-operand"),
]


@pytest.mark.parametrize("pattern, sizes, shapes, reference", NESTED)
@pytest.mark.parametrize("fuse", [True, False])
def test_nested_pattern_matches_plain_torch(pattern, sizes, shapes, reference, fuse):
    tensors = [randn(*s) for s in shapes]
    f = einc.compile(pattern, fuse=fuse, **sizes)
    torch.testing.assert_close(f(*tensors), reference(*tensors), rtol=1e-10, atol=1e-12)
    assert f.validate(*tensors) < 1e-10


def test_nested_equals_the_step_by_step_form():
    q, k, v = randn(2, 5, 8), randn(2, 7, 8), randn(2, 7, 8)
    weights = einc.compile("softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d))", h=2)(q, k)
    stepwise = einc.compile("b h q k, b k (h d) -> b q (h d)", h=2)(weights, v)
    torch.testing.assert_close(einc.compile(ATTENTION, h=2, fuse=False)(q, k, v), stepwise, rtol=0, atol=0)
    torch.testing.assert_close(einc.compile(ATTENTION, h=2)(q, k, v), stepwise, rtol=1e-12, atol=1e-14)


def test_nested_pattern_compiles_to_one_function():
    f = einc.compile(ATTENTION, h=2, fuse=False)
    source = f.explain((2, 5, 8), (2, 7, 8), (2, 7, 8)).source
    assert source.count("def einc_fn(") == 1 and "torch.softmax(" in source
    assert source.count("torch.bmm(") + source.count("torch.matmul(") == 2


def test_explain_lists_the_steps_of_every_level():
    plan = einc.compile(ATTENTION, h=2, fuse=False).explain((2, 5, 8), (2, 7, 8), (2, 7, 8))
    assert [step.equation for step in plan.steps] == ["b q h d, b k h d -> b h q k", "b h q k, b k h d -> b h q d"]
    assert plan.flops == sum(step.flops for step in plan.steps)
    assert plan.largest_intermediate == 2 * 2 * 5 * 7  # the softmax weights
    assert plan.shapes == ((2, 5, 8), (2, 7, 8), (2, 7, 8))


@pytest.mark.parametrize("pattern, shapes, message", [
    # d is one axis: the same size inside the nested operation and in the outer operand
    ("softmax(b q d, b k d -> b q [k]), b k d -> b q d", [(2, 3, 4), (2, 5, 4), (2, 5, 6)],
     r"axis 'd' has size \d in operand \d \(dimension 2\) but \d in operand \d"),
    # h from the outer operand does not divide the nested operand's (h d)
    ("softmax(b q (h d), b k (h d) -> b h q [k]), b h k e -> b q (h e)", [(2, 3, 8), (2, 4, 8), (2, 3, 4, 3)],
     r"composition \(h d\) in operand 0 .* has size 8, which the known sizes \(product 3\) do not divide"),
    # (h d) cannot be split: no size for h anywhere
    ("softmax(b q (h d), b k (h d) -> b q [k]), b k e -> b q e", [(2, 3, 8), (2, 4, 8), (2, 4, 3)],
     "cannot infer the sizes"),
    # too few tensors for the leaves
    (ATTENTION, [(2, 3, 8), (2, 4, 8)], "the pattern has 3 operands but 2 tensors"),
])
def test_nested_shape_errors_name_the_axis(pattern, shapes, message):
    with pytest.raises(einc.EincError, match=message):
        einc.compile(pattern)(*[randn(*s) for s in shapes])


def test_constants_are_refused_with_nested_operations():
    with pytest.raises(einc.EincError, match="constants are not supported"):
        einc.compile(ATTENTION, h=2, constants={2: torch.ones(2, 3, 8)})


# ---------------------------------------------------------------- scale

SCALED = [
    # (pattern, shapes, reference)
    ("i j, j k -> i k / 2", [(3, 4), (4, 5)], lambda a, b: (a @ b) / 2),                 # divide by an int
    ("i j, j k -> i k * 3", [(3, 4), (4, 5)], lambda a, b: (a @ b) * 3),                 # multiply by an int
    ("i j, j k -> i k / sqrt(j)", [(3, 4), (4, 5)], lambda a, b: (a @ b) / 2),           # sqrt of an axis size
    ("i j, j k -> i k * j / sqrt(16)", [(3, 4), (4, 5)], lambda a, b: (a @ b)),          # 4 / 4
    ("mean(i j -> i) * 2", [(3, 4)], lambda a: a.mean(1) * 2),                           # after a mean
    ("softmax(i j -> i [j] / 4)", [(3, 5)], lambda a: torch.softmax(a / 4, 1)),          # temperature
    ("log_softmax(i [j] * 3)", [(3, 5)], lambda a: torch.log_softmax(a * 3, 1)),         # arrowless
    ("ij,jk->ik/sqrt(j)", [(3, 9), (9, 2)], lambda a, b: (a @ b) / 3),                   # compact notation
]


@pytest.mark.parametrize("pattern, shapes, reference", SCALED, ids=[row[0] for row in SCALED])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_scale_matches_plain_torch(pattern, shapes, reference, backend):
    tensors = [randn(*s) for s in shapes]
    out = einc.compile(pattern, backend=backend)(*tensors)
    torch.testing.assert_close(out, reference(*tensors), rtol=1e-12, atol=1e-12)


def test_scale_reaches_the_code_as_integers_only():
    source = einc.compile("i j, j k -> i k * 3 / sqrt(j)").explain((3, 4), (4, 5)).source
    assert "(1.0 * 3 / 4 ** 0.5)" in source


def test_integer_scale_keeps_integer_tensors_integer():
    a, b = torch.arange(6).reshape(2, 3), torch.arange(6).reshape(3, 2)
    assert einc.einsum("i j, j k -> i k * 2", a, b).dtype == torch.int64
    torch.testing.assert_close(einc.einsum("i j, j k -> i k * 2", a, b), (a @ b) * 2)
    assert einc.einsum("i j, j k -> i k / 2", a, b).dtype == torch.float32


# ---------------------------------------------------------------- the SDPA rewrite

REWRITE = [
    # (pattern, sizes, shapes, taken?)
    (ATTENTION, {"h": 2}, [(2, 5, 8), (2, 7, 8), (2, 7, 8)], True),                                   # heads by composition
    ("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e", {}, [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], True),
    ("softmax(q d, k d -> q [k] / 8), k e -> q e", {}, [(4, 5), (6, 5), (6, 3)], True),              # no batch axis
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], True),  # one batch axis
    ("softmax(b k d, b q d -> b q [k]), b k e -> b q e", {}, [(2, 6, 5), (2, 4, 5), (2, 6, 3)], True),  # k before q
    ("b k e, softmax(b q d, b k d -> b q [k]) -> b q e", {}, [(2, 6, 3), (2, 4, 5), (2, 6, 5)], True),  # v first
    ("softmax(b q d, b k d -> b q [k]), b k e -> e q b", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], True),  # any output order
    ("softmax(b q (h d), b k (h d) -> b h q [k]), b k (h d) -> b q h d", {"h": 2}, [(2, 5, 8), (2, 7, 8), (2, 7, 8)],
     True),                                                                                           # output split
    ("log_softmax(b q d, b k d -> b q [k]), b k e -> b q e", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], False),  # not softmax
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e / 2", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], False),  # outer scale
    ("softmax(b q d, b k d -> b q [k]), b k e -> q e", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], False),  # b summed
    ("softmax(b q d, b k d -> b q [k]), k e -> b q e", {}, [(2, 4, 5), (2, 6, 5), (6, 3)], False),    # v lacks b
    ("softmax(... q d, ... k d -> ... q [k]), ... k e -> ... q e", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], False),
    ("softmax(b q d, b k d -> b q [k]), b k q -> b q", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 4)], False),  # v has q
    ("softmax(q d, k d -> q [k]), k d -> q", {}, [(4, 5), (6, 5), (6, 5)], False),                    # d summed in v
    ("softmax(b q d, b k d -> b [q k]), b k e -> b q e", {}, [(2, 4, 5), (2, 6, 5), (2, 6, 3)], False),  # joint softmax
    ("softmax(q, k -> q [k]), k e -> q e", {}, [(4,), (6,), (6, 3)], False),                          # no head axis
]


@pytest.mark.parametrize("pattern, sizes, shapes, taken", REWRITE, ids=[row[0] for row in REWRITE])
def test_sdpa_rewrite_is_taken_where_it_fits_and_equals_the_plain_lowering(pattern, sizes, shapes, taken):
    tensors = [randn(*s, dtype=torch.float32) for s in shapes]
    fused = einc.compile(pattern, **sizes)
    plan = fused.explain(*tensors)
    assert (plan.rewrite == "sdpa") is taken
    assert ("scaled_dot_product_attention(" in plan.source) is taken
    assert (attention(parse(pattern)) is not None) is taken
    plain = einc.compile(pattern, fuse=False, **sizes)
    assert "scaled_dot_product_attention" not in plain.explain(*tensors).source
    torch.testing.assert_close(fused(*tensors), plain(*tensors), rtol=1e-5, atol=1e-6)
    assert fused.validate(*tensors) < 1e-5


def test_sdpa_gets_the_scale_explicitly_even_without_one():
    source = einc.compile("softmax(q d, k d -> q [k]), k e -> q e").explain((4, 64), (6, 64), (6, 3)).source
    assert "scale=(1.0)" in source  # SDPA's default would be 1/sqrt(64)


def test_sdpa_matches_torch_sdpa_on_the_issue_shape_layout():
    q, k, v = (randn(2, 16, 32, dtype=torch.float32) for _ in range(3))
    out = einc.compile(ATTENTION, h=4)(q, k, v)
    expected = F.scaled_dot_product_attention(split_heads(q, 4), split_heads(k, 4), split_heads(v, 4))
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(2, 16, 32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse", [True, False])
def test_half_precision_attention_against_float64(dtype, fuse):
    q, k, v = (randn(2, 8, 16, dtype=dtype) for _ in range(3))
    out = einc.compile(ATTENTION, h=2, fuse=fuse)(q, k, v)
    assert out.dtype == dtype
    rtol, atol = (2e-2, 2e-3) if dtype == torch.float16 else (5e-2, 2e-2)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, 2), rtol=rtol, atol=atol)


def test_fully_masked_rows_sdpa_zeros_versus_plain_nan():
    # Every logit of row 0 is -inf: softmax of it is NaN in the plain form; SDPA's fused
    # kernels return zeros there (documented in the README).
    q = torch.ones(1, 3, 2)
    q[0, 0] = float("-inf")
    k, v = torch.ones(1, 4, 2), torch.randn(1, 4, 5)
    pattern = "softmax(b q d, b k d -> b q [k]), b k e -> b q e"
    plain = einc.compile(pattern, fuse=False)(q, k, v)
    fused = einc.compile(pattern)(q, k, v)
    assert torch.isnan(plain[0, 0]).all()
    assert (fused[0, 0] == 0).all()
    torch.testing.assert_close(plain[0, 1:], fused[0, 1:])
    expected = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    torch.testing.assert_close(fused, expected, equal_nan=True)


@pytest.mark.parametrize("fuse", [True, False])
def test_attention_gradients_pass_gradcheck(fuse):
    q, k, v = (randn(1, 3, 4, requires_grad=True) for _ in range(3))
    f = einc.compile(ATTENTION, h=2, fuse=fuse, backend="eager")
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_attention_gradients_match_plain_torch_in_float32():
    inputs = [randn(2, 6, 8, dtype=torch.float32, requires_grad=True) for _ in range(3)]
    wide = [x.detach().double().requires_grad_() for x in inputs]
    grad = randn(2, 6, 8, dtype=torch.float32)
    einc.compile(ATTENTION, h=2)(*inputs).backward(grad)
    attention_reference(*wide, 2).backward(grad.double())
    for mine, reference in zip(inputs, wide):
        torch.testing.assert_close(mine.grad.double(), reference.grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=examples(40))
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5),
    st.permutations("bhqe"), st.booleans(),
)
def test_random_attention_shapes_and_output_orders(b, h, lq, lk, d, e, order, v_first):
    """Random sizes and output orders: fused and plain lowering against torch in float64."""
    out = " ".join(order)
    inner = "softmax(b h q d, b h k d -> b h q [k] / sqrt(d))"
    pattern = f"b h k e, {inner} -> {out}" if v_first else f"{inner}, b h k e -> {out}"
    q, k, v = randn(b, h, lq, d), randn(b, h, lk, d), randn(b, h, lk, e)
    weights = torch.softmax(E("bhqd,bhkd->bhqk", q, k) / math.sqrt(d), -1)
    expected = E(f"bhqk,bhke->{''.join(order)}", weights, v)
    args = (v, q, k) if v_first else (q, k, v)
    for fuse in (True, False):
        f = einc.compile(pattern, fuse=fuse, backend="eager")
        assert (f.explain(*args).rewrite == "sdpa") is fuse
        torch.testing.assert_close(f(*args), expected, rtol=1e-10, atol=1e-12)



# ---------------------------------------------------------------- shape-generic modules

MODULES = [
    # (pattern, sizes, example shapes, other shapes, reference)
    (ATTENTION, {"h": 2}, [(1, 1, 8)] * 3, [(3, 5, 8), (3, 9, 8), (3, 9, 8)],
     lambda q, k, v: attention_reference(q, k, v, 2)),                                       # fused attention
    ("b t (h d), h d e -> b t h e", {"h": 2}, [(1, 1, 8), (2, 4, 3)], [(4, 7, 8), (2, 4, 3)],
     lambda x, w: E("bthd,hde->bthe", x.reshape(4, 7, 2, 4), w)),                          # projection to heads
    ("logsumexp(b (t c) -> b t)", {"c": 3}, [(2, 6)], [(5, 12)],
     lambda x: torch.logsumexp(x.reshape(5, 4, 3), -1)),                                   # stable reduction
    ("mean(... i j -> ... j)", {}, [(2, 3, 4)], [(5, 6, 7)], lambda x: x.mean(1)),         # mean over a dynamic axis
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", {}, [(1, 2, 3), (1, 2, 3), (1, 2, 4)],
     [(2, 5, 3), (2, 6, 3), (2, 6, 4)], lambda q, k, v: torch.softmax(q @ k.transpose(1, 2), -1) @ v),
]


@pytest.mark.parametrize("pattern, sizes, example, shapes, reference", MODULES, ids=[row[0] for row in MODULES])
@pytest.mark.parametrize("fuse", [True, False])
def test_module_serves_other_shapes_eagerly_and_scripted(pattern, sizes, example, shapes, reference, fuse):
    module = einc.compile(pattern, fuse=fuse, **sizes).module(*example)
    tensors = [randn(*s) for s in shapes]
    expected = reference(*tensors)
    torch.testing.assert_close(module(*tensors), expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(*tensors), expected, rtol=1e-10, atol=1e-12)


def test_module_refuses_size_one_ellipsis_broadcasting():
    f = einc.compile("... i, ... i -> ... i")
    with pytest.raises(einc.EincError, match="cannot broadcast size-1"):
        f.module((1, 3), (4, 3))


@pytest.mark.slow
def test_module_compiles_fullgraph_with_dynamic_shapes():
    module = einc.compile(ATTENTION, h=2).module(*[(1, 1, 8)] * 3)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for b, lq, lk in [(2, 3, 4), (3, 5, 7)]:
        q, k, v = randn(b, lq, 8), randn(b, lk, 8), randn(b, lk, 8)
        torch.testing.assert_close(compiled(q, k, v), attention_reference(q, k, v, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torchscript", "eager", pytest.param("compile", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fuse", [True, False])
def test_attention_on_every_backend(backend, fuse):
    q, k, v = randn(2, 5, 8), randn(2, 7, 8), randn(2, 7, 8)
    out = einc.compile(ATTENTION, h=2, backend=backend, fuse=fuse)(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_on_cuda(device, dtype):
    # Equal head dims and half floats: SDPA's flash kernels apply.
    q, k, v = (randn(2, 64, 128, dtype=dtype, device=device) for _ in range(3))
    out = einc.compile(ATTENTION, h=2)(q, k, v)
    assert out.device.type == "cuda" and out.dtype == dtype
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}[dtype]
    torch.testing.assert_close(out.double().cpu(), attention_reference(q.cpu(), k.cpu(), v.cpu(), 2),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("pattern, sizes, shapes", [
    (ATTENTION, {"h": 2}, [(2, 5, 8), (2, 7, 8), (2, 7, 8)]),                               # nested first
    ("b k e, softmax(b q d, b k d -> b q [k]) -> b q e", {}, [(2, 8, 3), (2, 5, 4), (2, 8, 4)]),  # nested second
    ("softmax(i j, j k -> i [k]), k l, l m -> i m", {}, [(2, 3), (3, 4), (4, 50), (50, 2)]),  # outer pair first
])
def test_plan_path_covers_every_tensor_in_opt_einsum_format(pattern, sizes, shapes):
    """Replaying the path over the tensors meets each step's operands (by element count:
    a step sees its operands with compositions split)."""
    plan = einc.compile(pattern, fuse=False, **sizes).explain(*shapes)
    live = [math.prod(s) for s in shapes]
    assert len(plan.path) == len(plan.steps)
    for contraction, step in zip(plan.path, plan.steps):
        assert step.operands == contraction
        assert sorted(live[i] for i in contraction) == sorted(math.prod(s) for s in step.shapes)
        for i in sorted(contraction, reverse=True):
            live.pop(i)
        live.append(math.prod(step.output_shape))
    assert live == [math.prod(plan.output_shape)]


REDUCE = {
    "sum": lambda x, dims: x.sum(dims),
    "mean": lambda x, dims: x.mean(dims),
    "max": lambda x, dims: x.amax(dims),
    "min": lambda x, dims: x.amin(dims),
    "logsumexp": lambda x, dims: torch.logsumexp(x, dims),
}


@st.composite
def nested_cases(draw):
    """``op(inner) , B -> out`` with a random operation, random axes and sizes, and its
    plain-torch float64 reference (the reduction or normalizer, then torch.einsum)."""
    pool = "abcdef"
    size = {a: draw(st.integers(1, 3), label=f"size {a}") for a in pool}
    inner = draw(st.permutations(pool).map(lambda p: list(p[:draw(st.integers(2, 4))])), label="inner axes")
    op = draw(st.sampled_from([*REDUCE, "softmax", "log_softmax"]), label="op")
    if op in REDUCE:
        kept = draw(st.permutations(inner).map(lambda p: list(p[:draw(st.integers(1, len(inner) - 1))])))
        spelled = f"{op}({' '.join(inner)} -> {' '.join(kept)})"
    else:
        kept = draw(st.permutations(inner))
        marked = draw(st.sampled_from(kept))
        spelled = f"{op}({' '.join(inner)} -> {' '.join(f'[{a}]' if a == marked else a for a in kept)})"
    other = draw(st.permutations(pool).map(lambda p: list(p[:draw(st.integers(1, 3))])), label="other axes")
    union = list(dict.fromkeys(kept + other))
    out = draw(st.permutations(union).map(lambda p: list(p[:draw(st.integers(0, len(union)))])), label="output")
    first = draw(st.booleans(), label="nested first")
    operands = [spelled, " ".join(other)] if first else [" ".join(other), spelled]
    pattern = f"{', '.join(operands)} -> {' '.join(out)}"

    def reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if op in REDUCE:
            dropped = [i for i, a in enumerate(inner) if a not in kept]
            left = [a for a in inner if a in kept]
            r = REDUCE[op](x, dropped).permute([left.index(a) for a in kept])
        else:
            r = x.permute([inner.index(a) for a in kept])
            r = getattr(torch, op)(r, kept.index(marked))
        return E(f"{''.join(kept)},{''.join(other)}->{''.join(out)}", r, y)

    shapes = [[size[a] for a in inner], [size[a] for a in other]]
    return pattern, shapes, reference, first


@settings(max_examples=examples(60))
@given(nested_cases())
def test_random_nested_operations_match_plain_torch(case):
    pattern, shapes, reference, first = case
    x, y = randn(*shapes[0]), randn(*shapes[1])
    expected = reference(x, y)
    out = einc.compile(pattern, backend="eager")(*((x, y) if first else (y, x)))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
