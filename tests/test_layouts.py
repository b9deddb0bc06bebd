"""Operand layouts and kernel choice (issue 11.1): the lowering may reorder a product's
operands or pick a dot-product kernel; results and gradients stay torch.einsum's.

References: torch.einsum in float64 (complex128), and autograd through it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randn

import einc

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

BACKENDS = ["torchscript", "eager"]

CASES = [
    # (pattern, shapes, kernel of the last step)
    # Dot products per batch entry: vecdot, not a bmm of 1xK by Kx1 matrices.
    ("b i j, b i j -> b", [(4, 3, 5), (4, 3, 5)], "vecdot"),
    # One full dot product (no batch): a scalar.
    ("i, i ->", [(7,), (7,)], "vecdot"),
    # Batch axes in other places and orders in the two operands.
    ("i b c, c b i -> b", [(3, 4, 5), (5, 4, 3)], "vecdot"),
    # The narrow free side moved left: N is the wide d.
    ("l b n d, v b n l -> v b n d", [(4, 2, 3, 16), (3, 2, 3, 4)], "matmul"),
    # Swapped by output order.
    ("b j k, b i j -> b i k", [(2, 4, 30), (2, 5, 4)], "matmul"),
    # The weight first: its intermediate is laid out with the output's b outermost.
    ("i j o, b i, b j -> b o", [(8, 8, 4), (16, 8), (16, 8)], "bmm"),
]


@pytest.mark.parametrize("pattern, shapes, kernel", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_match_torch_einsum(pattern, shapes, kernel, dtype, backend):
    expression = einc.compile(pattern, backend=backend)
    tensors = [randn(*s, dtype=dtype) for s in shapes]
    assert expression.explain(*tensors).steps[-1].kernel == kernel
    wide = torch.complex128 if dtype.is_complex else torch.float64
    expected = torch.einsum(pattern, *[t.to(wide) for t in tensors])
    result = expression(*tensors)
    assert result.dtype == dtype and result.shape == expected.shape
    assert_close(result.to(wide), expected, rtol=1e-2 if dtype == torch.float16 else 1e-5,
                 atol=1e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("pattern, shapes, kernel", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_gradients_match_torch_einsum(pattern, shapes, kernel, dtype, backend):
    # vecdot conjugates its first argument; einc passes it conjugated back: complex
    # gradients are those of the plain product.
    expression = einc.compile(pattern, backend=backend)
    for _ in range(3):
        tensors = [randn(*s, dtype=dtype).requires_grad_() for s in shapes]
        weight = randn(*torch.einsum(pattern, *tensors).shape, dtype=dtype)
        got = torch.autograd.grad((expression(*tensors) * weight).real.sum(), tensors)
        expected = torch.autograd.grad((torch.einsum(pattern, *tensors) * weight).real.sum(), tensors)
        for g, r in zip(got, expected):
            assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dot_products_stay_exact(dtype):
    # vecdot takes floating tensors only: integers keep the exact int64 path.
    a = torch.arange(24).reshape(4, 6).to(dtype)
    expected = torch.einsum("b i, b i -> b", a.long(), a.long())
    assert torch.equal(einc.compile("b i, b i -> b")(a, a), expected)


@pytest.mark.parametrize("pattern, shapes, kernel", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_under_vmap(pattern, shapes, kernel, dtype, backend):
    # A conjugated view (vecdot's complex form) has no vmap batching rule: safe code
    # keeps the bmm for complex dot products.  Reference: torch.einsum per batch entry.
    expression = einc.compile(pattern, backend=backend)
    tensors = [randn(2, *s, dtype=dtype) for s in shapes]
    expected = torch.stack([torch.einsum(pattern, *[t[i] for t in tensors]) for i in range(2)])
    assert_close(torch.func.vmap(expression)(*tensors), expected, rtol=1e-4, atol=1e-4)
