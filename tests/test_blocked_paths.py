"""The blocked code paths of the runtime helpers, on inputs large enough to take them.

References: torch.logsumexp and naive broadcast forms in float64.
"""

import pytest
import torch

import einc

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")


@pytest.mark.parametrize(
    "shape, scale",
    [
        ((4, 8, 64, 512), 1.0),  # 1M elements: row blocks of the trailing-axis logsumexp
        ((4, 8, 64, 512), 50.0),  # wide range: clamped exponents inside each block
        ((3, 200, 2000), 1e4),  # block boundary not a multiple of the row count
    ],
)
def test_blocked_logsumexp_matches_torch(shape, scale):
    torch.manual_seed(0)
    x = torch.randn(shape) * scale
    x[0, 0] = float("-inf")  # an all -inf row inside the first block
    x[-1, -1, :7] = float("-inf")  # a partly -inf row inside the last block
    got = einc.compile("logsumexp(a b n -> a b)" if len(shape) == 3 else "logsumexp(a b c n -> a b c)")(x)
    want = torch.logsumexp(x.double(), -1)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want.float()))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-6, atol=1e-5)


def test_blocked_logsumexp_gradient_matches_torch():
    torch.manual_seed(1)
    x = (torch.randn(600, 1000, dtype=torch.float64) * 30).requires_grad_()
    einc.compile("logsumexp(a n -> a)", backend="eager")(x).sum().backward()
    y = x.detach().clone().requires_grad_()
    torch.logsumexp(y, -1).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("op, reduce", [("max", torch.amax), ("min", torch.amin)])
def test_blocked_tropical_matches_naive(op, reduce):
    # 64*64 outputs: the contracted axis (200) is processed in blocks of 64.
    torch.manual_seed(2)
    a, b = torch.randn(64, 200, dtype=torch.float64), torch.randn(200, 64, dtype=torch.float64)
    got = einc.compile(f"{op}(i k, k j -> i j)")(a, b)
    assert torch.equal(got, reduce(a[:, :, None] + b[None], 1))


def test_log_semiring_recovers_every_underflowed_entry():
    # Row maxima of A and column maxima of B at different k everywhere: the shifted
    # product underflows for every entry and each is recomputed exactly.
    n = 300
    a = torch.full((n, 2), -100.0)
    a[:, 0] = 0.0
    b = torch.full((2, n), -100.0)
    b[1] = 0.0
    a = a + torch.randn(n, 2)
    b = b + torch.randn(2, n)
    got = einc.compile("logsumexp(i k, k j -> i j)")(a, b)
    want = torch.logsumexp(a.double()[:, :, None] + b.double()[None], 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-4)


def test_log_semiring_exact_recompute_after_both_shifted_passes():
    # B's row maxima sit in column 0 or everywhere, A's row maxima at k=0: for j >= 1
    # the dominant term (k=1) is 100 below A's row maximum under either shift, so
    # neither shifted product resolves it and those entries are recomputed exactly.
    n = 50
    a = torch.full((n, 2), -100.0)
    a[:, 0] = 0.0
    b = torch.zeros(2, n)
    b[0, 1:] = -200.0
    a, b = a + 0.1 * torch.randn(n, 2), b + 0.1 * torch.randn(2, n)
    for backend in ("eager", "torchscript"):
        got = einc.compile("logsumexp(i k, k j -> i j)", backend=backend)(a, b)
        want = torch.logsumexp(a.double()[:, :, None] + b.double()[None], 1)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-4)
