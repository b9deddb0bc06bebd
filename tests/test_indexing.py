"""Indexing in patterns: ``gather(data, index... -> output)``, and token log-probabilities
(``gather(log_softmax(...), ids -> ...)``, fused over a projection into a cross-entropy
kernel that never builds the logits).

References are torch in float64, never einc: ``torch.gather``, advanced indexing
(``x[torch.arange(B)[:, None], idx]``), ``W[ids]``, ``F.log_softmax`` and
``F.cross_entropy`` (reductions none/mean/sum, ``ignore_index``, class-probability
targets); gradients are torch autograd of those references, with indices that repeat
(their gradients accumulate).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import einc
import einc.crossentropy
from einc.errors import EincError, MemoryLimitError
from einc.parser import parse
from einc.rewrite import cross_entropy

# Small sizes with more indices than entries, so that indices repeat: n < k and i * j < k.
SIZES = dict(b=2, t=3, v=5, i=2, j=3, n=4, d=3, e=2, k=7, h=2)


def _arange(n: int, dim: int, rank: int) -> torch.Tensor:
    """``arange(n)`` shaped to broadcast along dimension ``dim`` of ``rank`` (advanced indexing)."""
    return torch.arange(n).reshape([n if d == dim else 1 for d in range(rank)])


def _shape(axes: str, sizes: dict[str, int]) -> list[int]:
    """The shape of an axis list such as ``"b (d e)"``."""
    shape = []
    for group in re.findall(r"\([^)]*\)|\S+", axes):
        n = 1
        for name in group.strip("()").split():
            n *= sizes[name]
        shape.append(n)
    return shape


def _operands(spec, sizes, dtype=torch.float64, index_dtype=torch.int64, seed=0):
    """A data tensor for each axis list, an index into axis ``into`` for each ``(axes, into)``."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for item in spec:
        if isinstance(item, str):
            found.append(torch.randn(_shape(item, sizes), generator=g, dtype=torch.float64).to(dtype))
        else:
            axes, into = item
            found.append(torch.randint(0, max(1, sizes[into]), _shape(axes, sizes), generator=g).to(index_dtype))
    return found


# (id, pattern, operands: an axis list for data, (axes, indexed axis) for an index, keyword
# sizes, sizes that differ from SIZES, index dtype, the reference on float64 data)
ROWS = [
    # token logits: out[b, t] = x[b, t, ids[b, t]]
    ("token-logits", "gather(b t [v], b t -> b t)", ["b t v", ("b t", "v")], {}, {}, torch.int64,
     lambda x, ids: x.gather(2, ids[..., None])[..., 0]),
    # the same without brackets: the indexed axis is the one the output drops
    ("token-logits-unbracketed", "gather(b t v, b t -> b t)", ["b t v", ("b t", "v")], {}, {}, torch.int64,
     lambda x, ids: x.gather(2, ids[..., None])[..., 0]),
    # torch.gather's documented 2-D case: output[i] = input[i, index[i]]
    ("batch-gather", "gather(i [j], i -> i)", ["i j", ("i", "j")], {}, {}, torch.int64,
     lambda x, idx: x.gather(1, idx[:, None])[:, 0]),
    # rows picked per batch: out[b, k, d] = x[b, idx[b, k], d]
    ("rows", "gather(b [n] d, b k -> b k d)", ["b n d", ("b k", "n")], {}, {}, torch.int64,
     lambda x, idx: x[_arange(x.shape[0], 0, 2), idx]),
    # embedding lookup W[ids]: no batch axis shared
    ("embedding", "gather([v] d, b t -> b t d)", ["v d", ("b t", "v")], {}, {}, torch.int64,
     lambda w, ids: w[ids]),
    # batch axes in another order in the data, the index and the output
    ("batch-axes-reordered", "gather(t [v] b, b t -> t b)", ["t v b", ("b t", "v")], {}, {}, torch.int64,
     lambda x, ids: x[_arange(x.shape[0], 0, 2), ids.T, _arange(x.shape[2], 1, 2)]),
    # top-k style: the index has an axis of its own
    ("top-k", "gather(b [v], b k -> b k)", ["b v", ("b k", "v")], {}, {}, torch.int64,
     lambda x, idx: x.gather(1, idx)),
    # two indexed axes: x[b, I[b, k], J[b, k], d]
    ("two-indexed", "gather(b [i] [j] d, b k, b k -> b k d)", ["b i j d", ("b k", "i"), ("b k", "j")], {}, {},
     torch.int64, lambda x, ii, jj: x[_arange(x.shape[0], 0, 2), ii, jj]),
    # two indexed axes, no batch axis: x[I, J]
    ("two-indexed-no-batch", "gather([i] [j], k, k -> k)", ["i j", ("k", "i"), ("k", "j")], {}, {}, torch.int64,
     lambda x, ii, jj: x[ii, jj]),
    # two indexed axes around a kept one, indices over different new axes: x[I[k], :, J[t]]
    ("two-indexed-outer", "gather([i] d [j], k, t -> k t d)", ["i d j", ("k", "i"), ("t", "j")], {}, {},
     torch.int64, lambda x, ii, jj: x.permute(0, 2, 1)[ii[:, None], jj[None, :]]),
    # a composed output
    ("composed-output", "gather(b t [v], b t -> (b t))", ["b t v", ("b t", "v")], {}, {}, torch.int64,
     lambda x, ids: x.gather(2, ids[..., None]).reshape(-1)),
    # a composed kept axis in the data, split in the output
    ("composed-data", "gather(b [n] (d e), b k -> b k d e)", ["b n (d e)", ("b k", "n")], {"e": SIZES["e"]}, {},
     torch.int64, lambda x, idx: x[_arange(x.shape[0], 0, 2), idx].reshape(*idx.shape, -1, SIZES["e"])),
    # a data axis the index lacks: out[b, h] = x[b, h, ids[b]]
    ("data-axis-index-lacks", "gather(b h [v], b -> b h)", ["b h v", ("b", "v")], {}, {}, torch.int64,
     lambda x, ids: x[_arange(x.shape[0], 0, 2), _arange(x.shape[1], 1, 2), ids[:, None]]),
    # an index without the batch axis: the same rows for every b
    ("index-lacks-batch", "gather(b [n] d, k -> b k d)", ["b n d", ("k", "n")], {}, {}, torch.int64,
     lambda x, idx: x[:, idx]),
    # the index's axes in another order, the output permuted
    ("index-reordered", "gather(b [n] d, k b -> d b k)", ["b n d", ("k b", "n")], {}, {}, torch.int64,
     lambda x, idx: x[_arange(x.shape[0], 0, 2), idx.T].permute(2, 0, 1)),
    # no indices: an empty output
    ("empty-index", "gather(b [n] d, b k -> b k d)", ["b n d", ("b k", "n")], {}, {"k": 0}, torch.int64,
     lambda x, idx: x[_arange(x.shape[0], 0, 2), idx]),
    # an empty indexed axis and no indices into it
    ("empty-indexed-axis", "gather(b [n] d, b k -> b k d)", ["b n d", ("b k", "n")], {}, {"n": 0, "k": 0},
     torch.int64, lambda x, idx: x[_arange(x.shape[0], 0, 2), idx]),
    # an empty batch
    ("empty-batch", "gather(b t [v], b t -> b t)", ["b t v", ("b t", "v")], {}, {"b": 0}, torch.int64,
     lambda x, ids: x.gather(2, ids[..., None])[..., 0]),
    # int32 indices
    ("int32-indices", "gather(b t [v], b t -> b t)", ["b t v", ("b t", "v")], {}, {}, torch.int32,
     lambda x, ids: x.gather(2, ids.long()[..., None])[..., 0]),
    # int16 indices, two of them
    ("int16-indices", "gather(b [i] [j] d, b k, b k -> b k d)", ["b i j d", ("b k", "i"), ("b k", "j")], {}, {},
     torch.int16, lambda x, ii, jj: x[_arange(x.shape[0], 0, 2), ii.long(), jj.long()]),
    # uint8 indices, an embedding
    ("uint8-indices", "gather([v] d, b t -> b t d)", ["v d", ("b t", "v")], {}, {}, torch.uint8,
     lambda w, ids: w[ids.long()]),
    # nested in a reduction
    ("in-a-sum", "sum(gather(b t [v], b t -> b t) -> b)", ["b t v", ("b t", "v")], {}, {}, torch.int64,
     lambda x, ids: x.gather(2, ids[..., None])[..., 0].sum(1)),
    ("in-a-mean", "mean(gather(b [n] d, b k -> b k d) -> b d)", ["b n d", ("b k", "n")], {}, {}, torch.int64,
     lambda x, idx: x[_arange(x.shape[0], 0, 2), idx].mean(1)),
    # over a contraction: the logits of a projection, then the chosen ones
    ("over-a-contraction", "gather(sum(b t d, v d -> b t v), b t -> b t)", ["b t d", "v d", ("b t", "v")], {}, {},
     torch.int64, lambda h, w, ids: (h @ w.T).gather(2, ids[..., None])[..., 0]),
    # gathered rows, then contracted with another operand
    ("then-a-contraction", "gather(b [n] d, b k -> b k d), d e -> b k e", ["b n d", ("b k", "n"), "d e"], {}, {},
     torch.int64, lambda x, idx, w: x[_arange(x.shape[0], 0, 2), idx] @ w),
    # two embedding lookups contracted together
    ("two-gathers", "gather([v] d, b t -> b t d), gather([v] d, b k -> b k d) -> b t k",
     ["v d", ("b t", "v"), "v d", ("b k", "v")], {}, {}, torch.int64,
     lambda w1, ids, w2, idx: w1[ids] @ w2[idx].transpose(1, 2)),
]


def _warm_sizes(sizes: dict[str, int], keyword: dict[str, int]) -> dict[str, int]:
    """Other sizes (keyword ones kept): a first call on them makes the row's call a new signature."""
    return {a: n if a in keyword else n + 1 for a, n in sizes.items()}


@pytest.mark.parametrize("name, pattern, spec, keyword, sizes, index_dtype, reference", ROWS,
                         ids=[r[0] for r in ROWS])
def test_gather_matches_indexing(both_codes, name, pattern, spec, keyword, sizes, index_dtype, reference):
    sizes = {**SIZES, **sizes}
    f = einc.compile(pattern, **keyword)
    # A first signature: with both_codes="shared", the calls below run the shared generic code.
    f(*_operands(spec, _warm_sizes(sizes, keyword), index_dtype=index_dtype, seed=1))
    tensors = _operands(spec, sizes, index_dtype=index_dtype)
    data = [i for i, item in enumerate(spec) if isinstance(item, str)]
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        leaves = [t.to(dtype).requires_grad_() if i in data else t for i, t in enumerate(tensors)]
        wanted = [t.detach().double().requires_grad_() if i in data else t for i, t in enumerate(leaves)]
        out = f(*leaves)
        expected = reference(*wanted)
        assert out.dtype == dtype
        assert tuple(out.shape) == tuple(expected.shape)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        # Gradients of a weighted sum (not a uniform one), against autograd of the reference.
        weights = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).reshape(out.shape)
        got = torch.autograd.grad((out * weights.to(dtype)).sum(), [leaves[i] for i in data])
        want = torch.autograd.grad((expected * weights).sum(), [wanted[i] for i in data], allow_unused=True)
        for g, w, i in zip(got, want, data):
            w = torch.zeros_like(wanted[i]) if w is None else w  # (an empty output: no gradient at all)
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


def test_repeated_indices_accumulate_their_gradients():
    """Each row of W picked m times gets m times the upstream gradient (index_add semantics)."""
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 0], [0, 3, 2]])
    einc.compile("gather([v] d, b t -> b t d)")(w, ids).sum().backward()
    counts = torch.tensor([3.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w.grad, counts[:, None].expand(4, 3))


def test_non_contiguous_data_and_index():
    x = torch.randn(5, 4, 2, dtype=torch.float64).permute(2, 1, 0)  # (b=2, n=4, d=5), strided
    idx = torch.randint(0, 4, (6, 2)).T  # (b=2, k=6), strided
    expected = x[torch.arange(2)[:, None], idx]
    torch.testing.assert_close(einc.compile("gather(b [n] d, b k -> b k d)")(x, idx), expected)
    stretched = torch.randint(0, 4, (6,)).expand(2, 6)  # a stride-0 index
    torch.testing.assert_close(einc.compile("gather(b [n] d, b k -> b k d)")(x, stretched),
                               x[torch.arange(2)[:, None], stretched])


# ---------------------------------------------------------------------------- the parser


# (pattern, indexed axes, (position, indexed axis) of each index tensor, canonical spelling)
PARSED = [
    ("gather(b t [v], b t -> b t)", ("v",), [(1, "v")], "gather(b t v, b t -> b t)"),
    ("gather(b t v, b t -> b t)", ("v",), [(1, "v")], "gather(b t v, b t -> b t)"),
    ("gather(b [i] [j] d, b k, b k -> b k d)", ("i", "j"), [(1, "i"), (2, "j")],
     "gather(b i j d, b k, b k -> b k d)"),
    ("gather([j] [i], k, k -> k)", ("j", "i"), [(1, "j"), (2, "i")], "gather(j i, k, k -> k)"),  # the data's order
    ("gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)", ("v",), [(2, "v")],
     "gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)"),
    ("gather(log_softmax(b t d, v d -> b t [v] mask(b t v)), b t -> b t)", ("v",), [(3, "v")],  # after the mask
     "gather(log_softmax(b t d, v d -> b t [v] mask(b t v)), b t -> b t)"),
    ("bi,bij,bj->b", (), [], "bi,bij,bj->b"),  # not a gather
]


@pytest.mark.parametrize("pattern, indexed, leaves, rendered", PARSED, ids=[p[0] for p in PARSED])
def test_parsed(pattern, indexed, leaves, rendered):
    parsed = parse(pattern)
    assert parsed.op == ("gather" if pattern.startswith("gather") else None)
    assert parsed.indexed == indexed
    assert [(position, axis) for position, axis, _ in parsed.index_leaves()] == leaves
    assert all(level is parsed for _, _, level in parsed.index_leaves())
    assert parsed.render() == rendered
    assert parse(rendered) == parsed  # brackets on the data are a spelling only


def test_nested_gathers_index_leaves():
    """Index positions count every tensor before them, nested ones included."""
    parsed = parse("x y, gather([v] d, b t -> b t d), gather([v] d, b k -> b k d) -> x")
    assert parsed.op is None and parsed.indexed == ()
    assert [(position, axis) for position, axis, _ in parsed.index_leaves()] == [(2, "v"), (4, "v")]
    levels = [level for _, _, level in parsed.index_leaves()]
    assert levels == [parsed.inputs[1], parsed.inputs[2]]
    assert parse("sum(gather(b t v, b t -> b t) -> b)").index_leaves()[0][:2] == (1, "v")


BAD_PATTERNS = [
    ("gather(b t v -> b t)", "takes the data, then one index tensor"),  # no index
    ("gather(b t v, b s -> b t)", "axis 's' of index operand 1 is not in the output"),  # an index axis dropped
    ("gather(b (t v), b -> b t)", "must be a dimension of its own"),  # the indexed axis inside a composition
    ("gather(b t [d] v, b t -> b t d)", "brackets in gather(...)'s data mark its indexed axes"),  # wrong bracket
    ("gather([b] t v, b t -> b t)", "brackets in gather(...)'s data mark its indexed axes"),  # a batch axis
    ("gather(b t v, b t v -> b t v)", "one index tensor per indexed axis"),  # nothing dropped, one index
    ("gather(b t v, b t, b t -> b t)", "one index tensor per indexed axis"),  # one dropped, two indices
    ("gather(b t [d] v, b t -> b t)", "one index tensor per indexed axis"),  # two dropped, one index
    ("gather(b t v, b t -> b t z)", "output axis 'z' is in neither the data nor an index"),
    ("gather(b t v, sum(b t -> b t) -> b t)", "a gather(...) index is a tensor, not a nested operation"),
    ("gather(b t v, b v -> b t)", "index operand 1 has the indexed axis 'v'"),  # an index over its own axis
    ("gather(... t v, t -> ... t)", "takes named axes, not '...'"),
    ("gather(b t v, b t -> b t / 2)", "a scale applies to sums of products"),  # a gather has no scale
    ("gather(b t v, b t -> b t b)", "axis 'b' appears twice in the output"),
]


@pytest.mark.parametrize("pattern, message", BAD_PATTERNS, ids=[p[0] for p in BAD_PATTERNS])
def test_bad_patterns(pattern, message):
    with pytest.raises(EincError, match=re.escape(message)):
        parse(pattern)
    with pytest.raises(EincError, match=re.escape(message)):
        einc.compile(pattern)


@pytest.mark.parametrize("pattern, fused", [
    ("gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)", True),  # token log-probabilities of a projection
    ("gather(log_softmax(v d, b t d -> b t [v]), b t -> b t)", True),  # w first
    ("gather(log_softmax(n d, d v -> n [v]), n -> n)", True),  # w as (d, v)
    ("gather(log_softmax(b t e f, v e f -> b t [v]), b t -> t b)", True),  # two hidden axes, output reordered
    ("gather(softmax(b t d, v d -> b t [v]), b t -> b t)", False),  # probabilities, not log-probabilities
    ("gather(log_softmax(b t d, v d -> b t [v] / sqrt(d)), b t -> b t)", False),  # scaled logits
    ("gather(log_softmax(b t d, v d -> b t [v] * 2), b t -> b t)", False),
    ("gather(log_softmax(b t d, v d -> b t [v] mask(b t v)), b t -> b t)", False),  # masked logits
    ("gather(log_softmax(b t d, v d -> b t [v] bias(t v)), b t -> b t)", False),  # biased logits
    ("gather(log_softmax(b t [v]), b t -> b t)", False),  # no projection
    ("gather(b t v, b t -> b t)", False),  # no log_softmax
    ("gather(log_softmax(b t d, v d -> b t [v]), b -> b t)", False),  # an index over part of the rows
])
def test_cross_entropy_rewrite_recognizes(pattern, fused):
    found = cross_entropy(parse(pattern))
    assert (found is not None) == fused
    if fused:
        assert found.vocab == "v"


def test_per_batch_vocabulary_weights():
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)  # one projection per b
    ids = torch.randint(0, 5, (2, 3), generator=g)
    pattern = "gather(log_softmax(b t d, b v d -> b t [v]), b t -> b t)"
    expected = F.log_softmax(torch.einsum("btd,bvd->btv", h, w), -1).gather(2, ids[..., None])[..., 0]
    torch.testing.assert_close(einc.compile(pattern, fuse=False)(h, w, ids), expected)  # (unfused: right)
    torch.testing.assert_close(einc.compile(pattern)(h, w, ids), expected)


def test_an_indexed_axis_repeated_in_the_data():
    y = torch.randn(2, 4, 4)
    ii, jj = torch.randint(0, 4, (2, 6)), torch.randint(0, 4, (2, 6))
    with pytest.raises(EincError):
        einc.compile("gather(b [v] [v], b k, b k -> b k)")(y, ii, jj)


def test_an_index_axis_repeated_takes_the_diagonal():
    """As in einsum, an axis twice in one operand means its diagonal: ids[b, t, b]."""
    x = torch.randn(3, 3, 5, dtype=torch.float64)
    ids = torch.randint(0, 5, (3, 3, 3))
    diagonal = ids.diagonal(0, 0, 2).T  # [b, t] -> ids[b, t, b]
    torch.testing.assert_close(einc.compile("gather(b t [v], b t b -> b t)")(x, ids),
                               x.gather(2, diagonal[..., None])[..., 0], rtol=0, atol=0)


# ------------------------------------------------------------------------------- dtypes


DTYPES = [
    torch.bfloat16,  # copies: exact
    torch.float16,
    torch.int64,
    torch.int32,  # not promoted to the indices' int64
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern, reference", [
    ("gather(b t [v], b t -> b t)", lambda x, ids: x.gather(2, ids[..., None])[..., 0]),
    ("gather([v] d, b t -> b t d)", lambda x, ids: x[ids]),
], ids=["token", "embedding"])
def test_gather_keeps_the_data_dtype(both_codes, dtype, pattern, reference):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (2, 3, 5) if "b t [v]" in pattern else (5, 3), generator=g).to(dtype)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    f = einc.compile(pattern)
    for index_dtype in (torch.int64, torch.int32):  # a second signature: the shared code, with both_codes
        out = f(x, ids.to(index_dtype))
        assert out.dtype == dtype
        assert torch.equal(out, reference(x, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_float_gather_gradients(dtype):
    x = torch.randn(2, 4, 3).to(dtype).requires_grad_()
    idx = torch.randint(0, 4, (2, 7))
    out = einc.compile("gather(b [n] d, b k -> b k d)")(x, idx)
    assert out.dtype == dtype and torch.equal(out, x.detach()[torch.arange(2)[:, None], idx])
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights.to(dtype)).sum().backward()
    wanted = x.detach().double().requires_grad_()
    (wanted[torch.arange(2)[:, None], idx] * weights.double()).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), wanted.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_gather_of_complex_data(dtype):
    x = torch.randn(2, 3, 5, dtype=dtype)
    ids = torch.randint(0, 5, (2, 3))
    out = einc.compile("gather(b t [v], b t -> b t)")(x, ids)
    assert out.dtype == dtype and torch.equal(out, x.gather(2, ids[..., None])[..., 0])


# ------------------------------------------------------- token log-probabilities, cross-entropy

B, T, D, V = 2, 3, 4, 11
CE = "gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)"


def _projection(seed=0, b=B, t=T, d=D, v=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    return h, w, ids


def _cross_entropy(h, w, ids, **keywords):
    """F.cross_entropy of the logits h · wᵀ (float64)."""
    logits = torch.einsum("btd,vd->btv", h, w)
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), ids.reshape(-1), **keywords)
    return loss.reshape(ids.shape) if keywords.get("reduction") == "none" else loss


def test_token_log_probabilities_of_logits():
    x = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    _, _, ids = _projection()
    f = einc.compile("gather(log_softmax(b t [v]), b t -> b t)")
    assert f.explain(x, ids).rewrite == ""  # no projection to fuse
    out = f(x, ids)
    expected = F.log_softmax(x, -1).gather(2, ids[..., None])[..., 0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    got, = torch.autograd.grad((out * weights).sum(), x)
    want, = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# (fuse, memory_limit): the fused kernel in one chunk, in chunks of two rows, and unfused
MODES = [(True, None), (True, 30), (False, None)]
MODE_IDS = ["fused", "fused-chunks", "unfused"]

# (id, pattern, einc's operands from (h, w, ids), the result as (b, t))
SPELLINGS = [
    ("plain", CE, lambda h, w, ids: (h, w, ids), lambda out: out),
    ("w-first", "gather(log_softmax(v d, b t d -> b t [v]), b t -> b t)", lambda h, w, ids: (w, h, ids),
     lambda out: out),
    ("w-transposed", "gather(log_softmax(b t d, d v -> b t [v]), b t -> b t)", lambda h, w, ids: (h, w.T, ids),
     lambda out: out),
    ("h-transposed", "gather(log_softmax(t b d, v d -> b t [v]), b t -> b t)",
     lambda h, w, ids: (h.transpose(0, 1), w, ids), lambda out: out),
    ("index-reordered", "gather(log_softmax(b t d, v d -> b t [v]), t b -> t b)",
     lambda h, w, ids: (h, w, ids.T), lambda out: out.T),
    ("output-reordered", "gather(log_softmax(b t d, v d -> b t [v]), b t -> t b)",
     lambda h, w, ids: (h, w, ids), lambda out: out.T),
    ("vocabulary-in-the-middle", "gather(log_softmax(b t d, v d -> b [v] t), b t -> b t)",
     lambda h, w, ids: (h, w, ids), lambda out: out),
    ("composed-output", "gather(log_softmax(b t d, v d -> b t [v]), b t -> (b t))",
     lambda h, w, ids: (h, w, ids), lambda out: out.reshape(B, T)),
    ("two-hidden-axes", "gather(log_softmax(b t e f, v e f -> b t [v]), b t -> b t)",
     lambda h, w, ids: (h.reshape(B, T, 2, D // 2), w.reshape(V, 2, D // 2), ids), lambda out: out),
    ("one-row-axis", "gather(log_softmax(n d, v d -> n [v]), n -> n)",
     lambda h, w, ids: (h.reshape(-1, D), w, ids.reshape(-1)), lambda out: out.reshape(B, T)),
]


@pytest.mark.parametrize("fuse, memory_limit", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name, pattern, arrange, back", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_token_log_probabilities_of_a_projection(name, pattern, arrange, back, fuse, memory_limit):
    h, w, ids = _projection()
    f = einc.compile(pattern, fuse=fuse, memory_limit=memory_limit)
    plan = f.explain(*arrange(h, w, ids))
    assert plan.rewrite == ("cross_entropy" if fuse else "")
    if fuse:
        assert plan.steps[0].kernel == "linear_cross_entropy"
    expected = -_cross_entropy(h, w, ids, reduction="none")
    for weights in (None, torch.linspace(-1, 2, B * T, dtype=torch.float64).reshape(B, T)):  # uniform, not
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        out = back(f(*arrange(*leaves, ids)))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(out.mean() if weights is None else (out * weights).sum(), leaves)
        wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        reference = -_cross_entropy(*wanted, ids, reduction="none")
        want = torch.autograd.grad(reference.mean() if weights is None else (reference * weights).sum(), wanted)
        for g, x in zip(got, want):
            torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fuse, memory_limit", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("pattern, reduction", [
    (CE, "none"),
    (f"mean({CE} -> )", "mean"),
    (f"sum({CE} -> )", "sum"),
], ids=["none", "mean", "sum"])
def test_cross_entropy_losses(pattern, reduction, fuse, memory_limit):
    h, w, ids = _projection(1)
    f = einc.compile(pattern, fuse=fuse, memory_limit=memory_limit)
    assert f.explain(h, w, ids).rewrite == ("cross_entropy" if fuse else "")
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    loss = -f(*leaves, ids)
    wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    expected = _cross_entropy(*wanted, ids, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.5, 2, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    got = torch.autograd.grad((loss * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), wanted)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


class _Shapes(TorchFunctionMode):
    """(name, shape) of every tensor torch functions return while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.made.append((getattr(func, "__name__", str(func)), tuple(out.shape)))
        return out

    def products(self) -> list[tuple[int, ...]]:
        """The shapes of matrix products with V columns: the chunks' logits."""
        return [shape for name, shape in self.made if "matmul" in name and shape[-1:] == (V,)]


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform-upstream", "weighted-upstream"])
def test_the_fused_kernel_never_builds_the_logits(monkeypatch, uniform):
    """memory_limit=30 elements with V=11: chunks of 2 rows, so (2, 11) logits at most."""
    spy = _Shapes()

    def watched(function):
        def run(*args, **kwargs):
            with spy:
                return function(*args, **kwargs)
        return run

    monkeypatch.setattr(einc.crossentropy, "token_logprobs", watched(einc.crossentropy.token_logprobs))
    monkeypatch.setattr(einc.crossentropy, "_weight_gradient", watched(einc.crossentropy._weight_gradient))
    h, w, ids = _projection()
    h.requires_grad_()
    w.requires_grad_()
    f = einc.compile(CE, memory_limit=30)
    out = f(h, w, ids)
    (out.sum() if uniform else (out * torch.arange(B * T).reshape(B, T)).sum()).backward()
    assert spy.products(), "the kernel was not watched"
    assert {shape for shape in spy.products()} == {(2, V)}  # forward and backward: 3 chunks of 2 rows
    assert len(spy.products()) == (3 if uniform else 6)  # (a weighted upstream gradient: W's again, in chunks)
    assert max(math.prod(shape) for _, shape in spy.made) < B * T * V  # nothing as large as the logits
    # Unlimited: one chunk of every row.
    spy.made.clear()
    einc.compile(CE)(h, w, ids)
    assert spy.products() == [(B * T, V)]


@pytest.mark.parametrize("fuse, memory_limit", MODES, ids=MODE_IDS)
def test_weighted_loss_matches_ignore_index(fuse, memory_limit):
    """The ignore_index recipe: weights 0 at ignored positions, 1/count elsewhere; valid ids there."""
    h, w, labels = _projection(2, t=4)
    labels[0, 1] = labels[1, 3] = labels[1, 0] = -100
    keep = labels != -100
    weights = keep.double() / keep.sum()
    ids = labels.masked_fill(~keep, 0)
    f = einc.compile(f"sum({CE}, b t -> )", fuse=fuse, memory_limit=memory_limit)
    assert f.explain(h, w, ids, weights).rewrite == ("cross_entropy" if fuse else "")
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    loss = -f(*leaves, ids, weights)
    wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    expected = _cross_entropy(*wanted, labels, ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, x in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, wanted)):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


def test_soft_labels():
    """A sum of products with class probabilities is minus F.cross_entropy with probability targets."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.softmax(torch.randn(4, V, generator=g, dtype=torch.float64), -1)
    loss = -einc.compile("log_softmax(b [v]), b v -> b")(logits, targets)
    wanted = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(wanted, targets, reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, 4, dtype=torch.float64)
    got, = torch.autograd.grad((loss * weights).sum(), logits)
    want, = torch.autograd.grad((expected * weights).sum(), wanted)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Over a projection.
    h, w, _ = _projection(3)
    targets = torch.softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    loss = -einc.compile("log_softmax(b t d, v d -> b t [v]), b t v -> b t")(h, w, targets)
    expected = F.cross_entropy(torch.einsum("btd,vd->btv", h, w).reshape(-1, V), targets.reshape(-1, V),
                               reduction="none").reshape(B, T)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_large_logits_soft_and_hard_labels():
    """Logits [[1000, 0]]: with labels [.5, .5] the loss is 500 and its gradient
    softmax - labels = [.5, -.5]; with label 1 the loss is 1000, the gradient [1, -1]."""
    logits = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    loss = -einc.compile("log_softmax(b [v]), b v -> b")(logits, torch.tensor([[0.5, 0.5]])).sum()
    loss.backward()
    assert loss.item() == 500.0
    torch.testing.assert_close(logits.grad, torch.tensor([[0.5, -0.5]]))
    assert F.cross_entropy(logits.detach(), torch.tensor([[0.5, 0.5]])).item() == 500.0
    logits.grad = None
    loss = -einc.compile("gather(log_softmax(b [v]), b -> b)")(logits, torch.tensor([1])).sum()
    loss.backward()
    assert loss.item() == 1000.0
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0]]))
    assert F.cross_entropy(logits.detach(), torch.tensor([1])).item() == 1000.0


def test_large_logits_through_the_fused_kernel():
    """The same logits as a projection: h = [[1000, 0]] and W = I, so logits = h."""
    h = torch.tensor([[[1000.0, 0.0]]], requires_grad=True)
    w = torch.eye(2, requires_grad=True)
    f = einc.compile(CE)
    assert f.explain(h, w, torch.tensor([[1]])).rewrite == "cross_entropy"
    loss = -f(h, w, torch.tensor([[1]])).sum()
    loss.backward()
    assert loss.item() == 1000.0
    torch.testing.assert_close(h.grad, torch.tensor([[[1.0, -1.0]]]))
    torch.testing.assert_close(w.grad, torch.tensor([[1000.0, 0.0], [-1000.0, 0.0]]))


@pytest.mark.parametrize("memory_limit", [None, 11], ids=["one-chunk", "row-by-row"])
def test_gradcheck_of_the_fused_kernel(memory_limit):
    h, w, ids = _projection(4, b=2, t=2, d=3, v=5)
    f = einc.compile(CE, memory_limit=memory_limit)
    assert f.explain(h, w, ids).rewrite == "cross_entropy"
    leaves = (h.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, ids), leaves)  # every upstream gradient one-hot
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, ids).sum(), leaves)  # a uniform upstream gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_floats_through_the_fused_kernel(dtype):
    h, w, ids = _projection(5)
    h, w = h.to(dtype), w.to(dtype)
    f = einc.compile(CE, memory_limit=30)
    assert f.explain(h, w, ids).rewrite == "cross_entropy"
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    out = f(*leaves, ids)
    assert out.dtype == dtype
    wanted = [h.double().requires_grad_(), w.double().requires_grad_()]
    expected = -_cross_entropy(*wanted, ids, reduction="none")
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)
    for g, x in zip(torch.autograd.grad(out.mean(), leaves), torch.autograd.grad(expected.mean(), wanted)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), x, rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_through_the_fused_kernel():
    """float32 h with float64 W computes (and returns) float64, as torch's promotion says."""
    h, w, ids = _projection(6)
    f = einc.compile(CE)
    out = f(h.float(), w, ids)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, -_cross_entropy(h.float().double(), w, ids, reduction="none"),
                               rtol=1e-12, atol=1e-12)


def test_empty_axes_through_the_cross_entropy():
    h, w, _ = _projection(7)
    f = einc.compile(CE)
    # No rows: an empty result, zero gradients.
    leaves = [torch.randn(B, 0, D, dtype=torch.float64, requires_grad=True), w.clone().requires_grad_()]
    out = f(*leaves, torch.zeros(B, 0, dtype=torch.long))
    assert out.shape == (B, 0)
    out.sum().backward()
    assert torch.equal(leaves[1].grad, torch.zeros_like(w))
    # No hidden axis: zero logits, log p = -log V.
    out = f(torch.randn(B, T, 0, dtype=torch.float64), torch.randn(V, 0, dtype=torch.float64),
            torch.randint(0, V, (B, T)))
    torch.testing.assert_close(out, torch.full((B, T), -math.log(V), dtype=torch.float64))


def test_double_backward():
    h, w, ids = _projection(8)
    # Fused: refused.
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    out = einc.compile(CE)(*leaves, ids)
    with pytest.raises(EincError, match="no double backward"):
        torch.autograd.grad(out.sum(), leaves, create_graph=True)
    # Unfused: the second derivative, against the reference's.
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    out = einc.compile(CE, fuse=False)(*leaves, ids)
    grad_h, = torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
    got = torch.autograd.grad((grad_h ** 2).sum(), leaves)
    wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    grad_h, = torch.autograd.grad(-_cross_entropy(*wanted, ids, reduction="sum"), wanted[0], create_graph=True)
    want = torch.autograd.grad((grad_h ** 2).sum(), wanted)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-10, atol=1e-10)


def test_gradient_for_h_only_and_w_only():
    h, w, ids = _projection(9)
    f = einc.compile(CE, memory_limit=30)
    for trained in (0, 1):
        leaves = [h.clone(), w.clone()]
        leaves[trained].requires_grad_()
        got, = torch.autograd.grad((f(*leaves, ids) * torch.arange(B * T).reshape(B, T)).sum(), leaves[trained])
        wanted = [h.clone(), w.clone()]
        wanted[trained].requires_grad_()
        reference = -_cross_entropy(*wanted, ids, reduction="none")
        want, = torch.autograd.grad((reference * torch.arange(B * T).reshape(B, T)).sum(), wanted[trained])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_tied_embeddings():
    """One W looks the tokens up and projects onto the vocabulary: its gradients add up."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    inputs, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    embed = einc.compile("gather([v] d, b t -> b t d)")
    loss = -einc.compile(f"mean({CE} -> )", memory_limit=30)(embed(w, inputs), w, targets)
    got, = torch.autograd.grad(loss, w)
    wanted = w.detach().clone().requires_grad_()
    expected = F.cross_entropy((wanted[inputs] @ wanted.T).reshape(-1, V), targets.reshape(-1))
    want, = torch.autograd.grad(expected, wanted)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------- plans, slicing, torch.func


@pytest.mark.parametrize("pattern, shapes, kernel, output", [
    ("gather(b t [v], b t -> b t)", [(2, 3, 5), (2, 3)], "gather", (2, 3)),  # a batch axis shared: torch.gather
    ("gather([v] d, b t -> b t d)", [(5, 4), (2, 3)], "index_select", (2, 3, 4)),  # none shared: rows
    (CE, [(B, T, D), (V, D), (B, T)], "linear_cross_entropy", (B, T)),
], ids=["gather", "index_select", "linear_cross_entropy"])
def test_explain_from_shapes(pattern, shapes, kernel, output):
    """explain() takes shapes alone (an index's dtype is not asked for)."""
    plan = einc.compile(pattern).explain(*shapes)
    assert plan.steps[0].kernel == kernel
    assert plan.rewrite == ("cross_entropy" if pattern == CE else "")
    assert plan.output_shape == output


@pytest.mark.parametrize("memory_limit", [24, 40])
def test_sliced_gather(memory_limit):
    """Over the memory limit a gather under a sum runs in slices, never of the indexed axis."""
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 5, (3, 6))
    f = einc.compile("sum(gather(b [n] d, b k -> b k d) -> b d)", memory_limit=memory_limit)
    slicing = f.explain(x, idx).slicing
    assert slicing is not None and "n" not in [axis.name for axis in slicing.axes]
    out = f(x, idx)
    wanted = x.detach().clone().requires_grad_()
    expected = wanted[torch.arange(3)[:, None], idx].sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, dtype=torch.float64)
    got, = torch.autograd.grad((out * weights).sum(), x)
    want, = torch.autograd.grad((expected * weights).sum(), wanted)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_func_transforms_of_a_gather():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    idx = torch.randint(0, 4, (2, 5))
    f = einc.compile("gather(b [n] d, b k -> b k d)")

    def plain(a, i=idx):
        return a[torch.arange(a.shape[0])[:, None], i]

    tangent = torch.randn_like(x)
    got, want = torch.func.jvp(lambda a: f(a, idx), (x,), (tangent,)), torch.func.jvp(plain, (x,), (tangent,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.grad(lambda a: (f(a, idx) ** 2).sum())(x),
                               torch.func.grad(lambda a: (plain(a) ** 2).sum())(x), rtol=1e-12, atol=1e-12)
    xs = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda a: f(a, idx))(xs), torch.func.vmap(plain)(xs), rtol=0, atol=0)
    indices = torch.randint(0, 4, (3, 2, 5))  # a batch of index tensors
    torch.testing.assert_close(torch.func.vmap(lambda i: f(x, i))(indices),
                               torch.stack([plain(x, i) for i in indices]), rtol=0, atol=0)


def test_torch_func_grad_of_the_fused_cross_entropy():
    h, w, ids = _projection(14)
    f = einc.compile(CE)
    got = torch.func.grad(lambda a, b: f(a, b, ids).sum(), argnums=(0, 1))(h, w)
    want = torch.func.grad(lambda a, b: -_cross_entropy(a, b, ids, reduction="sum"), argnums=(0, 1))(h, w)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


def test_torch_func_grad_of_the_unfused_cross_entropy():
    h, w, ids = _projection(14)
    f = einc.compile(CE, fuse=False)
    got = torch.func.grad(lambda a, b: f(a, b, ids).sum(), argnums=(0, 1))(h, w)
    want = torch.func.grad(lambda a, b: -_cross_entropy(a, b, ids, reduction="sum"), argnums=(0, 1))(h, w)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- hypothesis


@settings(max_examples=examples(100))
def _same_values_and_gradients(out, expected, x, wanted, g):
    """``out`` (of ``x``) equals ``expected`` (of ``wanted``), and so do their gradients for
    random weights."""
    assert torch.equal(out, expected)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad((out * weights).sum(), x)
    want, = torch.autograd.grad((expected * weights).sum(), wanted)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(0, 6), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_random_rows(batch, n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, n, (batch, k), generator=g)  # n small: repeats
    out = einc.compile("gather(b [n] d, b k -> b k d)")(x, idx)
    wanted = x.detach().clone().requires_grad_()
    expected = wanted[torch.arange(batch)[:, None], idx]
    _same_values_and_gradients(out, expected, x, wanted, g)


@settings(max_examples=examples(100))
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 6), st.integers(0, 2),
       st.integers(0, 2**31 - 1))
def test_random_two_indexed_axes(batch, ni, nj, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ni, d, nj, generator=g, dtype=torch.float64, requires_grad=True)
    ii = torch.randint(0, ni, (batch, k), generator=g)
    jj = torch.randint(0, nj, (k, batch), generator=g)
    out = einc.compile("gather(b [i] d [j], b k, k b -> k d b)")(x, ii, jj)
    wanted = x.detach().clone().requires_grad_()
    # x[b, I[b, k], :, J[k, b]] over (b, k, d), as (k, d, b)
    expected = wanted.permute(0, 1, 3, 2)[torch.arange(batch)[:, None], ii, jj.T].permute(1, 2, 0)
    _same_values_and_gradients(out, expected, x, wanted, g)


@settings(max_examples=examples(50))
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 40),
       st.integers(0, 2**31 - 1))
def test_random_cross_entropy(batch, t, d, v, memory_limit, seed):
    h, w, ids = _projection(seed, b=batch, t=t, d=d, v=v)
    # (the output must fit, and one row of logits: the kernel holds whole rows)
    f = einc.compile(CE, memory_limit=max(memory_limit, batch * t, v))
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    out = f(*leaves, ids)
    wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    expected = -_cross_entropy(*wanted, ids, reduction="none")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, dtype=torch.float64)
    for g, x in zip(torch.autograd.grad((out * weights).sum(), leaves),
                    torch.autograd.grad((expected * weights).sum(), wanted)):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------- backends, modules

# torch.compile's first use imports torch internals that warn about TorchScript's own deprecation.
_TORCH_INTERNAL_WARNING = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
BACKENDS = ["torchscript", "eager", pytest.param("compile", marks=[pytest.mark.slow, _TORCH_INTERNAL_WARNING])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_plain_gather(backend):
    f = einc.compile("gather(b [n] d, b k -> b k d)", backend=backend)
    for shape in [(2, 4, 3, 5), (3, 2, 1, 6)]:  # a second shape: a new signature
        batch, n, d, k = shape
        x = torch.randn(batch, n, d, dtype=torch.float64, requires_grad=True)
        idx = torch.randint(0, n, (batch, k))
        out = f(x, idx)
        expected = x[torch.arange(batch)[:, None], idx]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        got, = torch.autograd.grad((out * 2).sum(), x)
        want, = torch.autograd.grad((expected * 2).sum(), x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_fused_cross_entropy(backend):
    f = einc.compile(CE, backend=backend, memory_limit=30)
    for seed, t in [(0, T), (1, T + 2)]:
        h, w, ids = _projection(seed, t=t)
        assert f.explain(h, w, ids).rewrite == "cross_entropy"
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        out = f(*leaves, ids)
        wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        expected = -_cross_entropy(*wanted, ids, reduction="none")
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        for g, x in zip(torch.autograd.grad((out * weights).sum(), leaves),
                        torch.autograd.grad((expected * weights).sum(), wanted)):
            torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


def test_scripted_gather_module_with_gradients():
    module = einc.compile("gather(b [i] [j] d, b k, b k -> b k d)").module((2, 3, 4, 2), (2, 5), (2, 5),
                                                                        dtype=torch.float64)
    scripted = torch.jit.script(module)
    for batch, ni, nj, d, k in [(2, 3, 4, 2, 5), (1, 2, 5, 3, 8), (3, 1, 1, 1, 0)]:
        x = torch.randn(batch, ni, nj, d, dtype=torch.float64, requires_grad=True)
        ii, jj = torch.randint(0, ni, (batch, k)), torch.randint(0, nj, (batch, k))
        out = scripted(x, ii, jj)
        expected = x[torch.arange(batch)[:, None], ii, jj]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        weights = torch.randn(out.shape, dtype=torch.float64)
        got, = torch.autograd.grad((out * weights).sum(), x)
        want, = torch.autograd.grad((expected * weights).sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scripted_cross_entropy_module_with_gradients():
    h, w, ids = _projection()
    module = einc.compile(f"mean({CE} -> )").module(h, w, ids)
    scripted = torch.jit.script(module)
    for seed, batch, t in [(0, B, T), (1, 3, 5), (2, 1, 1)]:
        h, w, ids = _projection(seed, b=batch, t=t)
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = -scripted(*leaves, ids)
        wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        expected = _cross_entropy(*wanted, ids)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        for g, x in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, wanted)):
            torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)


def test_cross_entropy_module_under_a_memory_limit():
    h, w, ids = _projection()
    f = einc.compile(CE, memory_limit=30)
    expected = -_cross_entropy(h, w, ids, reduction="none")
    torch.testing.assert_close(f(h, w, ids), expected)  # the call runs, in chunks of 2 rows
    torch.testing.assert_close(f.module(h, w, ids)(h, w, ids), expected)


@pytest.mark.slow
@_TORCH_INTERNAL_WARNING
def test_compiles_fullgraph_dynamic():
    gather = torch.compile(einc.compile("gather(b t [v], b t -> b t)").module((2, 3, 5), (2, 3)),
                           fullgraph=True, dynamic=True)
    loss = torch.compile(einc.compile(CE).module((B, T, D), (V, D), (B, T)), fullgraph=True, dynamic=True)
    for seed, batch, t in [(0, B, T), (1, 3, 5)]:
        h, w, ids = _projection(seed, b=batch, t=t)
        x = torch.randn(batch, t, V)
        torch.testing.assert_close(gather(x, ids), x.gather(2, ids[..., None])[..., 0], rtol=0, atol=0)
        leaves = [h.float().requires_grad_(), w.float().requires_grad_()]
        out = loss(*leaves, ids)
        wanted = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        expected = -_cross_entropy(*wanted, ids, reduction="none")
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        for g, x in zip(torch.autograd.grad(out.mean(), leaves), torch.autograd.grad(expected.mean(), wanted)):
            torch.testing.assert_close(g.double(), x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- bad input


def _bad_indices():
    """(id, pattern, good operands, a bad copy of them, the message's fragment, good operands
    of another shape) for index errors."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 7, generator=g)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    y = torch.randn(2, 3, 4, 5, generator=g)
    ii, jj = torch.randint(0, 3, (2, 6), generator=g), torch.randint(0, 4, (2, 6), generator=g)
    w = torch.randn(7, 4, generator=g)
    h = torch.randn(2, 3, 4, generator=g)

    def put(t, at, value):
        t = t.clone()
        t[at] = value
        return t

    single = "gather(b t [v], b t -> b t)"
    double = "gather(b [i] [j] d, b k, b k -> b k d)"
    return [
        ("too-large", single, (x, ids), (x, put(ids, (1, 2), 9)),
         "operand 1 indexes axis 'v' of size 7 but holds the index 9", (x[:1], ids[:1])),
        ("negative", single, (x, ids), (x, put(ids, (0, 1), -1)),
         "operand 1 indexes axis 'v' of size 7 but holds the index -1", (x[:1], ids[:1])),
        ("size-itself", single, (x, ids), (x, put(ids, (0, 0), 7)),
         "operand 1 indexes axis 'v' of size 7 but holds the index 7", (x[:1], ids[:1])),
        # j = 4 (out of range) would land in range, on the next i, once merged into one index
        ("second-component", double, (y, ii, jj), (y, put(ii, (0, 0), 0), put(jj, (0, 0), 4)),
         "operand 2 indexes axis 'j' of size 4 but holds the index 4", (y[:1], ii[:1], jj[:1])),
        ("first-component-negative", double, (y, ii, jj), (y, put(ii, (1, 5), -1), put(jj, (1, 5), 0)),
         "operand 1 indexes axis 'i' of size 3 but holds the index -1", (y[:1], ii[:1], jj[:1])),
        ("embedding", "gather([v] d, b t -> b t d)", (w, ids), (w, put(ids, (1, 1), 8)),
         "operand 1 indexes axis 'v' of size 7 but holds the index 8", (w, ids[:1])),
        ("embedding-negative", "gather([v] d, b t -> b t d)", (w, ids), (w, put(ids, (1, 1), -3)),
         "operand 1 indexes axis 'v' of size 7 but holds the index -3", (w, ids[:1])),
        ("fused-cross-entropy", CE, (h, w, ids), (h, w, put(ids, (1, 0), 7)),
         "operand 2 indexes axis 'v' of size 7 but holds the index 7", (h[:1], w, ids[:1])),
        ("fused-cross-entropy-negative", CE, (h, w, ids), (h, w, put(ids, (0, 2), -1)),
         "operand 2 indexes axis 'v' of size 7 but holds the index -1", (h[:1], w, ids[:1])),
        ("nested-in-a-sum", "sum(gather(b t [v], b t -> b t) -> b)", (x, ids), (x, put(ids, (1, 1), 100)),
         "operand 1 indexes axis 'v' of size 7 but holds the index 100", (x[:1], ids[:1])),
    ]


BAD_INDICES = _bad_indices()


@pytest.mark.parametrize("name, pattern, good, bad, message, other", BAD_INDICES, ids=[b[0] for b in BAD_INDICES])
def test_out_of_range_on_literal_code(name, pattern, good, bad, message, other):
    """The second call of a shape: the literal code compiled for it."""
    f = einc.compile(pattern)
    f(*good)
    with pytest.raises(EincError, match=re.escape(message)):
        f(*bad)
    f(*good)  # (still usable)


@pytest.mark.parametrize("both_codes", ["shared"], indirect=True)  # about the shared code
@pytest.mark.parametrize("name, pattern, good, bad, message, other", BAD_INDICES, ids=[b[0] for b in BAD_INDICES])
def test_out_of_range_on_shared_code(both_codes, name, pattern, good, bad, message, other):
    """A new shape on an expression already called once: the shared generic code."""
    f = einc.compile(pattern)
    f(*other)
    with pytest.raises(EincError, match=re.escape(message)):
        f(*bad)


@pytest.mark.parametrize("name, pattern, good, bad, message, other",
                         [b for b in BAD_INDICES if b[1] != CE], ids=[b[0] for b in BAD_INDICES if b[1] != CE])
def test_out_of_range_in_a_scripted_module(name, pattern, good, bad, message, other):
    scripted = torch.jit.script(einc.compile(pattern).module(*other))  # (shape-generic: made for other shapes)
    scripted(*good)
    size = int(re.search(r"of size (\d+)", message).group(1))
    with pytest.raises(torch.jit.Error, match=re.escape(f"outside [0, {size})")):
        scripted(*bad)


@pytest.mark.parametrize("script", [False, True], ids=["eager-module", "scripted-module"])
def test_out_of_range_in_a_cross_entropy_module(script):
    name, pattern, good, bad, message, other = next(b for b in BAD_INDICES if b[0] == "fused-cross-entropy")
    module = einc.compile(pattern).module(*good)
    module = torch.jit.script(module) if script else module
    module(*good)
    with pytest.raises((EincError, torch.jit.Error), match=re.escape("outside [0, 7)")):
        module(*bad)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_out_of_range_component_under_torch_func(transform):
    x = torch.randn(3, 4, dtype=torch.float64)
    ii, jj = torch.tensor([0, 1, 2]), torch.tensor([1, 5, 0])  # (1, 5) is x.flatten()[9] = x[2, 1] once merged
    f = einc.compile("gather([i] [j], k, k -> k)")
    with pytest.raises(EincError, match=re.escape("operand 2 indexes axis 'j' of size 4 but holds the index 5")):
        if transform == "grad":
            torch.func.grad(lambda a: f(a, ii, jj).sum())(x)
        else:
            torch.func.vmap(lambda a: f(a, ii, jj))(x[None].expand(2, 3, 4))


def test_out_of_range_under_torch_func_with_one_indexed_axis():
    x = torch.randn(2, 5, dtype=torch.float64)
    f = einc.compile("gather(b [v], b -> b)")
    with pytest.raises(EincError, match=re.escape("operand 1 indexes axis 'v' of size 5 but holds the index 7")):
        torch.func.grad(lambda a: f(a, torch.tensor([1, 7])).sum())(x)


def test_an_index_into_an_empty_axis():
    f = einc.compile("gather(b [n] d, b k -> b k d)")
    with pytest.raises(EincError, match=re.escape("operand 1 indexes axis 'n' of size 0 but holds the index 0")):
        f(torch.randn(2, 0, 3), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("index_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool, torch.complex64,
                                         torch.uint16, torch.uint32, torch.uint64], ids=str)
@pytest.mark.parametrize("pattern, position, axis", [
    ("gather(b t [v], b t -> b t)", 1, "v"),
    ("gather(b [i] [j] d, b t, b t -> b t d)", 2, "j"),
    (CE, 2, "v"),
], ids=["one-axis", "second-of-two", "fused-cross-entropy"])
def test_non_integer_indices(pattern, position, axis, index_dtype):
    shapes = {"gather(b t [v], b t -> b t)": [(2, 3, 7), (2, 3)],
              "gather(b [i] [j] d, b t, b t -> b t d)": [(2, 3, 7, 2), (2, 3), (2, 3)],
              CE: [(2, 3, 4), (7, 4), (2, 3)]}[pattern]
    indices = {p for p, _, _ in parse(pattern).index_leaves()}
    good = [torch.zeros(s, dtype=torch.long) if p in indices else torch.randn(s) for p, s in enumerate(shapes)]
    bad = [torch.zeros(s, dtype=index_dtype) if p == position else t for p, (s, t) in enumerate(zip(shapes, good))]
    name = str(index_dtype).removeprefix("torch.")
    message = (f"operand {position} indexes axis '{axis}' of gather(...): it must be an integer tensor (int64, "
               f"int32, int16, int8 or uint8), not {name}")
    with pytest.raises(EincError, match=re.escape(message)):
        einc.compile(pattern)(*bad)
    # A scripted module says so too.
    scripted = torch.jit.script(einc.compile(pattern).module(*good))
    with pytest.raises(torch.jit.Error, match=re.escape(f"operand {position} indexes axis '{axis}' of gather(...)")):
        scripted(*bad)


@pytest.mark.parametrize("pattern, tensors, message", [
    ("gather(b [n] d, b k -> b k d)", [(2, 4, 3), (3, 5)], "axis 'b' has size 3 in operand 1"),
    ("gather(b [i] [j] d, b k, b k -> b k d)", [(2, 3, 4, 5), (2, 6), (2, 5)], "axis 'k' has size 5 in operand 2"),
    ("gather(b [n] d, b k -> b k d)", [(2, 4, 3)], "the pattern has 2 operands but 1 tensors were given"),
    ("gather(b [n] d, b k -> b k d)", [(2, 4, 3), (2, 5), (2, 5)], "the pattern has 2 operands but 3 tensors"),
    ("gather(b [n] d, b k -> b k d)", [(2, 4, 3), (2, 1, 5)], "operand 1 has 3 dimensions"),
    (CE, [(2, 3, 4), (7, 4)], "the pattern has 3 operands but 2 tensors were given"),
    (CE, [(2, 3, 4), (7, 5), (2, 3)], "axis 'd' has size 5 in operand 1"),
    (CE, [(2, 3, 4), (7, 4), (2, 4)], "axis 't' has size 4 in operand 2"),
], ids=["batch", "index-axis", "too-few", "too-many", "rank", "cross-entropy-too-few", "cross-entropy-hidden",
        "cross-entropy-rows"])
def test_mismatched_shapes(pattern, tensors, message):
    parsed = parse(pattern)
    indices = {position for position, _, _ in parsed.index_leaves()}
    made = [torch.zeros(s, dtype=torch.long) if i in indices else torch.randn(s) for i, s in enumerate(tensors)]
    with pytest.raises(EincError, match=re.escape(message)):
        einc.compile(pattern)(*made)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_out_of_range_on_cuda_is_an_error_not_a_device_assert():
    for name, pattern, good, bad, message, other in BAD_INDICES:
        f = einc.compile(pattern)
        torch.testing.assert_close(f(*[t.cuda() for t in good]).cpu(), f(*good), rtol=1e-4, atol=1e-4)
        with pytest.raises(EincError, match=re.escape(message)):
            f(*[t.cuda() for t in bad])


@pytest.mark.parametrize("limit", [6, 5, 13])
def test_a_budget_below_one_row_of_logits_takes_vocabulary_blocks(limit):
    # The fused kernel holds whole rows of logits where one fits (v = 7); under that, a
    # chunk's rows meet the vocabulary in blocks (an online log-partition, a second pass
    # for the gradients), still within the budget; the unfused plan is refused.
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([6, 0, 3, 3, 1])
    pattern = "gather(log_softmax(n d, v d -> n [v]), n -> n)"
    if limit < 7:
        with pytest.raises(MemoryLimitError, match=f"memory_limit={limit} elements is too small"):
            einc.compile(pattern, memory_limit=limit, fuse=False)(h, w, ids)
    rows, block = einc.crossentropy._blocks(limit, 5, 7)
    assert rows * block <= limit and (block == 7) == (limit >= 7)
    f = einc.compile(pattern, memory_limit=limit, backend="eager")
    out = f(h, w, ids)
    expected = torch.log_softmax(h @ w.T, 1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for upstream in (torch.ones(5, dtype=torch.float64), torch.linspace(-1, 2, 5, dtype=torch.float64)):
        got = torch.autograd.grad(f(h, w, ids), (h, w), upstream)
        want = torch.autograd.grad(expected, (h, w), upstream, retain_graph=True)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_permuted_table_is_not_copied():
    # gather(d e [v], t -> t d e): the data's other axes stay dimensions of their own, so
    # torch.gather reads the permuted table in place (no reshape of the whole table).
    x, ids = torch.randn(2, 3, 10, dtype=torch.float64), torch.tensor([9, 0, 0, 4])
    f = einc.compile("gather(d e [v], t -> t d e)")
    assert "reshape([10, 6])" not in f.explain(x, ids).source
    assert torch.equal(f(x, ids), x.permute(2, 0, 1)[ids])


@given(st.integers(1, 10**7), st.integers(1, 10**5), st.integers(1, 10**6))
def test_every_chunk_of_logits_fits_the_budget(budget, n, v):
    # Stage test of the kernel's chunking: rows x block never exceeds the budget; the
    # whole vocabulary per chunk wherever one row of it fits.
    rows, block = einc.crossentropy._blocks(budget, n, v)
    assert 1 <= rows <= n and 1 <= block and rows * min(block, v) <= budget
    assert (block >= v) == (v <= budget)


def test_the_readme_indexing_examples_as_written():
    # README, "Indexing": every pattern of its example compiles, and each computes what
    # its comment says on small tensors.
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    source = readme.split("## Indexing", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    names: dict = {}
    exec(compile(source, "README.md:indexing", "exec"), names)
    g = torch.Generator().manual_seed(5)
    logits, ids = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (2, 3), generator=g)
    assert torch.equal(names["pick"](logits, ids), logits.gather(2, ids[..., None])[..., 0])
    x, index = torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g)
    assert torch.equal(names["rows"](x, index), x[torch.arange(4), index])
    data, idx = torch.randn(2, 5, 3, generator=g), torch.randint(0, 5, (2, 4), generator=g)
    assert torch.equal(names["take"](data, idx), data[torch.arange(2)[:, None], idx])
    w, tokens = torch.randn(7, 3, generator=g), torch.randint(0, 7, (2, 3), generator=g)
    assert torch.equal(names["embed"](w, tokens), w[tokens])
    grid, ii, jj = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 6), generator=g), \
        torch.randint(0, 4, (2, 6), generator=g)
    assert torch.equal(names["pairs"](grid, ii, jj), grid[torch.arange(2)[:, None], ii, jj])
    h, weights = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g,
                                                                                     dtype=torch.float64)
    expected = torch.log_softmax(h @ weights.T, -1).gather(2, ids[..., None])[..., 0]
    torch.testing.assert_close(names["logp"](h, weights, ids), expected)
    torch.testing.assert_close(-names["loss"](h, weights, ids),
                               F.cross_entropy((h @ weights.T).reshape(-1, 5), ids.reshape(-1)))


@pytest.mark.parametrize("want_h, want_w", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("budget", [1000, 9, 3], ids=["whole-vocabulary", "rows-of-it", "vocabulary-blocks"])
def test_the_kernel_computes_ahead_only_the_gradients_wanted(want_h, want_w, budget):
    # Stage test of the custom op: log p, and the gradients of sum(log p) for h and W
    # (an upstream gradient of ones) against torch autograd; a gradient not wanted (a
    # frozen W, as in fine-tuning under a frozen head) is not even allocated.
    einc.crossentropy.register()
    g = torch.Generator().manual_seed(8)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([6, 0, 3, 3, 1])
    with torch.no_grad():
        logp, grad_h, grad_w = torch.ops.einc.linear_log_softmax_gather(h, w, ids, budget, want_h, want_w)
    expected = torch.log_softmax(h @ w.T, 1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(logp, expected.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(expected.sum(), (h, w))
    assert grad_h.numel() == (h.numel() if want_h else 0) and grad_w.numel() == (w.numel() if want_w else 0)
    for wanted, got, reference in ((want_h, grad_h, want[0]), (want_w, grad_w, want[1])):
        if wanted:
            torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
