"""einc.nn: Einsum layers and multi-head attention.

References: torch.einsum in float64 for Einsum, ``torch.nn.MultiheadAttention`` with the
same weights for the attention layer, and torch's Transformer layers against copies whose
attention is einc's.  Both layers are also run under ``torch.jit.script`` and
``torch.compile(fullgraph=True)`` (which fails on any graph break).
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from conftest import randn

import einc
import einc.nn

E = torch.einsum

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


# ---------------------------------------------------------------- Einsum

EINSUM = [
    # (pattern, weight, bias, sizes, input shape, float64 reference from x, weight, bias)
    pytest.param("b t (h d) -> b t h e", "h d e", "h e", {"h": 2, "d": 3, "e": 4}, (2, 5, 6),
                 lambda x, w, b: E("bthd,hde->bthe", x.reshape(2, 5, 2, 3), w) + b, id="heads-projection"),
    pytest.param("b t c -> b t d", "c d", "d", {"c": 6, "d": 4}, (2, 5, 6),
                 lambda x, w, b: x @ w + b, id="linear"),
    pytest.param("b t c -> b (t d)", "c d", None, {"c": 6, "d": 4}, (2, 5, 6),
                 lambda x, w, b: (x @ w).reshape(2, 20), id="merge-into-output"),
    pytest.param("... c -> ... d", "c d", "d", {"c": 6, "d": 4}, (3, 6),
                 lambda x, w, b: x @ w + b, id="ellipsis"),
    pytest.param("b c -> c b", None, None, {}, (4, 6), lambda x, w, b: x.T, id="parameter-free-rearrange"),
    pytest.param("b t c -> b c (t k)", "c k", "c (t k)", {"c": 3, "k": 2, "t": 5}, (2, 5, 3),
                 lambda x, w, b: E("btc,ck->bctk", x, w).reshape(2, 3, 10) + b, id="bias-over-merged-axes"),
]


@pytest.mark.parametrize("pattern, weight, bias, sizes, shape, reference", EINSUM)
def test_einsum_layer_matches_torch_einsum(pattern, weight, bias, sizes, shape, reference):
    layer = einc.nn.Einsum(pattern, weight, bias, **sizes).double()
    x = randn(*shape)
    expected = reference(x, layer.weight, None if layer.bias is None else layer.bias.reshape(layer.bias_view))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(script(layer)(x), expected, rtol=1e-10, atol=1e-12)


def test_einsum_layer_serves_any_batch_and_sequence_length():
    layer = einc.nn.Einsum("b t (h d) -> b t h e", "h d e", "h e", h=2, d=3, e=4).double()
    scripted = script(layer)
    for b, t in [(1, 1), (3, 7), (5, 2)]:
        x = randn(b, t, 6)
        expected = E("bthd,hde->bthe", x.reshape(b, t, 2, 3), layer.weight) + layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-10, atol=1e-12)


def test_einsum_layer_initialisation_bound_is_one_over_sqrt_fan_in():
    layer = einc.nn.Einsum("b t (h d) -> b t h e", "h d e", "h e", h=2, d=50, e=40)
    bound = 1 / math.sqrt(50)  # d is summed; h and e are kept
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound


def test_einsum_layer_gradients_match_torch_einsum():
    layer = einc.nn.Einsum("b t (h d) -> b t h e", "h d e", "h e", h=2, d=3, e=4)
    x = randn(2, 5, 6, dtype=torch.float32, requires_grad=True)
    grad = randn(2, 5, 2, 4, dtype=torch.float32)
    layer(x).backward(grad)
    xw, ww, bw = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    (E("bthd,hde->bthe", xw.reshape(2, 5, 2, 3), ww) + bw).backward(grad.double())
    for mine, reference in ((x.grad, xw.grad), (layer.weight.grad, ww.grad), (layer.bias.grad, bw.grad)):
        torch.testing.assert_close(mine.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern, weight, bias, sizes, message", [
    # weight axis without a size
    ("b t c -> b t d", "c d", None, {"c": 4}, "give the size of weight axis 'd' by keyword"),
    # bias covering half of a composed output dimension
    ("b t c -> b (t d)", "c d", "d", {"c": 4, "d": 2}, "the bias must cover whole output dimensions"),
    # bias axes out of output order
    ("b t c -> b h e", "c h e", "e h", {"c": 4, "h": 2, "e": 3}, "in output order"),
    # a weight with an operation
    ("sum(b t c -> b t)", "c", None, {"c": 4}, "the pattern must be one operand and an output"),
    # a weight with '...'
    ("b c -> b d", "... d", None, {"d": 2}, "the weight cannot have '...'"),
    # a weight of two axis lists (once taken as its first list, silently)
    ("b c -> b o", "o c, o", None, {"o": 3, "c": 4}, "the weight must be one axis list"),
    # a weight with an arrow
    ("b c -> b o", "o c -> o", None, {"o": 3, "c": 4}, "the weight must be one axis list"),
    # a weight with an operation
    ("b c -> b o", "sum(o c -> o)", None, {"o": 3, "c": 4}, "the weight must be one axis list"),
    # a bias of two lists
    ("b c -> b o", "o c", "o, o", {"o": 3, "c": 4}, "the bias must be one axis list"),
    # a weight that is not text
    ("b c -> b o", 3, None, {"o": 3, "c": 4}, "the weight must be an axis list as a string"),
    # a float size (once a raw TypeError from torch.empty)
    ("b c -> b o", "o c", None, {"o": 3.0, "c": 4}, "size of axis 'o' must be a non-negative int"),
])
def test_einsum_layer_errors(pattern, weight, bias, sizes, message):
    with pytest.raises(einc.EincError, match=message):
        einc.nn.Einsum(pattern, weight, bias, **sizes)


@pytest.mark.slow
def test_einsum_layer_compiles_fullgraph():
    layer = einc.nn.Einsum("b t (h d) -> b t h e", "h d e", "h e", h=2, d=3, e=4)
    compiled = torch.compile(layer, fullgraph=True)
    for b, t in [(2, 5), (3, 7)]:
        x = randn(b, t, 6, dtype=torch.float32)
        torch.testing.assert_close(compiled(x), layer(x))


# ---------------------------------------------------------------- MultiheadAttention


def pair(embed: int = 32, heads: int = 4, **options) -> tuple[torch.nn.Module, einc.nn.MultiheadAttention]:
    """torch's layer and einc's, with the same weights (loaded through the state dict)."""
    reference = torch.nn.MultiheadAttention(embed, heads, **options)
    with torch.no_grad():  # non-zero biases, so a misplaced bias cannot hide
        for parameter in reference.parameters():
            parameter.uniform_(-0.3, 0.3)
    mine = einc.nn.MultiheadAttention(embed, heads, **options)
    mine.load_state_dict(reference.state_dict())
    return reference.eval(), mine.eval()


def inputs(batch_first: bool, n: int = 2, lq: int = 5, lk: int = 7, e: int = 32) -> tuple[torch.Tensor, ...]:
    shape = (lambda length: (n, length, e)) if batch_first else (lambda length: (length, n, e))
    return randn(*shape(lq), dtype=torch.float32), randn(*shape(lk), dtype=torch.float32), \
        randn(*shape(lk), dtype=torch.float32)


def masks(n: int = 2, heads: int = 4, lq: int = 5, lk: int = 7) -> dict[str, dict]:
    padding = torch.zeros(n, lk, dtype=torch.bool)
    padding[0, 4:] = True
    return {
        "plain": {},                                                                 # weights averaged (default)
        "no-weights": {"need_weights": False},                                      # the fused SDPA path
        "per-head-weights": {"average_attn_weights": False},
        "key-padding": {"key_padding_mask": padding},
        "float-key-padding": {"key_padding_mask": torch.randn(n, lk)},
        "bool-mask": {"attn_mask": torch.rand(lq, lk) < 0.3, "need_weights": False},
        "float-mask-3d": {"attn_mask": torch.randn(n * heads, lq, lk)},
        "causal": {"attn_mask": torch.ones(lq, lk, dtype=torch.bool).triu(1), "is_causal": True},
        "both-masks": {"attn_mask": torch.randn(lq, lk), "key_padding_mask": padding},
    }


MASKS = masks()


@pytest.mark.parametrize("case", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_matches_torch_multihead_attention(case, batch_first):
    reference, mine = pair(batch_first=batch_first)
    _matches_torch(reference, mine, inputs(batch_first), MASKS[case])


def _matches_torch(reference, mine, tensors, options) -> None:
    """einc's layer, eager and scripted, gives torch's layer's output and weights."""
    expected = reference(*tensors, **options)
    for layer in (mine, script(mine)):
        out, weights = layer(*tensors, **options)
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
        if expected[1] is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected[1], rtol=1e-5, atol=1e-6)


def test_attention_without_bias_and_self_attention():
    reference, mine = pair(bias=False, batch_first=True)
    x = randn(3, 6, 32, dtype=torch.float32)
    torch.testing.assert_close(mine(x, x, x)[0], reference(x, x, x)[0], rtol=1e-5, atol=1e-6)
    assert mine.in_proj_bias is None


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_unbatched_inputs(batch_first):
    reference, mine = pair(batch_first=batch_first)
    q, k, v = (randn(length, 32, dtype=torch.float32) for length in (5, 7, 7))
    padding = torch.arange(7) >= 5
    for options in ({}, {"need_weights": False}, {"key_padding_mask": padding},
                    {"key_padding_mask": padding, "need_weights": False},
                    {"attn_mask": torch.randn(4, 5, 7), "need_weights": False}):
        expected = reference(q, k, v, **options)
        out, weights = mine(q, k, v, **options)
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
        assert (weights is None) == (expected[1] is None)


def test_the_fused_path_uses_sdpa():
    _, mine = pair(batch_first=True)
    assert "scaled_dot_product_attention(" in mine.attend.einc_source
    assert "scaled_dot_product_attention" not in mine.scores.einc_source


def test_attention_gradients_match_torch():
    reference, mine = pair(batch_first=True)
    q, k, v = (x.requires_grad_() for x in inputs(True))
    for options in ({"need_weights": False}, {}):
        for layer in (reference, mine):
            layer.zero_grad()
        q.grad = None
        reference(q, k, v, **options)[0].square().sum().backward()
        expected = [q.grad.clone()] + [p.grad.clone() for p in reference.parameters()]
        q.grad = None
        mine(q, k, v, **options)[0].square().sum().backward()
        got = [q.grad] + [p.grad for p in mine.parameters()]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_applies_in_training_only():
    reference, mine = pair(dropout=0.5, batch_first=True)
    q, k, v = inputs(True)
    mine.train()
    first = mine(q, k, v, need_weights=False)[0]
    assert torch.isfinite(first).all() and not torch.allclose(first, mine(q, k, v, need_weights=False)[0])
    mine.eval()
    torch.testing.assert_close(mine(q, k, v)[0], reference(q, k, v)[0], rtol=1e-5, atol=1e-6)


EXTENDED = {  # torch's options einc's layer once refused
    "kdim-vdim": {"kdim": 12, "vdim": 20},                       # separate q/k/v projection weights
    "bias-kv": {"add_bias_kv": True},                            # a learned key and value appended
    "zero-attn": {"add_zero_attn": True},                        # a zero key and value appended
    "all": {"kdim": 12, "vdim": 20, "add_bias_kv": True, "add_zero_attn": True},
    "no-bias": {"kdim": 12, "vdim": 20, "add_bias_kv": True, "bias": False},
}


def _extended_inputs(batch_first: bool, options: dict, n: int = 2, lq: int = 5, lk: int = 7):
    q, k, v = inputs(batch_first, n, lq, lk)
    kdim, vdim = options.get("kdim", 32), options.get("vdim", 32)
    k = k[..., :1].expand(*k.shape[:-1], kdim) * randn(kdim, dtype=torch.float32)
    v = v[..., :1].expand(*v.shape[:-1], vdim) + randn(vdim, dtype=torch.float32)
    return q, k.contiguous(), v.contiguous()


@pytest.mark.parametrize("case", [c for c in MASKS if c != "float-mask-3d"])
@pytest.mark.parametrize("extended", list(EXTENDED))
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_options_kdim_vdim_bias_kv_zero_attn_match_torch(extended, case, batch_first):
    options = EXTENDED[extended]
    reference, mine = pair(batch_first=batch_first, **options)
    assert mine.state_dict().keys() == reference.state_dict().keys()
    _matches_torch(reference, mine, _extended_inputs(batch_first, options), MASKS[case])


@pytest.mark.parametrize("need_weights", [True, False])
def test_torch_options_gradients_match_torch(need_weights):
    options = EXTENDED["all"]
    reference, mine = pair(batch_first=True, **options)
    q, k, v = _extended_inputs(True, options)
    padding = MASKS["key-padding"]["key_padding_mask"]
    grads = []
    for layer in (reference, mine):
        layer.zero_grad()
        out = layer(q, k, v, key_padding_mask=padding, need_weights=need_weights)[0]
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({name: p.grad for name, p in layer.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _gqa_reference(layer, q, k, v, mask=None):
    """Grouped-query attention in float64, the plain way: project, repeat each key/value
    head for its queries, softmax(q kᵀ / sqrt(d) + mask) v, project out (batch first)."""
    h, g, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    e = layer.embed_dim
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    bias = w.get("in_proj_bias", torch.zeros(e + 2 * g * d, dtype=torch.float64))
    qp = q.double() @ w["q_proj_weight"].T + bias[:e]
    kp = k.double() @ w["k_proj_weight"].T + bias[e:e + g * d]
    vp = v.double() @ w["v_proj_weight"].T + bias[e + g * d:]
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    qh = qp.reshape(n, lq, h, d).transpose(1, 2)
    kh = kp.reshape(n, lk, g, d).transpose(1, 2).repeat_interleave(h // g, 1)
    vh = vp.reshape(n, lk, g, d).transpose(1, 2).repeat_interleave(h // g, 1)
    scores = qh @ kh.transpose(-1, -2) / d ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = (torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(n, lq, e)
    return out @ w["out_proj.weight"].T + w.get("out_proj.bias", 0)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])   # multi-query, grouped, one key/value head per query head
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_attention_matches_the_plain_form(kv_heads, need_weights, padded):
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, num_kv_heads=kv_heads, kdim=24).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.3, 0.3)
    q, k, v = randn(2, 5, 32, dtype=torch.float32), randn(2, 7, 24, dtype=torch.float32), \
        randn(2, 7, 32, dtype=torch.float32)
    padding = MASKS["key-padding"]["key_padding_mask"] if padded else None
    expected = _gqa_reference(layer, q, k, v, None if padding is None else padding[:, None, None, :])
    for module in (layer, script(layer)):
        out, weights = module(q, k, v, key_padding_mask=padding, need_weights=need_weights)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        assert (weights is None) == (not need_weights)
    assert layer.k_proj_weight.shape == (kv_heads * 8, 24) and layer.in_proj_bias.shape == (32 + 2 * kv_heads * 8,)


def test_grouped_query_attention_fuses_to_sdpa_without_masks():
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, num_kv_heads=2)
    assert "scaled_dot_product_attention(" in layer.attend.einc_source


@pytest.mark.parametrize("options, message", [
    ({"num_kv_heads": 3}, "num_kv_heads (3) must divide num_heads (4)"),
    ({"num_kv_heads": 0}, "num_kv_heads must be a positive int, not 0"),
    ({"kdim": 0}, "kdim must be a positive int, not 0"),
    ({"vdim": "8"}, "vdim must be a positive int, not '8'"),
    ({"add_bias_kv": 1}, "add_bias_kv must be True or False, not 1"),
])
def test_attention_bad_options(options, message):
    with pytest.raises(einc.EincError, match=re.escape(message)):
        einc.nn.MultiheadAttention(32, 4, **options)


def test_kdim_and_vdim_inputs_are_checked():
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, kdim=12, vdim=20)
    q = torch.randn(2, 5, 32)
    message = "key has shape (2, 7, 32), whose last dimension is not kdim=12"
    with pytest.raises(einc.EincError, match=re.escape(message)):
        layer(q, torch.randn(2, 7, 32), torch.randn(2, 7, 20))
    with pytest.raises(einc.EincError, match="they must have the same batch and sequence sizes"):
        layer(q, torch.randn(2, 7, 12), torch.randn(2, 6, 20))


@pytest.mark.parametrize("arguments, message", [
    # a string embedding size (once a raw TypeError from a comparison)
    ({"embed_dim": "8", "num_heads": 2}, "embed_dim must be a positive int, not '8'"),
    ({"embed_dim": 8, "num_heads": 2.0}, "num_heads must be a positive int, not 2.0"),
    # dropout that is no probability (once a raw ValueError from float())
    ({"embed_dim": 8, "num_heads": 2, "dropout": "x"}, "dropout must be a probability between 0 and 1, not 'x'"),
    ({"embed_dim": 8, "num_heads": 2, "dropout": 1.5}, "dropout must be a probability between 0 and 1, not 1.5"),
])
def test_attention_constructor_arguments_are_checked(arguments, message):
    with pytest.raises(einc.EincError, match=re.escape(message)):
        einc.nn.MultiheadAttention(**arguments)


@pytest.mark.parametrize("shapes, message", [
    # a 4-D query (once a message naming the layer's internal projection pattern)
    ([(1, 2, 5, 32), (2, 7, 32), (2, 7, 32)], "query has shape (1, 2, 5, 32); query, key and value must all be"),
    # a batched query with unbatched keys
    ([(2, 5, 32), (7, 32), (7, 32)], "key has shape (7, 32); query, key and value must all be"),
    # another embedding size
    ([(2, 5, 32), (2, 7, 16), (2, 7, 32)], "key has shape (2, 7, 16), whose last dimension is not embed_dim=32"),
])
def test_attention_input_shapes_are_checked_like_torch(shapes, message):
    reference, mine = pair(batch_first=True)
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises((RuntimeError, AssertionError)):
        reference(q, k, v)
    with pytest.raises(einc.EincError, match=re.escape(message)):
        mine(q, k, v)


def test_attention_heads_must_divide_embed_dim():
    with pytest.raises(einc.EincError, match="multiple of num_heads"):
        einc.nn.MultiheadAttention(30, 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no-weights", "key-padding", "bool-mask"])
def test_attention_compiles_fullgraph(case):
    reference, mine = pair(batch_first=True)
    compiled = torch.compile(mine, fullgraph=True)
    for n, lq, lk in [(2, 5, 7), (3, 4, 6)]:
        q, k, v = inputs(True, n, lq, lk)
        options = masks(n, 4, lq, lk)[case]
        expected = reference(q, k, v, **options)
        out, _ = compiled(q, k, v, **options)
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_on_device_and_dtype(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("torch's CPU MultiheadAttention reference is slow and loose in float16")
    reference, mine = pair(batch_first=True)
    reference, mine = reference.to(device, dtype), mine.to(device, dtype)
    q, k, v = (x.to(device, dtype) for x in inputs(True))
    tolerance = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}[dtype]
    for options in ({"need_weights": False}, {}):
        out = mine(q, k, v, **options)[0]
        assert out.dtype == dtype and out.device.type == device
        torch.testing.assert_close(out.float(), reference(q, k, v, **options)[0].float(),
                                   rtol=tolerance[0], atol=tolerance[1])


# ------------------------------------------- MultiheadAttention: torch's layer's contract
# torch's layer takes its slow path in these tests (its parameters require grad), where
# it checks masks and hints; its fast path (eval, no grad, self-attention) checks less.


def pair64(**options) -> tuple[torch.nn.Module, einc.nn.MultiheadAttention]:
    reference, mine = pair(**options)
    return reference.double(), mine.double()


def inputs64(n: int = 2, lq: int = 5, lk: int = 7) -> tuple[torch.Tensor, ...]:
    return tuple(x.double() for x in inputs(True, n, lq, lk))


CAUSAL = torch.ones(5, 7, dtype=torch.bool).triu(1)
NOT_CAUSAL = torch.zeros(5, 7, dtype=torch.float64)
PADDING = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])

IS_CAUSAL = [
    # need_weights=False, no padding: torch hands the hint to SDPA, which masks by itself
    pytest.param({"attn_mask": CAUSAL, "need_weights": False}, id="hint-to-sdpa"),
    # ... even over a mask that is not causal: the hint wins there
    pytest.param({"attn_mask": NOT_CAUSAL, "need_weights": False}, id="hint-over-wrong-mask"),
    # returned weights: the mask applies, the hint is dropped
    pytest.param({"attn_mask": NOT_CAUSAL}, id="weights-mask-applies"),
    pytest.param({"attn_mask": CAUSAL.double().masked_fill(CAUSAL, float("-inf"))}, id="weights-float-mask"),
    # key padding merged into the mask: the merged mask applies, the hint is dropped
    pytest.param({"attn_mask": NOT_CAUSAL, "key_padding_mask": PADDING, "need_weights": False},
                 id="padding-drops-hint"),
    pytest.param({"attn_mask": CAUSAL, "key_padding_mask": PADDING, "need_weights": False},
                 id="padding-and-causal-mask"),
]


@pytest.mark.parametrize("options", IS_CAUSAL)
def test_is_causal_hint_follows_torch(options):
    reference, mine = pair64(batch_first=True)
    q, k, v = inputs64()
    expected, _ = reference(q, k, v, is_causal=True, **options)
    for layer in (mine, script(mine)):
        torch.testing.assert_close(layer(q, k, v, is_causal=True, **options)[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_without_a_mask_is_refused(need_weights):
    reference, mine = pair(batch_first=True)
    q, k, v = inputs(True)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        reference(q, k, v, is_causal=True, need_weights=need_weights)
    with pytest.raises(einc.EincError, match="is_causal=True is a hint that attn_mask is causal and needs"):
        mine(q, k, v, is_causal=True, need_weights=need_weights)
    with pytest.raises(torch.jit.Error, match="is_causal=True is a hint"):
        script(mine)(q, k, v, is_causal=True, need_weights=need_weights)


@pytest.mark.parametrize("name, mask, dtype_name", [
    # the classic 0/1 byte mask
    pytest.param("attn_mask", torch.zeros(5, 7, dtype=torch.uint8), "torch.uint8", id="uint8-attn-mask"),
    pytest.param("attn_mask", torch.zeros(5, 7, dtype=torch.int64), "torch.int64", id="int64-attn-mask"),
    pytest.param("key_padding_mask", torch.zeros(2, 7, dtype=torch.uint8), "torch.uint8", id="uint8-padding"),
    pytest.param("key_padding_mask", torch.zeros(2, 7, dtype=torch.int32), "torch.int32", id="int32-padding"),
])
@pytest.mark.parametrize("need_weights", [True, False])
def test_integer_masks_are_refused(name, mask, dtype_name, need_weights):
    reference, mine = pair(batch_first=True)
    q, k, v = inputs(True)
    with pytest.raises(AssertionError, match=f"only bool and floating types of {name}"):
        reference(q, k, v, need_weights=need_weights, **{name: mask})
    with pytest.raises(einc.EincError, match=f"{name} must be a bool mask .* not {dtype_name}; .* {name}.bool()"):
        mine(q, k, v, need_weights=need_weights, **{name: mask})


def _fully_masked(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask[1] = True
    return mask


FULLY_MASKED = [
    # every key of batch entry 1 is padding
    pytest.param({"key_padding_mask": _fully_masked(PADDING)}, id="padded-sequence"),
    # the same as a float padding mask
    pytest.param({"key_padding_mask": torch.zeros(2, 7, dtype=torch.float64).masked_fill(_fully_masked(PADDING),
                                                                                          float("-inf"))},
                 id="float-padded-sequence"),
    # query 1 may attend to no key
    pytest.param({"attn_mask": _fully_masked(CAUSAL)}, id="masked-query"),
    # padding merged with a float mask, per head
    pytest.param({"attn_mask": torch.randn(2 * 4, 5, 7, dtype=torch.float64),
                  "key_padding_mask": _fully_masked(PADDING)}, id="padding-and-3d-mask"),
]


@pytest.mark.parametrize("options", FULLY_MASKED)
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_match_torch_with_gradients(options, need_weights):
    reference, mine = pair64(batch_first=True)
    q, k, v = (x.requires_grad_() for x in inputs64())
    results = []
    for layer in (reference, mine):
        q.grad = k.grad = v.grad = None
        layer.zero_grad()
        out, _ = layer(q, k, v, need_weights=need_weights, **options)
        out.square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad] + [p.grad for p in layer.parameters()])
    for got, expected in zip(results[1], results[0]):
        # with weights, torch's rows of masked queries are NaN, and so its gradients
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, equal_nan=need_weights)
    if not need_weights:
        assert all(torch.isfinite(t).all() for t in results[1])


@pytest.mark.parametrize("batched, options, message", [
    # a source length too many
    pytest.param(True, {"attn_mask": torch.zeros(5, 8)},
                 r"attn_mask has shape \(5, 8\); it must be \(L, S\) = \(5, 7\) or "
                 r"\(N \* num_heads, L, S\) = \(8, 5, 7\)", id="attn-mask-source-length"),
    # one mask per batch entry instead of per (entry, head)
    pytest.param(True, {"attn_mask": torch.zeros(2, 5, 7)}, r"attn_mask has shape \(2, 5, 7\)",
                 id="attn-mask-per-entry"),
    # (N, num_heads, L, S) is what SDPA takes, not this layer
    pytest.param(True, {"attn_mask": torch.zeros(2, 4, 5, 7)}, r"attn_mask has shape \(2, 4, 5, 7\)",
                 id="attn-mask-4d"),
    pytest.param(True, {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)},
                 r"key_padding_mask has shape \(2, 5\); it must be \(N, S\) = \(2, 7\)", id="padding-length"),
    # an unbatched padding mask for a batch
    pytest.param(True, {"key_padding_mask": torch.zeros(7, dtype=torch.bool)},
                 r"key_padding_mask has shape \(7,\)", id="unbatched-padding-for-batch"),
    pytest.param(False, {"key_padding_mask": torch.zeros(1, 7, dtype=torch.bool)},
                 r"key_padding_mask has shape \(1, 7\); for unbatched inputs, it must be \(S,\) = \(7,\)",
                 id="batched-padding-unbatched-input"),
    pytest.param(False, {"attn_mask": torch.zeros(1, 5, 7)},
                 r"for unbatched inputs, it must be \(L, S\) = \(5, 7\) or \(num_heads, L, S\) = \(4, 5, 7\)",
                 id="unbatched-3d-attn-mask"),
])
@pytest.mark.parametrize("need_weights", [True, False])
def test_bad_mask_shapes_are_refused(batched, options, message, need_weights):
    reference, mine = pair(batch_first=True)
    q, k, v = inputs(True)
    if not batched:
        q, k, v = q[0], k[0], v[0]
    with pytest.raises((RuntimeError, AssertionError)):
        reference(q, k, v, need_weights=need_weights, **options)
    with pytest.raises(einc.EincError, match=message):
        mine(q, k, v, need_weights=need_weights, **options)


@pytest.mark.parametrize("options", [
    pytest.param({}, id="no-mask"),
    pytest.param({"key_padding_mask": PADDING}, id="key-padding"),
    pytest.param({"attn_mask": torch.randn(5, 7, dtype=torch.float64)}, id="float-mask"),
])
@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_matches_torch_for_the_same_seed(options, need_weights):
    # On CPU, torch's layer and this one draw the same dropout mask from the same seed:
    # F.dropout with weights, SDPA's dropout_p without.
    reference, mine = pair64(dropout=0.5, batch_first=True)
    q, k, v = inputs64()
    outputs = []
    for layer in (reference.train(), mine.train()):
        torch.manual_seed(1)
        outputs.append(layer(q, k, v, need_weights=need_weights, **options)[0])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    torch.manual_seed(2)
    assert not torch.allclose(mine(q, k, v, need_weights=need_weights, **options)[0], outputs[0])


# ------------------------------------------- inside torch's Transformer layers


def _einc_copy(attention: torch.nn.MultiheadAttention) -> einc.nn.MultiheadAttention:
    mine = einc.nn.MultiheadAttention(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                                      batch_first=attention.batch_first).double()
    mine.load_state_dict(attention.state_dict())
    return mine


def _transformer(kind: str, batch_first: bool) -> torch.nn.Module:
    options = {"dim_feedforward": 32, "dropout": 0.0, "batch_first": batch_first}
    if kind == "encoder-layer":
        return torch.nn.TransformerEncoderLayer(16, 4, **options)
    if kind == "decoder-layer":
        return torch.nn.TransformerDecoderLayer(16, 4, **options)
    return torch.nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=2, **options)


def _with_einc_attention(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (same weights) whose every attention is einc's."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        for name in ("self_attn", "multihead_attn"):
            if isinstance(getattr(layer, name, None), torch.nn.MultiheadAttention):
                setattr(layer, name, _einc_copy(getattr(layer, name)))
    return model


def _run(kind: str, model: torch.nn.Module, batch_first: bool) -> torch.Tensor:
    def batch(length: int) -> torch.Tensor:
        x = randn(2, length, 16)
        return x if batch_first else x.transpose(0, 1)
    # entry 0 ends in padding (left-aligned, as torch's nested-tensor fast path wants)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    if kind == "encoder-layer":
        src_causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
        return model(batch(6), src_mask=src_causal, src_key_padding_mask=padding, is_causal=True)
    if kind == "decoder-layer":
        return model(batch(5), batch(6), tgt_mask=causal, memory_key_padding_mask=padding, tgt_is_causal=True)
    # nn.Transformer finds the causal tgt_mask itself and passes is_causal on
    return model(batch(6), batch(5), tgt_mask=causal, src_key_padding_mask=padding,
                 memory_key_padding_mask=padding)


TRANSFORMERS = [
    # (kind, batch_first, training, grad enabled, torch's encoder fast path runs instead of
    # the attention's forward)
    pytest.param("encoder-layer", True, True, True, False, id="encoder-layer-train"),
    pytest.param("encoder-layer", True, False, True, False, id="encoder-layer-eval-grad"),
    pytest.param("encoder-layer", True, False, False, True, id="encoder-layer-eval-fast-path"),
    pytest.param("encoder-layer", False, False, False, False, id="encoder-layer-eval-sequence-first"),
    pytest.param("decoder-layer", True, True, True, False, id="decoder-layer-train"),
    pytest.param("decoder-layer", True, False, False, False, id="decoder-layer-eval"),
    pytest.param("decoder-layer", False, False, False, False, id="decoder-layer-eval-sequence-first"),
    pytest.param("transformer", True, True, True, False, id="transformer-train"),
    pytest.param("transformer", False, True, True, False, id="transformer-train-sequence-first"),
    # the encoder also packs the padded source into a nested tensor
    pytest.param("transformer", True, False, False, True, id="transformer-eval-fast-path"),
    pytest.param("transformer", False, False, False, False, id="transformer-eval-sequence-first"),
]


@pytest.mark.parametrize("kind, batch_first, training, grad, fast", TRANSFORMERS)
def test_einc_attention_inside_torch_transformer_layers(kind, batch_first, training, grad, fast, monkeypatch):
    reference = _transformer(kind, batch_first).double()
    with torch.no_grad():  # non-zero attention biases, so a misplaced bias cannot hide
        for name, parameter in reference.named_parameters():
            if "in_proj_bias" in name or "out_proj.bias" in name:
                parameter.uniform_(-0.3, 0.3)
    mine = _with_einc_attention(reference)
    reference.train(training)
    mine.train(training)
    called: list[str] = []
    forward = einc.nn.MultiheadAttention.forward

    def counted(self, *args, **kwargs):
        called.append(next(name for name, module in mine.named_modules() if module is self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(einc.nn.MultiheadAttention, "forward", counted)
    outputs = []
    for model in (reference, mine):
        torch.manual_seed(1)
        with torch.set_grad_enabled(grad):
            outputs.append(_run(kind, model, batch_first))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-12)
    # Encoders' self-attention runs in torch's kernel on the fast path (from the
    # attributes it reads), through this layer's forward otherwise.
    einc_attention = [name for name, module in mine.named_modules() if isinstance(module, einc.nn.MultiheadAttention)]
    encoder_attention = [name for name in einc_attention if "decoder" not in name and kind != "decoder-layer"]
    assert sorted(called) == sorted(set(einc_attention) - set(encoder_attention) if fast else einc_attention)
    if grad:
        outputs[0].square().sum().backward()
        outputs[1].square().sum().backward()
        gradients = dict(mine.named_parameters())
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(gradients[name].grad, parameter.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
def test_grouped_query_attention_with_extra_keys_compiles_fullgraph():
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, num_kv_heads=2, add_bias_kv=True,
                                       add_zero_attn=True).eval()
    compiled = torch.compile(layer, fullgraph=True)
    for n, lq, lk in [(2, 5, 7), (3, 4, 6)]:
        q, k, v = (randn(n, length, 32, dtype=torch.float32) for length in (lq, lk, lk))
        for need_weights in (False, True):
            torch.testing.assert_close(compiled(q, k, v, need_weights=need_weights)[0],
                                       layer(q, k, v, need_weights=need_weights)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- decoding with a key/value cache

CHUNKS = [(0, 3), (3, 4), (4, 6), (6, 9)]  # a prompt of 3, one token, two tokens, three tokens


def _decoded(layer, x, batch_first: bool):
    """``x`` fed to ``layer.decode`` chunk by chunk, the cache carried along; the outputs joined."""
    outputs, k, v = [], None, None
    for start, stop in CHUNKS:
        part = x[:, start:stop] if batch_first else x[start:stop]
        out, k, v = layer.decode(part, k, v)
        outputs.append(out)
    return torch.cat(outputs, 1 if batch_first else 0), k


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoding_with_a_cache_matches_torch_on_the_whole_sequence(batch_first):
    reference, mine = pair(batch_first=batch_first)
    x = randn(*((2, 9, 32) if batch_first else (9, 2, 32)), dtype=torch.float32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    expected = reference(x, x, x, attn_mask=causal, need_weights=False)[0]
    for layer in (mine, script(mine)):
        out, k = _decoded(layer, x, batch_first)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert k.shape == (2, 4, 9, 8)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_decoding_matches_the_plain_causal_form(kv_heads):
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, num_kv_heads=kv_heads).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.3, 0.3)
    x = randn(2, 9, 32, dtype=torch.float32)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    expected = _gqa_reference(layer, x, x, x, future)
    out, k = _decoded(layer, x, True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert k.shape == (2, kv_heads, 9, 8)


@pytest.mark.slow
def test_decoding_compiles_fullgraph_for_a_growing_cache():
    _, layer = pair(batch_first=True)
    decode = torch.compile(layer.decode, fullgraph=True, dynamic=True)
    x = randn(2, 9, 32, dtype=torch.float32)
    expected, _ = _decoded(layer, x, True)
    outputs, k, v = [], None, None
    for start, stop in CHUNKS:
        out, k, v = decode(x[:, start:stop], k, v)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, call, message", [
    ({"add_bias_kv": True}, lambda m: m.decode(torch.randn(2, 1, 32)), "self-attention only"),
    ({"kdim": 16}, lambda m: m.decode(torch.randn(2, 1, 32)), "self-attention only"),
    ({}, lambda m: m.decode(torch.randn(2, 1, 16)), "x has shape (2, 1, 16); expected (N, T, E) with E = embed_dim"),
    ({}, lambda m: m.decode(torch.randn(2, 1, 32), torch.randn(2, 4, 3, 8)), "pass both cache_k and cache_v"),
    ({}, lambda m: m.decode(torch.randn(2, 1, 32), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)),
     "cache_v has shape (2, 4, 5, 8); expected (N, num_kv_heads, S, head_dim) = (2, 4, 3, 8)"),
])
def test_decoding_errors(options, call, message):
    layer = einc.nn.MultiheadAttention(32, 4, batch_first=True, **options)
    with pytest.raises(einc.EincError, match=re.escape(message)):
        call(layer)
