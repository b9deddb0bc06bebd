"""torch.func transforms and forward-mode AD through einc: jvp, vmap, grad.

References: the same transform applied to the plain torch form of each pattern
(torch.einsum, torch.softmax, torch.logsumexp of the broadcast sum), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import assert_close, randn
from torch.func import grad, jvp, vmap

import einc
import einc.nn

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

CASES = [
    # (pattern, shapes, the plain torch form)
    ("softmax(i j, j k -> i [k])", [(3, 4), (4, 5)], lambda a, b: torch.softmax(a @ b, -1)),  # in-place softmax
    ("log_softmax(i j, j k -> i [k])", [(3, 4), (4, 5)], lambda a, b: torch.log_softmax(a @ b, -1)),
    ("logsumexp(i k, k j -> i j)", [(3, 4), (4, 5)],  # the log semiring's data-dependent guard
     lambda a, b: torch.logsumexp(a[:, :, None] + b[None], 1)),
    ("logsumexp(i j -> i)", [(3, 4)], lambda a: torch.logsumexp(a, 1)),
    ("max(i k, k j -> i j)", [(3, 4), (4, 5)], lambda a, b: (a[:, :, None] + b[None]).amax(1)),
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", [(2, 3, 4), (2, 5, 4), (2, 5, 6)],  # SDPA
     lambda q, k, v: torch.softmax(q @ k.transpose(1, 2), -1) @ v),
    ("softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e", [(2, 3, 4), (2, 5, 4), (2, 5, 6)],
     lambda q, k, v: torch.softmax(q @ k.transpose(1, 2) / 2, -1) @ v),
    ("ij,jk->ik", [(3, 4), (4, 5)], lambda a, b: a @ b),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("pattern, shapes, plain", CASES, ids=IDS)
def test_jvp_matches_the_plain_form(pattern, shapes, plain, backend):
    f = einc.compile(pattern, backend=backend)
    primals = tuple(randn(*s) for s in shapes)
    tangents = tuple(randn(*s) for s in shapes)
    # Under no_grad too: that is where einc's in-place normalizer used to be taken.
    for context in (torch.enable_grad, torch.no_grad):
        with context():
            out, tangent = jvp(f, primals, tangents)
            expected, expected_tangent = jvp(plain, primals, tangents)
        assert_close(out, expected)
        assert_close(tangent, expected_tangent)


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize("pattern, shapes, plain", CASES, ids=IDS)
def test_vmap_matches_a_loop(pattern, shapes, plain, backend):
    f = einc.compile(pattern, backend=backend)
    batched = [randn(3, *s) for s in shapes]
    with torch.no_grad():
        out = vmap(f)(*batched)
    expected = torch.stack([plain(*[t[i] for t in batched]) for i in range(3)])
    assert_close(out, expected)


@pytest.mark.parametrize("pattern, shapes, plain", CASES[:4], ids=IDS[:4])
def test_forward_ad_dual_tensors(pattern, shapes, plain):
    f = einc.compile(pattern)
    primals = [randn(*s) for s in shapes]
    tangents = [randn(*s) for s in shapes]
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]))
    _, expected = jvp(plain, tuple(primals), tuple(tangents))
    assert_close(out.tangent, expected)


def test_func_grad_and_vmap_of_grad():
    f = einc.compile("logsumexp(i k, k j -> i j)")
    a, b = randn(3, 4), randn(4, 5)
    got = grad(lambda x: f(x, b).sum())(a)
    expected = grad(lambda x: torch.logsumexp(x[:, :, None] + b[None], 1).sum())(a)
    assert_close(got, expected)
    per_sample = vmap(grad(lambda x: f(x, b).sum()))(randn(2, 3, 4))
    assert per_sample.shape == (2, 3, 4)


def test_transforms_leave_the_fast_code_for_plain_calls():
    # A plain call after a transformed one still uses the in-place, guarded code.
    f = einc.compile("softmax(i j, j k -> i [k])", backend="eager")
    a, b = randn(3, 4), randn(4, 5)
    jvp(f, (a, b), (a, b))
    assert "out=" in f.explain(a, b).source
    assert_close(f(a, b), torch.softmax(a @ b, -1))


def test_attention_layer_under_vmap_and_jvp():
    layer = einc.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = randn(3, 2, 5, 8)
    with torch.no_grad():  # the layer normalizes its scores in place only outside transforms
        out = vmap(lambda t: layer(t, t, t, need_weights=True)[0])(x)
        expected = torch.stack([layer(t, t, t, need_weights=True)[0] for t in x])
    assert_close(out, expected)
    t, dt = x[0], randn(2, 5, 8)
    _, tangent = jvp(lambda u: layer(u, u, u)[0], (t,), (dt,))
    eps = 1e-6
    numeric = (layer(t + eps * dt, t + eps * dt, t + eps * dt)[0] - layer(t - eps * dt, t - eps * dt,
                                                                         t - eps * dt)[0]) / (2 * eps)
    assert_close(tangent, numeric, rtol=1e-5, atol=1e-6)
