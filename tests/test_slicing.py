"""Memory-bounded execution (issue 13): a plan over ``memory_limit`` runs in slices.

References: torch in float64 (torch.einsum, torch.logsumexp, amax/amin of the naive
broadcast, torch.softmax/log_softmax), never einc's own unsliced result; the per-slice
peak is checked against the budget from the plan einc reports.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import assert_peak, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import einc

F64 = torch.float64


def _chain3(op):
    """(b i, i j, j k -> b k) reduced by ``op`` over i and j, the naive way."""
    def reference(a, b, c):
        if op in (None, "mean"):
            out = torch.einsum("bi,ij,jk->bk", a, b, c)
            return out / (a.shape[1] * b.shape[1]) if op == "mean" else out
        s = a[:, :, None, None] + b[None, :, :, None] + c[None, None, :, :]
        return {"max": torch.amax, "min": torch.amin, "logsumexp": torch.logsumexp}[op](s, (1, 2))
    return reference


CHAIN = [(4, 96), (96, 96), (96, 4)]
# (id, pattern, shapes, float64 reference)
CASES = [
    ("sum-chain", "ab,bc,cd->ad", [(16, 96), (96, 96), (96, 16)], lambda a, b, c: a @ b @ c),
    ("bilinear", "b i, b j, i j o -> b o", [(8, 24), (8, 24), (24, 24, 8)],
     lambda x, y, w: torch.einsum("bi,bj,ijo->bo", x, y, w)),
    ("five-operands", "b i, i j, b j, j k, b k -> b", [(8, 24), (24, 24), (8, 24), (24, 24), (8, 24)],
     lambda *t: torch.einsum("bi,ij,bj,jk,bk->b", *t)),
    ("mean-chain", "mean(b i, i j, j k -> b k)", CHAIN, _chain3("mean")),
    ("max-chain", "max(b i, i j, j k -> b k)", CHAIN, _chain3("max")),
    ("min-chain", "min(b i, i j, j k -> b k)", CHAIN, _chain3("min")),
    ("logsumexp-chain", "logsumexp(b i, i j, j k -> b k)", CHAIN, _chain3("logsumexp")),
    ("log-semiring-batched", "logsumexp(z i k, z k l, z l j -> z i j)", [(3, 4, 48), (3, 48, 48), (3, 48, 4)],
     lambda a, b, c: torch.logsumexp(a[:, :, :, None, None] + b[:, None, :, :, None] + c[:, None, None], (2, 3))),
    ("log-partition", "logsumexp(sum(b t d, v d -> b t v) -> b t)", [(2, 8, 16), (256, 16)],
     lambda h, w: torch.logsumexp(h @ w.T, -1)),
    # A top-level normalizer's output is its largest tensor: it must fit whole, so
    # normalizers slice where they are nested (token log-probabilities, attention).
    ("log-probability-sums", "sum(log_softmax(b t d, v d -> b t [v]) -> b t)", [(4, 64, 16), (256, 16)],
     lambda h, w: torch.log_softmax(h @ w.T, -1).sum(-1)),
    ("attention", "softmax(b q d, b k d -> b q [k]), b k e -> b q e", [(2, 64, 8), (2, 64, 8), (2, 64, 8)],
     lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v),
]


def _budget(pattern, shapes, factor, **options):
    """The unsliced plan's peak over ``factor``, but room for the output."""
    plan = einc.compile(pattern, **options).explain(*shapes, dtype=F64)
    return max(plan.largest_intermediate // factor, math.prod(plan.output_shape)), plan.largest_intermediate


@pytest.mark.parametrize("factor", [16, 256])
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("name, pattern, shapes, reference", CASES, ids=[c[0] for c in CASES])
def test_sliced_results_match_the_reference_within_the_budget(name, pattern, shapes, reference, backend, factor):
    limit, peak = _budget(pattern, shapes, factor, fuse=False)
    xs = [randn(*s) for s in shapes]
    f = einc.compile(pattern, memory_limit=limit, backend=backend, fuse=False)
    plan = f.explain(*xs)
    assert plan.slicing is not None, f"{name}: unsliced peak {peak} fits {limit}?"
    assert plan.largest_intermediate <= limit and plan.slicing.largest_intermediate <= limit
    assert plan.slicing.slices > 1
    torch.testing.assert_close(f(*xs), reference(*xs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
@pytest.mark.parametrize("name", ["sum-chain", "mean-chain", "max-chain", "logsumexp-chain", "log-partition",
                                  "log-probability-sums", "attention"])
def test_sliced_gradients_match_torch(name, backend):
    _, pattern, shapes, reference = next(c for c in CASES if c[0] == name)
    limit, _ = _budget(pattern, shapes, 16, fuse=False)
    xs = [randn(*s).requires_grad_() for s in shapes]
    weight = randn(*reference(*xs).shape)
    f = einc.compile(pattern, memory_limit=limit, fuse=False, backend=backend)
    assert f.explain(*xs).slicing is not None
    got = torch.autograd.grad((f(*xs) * weight).sum(), xs)
    expected = torch.autograd.grad((reference(*xs) * weight).sum(), xs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_sliced_calls_run_under_torch_compile_forward_and_backward():
    h, w = randn(2, 8, 16).requires_grad_(), randn(256, 16).requires_grad_()
    f = einc.compile("logsumexp(sum(b t d, v d -> b t v) -> b t)", memory_limit=1024, backend="compile")
    assert f.explain(h, w).slicing is not None
    out, expected = f(h, w), torch.logsumexp(h @ w.T, -1)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    for g, e in zip(torch.autograd.grad(out.sum(), (h, w)), torch.autograd.grad(expected.sum(), (h, w))):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_gradcheck_on_a_sliced_log_partition():
    h, w = randn(2, 3, 4).requires_grad_(), randn(24, 4).requires_grad_()
    f = einc.compile("logsumexp(sum(b t d, v d -> b t v) -> b t)", memory_limit=12)
    assert f.explain(h, w).slicing.slices > 1
    assert torch.autograd.gradcheck(f, (h, w))


def test_slice_false_keeps_the_refusal():
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    with pytest.raises(einc.EincError, match="memory_limit=256 elements is too small"):
        einc.compile("ab,bc,cd->ad", memory_limit=256, slice=False)(*xs)
    torch.testing.assert_close(einc.compile("ab,bc,cd->ad", memory_limit=256)(*xs), xs[0] @ xs[1] @ xs[2])
    with pytest.raises(einc.EincError, match="slice must be True or False"):
        einc.compile("ab->a", slice="yes")


@pytest.mark.parametrize("fuse", [False, True])
def test_long_sequence_attention_slices_along_queries(fuse):
    # Issue 13: attention that cannot take the SDPA rewrite (fuse=False), or may, runs in
    # bounded memory along queries; the normalized keys are never cut.
    q, k, v = (randn(1, 2, 512, 16) for _ in range(3))
    f = einc.compile("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e", memory_limit="256KiB", fuse=fuse)
    plan = f.explain(q, k, v)
    assert [axis.name for axis in plan.slicing.axes] in (["q"], ["h"], ["b", "q"], ["h", "q"])
    assert "k" not in [axis.name for axis in plan.slicing.axes]
    expected = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    torch.testing.assert_close(f(q, k, v), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern, arrange", [
    ("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e", lambda o: o),
    ("softmax(b h q d, b h k d -> b h q [k] / sqrt(d)), b h k e -> b h q e", lambda o: o),
    ("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b q h e", lambda o: o.transpose(1, 2)),
])
def test_attention_slices_along_keys_with_flash_attentions_recurrence(pattern, arrange):
    # Where even one query's scores against every key exceed the budget, keys are cut:
    # each slice's softmax is rescaled by its log-normalizer's share (forward), and
    # backward goes through both; against torch in float64, values and gradients.
    q, k, v = (randn(1, 2, 8, 4).requires_grad_() for _ in range(3))
    k_long, v_long = (randn(1, 2, 96, 4).requires_grad_() for _ in range(2))
    f = einc.compile(pattern, fuse=False, memory_limit=96)
    plan = f.explain(q, k_long, v_long)
    assert [(a.name, a.role) for a in plan.slicing.axes if a.role != "output"] == [("k", "softmax")]
    scale = 0.5 if "sqrt" in pattern else 1.0
    expected = arrange(torch.softmax(q @ k_long.transpose(-1, -2) * scale, -1) @ v_long)
    out = f(q, k_long, v_long)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    weight = randn(*expected.shape)
    got = torch.autograd.grad((out * weight).sum(), (q, k_long, v_long))
    want = torch.autograd.grad((expected * weight).sum(), (q, k_long, v_long))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_gradcheck_on_attention_sliced_along_keys():
    q, k, v = randn(1, 1, 2, 2).requires_grad_(), randn(1, 1, 12, 2).requires_grad_(), randn(1, 1, 12, 2)
    f = einc.compile("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e", fuse=False, memory_limit=8)
    assert "k" in [a.name for a in f.explain(q, k, v).slicing.axes]
    assert torch.autograd.gradcheck(f, (q, k, v.requires_grad_()))


def test_queries_are_cut_before_keys_where_both_fit():
    # Cutting keys computes every slice's logits twice (for the log-normalizer).
    q, k, v = (randn(2, 3, 64, 8) for _ in range(3))
    plan = einc.compile("softmax(b h q d, b h k d -> b h q [k]), b h k e -> b h q e", fuse=False,
                        memory_limit=3072).explain(q, k, v)
    assert "k" not in [a.name for a in plan.slicing.axes]


def test_validate_checks_a_sliced_call_against_the_float64_reference():
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    f = einc.compile("ab,bc,cd->ad", memory_limit=512)
    assert f.validate(*xs) < 1e-10
    with pytest.raises(einc.EincError, match="too small"):
        einc.compile("ab,bc,cd->ad", memory_limit=512, slice=False).validate(*xs)


def test_modules_do_not_slice_they_refuse():
    # Documented: shape-generic modules refuse what does not fit, when made and when called.
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    f = einc.compile("ab,bc,cd->ad", memory_limit=512)
    with pytest.raises(einc.EincError, match="memory_limit=512 elements is too small"):
        f.module(*xs)
    module = f.module((2, 96), (96, 2), (2, 16))  # fits for these shapes
    torch.testing.assert_close(module(xs[0][:2], xs[1][:, :2], xs[2][:2]), xs[0][:2] @ xs[1][:, :2] @ xs[2][:2])
    with pytest.raises(einc.EincError, match="too small"):
        module(*xs)


def test_the_output_must_fit():
    with pytest.raises(einc.EincError, match=r"the output alone \('a' 'd'\) has 256 elements"):
        einc.compile("ab,bc,cd->ad", memory_limit=255)(*[randn(16, 16) for _ in range(3)])


def test_a_process_wide_limit_slices_too():
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    previous = einc.configure(memory_limit=512)
    try:
        f = einc.compile("ab,bc,cd->ad")
        assert f.explain(*xs).slicing is not None
        torch.testing.assert_close(f(*xs), xs[0] @ xs[1] @ xs[2])
    finally:
        einc.configure(**previous)


def test_plan_reports_the_slicing():
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    plan = einc.compile("ab,bc,cd->ad", memory_limit=512).explain(*xs)
    (axis,) = plan.slicing.axes
    assert axis.count * axis.chunk >= axis.size > (axis.count - 1) * axis.chunk
    assert plan.slicing.flops >= plan.slicing.unsliced_flops
    data = plan.to_dict()["slicing"]
    assert data["slices"] == plan.slicing.slices and data["peak_bytes"] > 0
    assert "sliced:" in str(plan) and f"in {axis.count} chunks of {axis.chunk}" in str(plan)


def test_slicing_a_summed_axis_costs_no_extra_flops():
    # Issue 13: 1.00x where an axis can be sliced outside the large intermediates.
    xs = [randn(*s) for s in [(64, 32), (64, 32), (32, 32, 16)]]
    for factor in (16, 256):
        limit, _ = _budget("b i, b j, i j o -> b o", [x.shape for x in xs], factor)
        plan = einc.compile("b i, b j, i j o -> b o", memory_limit=limit).explain(*xs)
        assert plan.slicing.overhead == 1.0


INF = float("inf")


@pytest.mark.parametrize("scale", [1.0, 50.0, 1e30])
def test_sliced_log_partition_is_stable_on_wide_range_data(scale):
    h, w = randn(2, 8, 16, dtype=torch.float32), randn(256, 16, dtype=torch.float32)
    w = w * scale if scale != 1e30 else w.clamp(-1, 1) * 1e30 / 16
    f = einc.compile("logsumexp(sum(b t d, v d -> b t v) -> b t)", memory_limit=1024)
    assert f.explain(h, w).slicing is not None
    expected = torch.logsumexp(h.double() @ w.double().T, -1)
    torch.testing.assert_close(f(h, w).double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_sliced_logsumexp_of_all_neg_inf_is_neg_inf_with_zero_gradient():
    a = randn(4, 96).requires_grad_()
    b = torch.full((96, 96), -INF, dtype=F64)
    c = randn(96, 4)
    f = einc.compile("logsumexp(b i, i j, j k -> b k)", memory_limit=64)
    assert f.explain(a, b, c).slicing is not None
    out = f(a, b, c)
    assert torch.equal(out, torch.full((4, 4), -INF, dtype=F64))
    (grad,) = torch.autograd.grad(out.sum(), a)
    assert torch.equal(grad, torch.zeros_like(a))


def test_nan_propagates_through_slices():
    xs = [randn(*s) for s in [(16, 96), (96, 96), (96, 16)]]
    xs[1][5, 7] = float("nan")
    out = einc.compile("ab,bc,cd->ad", memory_limit=512)(*xs)
    expected = xs[0] @ xs[1] @ xs[2]
    assert torch.equal(out.isnan(), expected.isnan())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern, shapes, limit, reference", [
    ("logsumexp(sum(b t d, v d -> b t v) -> b t)", [(2, 8, 16), (256, 16)], 64,
     lambda h, w: torch.logsumexp(h @ w.T, -1)),
    ("b i, i j, j k -> b k", CHAIN, 64, lambda a, b, c: a @ b @ c),
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", [(2, 64, 8), (2, 64, 8), (2, 64, 8)], 1024,
     lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v),
])
def test_half_floats_slice_and_accumulate_in_float32(dtype, pattern, shapes, limit, reference):
    xs = [randn(*s, dtype=dtype) for s in shapes]
    f = einc.compile(pattern, memory_limit=limit)
    assert f.explain(*xs).slicing is not None
    out = f(*xs)
    assert out.dtype == dtype
    expected = reference(*[x.double() for x in xs])
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@settings(max_examples=30)
@given(data=st.data())
def test_random_contractions_under_random_budgets(data):
    # Any budget gives the unsliced result, or an EincError that says what did not fit.
    n = data.draw(st.integers(2, 4), label="operands")
    letters = "abcdefg"
    terms = [data.draw(st.lists(st.sampled_from(letters), min_size=1, max_size=3, unique=True), label=f"term{i}")
             for i in range(n)]
    present = sorted({a for term in terms for a in term})
    output = data.draw(st.lists(st.sampled_from(present), max_size=2, unique=True), label="output")
    sizes = {a: data.draw(st.integers(1, 12), label=a) for a in present}
    equation = ",".join("".join(t) for t in terms) + "->" + "".join(output)
    xs = [randn(*[sizes[a] for a in t]) for t in terms]
    limit = data.draw(st.integers(1, 400), label="limit")
    try:
        out = einc.compile(equation, memory_limit=limit, backend="eager")(*xs)
    except einc.EincError as err:
        assert f"memory_limit={limit:,} elements is too small" in str(err)
        return
    torch.testing.assert_close(out, torch.einsum(equation, *xs), rtol=1e-9, atol=1e-9)


LOG_PARTITION = """
b, v, d = 512, 32768, 16
h, w = torch.randn(b, d), torch.randn(v, d)
f = einc.compile("logsumexp(sum(b d, v d -> b v) -> b)", memory_limit=sys.argv[1], backend="eager")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("budget, bound", [
    ("4MiB", 12 * 2**20),  # sliced: a slice's logits, a slice's result, the output
    ("1GiB", None),        # unsliced, for the record: the 64 MiB logits
])
def test_the_sliced_log_partition_stays_within_its_budget(budget, bound):
    # The logits alone are 64 MiB (512 x 32768 float32); under a 4 MiB budget the
    # process's peak grows by a few budgets, not by the logits.
    assert_peak(LOG_PARTITION, "out = f(h, w)", budget, bound, floor=60 * 2**20)


def test_cotengra_slices_a_tensor_network_where_asked():
    # optimize="cotengra": cotengra's slicer picks the indices (single index values);
    # the result is the network's, contracted by opt_einsum in float64.
    import opt_einsum as oe
    from opt_einsum.testing import rand_equation

    eq, shapes = rand_equation(10, 3, seed=3, d_min=3, d_max=6, n_out=2)
    names = {c: f"x{i}" for i, c in enumerate(sorted(set(eq) - set(",->")))}
    inputs, output = eq.split("->")
    pattern = (", ".join(" ".join(names[c] for c in term) for term in inputs.split(",")) + " -> "
               + " ".join(names[c] for c in output))
    xs = [randn(*s) for s in shapes]
    peak = einc.compile(pattern).explain(*xs).largest_intermediate
    output_size = math.prod(einc.compile(pattern).explain(*xs).output_shape)
    limit = max(peak // 16, output_size)
    for optimize in ("auto", "cotengra"):
        f = einc.compile(pattern, memory_limit=limit, optimize=optimize)
        plan = f.explain(*xs)
        assert plan.slicing is not None and plan.slicing.largest_intermediate <= limit
        torch.testing.assert_close(f(*xs), oe.contract(eq, *xs), rtol=1e-9, atol=1e-9)


# ------------------------------------------------- found in review (each failed before)


def test_max_gradients_go_where_forward_found_the_maximum():
    # Backward recomputes max's slices exactly as forward cut them: finer slices could
    # round a maximum differently and drop its gradient, or double a tie's share.
    h, w = randn(2, 8, 16, dtype=torch.float32).requires_grad_(), randn(64, 16, dtype=torch.float32).requires_grad_()
    f = einc.compile("max(sum(b t d, v d -> b t v) -> b t)", memory_limit=32)
    assert f.explain(h, w).slicing.axes[0].role == "max"
    got = torch.autograd.grad(f(h, w).sum(), (h, w))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad((hd @ wd.T).amax(-1).sum(), (hd, wd))
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    a = torch.zeros(4, 32, dtype=F64, requires_grad=True)  # every entry ties
    (grad,) = torch.autograd.grad(einc.compile("max(b i, i j, j k -> b k)", memory_limit=16)(
        a, torch.zeros(32, 32, dtype=F64), torch.zeros(32, 4, dtype=F64)).sum(), a)
    assert float(grad.sum()) == 16.0  # one unit per output entry, as torch.amax gives


@pytest.mark.parametrize("pattern", [
    "softmax(b q d, b k d -> b q [k] / sqrt(k)), b k e -> b q e",  # the softmax's axis in its scale
    "softmax(b q d, b k d -> b q [k]), b k e -> b q e / k",        # ... or in the top level's
    "softmax(... q d, ... k d -> ... q [k]), ... k e -> ... q e",  # '...' may broadcast
])
def test_keys_are_not_cut_where_the_recurrence_would_not_hold(pattern):
    q, k, v = randn(1, 4, 8), randn(1, 256, 8), randn(1 if "..." not in pattern else 2, 256, 2)
    with pytest.raises(einc.EincError, match="no slicing fits it either"):
        einc.compile(pattern, memory_limit=96, fuse=False)(q, k, v)


def test_double_backward_through_a_sliced_call_raises():
    x, w = torch.ones(4, 16, dtype=F64, requires_grad=True), randn(16, 16, 2)
    f = einc.compile("b i, b j, i j o -> b o", memory_limit=8)
    with pytest.raises(einc.EincError, match="no double backward"):  # it would miss this call's term
        torch.autograd.grad(f(x, x, w).sum() + (x ** 3).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(f(x, x, w).sum(), x)  # a first backward is fine
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_attention_cut_along_keys_is_as_accurate_as_unsliced(dtype):
    q, k, v = (randn(1, 4, 16, dtype=torch.float32) * 4).to(dtype), (randn(1, 256, 16, dtype=torch.float32) * 4
                                                                       ).to(dtype), randn(1, 256, 2, dtype=dtype)
    pattern = "softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e"
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1) @ v.double()
    sliced = einc.compile(pattern, memory_limit=16)
    assert "k" in [a.name for a in sliced.explain(q, k, v).slicing.axes]
    error = float((sliced(q, k, v).double() - expected).abs().max())
    whole = float((einc.compile(pattern)(q, k, v).double() - expected).abs().max())
    assert error <= 2 * whole + 1e-3


def test_a_fused_attention_counts_the_logits_computed_again():
    # With SDPA fused, the softmax level's FLOPs are inside one step: cutting keys must
    # still count computing the logits twice, so queries are cut where both fit.
    q, k, v = randn(4, 4), randn(256, 4), randn(256, 2)
    for fuse in (True, False):
        plan = einc.compile("softmax(q d, k d -> q [k]), k e -> q e", memory_limit=346, fuse=fuse).explain(q, k, v)
        assert [a.name for a in plan.slicing.axes] == ["q"]


def test_many_small_slices_warn():
    # Over 1024 slices of under a million FLOPs each, the per-slice overhead dominates.
    xs = [randn(*s) for s in [(1, 1100), (1100, 1100), (1100, 1)]]  # only single rows fit
    f = einc.compile("a b, b c, c d -> a d", memory_limit=1)
    with pytest.warns(einc.slicing.SlicingWarning, match=r"slices of about .* FLOPs each"):
        out = f(*xs)
    assert f.explain(*xs).slicing.slices > 1024
    torch.testing.assert_close(out, xs[0] @ xs[1] @ xs[2])


@pytest.mark.parametrize("pattern, reference", [
    # Soft-label cross-entropy over a vocabulary: log-probabilities times targets.
    ("log_softmax(b t d, v d -> b t [v]), b t v -> b t", lambda h, w, y: (torch.log_softmax(h @ w.T, -1) * y).sum(-1)),
    # With a scale on the logits and a permuted output.
    ("log_softmax(b t d, v d -> b t [v] / sqrt(d)), b t v -> t b",
     lambda h, w, y: (torch.log_softmax(h @ w.T / 2, -1) * y).sum(-1).T),
    # Summed log-probabilities: the contraction with ones has no other operand.
    ("sum(log_softmax(b t d, v d -> b t [v]) -> b t)", lambda h, w: torch.log_softmax(h @ w.T, -1).sum(-1)),
])
def test_log_softmax_slices_along_its_own_axis(pattern, reference):
    # Where one row of logits does not fit: each slice's log-probabilities are off by
    # (its log-normalizer - the whole axis'), a constant per row, added back times the
    # contraction with ones; against torch in float64, values, gradients, gradcheck.
    h, w = randn(1, 2, 4).requires_grad_(), randn(256, 4).requires_grad_()
    y = torch.softmax(randn(1, 2, 256), -1).requires_grad_()
    args = (h, w, y) if pattern.count(",") > 1 else (h, w)
    f = einc.compile(pattern, memory_limit=64)
    assert [(a.name, a.role) for a in f.explain(*args).slicing.axes] == [("v", "log_softmax")]
    out, expected = f(*args), reference(*args)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    weight = randn(*expected.shape)
    got = torch.autograd.grad((out * weight).sum(), args)
    want = torch.autograd.grad((expected * weight).sum(), args)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    small = (h.detach().clone(), w.detach()[:24].clone(), y.detach()[..., :24].clone())[:len(args)]
    assert torch.autograd.gradcheck(einc.compile(pattern, memory_limit=8), tuple(a.requires_grad_() for a in small))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_log_softmax_cut_along_its_axis_is_as_accurate_as_unsliced(dtype):
    h, w = randn(1, 4, 16, dtype=dtype), randn(512, 16, dtype=dtype)
    y = torch.softmax(randn(1, 4, 512), -1).to(dtype)
    pattern = "log_softmax(b t d, v d -> b t [v] / sqrt(d)), b t v -> b t"
    expected = (torch.log_softmax(h.double() @ w.double().T / 4, -1) * y.double()).sum(-1)
    sliced = einc.compile(pattern, memory_limit=128)
    assert "v" in [a.name for a in sliced.explain(h, w, y).slicing.axes]
    error = float((sliced(h, w, y).double() - expected).abs().max())
    whole = float((einc.compile(pattern)(h, w, y).double() - expected).abs().max())
    assert error <= 2 * whole + 2e-2


@pytest.mark.parametrize("masked", ["first", "last", "middle"])  # which keys' slice is all -inf
def test_a_slice_whose_keys_are_all_masked_contributes_nothing(masked):
    """Attention cut along its keys where one slice of keys is masked out everywhere
    (padding): values and gradients as torch's softmax over the whole row."""
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(1, 12, generator=generator, dtype=torch.float64)
    v = torch.randn(12, 1, generator=generator, dtype=torch.float64)
    s[:, {"first": slice(0, 4), "last": slice(8, 12), "middle": slice(4, 8)}[masked]] = float("-inf")
    f = einc.compile("softmax(q k -> q [k]), k e -> q e", memory_limit=4)
    assert [a.role for a in f.explain(s, v).slicing.axes] == ["softmax"]
    a, b = s.clone().requires_grad_(), v.clone().requires_grad_()
    out, want = f(a, b), torch.softmax(a, -1) @ b
    torch.testing.assert_close(out, want)
    for got, expected in zip(torch.autograd.grad(out.sum(), (a, b)), torch.autograd.grad(want.sum(), (a, b))):
        torch.testing.assert_close(got, expected)
