"""Single-operand spaced patterns against einops.rearrange / einops.repeat (exact).

Named axes, compositions ``(a b)``, the unit axis ``1`` (and ``()``), anonymous axes
(``(h 2)``, ``-> h w 3``), ``...`` and ``(...)``, and new output axes whose sizes come
by keyword.  Reductions are tested in test_reductions.py, besides the anonymous-axis
reductions below.
"""

from __future__ import annotations

import einops
import pytest
import torch

import einc

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

# (pattern, input shape, keyword sizes): each compared with einops.rearrange.
REARRANGE = [
    ("h w -> w h", (3, 4), {}),  # transpose
    ("b h w -> w b h", (2, 3, 4), {}),  # 3-d permutation
    ("b c h w -> b c h w", (2, 3, 4, 5), {}),  # identity
    ("b (h d) -> b h d", (2, 12), {"h": 3}),  # split, first size given
    ("b (h d) -> b h d", (2, 12), {"d": 4}),  # split, second size given
    ("b (h d) -> b h d", (2, 12), {"h": 3, "d": 4}),  # split, both sizes given
    ("b (h d) -> b d h", (2, 12), {"h": 3}),  # split and transpose
    ("b h d -> b (h d)", (2, 3, 4), {}),  # merge
    ("b h d -> b (d h)", (2, 3, 4), {}),  # merge in the other order
    ("b h d -> (b h d)", (2, 3, 4), {}),  # flatten everything
    ("(a b) c -> (b a) c", (6, 2), {"a": 2}),  # regroup (transpose inside a group)
    ("(a b) c -> c b a", (6, 2), {"a": 2}),  # split into a permutation
    ("b c (h1 h2) w -> b (c h1) h2 w", (2, 3, 4, 5), {"h1": 2}),  # move a factor across groups
    ("b c h w -> b (h w) c", (2, 3, 4, 5), {}),  # image to sequence
    ("b (h w) c -> b c h w", (2, 20, 3), {"h": 4}),  # sequence to image
    ("(b1 b2) h w c -> (b1 h) (b2 w) c", (6, 2, 3, 1), {"b1": 2}),  # tile a batch into a grid
    ("b (h p1) (w p2) c -> b (h w) (p1 p2 c)", (2, 4, 6, 3), {"p1": 2, "p2": 3}),  # patchify
    ("b 1 d -> b d", (2, 1, 4), {}),  # drop a unit axis
    ("b () d -> b d", (2, 1, 4), {}),  # drop an empty group
    ("b d -> b 1 d", (2, 4), {}),  # add a unit axis
    ("b d -> b () d", (2, 4), {}),  # add an empty group
    ("b 1 -> b", (3, 1), {}),  # trailing unit axis
    ("1 1 -> 1", (1, 1), {}),  # only unit axes
    ("b c h w -> b c (h w) 1", (2, 3, 4, 5), {}),  # merge plus unit axis
    ("(a 1 b) -> a b", (6,), {"a": 2}),  # unit inside a composition
    ("b ... -> ... b", (2, 3, 4), {}),  # ellipsis moves
    ("... d -> d ...", (2, 3, 4), {}),  # trailing axis to the front
    ("b ... d -> d ... b", (2, 3, 4, 5), {}),  # ellipsis in the middle
    ("b ... -> b ...", (2,), {}),  # empty ellipsis
    ("... -> ...", (2, 3), {}),  # ellipsis only
    ("b (h d) ... -> h b d ...", (2, 6, 3), {"h": 2}),  # split with an ellipsis
    ("b h w -> b h w", (2, 0, 3), {}),  # zero-size identity
    ("b (h d) -> b h d", (2, 0), {"h": 3}),  # zero-size split
    ("b h d -> b (h d)", (0, 3, 4), {}),  # zero-size merge
    ("long_name other_name -> other_name long_name", (3, 4), {}),  # multi-letter names
    ("x0 t0 -> t0 x0", (3, 4), {}),  # names like the generated code's identifiers
    ("b ... d -> b (...) d", (2, 3, 4, 5), {}),  # the ellipsis merged into one dimension
    ("b ... d -> b (...) d", (2, 5), {}),  # ... of no dimensions merges into a size-1 one
    ("b ... d -> (b ...) d", (2, 3, 4, 5), {}),  # merged with a named axis
    ("b ... d -> (... b) d", (2, 3, 4, 5), {}),  # ... first in the group
    ("b ... -> (...) b", (2, 3, 4), {}),  # moved as one dimension
]


def _id(row):
    pattern, shape, sizes = row
    return f"{pattern}|{'x'.join(map(str, shape))}|{','.join(f'{k}={v}' for k, v in sizes.items())}"


@pytest.mark.parametrize("pattern, shape, sizes", REARRANGE, ids=[_id(r) for r in REARRANGE])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_rearrange(pattern, shape, sizes, backend):
    x = torch.randn(shape)
    expected = einops.rearrange(x, pattern, **sizes)
    out = einc.compile(pattern, backend=backend, **sizes)(x)
    assert out.dtype == x.dtype
    assert tuple(out.shape) == tuple(expected.shape)
    assert torch.equal(out, expected)


# (pattern, input shape, keyword sizes): each compared with einops.repeat.
REPEAT = [
    ("h w -> h w c", (3, 4), {"c": 3}),  # new trailing axis
    ("h w -> c h w", (3, 4), {"c": 2}),  # new leading axis
    ("h w -> h c w", (3, 4), {"c": 2}),  # new middle axis
    ("h w -> (h r) w", (3, 4), {"r": 2}),  # repeat each row (interleave)
    ("h w -> (r h) w", (3, 4), {"r": 2}),  # tile rows
    ("h w -> h (w r)", (3, 4), {"r": 3}),  # repeat each column
    ("h w -> (h r1) (w r2)", (2, 3), {"r1": 2, "r2": 3}),  # upsample
    ("h w -> w c h", (3, 4), {"c": 2}),  # new axis plus transpose
    ("b -> b c d", (3,), {"c": 2, "d": 4}),  # two new axes
    ("b -> b 1 c", (3,), {"c": 2}),  # unit axis and new axis
    ("b ... -> b c ...", (2, 3, 4), {"c": 2}),  # new axis before an ellipsis
    ("h w -> h w c", (3, 4), {"c": 1}),  # new axis of size 1
    ("h w -> h w c", (3, 4), {"c": 0}),  # new axis of size 0
    ("h w -> (h r) w", (0, 4), {"r": 2}),  # repeat of an empty tensor
    ("h w -> h w 3", (3, 4), {}),  # an anonymous new axis
    ("h w -> (h 2) w", (3, 4), {}),  # an anonymous repeat factor
    ("h w -> (h 2) (w 3)", (2, 3), {}),  # two of them: distinct axes
    ("h w -> 2 h w 2", (2, 3), {}),  # the same number twice: still two axes
]


@pytest.mark.parametrize("pattern, shape, sizes", REPEAT, ids=[_id(r) for r in REPEAT])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_repeat(pattern, shape, sizes, backend):
    x = torch.randn(shape)
    expected = einops.repeat(x, pattern, **sizes)
    out = einc.compile(pattern, backend=backend, **sizes)(x)
    assert tuple(out.shape) == tuple(expected.shape)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.complex64], ids=str
)
def test_rearrange_keeps_dtype_and_values(dtype):
    x = (torch.arange(48).reshape(2, 4, 6) % 5).to(dtype)
    pattern = "b (h p) w -> b h (w p)"
    expected = einops.rearrange(x, pattern, p=2)
    out = einc.compile(pattern, p=2)(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_rearrange_non_contiguous_input():
    base = torch.randn(6, 4, 5)
    for x in (base.transpose(0, 2), base[::2, :, 1:], base[:1].expand(3, 4, 5)):
        expected = einops.rearrange(x, "a (b c) d -> d a c b", b=2)
        assert torch.equal(einc.compile("a (b c) d -> d a c b", b=2)(x), expected)


def test_rearrange_sizes_agree_with_tensor():
    # A keyword size that agrees with the tensor is accepted, one that disagrees is not.
    x = torch.randn(2, 12)
    assert torch.equal(einc.compile("b (h d) -> b h d", h=3, d=4)(x), einops.rearrange(x, "b (h d) -> b h d", h=3))
    with pytest.raises(einc.EincError):
        einc.compile("b (h d) -> b h d", h=3, d=5)(x)
    with pytest.raises(einc.EincError):
        einc.compile("h w -> w h", h=4)(torch.randn(3, 4))


def test_same_expression_different_shapes():
    f = einc.compile("b (h d) -> h b d", h=2)
    for shape in [(2, 4), (3, 6), (1, 2), (5, 10)]:
        x = torch.randn(shape)
        assert torch.equal(f(x), einops.rearrange(x, "b (h d) -> h b d", h=2))


# (reduction, pattern, input shape): anonymous axes in inputs are reduced, as in einops.
REDUCE = [
    ("mean", "b (h 2) (w 2) c -> b h w c", (1, 4, 6, 3)),  # 2x2 average pooling (the case)
    ("max", "b (h 2) (w 2) c -> b h w c", (2, 4, 4, 3)),  # 2x2 max pooling
    ("sum", "(b 3) c -> b c", (6, 2)),  # sum over groups of three rows
    ("min", "b ... (c 2) -> b ... c", (2, 3, 4)),  # with an ellipsis
    ("prod", "b 3 -> b", (2, 3)),  # a standalone anonymous axis
]


@pytest.mark.parametrize("op, pattern, shape", REDUCE, ids=[f"{r[0]}|{r[1]}" for r in REDUCE])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_anonymous_axes_reduce_like_einops(op, pattern, shape, backend):
    x = torch.randn(shape, dtype=torch.float64)
    expected = einops.reduce(x, pattern, op)
    out = einc.compile(f"{op}({pattern})", backend=backend)(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("b (... d) -> b", "only in the output"),  # einops refuses (...) in inputs too
        ("a 0 -> a", "positive size"),  # an anonymous axis of size 0
        ("a 2b -> a", "starts with a letter"),  # '2b' is no name
        ("ab2,b->a", "letters only"),  # numbers need spaced notation
        ("a b -> a (... b)", "no input has"),  # (...) needs an input's ...
        # An anonymous input axis is reduced: without an operation that is a silent sum,
        # and einops' rearrange refuses it too.
        ("b (h 2) w -> b h w 2", "needs an operation"),
        ("(h 3) -> h", "needs an operation"),
    ],
)
def test_anonymous_and_merged_ellipsis_errors(pattern, message):
    with pytest.raises(einc.EincError, match=message):
        einc.compile(pattern)
