"""Masks, biases, causality and windows in patterns (``bias(...)``, ``mask(...)``,
``causal(q k)``, ``causal_lower_right(q k)``, ``window(q k, N)``).

Every row is compared with attention written by hand in float64 torch:
``softmax(q kᵀ · scale + bias).masked_fill(...) @ v``, a row that attends to nothing
giving zeros (SDPA's rule), on the fused (SDPA) and the plain lowering, on shared
generic and literal code, with gradients.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import assert_peak
from hypothesis import given
from hypothesis import strategies as st

import einc
from einc.errors import EincError
from einc.parser import parse

B, H, Q, K, D, E = 2, 2, 5, 7, 4, 3


def _attention(q, k, v, *, scale=1.0, bias=None, allowed=None, causal=None, window=None):
    """Attention over (b, h, q, d), (b, h, k, d), (b, h, k, e) in float64, the plain way."""
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    nq, nk = logits.shape[-2:]
    i = torch.arange(nq)[:, None] + (nk - nq if causal == "lower_right" else 0)
    j = torch.arange(nk)[None, :]
    keep = torch.ones(logits.shape, dtype=torch.bool)
    if allowed is not None:
        keep = keep & allowed
    if causal is not None:
        keep = keep & (j <= i)
    if window is not None:
        keep = keep & (i - j >= 0) & (i - j < window)
    logits = logits.masked_fill(~keep, float("-inf"))
    dead = ~keep.any(-1, keepdim=True) | (logits.amax(-1, keepdim=True) == float("-inf"))
    weights = torch.softmax(logits.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return weights @ v


def _tensors(seed=0, q_len=Q, k_len=K):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, k_len, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, k_len, E, generator=g, dtype=torch.float64)
    padding = torch.rand(B, k_len, generator=g) < 0.7
    padding[0, :] = False  # batch 0 attends to nothing: its rows give zeros
    full = torch.rand(B, H, q_len, k_len, generator=g) < 0.6
    bias = torch.randn(H, q_len, k_len, generator=g, dtype=torch.float64)
    return q, k, v, padding, full, bias


ATTEND = "softmax(b h q d, b h k d -> b h q [k] / sqrt(d){}), b h k e -> b h q e"
SCALE = 1 / math.sqrt(D)
# (name, modifiers, which extra tensors the call takes, the reference's keywords)
ROWS = [
    ("causal", " causal(q k)", [], {"causal": "upper_left"}),                       # SDPA's is_causal
    ("causal-lower-right", " causal_lower_right(q k)", [], {"causal": "lower_right"}),  # decoding alignment
    ("window", " window(q k, 3)", [], {"window": 3}),                                # sliding, upper left
    ("window-lower-right", " causal_lower_right(q k) window(q k, 2)", [], {"causal": "lower_right", "window": 2}),
    ("key-padding", " mask(b k)", ["padding"], {"allowed": "padding"}),              # broadcast by name
    ("full-mask", " mask(b h q k)", ["full"], {"allowed": "full"}),
    ("bias", " bias(h q k)", ["bias"], {"bias": "bias"}),                            # ALiBi-like, per head
    ("everything", " bias(h q k) mask(b k) causal(q k)", ["bias", "padding"],
     {"bias": "bias", "allowed": "padding", "causal": "upper_left"}),
]


def _reference_keywords(options, padding, full, bias):
    found = dict(options)
    if found.get("allowed") == "padding":
        found["allowed"] = padding[:, None, None, :]
    elif found.get("allowed") == "full":
        found["allowed"] = full
    if "bias" in found:
        found["bias"] = bias
    return found


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name, modifiers, extra, options", ROWS, ids=[r[0] for r in ROWS])
def test_masked_attention_matches_the_plain_form(both_codes, fuse, name, modifiers, extra, options):
    q, k, v, padding, full, bias = _tensors()
    named = {"padding": padding, "full": full, "bias": bias}
    f = einc.compile(ATTEND.format(modifiers), fuse=fuse)
    expected = _attention(q, k, v, scale=SCALE, **_reference_keywords(options, padding, full, bias))
    operands = [q, k, *[named[x] for x in extra], v]
    assert f.explain(*operands).rewrite == ("sdpa" if fuse else "")
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        cast = [t.to(dtype) if t.is_floating_point() else t for t in operands]
        torch.testing.assert_close(f(*cast).double(), expected, rtol=tol, atol=tol)
    # Gradients (float32) against float64 autograd of the plain form.
    leaves = [t.float().requires_grad_() if t.is_floating_point() else t for t in operands]
    out = f(*leaves)
    wanted = [t.double().detach().requires_grad_() if t.is_floating_point() else t for t in leaves]
    ref_q, ref_k, ref_v = wanted[0], wanted[1], wanted[-1]
    ref_keywords = _reference_keywords(options, padding, full, wanted[2] if "bias" in extra else bias)
    reference = _attention(ref_q, ref_k, ref_v, scale=SCALE, **ref_keywords)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    got = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t.requires_grad])
    want = torch.autograd.grad((reference * weights.double()).sum(), [t for t in wanted if t.requires_grad])
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_gradcheck(fuse):
    q, k, v, padding, _, bias = _tensors(1, 3, 4)
    f = einc.compile(ATTEND.format(" bias(h q k) mask(b k) causal_lower_right(q k)"), fuse=fuse)
    leaves = [t.clone().requires_grad_() for t in (q, k, bias[:, :3, :4].clone(), v)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: f(a, b, c, padding[:, :4], d), leaves)


def test_log_softmax_with_a_mask():
    """Masked entries are -inf; a row that sees nothing is -inf everywhere (log of zeros)."""
    q, k, _, _, full, _ = _tensors()
    f = einc.compile("log_softmax(b h q d, b h k d -> b h q [k] mask(b h q k))")
    logits = (q @ k.transpose(-1, -2)).masked_fill(~full, float("-inf"))
    dead = ~full.any(-1, keepdim=True)
    expected = torch.log_softmax(logits.masked_fill(dead, 0.0), -1).masked_fill(~full, float("-inf"))
    torch.testing.assert_close(f(q, k, full), expected)


def test_a_mask_inside_a_nested_pattern_under_a_reduction():
    """The mean over queries of masked attention: the mask applies inside, before the softmax."""
    q, k, v, padding, _, _ = _tensors()
    f = einc.compile("mean(softmax(b h q d, b h k d -> b h q [k] mask(b k)), b h k e -> b h e)")
    expected = _attention(q, k, v, allowed=padding[:, None, None, :]).mean(2) / K  # the mean over q and k
    torch.testing.assert_close(f(q, k, padding, v), expected)


@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from([None, "upper_left", "lower_right"]),
       st.integers(0, 2**31 - 1), st.booleans())
def test_random_shapes_masks_and_alignments(q_len, k_len, causal, seed, fuse):
    q, k, v, padding, _, _ = _tensors(seed, q_len, k_len)
    spelled = {None: "", "upper_left": " causal(q k)", "lower_right": " causal_lower_right(q k)"}
    modifiers = " mask(b k)" + spelled[causal]
    f = einc.compile(ATTEND.format(modifiers), fuse=fuse)
    expected = _attention(q, k, v, scale=SCALE, allowed=padding[:, None, None, :], causal=causal)
    torch.testing.assert_close(f(q, k, padding, v), expected)


def test_shape_generic_module_scripted_with_masks():
    module = einc.compile(ATTEND.format(" mask(b k) causal_lower_right(q k)")).module(
        (B, H, Q, D), (B, H, K, D), (B, K), (B, H, K, E), dtype=torch.float64)
    scripted = torch.jit.script(module)
    for q_len, k_len in [(5, 7), (1, 9), (3, 3)]:
        q, k, v, padding, _, _ = _tensors(2, q_len, k_len)
        expected = _attention(q, k, v, scale=SCALE, allowed=padding[:, None, None, :], causal="lower_right")
        torch.testing.assert_close(scripted(q, k, padding, v), expected)


@pytest.mark.slow
def test_compiles_fullgraph_dynamic_with_masks():
    module = einc.compile(ATTEND.format(" mask(b k) causal(q k)")).module(
        (B, H, Q, D), (B, H, K, D), (B, K), (B, H, K, E))
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for q_len, k_len in [(5, 7), (4, 6)]:
        q, k, v, padding, _, _ = _tensors(3, q_len, k_len)
        expected = _attention(q, k, v, scale=SCALE, allowed=padding[:, None, None, :], causal="upper_left")
        got = compiled(*(t.float() if t.is_floating_point() else t for t in (q, k, padding, v)))
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern, message", [
    # a mask over an axis the logits do not have
    ("softmax(b q d, b k d -> b q [k] mask(b z))", "mask(...) names axis 'z', which is not a dimension of its own"),
    # modifiers shape a normalizer's logits only
    ("b q d, b k d -> b q k causal(q k)", "shapes the logits of softmax/log_softmax"),
    # the keys' axis (the normalized one) comes second
    ("softmax(b q d, b k d -> b q [k] causal(k q))", "takes the queries' axis, then the keys' axis"),
    ("softmax(b q d, b k d -> b q [k] window(q b, 4))", "'b' is not normalized here"),
    ("softmax(b q d, b k d -> b q [k] window(q k))", "window(q k, N) takes a size"),
    ("softmax(b q d, b k d -> b q [k] window(q k, 0))", "a window's size is positive"),
    ("softmax(b q d, b k d -> b q [k] causal(q k, 3))", "causal(...) takes axes only (a size is window's)"),
    ("softmax(b q d, b k d -> b q [k] mask(b k, 3))", "mask(...) takes axes only"),
    ("softmax(b q d, b k d -> b q [k] causal(q k) causal_lower_right(q k))", "one causality"),
    # written after the call, outside its parentheses: it would shape nothing (it was dropped)
    ("softmax(q d, k d -> q [k]) causal(q k)", "shapes the logits of softmax/log_softmax"),
])
def test_bad_modifiers(pattern, message):
    with pytest.raises(EincError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(pattern)


@pytest.mark.parametrize("tensor, message", [
    (torch.ones(B, K), "mask(b k) (operand 2) must be a bool tensor (True = attend), not float32"),
    (torch.ones(B, K, dtype=torch.int64), "must be a bool tensor (True = attend), not int64"),
    (torch.ones(B, K + 1, dtype=torch.bool), "axis 'k' has size 8 in operand 2 (dimension 1) but 7 in operand 1"),
    (torch.ones(K, dtype=torch.bool), "mask(b k) (operand 2) has shape 7: 1 dimensions for its 2 axes"),
])
def test_bad_mask_tensors(tensor, message):
    q, k, v, *_ = _tensors()
    f = einc.compile(ATTEND.format(" mask(b k)"))
    with pytest.raises(EincError, match=message.replace("(", r"\(").replace(")", r"\)")):
        f(q.float(), k.float(), tensor, v.float())


def test_an_integer_bias_is_refused():
    q, k, v, *_ = _tensors()
    with pytest.raises(EincError, match=r"bias\(h q k\) \(operand 2\) must be a floating-point tensor"):
        einc.compile(ATTEND.format(" bias(h q k)"))(q, k, torch.ones(H, Q, K, dtype=torch.int64), v)


def test_rendering_keeps_modifiers():
    pattern = "softmax(b q d, b k d -> b q [k] / sqrt(d) bias(q k) mask(b k) window(q k, 16)), b k e -> b q e"
    assert parse(pattern).render() == pattern
    assert parse(pattern).leaves == 5


class _NanoGPTAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention (karpathy/nanoGPT, model.py), as written there."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class _EincAttention(_NanoGPTAttention):
    """The same block with the attention as one einc pattern: heads split and merged by
    composition, causality in the pattern, padding as a mask over (b, k)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__(n_embd, n_head)
        self.attend = einc.compile("softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d) mask(b k) causal(q k)), "
                                   "b k (h e) -> b q (h e)", h=n_head)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if padding is None:
            padding = torch.ones(x.shape[:2], dtype=torch.bool)
        return self.c_proj(self.attend(q, k, padding, v))


def test_port_nanogpt_causal_self_attention():
    torch.manual_seed(0)
    mine, theirs = _EincAttention(32, 4), _NanoGPTAttention(32, 4)
    theirs.load_state_dict({k: v for k, v in mine.state_dict().items()})
    x = torch.randn(3, 9, 32, requires_grad=True)
    out, expected = mine(x), theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert mine.attend.explain(x, x, torch.ones(3, 9, dtype=torch.bool), x).rewrite == "sdpa"
    (g,) = torch.autograd.grad(out.sum(), x)
    (h,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    # Left padding (batched prompts of different lengths): padded keys are never attended,
    # and the unpadded tokens of a short prompt get what the prompt alone gets.
    padding = torch.ones(3, 9, dtype=torch.bool)
    padding[1, :4] = False
    alone = theirs(x[1:2, 4:])
    torch.testing.assert_close(mine(x, padding)[1, 4:], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern, options, reason", [
    ("log_softmax(b q d, b k d -> b q [k]), b k e -> b q e", {}, "log_softmax: SDPA computes a softmax"),
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e", {"fuse": False}, "fuse=False"),
    ("softmax(b q d, b k d -> b q [k]), b k e -> b q e / 2", {}, "the outer contraction has a scale"),
    ("softmax(b q d, b k d -> b q [k]), b k e, b z -> b q e z", {}, "the outer contraction has 3 operands"),
])
def test_explain_says_why_sdpa_was_not_taken(pattern, options, reason):
    f = einc.compile(pattern, **options)
    shapes = {"b": 2, "q": 3, "r": 2, "k": 5, "d": 4, "e": 6, "z": 2}
    operands = [[shapes[a] for a in axes.axes] for axes in parse(pattern).leaf_lists()]
    plan = f.explain(*operands)
    assert plan.rewrite == "" and plan.not_fused.startswith(reason), plan.not_fused
    assert f"not SDPA because {reason}" in str(plan)


def test_explain_of_a_fused_or_plain_pattern_gives_no_reason():
    assert einc.compile(ATTEND.format(" causal(q k)")).explain((2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 3)).not_fused == ""
    assert einc.compile("b q d, b k d -> b q k").explain((2, 5, 4), (2, 7, 4)).not_fused == ""


@pytest.mark.parametrize("fuse", [True, False])
def test_grouped_query_attention_with_causality_and_padding(fuse):
    """GQA spelled by composition: query heads (g r) share key/value head g; the causal mask
    over (q, k) broadcasts over the query heads (SDPA's L folds r and q: one attn_mask)."""
    g_, r_ = 2, 2
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, Q, g_ * r_ * D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, K, g_ * D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, K, g_ * E, generator=gen, dtype=torch.float64)
    padding = torch.rand(B, K, generator=gen) < 0.8
    f = einc.compile("softmax(b q (g r d), b k (g d) -> b g r q [k] / sqrt(d) mask(b k) causal_lower_right(q k)), "
                     "b k (g e) -> b q (g r e)", g=g_, r=r_, fuse=fuse)
    heads = lambda t, n: t.reshape(B, t.shape[1], n, -1).transpose(1, 2)  # noqa: E731
    kh, vh = heads(k, g_).repeat_interleave(r_, 1), heads(v, g_).repeat_interleave(r_, 1)
    expected = _attention(heads(q, g_ * r_), kh, vh, scale=SCALE, allowed=padding[:, None, None, :],
                          causal="lower_right").transpose(1, 2).reshape(B, Q, -1)
    torch.testing.assert_close(f(q, k, padding, v), expected)
    assert f.explain(q, k, padding, v).rewrite == ("sdpa" if fuse else "")


def test_the_readme_transformer_block_runs_as_written():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    source = readme.split("```python\n# block.py\n", 1)[1].split("```", 1)[0]
    exec(compile(source, "README.md:block.py", "exec"), {})  # it asserts einc against plain torch itself



def test_constants_with_modifiers_are_refused():
    q, k, v, padding, *_ = _tensors()
    with pytest.raises(EincError, match=r"constants are not supported with bias\(...\), mask\(...\)"):
        einc.compile("softmax(b q d, b k d -> b q [k] mask(b k))", constants={2: padding})


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_an_empty_key_axis_with_modifiers(both_codes, fuse, op):
    """No keys: an empty result, as without modifiers (not amax's error on an empty axis)."""
    q, k, v, padding, *_ = _tensors()
    pattern = f"{op}(b h q d, b h k d -> b h q [k] mask(b k) causal(q k))" + (", b h k e -> b h q e" if op == "softmax"
                                                                               else "")
    f = einc.compile(pattern, fuse=fuse)
    operands = [q, k[:, :, :0], padding[:, :0]] + ([v[:, :, :0]] if op == "softmax" else [])
    out = f(*operands)
    assert out.shape == ((B, H, Q, E) if op == "softmax" else (B, H, Q, 0))
    assert (out == 0).all()


def test_integer_queries_with_a_float_bias_are_refused_as_without_it():
    """The bias does not decide the dtype the logits are computed in: integer q and k are
    refused as softmax refuses them, not by a raw torch error."""
    q, k, v, *_ = _tensors()
    f = einc.compile("softmax(b h q d, b h k d -> b h q [k] bias(h q k))")
    with pytest.raises(EincError, match="softmax"):
        f(q.long(), k.long(), torch.zeros(H, Q, K))


def test_the_bias_dtype_does_not_change_the_computation_dtype():
    """A float64 bias on float32 logits: added in float32 (the plan, its byte figures and
    validate's tolerance are float32's)."""
    q, k, v, _, _, bias = _tensors()
    f = einc.compile(ATTEND.format(" bias(h q k)"))
    args = (q.float(), k.float(), bias, v.float())
    assert f(*args).dtype == torch.float32
    assert f.explain(*args).dtype == "float32"
    assert f.validate(*args) < 1e-5
    half = (q.half(), k.half(), bias.float(), v.half())
    assert f(*half).dtype == torch.float16 and f.validate(*half) < 1e-2


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("fuse", [True, False])
def test_dropout_draws_what_torch_draws_for_the_same_seed(both_codes, fuse):
    """dropout= drops the softmax weights as SDPA's dropout_p does (and as torch.dropout on
    them): the same seed gives the same result on both lowerings."""
    q, k, v, *_ = (t.float() for t in _tensors())
    f = einc.compile(ATTEND.format(" causal(q k)"), dropout=0.5, fuse=fuse)
    assert f.explain(q, k, v).rewrite == ("sdpa" if fuse else "")
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(
            torch.ones(Q, K, dtype=torch.bool).triu(1), float("-inf")), -1)
        expected = torch.dropout(weights, 0.5, True) @ v
        torch.manual_seed(seed)
        torch.testing.assert_close(f(q, k, v), expected, rtol=1e-5, atol=1e-6)


def test_dropout_keeps_the_expectation():
    """Averaged over many draws, dropout's result tends to the result without it."""
    q, k, v, *_ = (t.float() for t in _tensors())
    torch.manual_seed(0)
    f = einc.compile(ATTEND.format(""), dropout=0.3)
    mean = torch.stack([f(q, k, v) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, einc.compile(ATTEND.format(""))(q, k, v), rtol=0, atol=0.1)


def test_dropout_in_a_scripted_module_and_its_gradient():
    q, k, v, *_ = (t.float() for t in _tensors())
    module = torch.jit.script(einc.compile(ATTEND.format(""), dropout=0.5).module(q, k, v))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    out = module(*leaves)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    torch.manual_seed(3)
    again = [t.clone().requires_grad_() for t in (q, k, v)]
    weights = torch.dropout(torch.softmax(again[0] @ again[1].transpose(-1, -2) * SCALE, -1), 0.5, True)
    ((weights @ again[2]) * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    for got, want in zip(leaves, again):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"dropout": 1.0}, "dropout must be a probability in [0, 1), not 1.0"),
    ({"dropout": -0.1}, "dropout must be a probability in [0, 1)"),
    ({"dropout": True}, "dropout must be a probability in [0, 1), not True"),
    ({"dropout": 0.1, "distributed": True}, "dropout with distributed"),
])
def test_bad_dropout(options, message):
    with pytest.raises(EincError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        einc.compile(ATTEND.format(""), **options)


def test_dropout_refuses_validate_and_slicing():
    q, k, v, *_ = (t.float() for t in _tensors())
    with pytest.raises(EincError, match="validate compares with a deterministic reference"):
        einc.compile(ATTEND.format(""), dropout=0.1).validate(q, k, v)
    with pytest.raises(EincError, match="sliced execution does not take dropout"):
        einc.compile(ATTEND.format(""), dropout=0.1, fuse=False, memory_limit=64)(q, k, v)


# ------------------------------------------------------------ under a memory_limit

# (rows of ROWS, query and key lengths): square, more keys than queries (a prefix
# before the queries, lower right), more queries than keys (lower right: the first
# queries see nothing).
LENGTHS = [(24, 24), (16, 40), (40, 16)]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("q_len, k_len", LENGTHS)
@pytest.mark.parametrize("name, modifiers, extra, options", ROWS, ids=[r[0] for r in ROWS])
def test_masked_attention_sliced_under_a_budget(fuse, q_len, k_len, name, modifiers, extra, options):
    if options.get("causal", "upper_left" if "window" in options else None) == "upper_left" and q_len > k_len:
        pytest.skip("upper-left causality with more queries than keys: test_upper_left_with_more_queries_...")
    q, k, v, padding, full, bias = _tensors(1, q_len, k_len)
    named = {"padding": padding, "full": full, "bias": bias}
    operands = [q, k, *[named[x] for x in extra], v]
    # Scores are B*H*q_len*k_len = 2,304..2,560 elements; 700 leaves room for a quarter.
    f = einc.compile(ATTEND.format(modifiers), fuse=fuse, memory_limit=700)
    cut = f.explain(*operands).slicing
    assert cut is not None and cut.largest_intermediate <= 700
    positional = "causal" in options or "window" in options
    if positional:
        # The queries slice with the keys they see: never more than the unsliced FLOPs.
        assert [a.name for a in cut.axes] == ["q"] and cut.visible is not None and cut.overhead < 1
    else:
        assert cut.visible is None
    expected = _attention(q, k, v, scale=SCALE, **_reference_keywords(options, padding, full, bias))
    torch.testing.assert_close(f(*operands), expected, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in operands]
    wanted = [t.clone().requires_grad_() if t.is_floating_point() else t for t in operands]
    out = f(*leaves)
    reference = _attention(wanted[0], wanted[1], wanted[-1], scale=SCALE, **_reference_keywords(
        options, padding, full, wanted[2] if "bias" in extra else bias))
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t.requires_grad])
    want = torch.autograd.grad((reference * weights).sum(), [t for t in wanted if t.requires_grad])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@given(st.integers(1, 30), st.integers(1, 30), st.sampled_from(["causal(q k)", "causal_lower_right(q k)"]),
       st.sampled_from([None, 1, 3, 8]), st.floats(0.02, 1.0), st.integers(0, 2**31 - 1), st.booleans())
def test_random_causal_slicing(q_len, k_len, causal, window, fraction, seed, fuse):
    lower_right = causal.startswith("causal_lower_right")
    if not lower_right and q_len > k_len:  # its queries do not slice (the test below)
        q_len, k_len = k_len, q_len
    q, k, v, padding, _, _ = _tensors(seed, q_len, k_len)
    modifiers = f" mask(b k) {causal}" + ("" if window is None else f" window(q k, {window})")
    # A fraction of the scores, but room for the output and a slice of one query.
    limit = max(B * H * q_len * E, 4 * k_len, int(fraction * B * H * q_len * k_len))
    f = einc.compile(ATTEND.format(modifiers), fuse=fuse, memory_limit=limit)
    expected = _attention(q, k, v, scale=SCALE, allowed=padding[:, None, None, :],
                          causal="lower_right" if lower_right else "upper_left", window=window)
    torch.testing.assert_close(f(q, k, padding, v), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset_kind", ["causal(q k)", "causal_lower_right(q k)"])
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("q_len, k_len, chunk", [(24, 24, 5), (16, 40, 3), (40, 16, 7), (9, 9, 9), (12, 30, 1)])
def test_each_slice_takes_exactly_the_keys_its_queries_see(offset_kind, window, q_len, k_len, chunk):
    # Stage test of slicing.Visible: the narrowest range holding every key that some
    # query of the slice attends to, read off the naive mask (the reference's rule).
    if offset_kind == "causal(q k)" and q_len > k_len:
        return  # not a Visible slicing (the next test)
    lower_right = offset_kind != "causal(q k)"
    offset = k_len - q_len if lower_right else 0
    keys = einc.slicing.Visible("q", "k", q_len, k_len, offset, window)
    i = torch.arange(q_len)[:, None] + offset
    j = torch.arange(k_len)[None, :]
    sees = (j <= i) & ((i - j < window) if window is not None else True)
    for start in range(0, q_len, chunk):
        length = min(chunk, q_len - start)
        seen = sees[start:start + length].any(0).nonzero().flatten().tolist()
        first, count = keys.span(start, length)
        assert list(range(first, first + count)) == seen, (start, length)


def test_upper_left_with_more_queries_than_keys_slices_other_axes():
    # The queries past the last key see every key: no narrowed range aligns them, so
    # the queries are not sliced; batch and heads are.
    q, k, v, padding, _, _ = _tensors(2, 30, 12)
    f = einc.compile(ATTEND.format(" causal(q k)"), memory_limit=400)
    cut = f.explain(q, k, v).slicing
    assert "q" not in [a.name for a in cut.axes] and cut.visible is None
    torch.testing.assert_close(f(q, k, v), _attention(q, k, v, scale=SCALE, causal="upper_left"))


def _causal_weights(q, k, normalizer):
    logits = (q @ k.transpose(-1, -2) * SCALE)
    keep = torch.arange(k.shape[-2])[None, :] <= torch.arange(q.shape[-2])[:, None]
    return normalizer(logits.masked_fill(~keep, float("-inf")), -1)


@pytest.mark.parametrize("pattern, follows, reference", [
    # keys summed at the top by a plain contraction: they follow
    (ATTEND, True, lambda q, k, v: _causal_weights(q, k, torch.softmax) @ v),
    # the queries summed too (a loss over positions): they still follow
    ("softmax(b h q d, b h k d -> b h q [k] / sqrt(d){}), b h k e -> b h e", True,
     lambda q, k, v: (_causal_weights(q, k, torch.softmax) @ v).sum(2)),
    # a log_softmax's masked -inf entries reach the top level (-inf x v): no narrowing
    ("log_softmax(b h q d, b h k d -> b h q [k] / sqrt(d){}), b h k e -> b h q e", False,
     lambda q, k, v: _causal_weights(q, k, torch.log_softmax) @ v),
    # a mean over the keys divides by all of them: no narrowing
    ("mean(softmax(b h q d, b h k d -> b h q [k] / sqrt(d){}), b h k e -> b h q e)", False,
     lambda q, k, v: _causal_weights(q, k, torch.softmax) @ v / k.shape[-2]),
])
def test_which_causal_patterns_slice_their_queries(pattern, follows, reference):
    q, k, v, *_ = _tensors(3, 24, 24)
    operands = (q, k, v) if pattern.count(",") > 1 else (q, k)
    f = einc.compile(pattern.format(" causal(q k)"), memory_limit=1200)
    cut = f.explain(*operands).slicing
    assert cut is not None and (cut.visible is not None) == follows
    assert ("q" in [a.name for a in cut.axes]) == follows  # else batch or heads
    torch.testing.assert_close(f(*operands), reference(q, k, v), equal_nan=True)


CAUSAL_PROBE = """
h, n, d = 8, 2048, 16
q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
f = einc.compile("softmax(b h q d, b h k d -> b h q [k] / sqrt(d) causal(q k)), b h k e -> b h q e", fuse=False,
                 memory_limit=sys.argv[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("budget, bound", [
    ("8MiB", 32 * 2**20),  # sliced along queries: a slice's scores (twice: logits, weights), the output
    ("1GiB", None),        # unsliced, for the record: the 128 MiB scores
])
def test_long_causal_attention_stays_within_its_budget(budget, bound):
    # The plain lowering's scores are 128 MiB (8 x 2048 x 2048 float32); under an 8 MiB
    # budget the process's peak grows by a few budgets.
    assert_peak(CAUSAL_PROBE, "out = f(q, k, v)", budget, bound, floor=100 * 2**20)
