"""einc.nn: Einsum layers and multi-head attention.

References: torch.einsum in float64 for Einsum, ``torch.nn.MultiheadAttention`` with the
same weights for the attention layer.  Both layers are also run under
``torch.jit.script`` and ``torch.compile(fullgraph=True)`` (which fails on any graph
break).
"""

from __future__ import annotations

import math
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
    q, k, v = inputs(batch_first)
    expected = reference(q, k, v, **MASKS[case])
    for layer in (mine, script(mine)):
        out, weights = layer(q, k, v, **MASKS[case])
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
    for options in ({}, {"need_weights": False}):
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


@pytest.mark.parametrize("options, message", [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"kdim": 16}, "kdim == vdim == embed_dim"),
])
def test_attention_unsupported_options(options, message):
    with pytest.raises(einc.EincError, match=message):
        einc.nn.MultiheadAttention(32, 4, **options)


def test_attention_heads_must_divide_embed_dim():
    with pytest.raises(einc.EincError, match="multiple of num_heads"):
        einc.nn.MultiheadAttention(30, 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no-weights", "key-padding"])
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
