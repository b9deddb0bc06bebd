"""Ports of real model code to einc, each checked against a plain-torch transcription.

Every test takes a small function-level piece of a real model, writes its einsum parts
with einc (``einc.compile``, ``einc.nn.Einsum``, ``einc.nn.MultiheadAttention``) and
compares the result, and gradients where a model would train through it, with a plain
torch transcription of the original written for this file (the original file and
function are cited next to each reference; no code is copied from them).  References
run in float64 (complex128), or are exact enumerations (CRF), or are torch's own layers
(``F.cross_entropy``, ``F.avg_pool2d``, ``nn.Conv2d``) or einops/opt_einsum.

Each port runs on the default backend (TorchScript) and ``backend="eager"``, and each
compiled expression is called with several shapes (batch, sequence length, number of
residues, bond dimension), as real use does.  The last tests pin the friction the
ports found (error messages that named einc's internals, a layer that dropped
unknown keywords), fixed since.
"""

from __future__ import annotations

import itertools
import math
import warnings

import einops
import opt_einsum as oe
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import einc
import einc.nn

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

BACKENDS = ["torchscript", "eager"]
F64 = torch.float64
C128 = torch.complex128
NEG_INF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny and intra-op threads only add wake-ups: on the 2-core
    machine this file was written on it ran in 3.7 s with one thread and 11.4 s with two
    (a 50x6 @ 6x4 float32 mm took up to 13 ms instead of 5 us).  Restored afterwards;
    tests/test_threads.py covers einc under threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def grads(output: torch.Tensor, inputs, cotangent: torch.Tensor | None = None):
    """Gradients of ``sum(output * cotangent)`` (real part for complex outputs); None -> 0."""
    if cotangent is None:
        loss = output.sum()
    else:
        loss = (output * cotangent.to(output.dtype)).sum()
    if loss.is_complex():
        loss = loss.real
    found = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]


def assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, **tol)


def linear_like(layer: torch.nn.Linear) -> einc.nn.Einsum:
    """``einc.nn.Einsum`` holding ``layer``'s parameters (same names and shapes, so load_state_dict)."""
    out_features, in_features = layer.weight.shape
    port = einc.nn.Einsum("... c -> ... o", weight="o c", bias=None if layer.bias is None else "o",
                          o=out_features, c=in_features).to(layer.weight.dtype)
    port.load_state_dict(layer.state_dict())
    return port


# ============================================================================ OpenFold
# 1a. Triangle multiplicative update, openfold/model/triangular_multiplicative_update.py,
#     TriangleMultiplicativeUpdate.forward with _outgoing_matmul / _incoming_matmul.  The
#     original combines the projections with permute_final_dims + torch.matmul; the einsum
#     it computes is '...ikc,...jkc->...ijc' (outgoing) and '...kic,...kjc->...ijc' (incoming).


class TriMulReference(torch.nn.Module):
    """Plain-torch transcription (OpenFold's gating/final inits zero the output, so the
    test keeps torch's default Linear init to make every term matter)."""

    LINEARS = ("linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g", "linear_g", "linear_z")

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        for name in self.LINEARS[:4]:
            setattr(self, name, torch.nn.Linear(c_z, c_hidden))
        self.linear_g = torch.nn.Linear(c_z, c_z)
        self.linear_z = torch.nn.Linear(c_hidden, c_z)
        self.layer_norm_in = torch.nn.LayerNorm(c_z)
        self.layer_norm_out = torch.nn.LayerNorm(c_hidden)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # channels first: [*, C, N, N]
        a, b = a.movedim(-1, -3), b.movedim(-1, -3)
        if self.outgoing:   # p[c, i, j] = sum_k a[i, k, c] b[j, k, c]
            p = a @ b.transpose(-1, -2)
        else:               # p[c, i, j] = sum_k a[k, i, c] b[k, j, c]
            p = a.transpose(-1, -2) @ b
        return p.movedim(-3, -1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = self.linear_a_p(z) * torch.sigmoid(self.linear_a_g(z)) * mask
        b = self.linear_b_p(z) * torch.sigmoid(self.linear_b_g(z)) * mask
        x = self.combine(a, b)
        x = self.linear_z(self.layer_norm_out(x))
        return x * torch.sigmoid(self.linear_g(z))


class TriMulPort(torch.nn.Module):
    """The same module with every Linear an ``einc.nn.Einsum`` and the combine an einc pattern."""

    def __init__(self, reference: TriMulReference, pattern: str, backend: str) -> None:
        super().__init__()
        self.linears = torch.nn.ModuleDict({name: linear_like(getattr(reference, name))
                                            for name in TriMulReference.LINEARS})
        self.layer_norm_in = reference.layer_norm_in
        self.layer_norm_out = reference.layer_norm_out
        self.combine = einc.compile(pattern, backend=backend)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = self.linears
        mask = mask.unsqueeze(-1)
        z = self.layer_norm_in(z)
        a = L["linear_a_p"](z) * torch.sigmoid(L["linear_a_g"](z)) * mask
        b = L["linear_b_p"](z) * torch.sigmoid(L["linear_b_g"](z)) * mask
        x = L["linear_z"](self.layer_norm_out(self.combine(a, b)))
        return x * torch.sigmoid(L["linear_g"](z))


TRIMUL = [
    # (outgoing, einc pattern for the combine)
    pytest.param(True, "... i k c, ... j k c -> ... i j c", id="outgoing"),        # Algorithm 11
    pytest.param(False, "... k i c, ... k j c -> ... i j c", id="incoming"),       # Algorithm 12
    pytest.param(True, "...ikc,...jkc->...ijc", id="outgoing-compact"),            # torch.einsum spelling
    pytest.param(False, "...kic,...kjc->...ijc", id="incoming-compact"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outgoing, pattern", TRIMUL)
def test_openfold_triangle_multiplicative_update(outgoing, pattern, backend):
    reference = TriMulReference(c_z=6, c_hidden=4, outgoing=outgoing).double()
    port = TriMulPort(reference, pattern, backend)
    # [*, N_res, N_res, C_z]: no batch, a batch, a batch and templates; N_res varies
    for lead, n in [((), 4), ((2,), 5), ((2, 3), 3)]:
        z = torch.randn(*lead, n, n, 6, dtype=F64, requires_grad=True)
        mask = (torch.rand(*lead, n, n) > 0.2).to(F64)
        expected, actual = reference(z, mask), port(z, mask)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        g_ref = grads(expected, [z, *reference.parameters()], cot)
        g_port = grads(actual, [z, *port.parameters()], cot)
        assert_close(g_port[0], g_ref[0])
        ref_named = dict(reference.named_parameters())
        for (name, _), g in zip(port.named_parameters(), g_port[1:]):
            key = name.removeprefix("linears.")
            assert_close(g, g_ref[1 + list(ref_named).index(key)])


def test_openfold_triangle_combine_matches_the_original_matmul_form():
    """The combine alone, against the original's permute + matmul (both directions)."""
    reference = TriMulReference(2, 3, True)
    for outgoing, pattern in [(True, "... i k c, ... j k c -> ... i j c"),
                              (False, "... k i c, ... k j c -> ... i j c")]:
        reference.outgoing = outgoing
        f = einc.compile(pattern)
        for shape in [(5, 5, 3), (2, 4, 4, 3), (1, 2, 6, 6, 2)]:
            a, b = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
            assert_close(f(a, b), reference.combine(a, b))


# 1b. Pair-biased attention: openfold/model/triangular_attention.py TriangleAttention.forward
#     (mask bias inf * (mask - 1), triangle bias from a Linear c_in -> no_heads) feeding
#     openfold/model/primitives.py Attention.forward (q k^T / sqrt(c_hidden) + biases,
#     softmax, weighted sum, sigmoid gate, output Linear).  einc has no bias term in
#     patterns, so einc computes the scaled scores and the weighted sum; torch adds the biases.


def tri_attention_reference(x, mask, p, heads, starting):
    if not starting:
        x, mask = x.transpose(-2, -3), mask.transpose(-1, -2)
    x = p["layer_norm"](x)
    mask_bias = (1e9 * (mask - 1))[..., :, None, None, :]                 # [*, I, 1, 1, J]
    tri_bias = p["linear"](x).movedim(-1, -3).unsqueeze(-4)               # [*, 1, H, I, J]

    def heads_first(t):                                                   # [*, I, H, J, C]
        return t.view(*t.shape[:-1], heads, -1).transpose(-2, -3)

    q, k, v = (heads_first(p[n](x)) for n in ("linear_q", "linear_k", "linear_v"))
    a = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask_bias + tri_bias
    o = (a.softmax(-1) @ v).transpose(-2, -3)                             # [*, I, J, H, C]
    g = torch.sigmoid(p["linear_g"](x)).view(o.shape)
    o = p["linear_o"]((o * g).flatten(-2))
    return o.transpose(-2, -3) if not starting else o


def tri_attention_port(x, mask, p, heads, starting, scores, weighted):
    if not starting:
        x, mask = x.transpose(-2, -3), mask.transpose(-1, -2)
    x = p["layer_norm"](x)
    mask_bias = (1e9 * (mask - 1))[..., :, None, None, :]
    tri_bias = p["tri_bias"](x).unsqueeze(-4)                   # one Einsum: Linear + permute
    a = scores(p["linear_q"](x), p["linear_k"](x)) + mask_bias + tri_bias
    o = weighted(a.softmax(-1), p["linear_v"](x))               # heads merged back: [*, I, J, (H C)]
    o = p["linear_o"](o * torch.sigmoid(p["linear_g"](x)))
    return o.transpose(-2, -3) if not starting else o


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("starting", [True, False], ids=["starting-node", "ending-node"])  # Algorithms 13, 14
def test_openfold_pair_biased_triangle_attention(starting, backend):
    c_in, c_hidden, heads = 5, 3, 2
    ref = {"layer_norm": torch.nn.LayerNorm(c_in).double(),
           "linear": torch.nn.Linear(c_in, heads, bias=False).double(),
           "linear_g": torch.nn.Linear(c_in, heads * c_hidden).double(),
           "linear_o": torch.nn.Linear(heads * c_hidden, c_in).double()}
    for name in ("linear_q", "linear_k", "linear_v"):
        ref[name] = torch.nn.Linear(c_in, heads * c_hidden, bias=False).double()
    port = {name: linear_like(layer) for name, layer in ref.items() if name.startswith("linear_")}
    port["layer_norm"] = ref["layer_norm"]
    # the triangle bias: Linear(c_in -> H) then permute_final_dims(.., (2, 0, 1)), one layer
    port["tri_bias"] = einc.nn.Einsum("... i j z -> ... h i j", weight="h z", h=heads, z=c_in).double()
    port["tri_bias"].load_state_dict(ref["linear"].state_dict())
    scores = einc.compile("... q (h c), ... k (h c) -> ... h q k / sqrt(c)", h=heads, backend=backend)
    weighted = einc.compile("... h q k, ... k (h c) -> ... q (h c)", h=heads, backend=backend)
    for lead, n in [((), 3), ((2,), 5), ((1,), 6)]:
        x = torch.randn(*lead, n, n, c_in, dtype=F64, requires_grad=True)
        mask = (torch.rand(*lead, n, n) > 0.3).to(F64)
        expected = tri_attention_reference(x, mask, ref, heads, starting)
        actual = tri_attention_port(x, mask, port, heads, starting, scores, weighted)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        linear_params = [ref[n].weight for n in ("linear_q", "linear_k", "linear_v", "linear")]
        port_params = [port[n].weight for n in ("linear_q", "linear_k", "linear_v", "tri_bias")]
        assert_all_close(grads(actual, [x, *port_params], cot), grads(expected, [x, *linear_params], cot))


# 1c. OpenFold's Linear (openfold/model/primitives.py Linear, a torch.nn.Linear) is applied
#     to single ([N_res, C]), MSA ([N_seq, N_res, C]), pair ([N_res, N_res, C]) and template
#     ([N_templ, N_res, N_res, C]) tensors, each with an optional batch: one
#     Einsum("... c -> ... o", weight="o c") must serve every rank.

LINEAR_SHAPES = [
    (7,),              # one residue's features (empty '...')
    (4, 7),            # single representation [N_res, C_s]
    (3, 4, 7),         # MSA [N_seq, N_res, C_m]
    (2, 4, 4, 7),      # batched pair representation [B, N_res, N_res, C_z]
    (2, 2, 4, 4, 7),   # batched templates [B, N_templ, N_res, N_res, C_t]
    (1, 3, 1, 7),      # size-1 batch dimensions, which '...' must not squeeze
    (0, 4, 7),         # empty MSA
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_openfold_linear_on_every_rank(bias):
    linear = torch.nn.Linear(7, 5, bias=bias).double()
    port = linear_like(linear)
    scripted = script(port)
    for shape in LINEAR_SHAPES:
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        for layer in (port, scripted):
            expected, actual = linear(x), layer(x)
            assert_close(actual, expected)
            if x.numel():
                cot = torch.randn_like(expected)
                assert_all_close(grads(actual, [x, *port.parameters()], cot),
                                 grads(expected, [x, *linear.parameters()], cot))


def test_openfold_linear_float32_matches_torch_linear():
    linear = torch.nn.Linear(16, 8)
    port = linear_like(linear)
    for shape in [(5, 16), (2, 3, 16), (2, 3, 3, 16)]:
        x = torch.randn(shape)
        actual = port(x)
        assert actual.dtype == torch.float32
        assert_close(actual, linear(x), rtol=1e-5, atol=1e-5)
        assert_close(actual, F.linear(x.double(), linear.weight.double(), linear.bias.double()), rtol=1e-5, atol=1e-5)


def test_openfold_outer_product_mean_einsum():
    """openfold/model/outer_product_mean.py OuterProductMean._opm: einsum('...bac,...dae->...bdce')
    then flattening the last two dims and linear_out; ported as one pattern with a composed
    output, and as one three-operand contraction including linear_out's weight."""
    opm = einc.compile("... i s c, ... j s e -> ... i j (c e)")
    opm_linear = einc.compile("... i s c, ... j s e, o (c e) -> ... i j o")
    w = torch.randn(5, 6, dtype=F64)
    for lead, n_res, n_seq in [((), 4, 3), ((2,), 3, 5), ((2, 1), 2, 2)]:
        a = torch.randn(*lead, n_res, n_seq, 2, dtype=F64)   # already transposed to [*, N_res, N_seq, C]
        b = torch.randn(*lead, n_res, n_seq, 3, dtype=F64)
        outer = torch.einsum("...bac,...dae->...bdce", a, b)
        outer = outer.reshape(outer.shape[:-2] + (-1,))
        assert_close(opm(a, b), outer)
        assert_close(opm_linear(a, b, w), outer @ w.T)


# ============================================================================ nanoGPT
# karpathy/nanoGPT model.py, CausalSelfAttention.forward (the non-flash branch): c_attn
# projects to 3 * n_embd, split into q, k, v, heads split with view + transpose, scores
# q @ k^T / sqrt(hs), masked_fill with the causal tril mask, softmax, att @ v, heads
# merged with transpose + view, c_proj.


def nanogpt_attention_reference(x, c_attn, c_proj, n_head, causal=True):
    B, T, C = x.shape
    q, k, v = c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if causal:
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), NEG_INF)
    y = att.softmax(dim=-1) @ v
    return c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPTAttentionPort(torch.nn.Module):
    def __init__(self, c_attn, c_proj, n_head, backend):
        super().__init__()
        C = c_attn.in_features
        # projection and head split in one layer: nn.Linear's weight/bias load as they are
        self.c_attn = einc.nn.Einsum("b t c -> s b h t d", weight="(s h d) c", bias="(s h d)",
                                     s=3, h=n_head, d=C // n_head, c=C).double()
        self.c_attn.load_state_dict(c_attn.state_dict())
        # head merge and output projection in one layer
        self.c_proj = einc.nn.Einsum("b h t d -> b t o", weight="o (h d)", bias="o",
                                     h=n_head, d=C // n_head, o=C).double()
        self.c_proj.load_state_dict(c_proj.state_dict())
        self.scores = einc.compile("b h q d, b h k d -> b h q k / sqrt(d)", backend=backend)
        self.weighted = einc.compile("b h q k, b h k d -> b h q d", backend=backend)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.c_attn(x)
        att = self.scores(q, k).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), NEG_INF)
        return self.c_proj(self.weighted(att.softmax(-1), v))


NANOGPT_SHAPES = [(2, 5), (1, 9), (3, 1)]  # (batch, sequence length): a single token too


@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_causal_self_attention(backend):
    C, n_head = 12, 3
    c_attn, c_proj = torch.nn.Linear(C, 3 * C).double(), torch.nn.Linear(C, C).double()
    port = NanoGPTAttentionPort(c_attn, c_proj, n_head, backend)
    for B, T in NANOGPT_SHAPES:
        x = torch.randn(B, T, C, dtype=F64, requires_grad=True)
        expected = nanogpt_attention_reference(x, c_attn, c_proj, n_head)
        actual = port(x)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, [x, *port.parameters()], cot),
                         grads(expected, [x, *c_attn.parameters(), *c_proj.parameters()], cot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_causal_attention_with_separate_merge_pattern(backend):
    """The merge as its own einc pattern ('... -> b q (h d)') and c_proj a plain Linear port."""
    C, n_head = 8, 2
    c_attn, c_proj = torch.nn.Linear(C, 3 * C).double(), torch.nn.Linear(C, C).double()
    split = einc.compile("b t (s h d) -> s b h t d", s=3, h=n_head, backend=backend)
    scores = einc.compile("b h q d, b h k d -> b h q k / sqrt(d)", backend=backend)
    merge = einc.compile("b h q k, b h k d -> b q (h d)", backend=backend)
    proj = linear_like(c_proj)
    for B, T in NANOGPT_SHAPES:
        x = torch.randn(B, T, C, dtype=F64)
        q, k, v = split(c_attn(x))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = scores(q, k).masked_fill(~causal, NEG_INF).softmax(-1)
        assert_close(proj(merge(att, v)), nanogpt_attention_reference(x, c_attn, c_proj, n_head))


FUSED_ATTENTION = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", [True, False], ids=["sdpa", "plain"])
def test_nanogpt_unmasked_attention_as_one_pattern(fuse, backend):
    """Without the causal mask (an encoder block) the whole attention is one einc pattern."""
    C, n_head = 12, 3
    c_attn, c_proj = torch.nn.Linear(C, 3 * C).double(), torch.nn.Linear(C, C).double()
    attend = einc.compile(FUSED_ATTENTION, h=n_head, fuse=fuse, backend=backend)
    for B, T in NANOGPT_SHAPES:
        x = torch.randn(B, T, C, dtype=F64, requires_grad=True)
        q, k, v = c_attn(x).split(C, dim=2)          # non-contiguous views, as in nanoGPT
        actual = c_proj(attend(q, k, v))
        expected = nanogpt_attention_reference(x, c_attn, c_proj, n_head, causal=False)
        assert_close(actual, expected)
        assert attend.explain(q, k, v).rewrite == ("sdpa" if fuse else "")
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, [x, c_attn.weight], cot), grads(expected, [x, c_attn.weight], cot))


@pytest.mark.parametrize("kwargs", [
    dict(need_weights=False, is_causal=True),   # SDPA's own causal mask
    dict(need_weights=False),                   # the mask merged into SDPA's attn_mask
    dict(need_weights=True),                    # unfused: scores, masking, softmax, weighted sum
])
def test_nanogpt_weights_in_einc_multihead_attention(kwargs):
    """nanoGPT's c_attn/c_proj are nn.MultiheadAttention's in_proj/out_proj (batch_first)."""
    C, n_head = 12, 3
    c_attn, c_proj = torch.nn.Linear(C, 3 * C).double(), torch.nn.Linear(C, C).double()
    mha = einc.nn.MultiheadAttention(C, n_head, batch_first=True).double()
    mha.load_state_dict({"in_proj_weight": c_attn.weight, "in_proj_bias": c_attn.bias,
                         "out_proj.weight": c_proj.weight, "out_proj.bias": c_proj.bias})
    for B, T in NANOGPT_SHAPES:
        x = torch.randn(B, T, C, dtype=F64)
        not_allowed = ~torch.ones(T, T, dtype=torch.bool).tril()
        out, _ = mha(x, x, x, attn_mask=not_allowed, **kwargs)
        assert_close(out, nanogpt_attention_reference(x, c_attn, c_proj, n_head))


# ============================================================================ Mamba / S4D
# state-spaces/mamba mamba_ssm/ops/selective_scan_interface.py, selective_scan_ref:
#   deltaA = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))        (A real or complex)
#   deltaB_u = torch.einsum('bdl,bnl,bdl->bdln', delta, B, u)        (variable B)
#   x = deltaA[:, :, i] * x + deltaB_u[:, :, i];  y = torch.einsum('bdn,bn->bd', x, C[:, :, i])

MIXED = [
    # (delta dtype, A dtype, expected result dtype)
    pytest.param(torch.float32, torch.complex64, torch.complex64, id="f32-c64"),     # Mamba's usual case
    pytest.param(F64, C128, C128, id="f64-c128"),
    pytest.param(F64, torch.complex64, C128, id="f64-c64-promotes"),                # promote_types(f64, c64)
    pytest.param(torch.float32, C128, C128, id="f32-c128"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("real, cplx, result", MIXED)
def test_mamba_discretization_real_delta_times_complex_A(real, cplx, result, backend):
    dA = einc.compile("bdl,dn->bdln", backend=backend)
    d, n = 4, 3
    # S4D-Lin initialisation of a complex A: -1/2 + i pi n
    A = torch.complex(-0.5 * torch.ones(d, n), math.pi * torch.arange(n).float().expand(d, n))
    A = A.to(cplx).requires_grad_()
    tight, loose = dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-5, atol=1e-5)
    for b, l in [(2, 5), (1, 8), (3, 1)]:
        delta = torch.rand(b, d, l, dtype=real, requires_grad=True)
        actual = torch.exp(dA(delta, A))
        assert actual.dtype == result
        d64, a128 = delta.detach().double().requires_grad_(), A.detach().to(C128).requires_grad_()
        expected = torch.exp(torch.einsum("bdl,dn->bdln", d64.to(C128), a128))
        assert_close(actual, expected, **(tight if result == C128 else loose))
        cot = torch.randn(expected.shape, dtype=C128)
        g = grads(actual, [delta, A], cot)
        assert (g[0].dtype, g[1].dtype) == (real, cplx)   # each operand's own dtype
        g_ref = grads(expected, [d64, a128], cot)
        assert_close(g[0], g_ref[0], **(tight if (real, result) == (F64, C128) else loose))
        assert_close(g[1], g_ref[1], **(tight if (cplx, result) == (C128, C128) and real == F64 else loose))


MAMBA_EINSUMS = [
    # (equation, operand shapes as functions of b, l) -- d=4 channels, n=3 states
    pytest.param("bdl,bnl->bdln", lambda b, l: [(b, 4, l), (b, 3, l)], id="delta-B"),
    pytest.param("bdl,bnl,bdl->bdln", lambda b, l: [(b, 4, l), (b, 3, l), (b, 4, l)], id="deltaB_u"),
    pytest.param("bdn,bn->bd", lambda b, l: [(b, 4, 3), (b, 3)], id="y-step"),
    pytest.param("bdn,dn->bd", lambda b, l: [(b, 4, 3), (4, 3)], id="y-step-fixed-C"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equation, shapes", MAMBA_EINSUMS)
def test_mamba_selective_scan_einsums(equation, shapes, backend):
    f = einc.compile(equation, backend=backend)
    for b, l in [(2, 5), (1, 8), (3, 1)]:
        ops = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes(b, l)]
        actual, expected = f(*ops), torch.einsum(equation, *ops)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, ops, cot), grads(expected, ops, cot))


def selective_scan(u, delta, A, B, C, D, dA, dBu, y_step):
    deltaA, deltaB_u = torch.exp(dA(delta, A)), dBu(delta, B, u)
    x = torch.zeros(u.shape[0], A.shape[0], A.shape[1], dtype=deltaA.dtype)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(y_step(x, C[:, :, i]))
    return torch.stack(ys, dim=2) + u * D[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba_selective_scan_ref(backend):
    ported = [einc.compile(p, backend=backend) for p in ("b d l, d n -> b d l n", "b d l, b n l, b d l -> b d l n",
                                                         "b d n, b n -> b d")]
    original = [lambda *t, e=e: torch.einsum(e, *t) for e in ("bdl,dn->bdln", "bdl,bnl,bdl->bdln", "bdn,bn->bd")]
    d, n = 4, 3
    for b, l in [(2, 5), (1, 8), (3, 1)]:
        u = torch.randn(b, d, l, dtype=F64, requires_grad=True)
        delta = F.softplus(torch.randn(b, d, l, dtype=F64)).requires_grad_()
        A = (-torch.rand(d, n, dtype=F64)).requires_grad_()
        B = torch.randn(b, n, l, dtype=F64, requires_grad=True)
        C = torch.randn(b, n, l, dtype=F64, requires_grad=True)
        D = torch.randn(d, dtype=F64)
        inputs = [u, delta, A, B, C]
        actual = selective_scan(u, delta, A, B, C, D, *ported)
        expected = selective_scan(u, delta, A, B, C, D, *original)
        assert_close(actual, expected)
        assert_all_close(grads(actual, inputs), grads(expected, inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_s4d_kernel_complex(backend):
    """state-spaces/s4 models/s4/s4d.py S4DKernel.forward: dtA = A * dt[:, None];
    C = C * (exp(dtA) - 1) / A;  K = 2 * einsum('hn, hnl -> hl', C, exp(dtA[..., None] * arange(L))).real"""
    scale = einc.compile("h, h n -> h n", backend=backend)            # real dt times complex A
    kernel = einc.compile("h n, h n l -> h l", backend=backend)
    H, N = 3, 4
    for L in [6, 1, 9]:
        dt = torch.exp(torch.rand(H, dtype=F64) * 3 - 4).requires_grad_()
        C = torch.randn(H, N, dtype=C128, requires_grad=True)
        A = torch.complex(-0.5 * torch.ones(H, N, dtype=F64),
                          math.pi * torch.arange(N, dtype=F64).repeat(H, 1)).requires_grad_()

        def k(dtA, contract):
            C_ = C * (torch.exp(dtA) - 1.0) / A
            return 2 * contract(C_, torch.exp(dtA.unsqueeze(-1) * torch.arange(L))).real

        actual = k(scale(dt, A), kernel)
        expected = k(A * dt.unsqueeze(-1), lambda *t: torch.einsum("hn,hnl->hl", *t))
        assert actual.dtype == F64
        assert_close(actual, expected)
        assert_all_close(grads(actual.square(), [dt, C, A]), grads(expected.square(), [dt, C, A]))


# ============================================================================ linear-chain CRF
# kmkurn/pytorch-crf torchcrf/__init__.py, CRF._compute_normalizer (the forward
# algorithm: score = logsumexp(score[:, :, None] + transitions + emissions[i][:, None], 1))
# and CRF._viterbi_decode (the same with max); harvardnlp/pytorch-struct
# torch_struct/linearchain.py runs the same recursion over per-position edge potentials
# with its LogSemiring / MaxSemiring.  References: the step-by-step torch form, and the
# exact enumeration of every tag sequence (independent of any recursion).

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def transitions(kind: str) -> torch.Tensor:
    t = torch.randn(5, 5, dtype=F64)
    if kind == "bio":  # I-X only after B-X or I-X (AllenNLP's allowed_transitions for BIO)
        for i, prev in enumerate(TAGS):
            for j, nxt in enumerate(TAGS):
                if nxt.startswith("I-") and prev[2:] != nxt[2:]:
                    t[i, j] = NEG_INF
    elif kind == "dead-ends":  # tag 2 has no successor, tag 4 is unreachable, one pair forbidden
        t[2, :] = NEG_INF
        t[:, 4] = NEG_INF
        t[0, 1] = NEG_INF
    return t


def all_paths_scores(start, emissions, trans, end):
    """score[b, path] of every tag sequence (C ** T of them)."""
    _, T, C = emissions.shape
    paths = torch.tensor(list(itertools.product(range(C), repeat=T)))            # [P, T]
    score = start[paths[:, 0]] + end[paths[:, -1]] + emissions[:, torch.arange(T), paths].sum(-1)
    if T > 1:
        score = score + trans[paths[:, :-1], paths[:, 1:]].sum(-1)
    return score, paths


def forward_algorithm(start, emissions, trans, end, step, final):
    score = start + emissions[:, 0]
    for i in range(1, emissions.shape[1]):
        score = step(score, trans) + emissions[:, i]
    return final(score + end)


def torch_lse_step(score, trans):
    return torch.logsumexp(score[:, :, None] + trans, dim=1)


def torch_max_step(score, trans):
    return torch.amax(score[:, :, None] + trans, dim=1)


CRF_TRANSITIONS = [
    pytest.param("dense", True, id="dense"),
    pytest.param("bio", True, id="bio-constraints"),          # -inf entries, every tag reachable
    # a tag nothing reaches: torch.logsumexp over an all -inf slice has NaN gradients (the
    # README: einc's are 0 there), so gradients are compared with the enumeration only
    pytest.param("dead-ends", False, id="dead-ends"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, torch_grads_finite", CRF_TRANSITIONS)
def test_crf_log_partition_log_semiring(kind, torch_grads_finite, backend):
    step = einc.compile("logsumexp(b i, i j -> b j)", backend=backend)
    final = einc.compile("logsumexp(b j -> b)", backend=backend)
    trans = transitions(kind).requires_grad_()
    start, end = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    for B, T in [(2, 5), (3, 1), (1, 6)]:
        emissions = torch.randn(B, T, 5, dtype=F64, requires_grad=True)
        inputs = [emissions, trans]
        actual = forward_algorithm(start, emissions, trans, end, step, final)
        stepwise = forward_algorithm(start, emissions, trans, end, torch_lse_step, lambda s: torch.logsumexp(s, 1))
        scores, _ = all_paths_scores(start, emissions, trans, end)
        exact = torch.logsumexp(scores, dim=-1)
        assert_close(actual, stepwise)
        assert_close(actual, exact)
        g = grads(actual, inputs)
        assert all(x.isfinite().all() for x in g)
        assert_all_close(g, grads(exact, inputs), rtol=1e-9, atol=1e-12)
        g_torch = grads(stepwise, inputs)
        if torch_grads_finite:
            assert_all_close(g, g_torch, rtol=1e-9, atol=1e-12)
        elif T > 1:
            assert g_torch[1].isnan().any()  # the documented difference from torch.logsumexp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "bio", "dead-ends"])
def test_crf_viterbi_max_plus(kind, backend):
    step = einc.compile("max(b i, i j -> b j)", backend=backend)
    final = einc.compile("max(b j -> b)", backend=backend)
    trans = transitions(kind).requires_grad_()
    start, end = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    for B, T in [(2, 5), (3, 1), (1, 6)]:
        emissions = torch.randn(B, T, 5, dtype=F64, requires_grad=True)
        actual = forward_algorithm(start, emissions, trans, end, step, final)
        stepwise = forward_algorithm(start, emissions, trans, end, torch_max_step, lambda s: torch.amax(s, 1))
        scores, paths = all_paths_scores(start, emissions, trans, end)
        assert_close(actual, stepwise)
        assert_close(actual, scores.amax(-1))
        g = grads(actual, [emissions, trans])
        assert_all_close(g, grads(stepwise, [emissions, trans]))
        # the gradient of the best score w.r.t. the emissions marks the best path (ties
        # have probability 0 with random scores): compare it with the enumeration's argmax
        best = paths[scores.argmax(-1)]                                          # [B, T]
        assert torch.equal(g[0], F.one_hot(best, 5).to(F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["unit", "wide-range"])  # 300: exp underflows per step
def test_crf_pytorch_struct_edge_potentials(scale, backend):
    """torch_struct's LinearChain: log_potentials [b, N-1, C_next, C_prev], chart[b, C]."""
    step = einc.compile("logsumexp(b i, b j i -> b j)", backend=backend)
    final = einc.compile("logsumexp(b j -> b)", backend=backend)
    C = 4
    for B, N in [(2, 5), (1, 2), (3, 4)]:
        edge = (torch.randn(B, N - 1, C, C, dtype=F64) * scale)
        edge[:, :, 0, 1] = NEG_INF                         # tag 1 -> tag 0 forbidden
        edge.requires_grad_()
        chart = torch.zeros(B, C, dtype=F64)
        for n in range(N - 1):
            chart = step(chart, edge[:, n])
        actual = final(chart)
        paths = torch.tensor(list(itertools.product(range(C), repeat=N)))
        pos = torch.arange(N - 1)
        exact = torch.logsumexp(edge[:, pos, paths[:, 1:], paths[:, :-1]].sum(-1), dim=-1)
        assert_close(actual, exact, rtol=1e-12, atol=1e-9 * scale)
        assert_all_close(grads(actual, [edge]), grads(exact, [edge]), rtol=1e-9, atol=1e-10)


# ============================================================================ tensor networks
# jcmgray/quimb and cotengra examples contract rings/chains of MPS tensors and 2D PEPS
# grids; references: torch.einsum and opt_einsum.contract.

RING = "aib,bjc,ckd,dle,emf,fng,goh,hpa->ijklmnop"     # periodic MPS, 8 sites, physical legs open


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimize", ["auto", "greedy", "dp"])
def test_periodic_mps_amplitudes(optimize, backend):
    f = einc.compile(RING, optimize=optimize, backend=backend)
    for bond in [3, 1, 2]:
        ts = [torch.randn(bond, 2, bond, dtype=F64, requires_grad=True) for _ in range(8)]
        actual = f(*ts)
        expected = torch.einsum(RING, *ts)
        assert_close(actual, expected)
        assert_close(actual, oe.contract(RING, *[t.detach() for t in ts], backend="torch"))
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, ts, cot), grads(expected, ts, cot))


def mps_norm_pattern(sites: int) -> str:
    """<psi|psi> of an open MPS in spaced notation: ket bonds k*, bra bonds r*, physical p*."""
    ket = [f"k{i} p{i} k{i + 1}" for i in range(sites)]
    bra = [f"r{i} p{i} r{i + 1}" for i in range(sites)]
    return ", ".join(ket + bra) + " ->"


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_mps_norm_sixteen_tensors(backend):
    sites = 8
    f = einc.compile(mps_norm_pattern(sites), backend=backend)
    symbols = {}
    compact = ",".join("".join(symbols.setdefault(a, oe.get_symbol(len(symbols))) for a in op.split())
                       for op in mps_norm_pattern(sites)[:-3].split(", ")) + "->"
    for bond in [3, 2, 4]:
        ket = [torch.randn(1 if i == 0 else bond, 2, 1 if i == sites - 1 else bond, dtype=C128,
                           requires_grad=True) for i in range(sites)]
        ops = ket + [t.conj() for t in ket]
        actual = f(*ops)
        expected = torch.einsum(compact, *ops)
        assert_close(actual, oe.contract(compact, *[t.detach() for t in ops]), rtol=1e-10, atol=1e-9)
        assert_close(actual, expected, rtol=1e-10, atol=1e-9)
        assert abs(actual.imag) <= 1e-9 * abs(actual.real)       # a norm is real
        assert_all_close(grads(actual.real, ket), grads(expected.real, ket), rtol=1e-9, atol=1e-9)


def peps_pattern(rows: int, cols: int) -> str:
    """Closed 2D grid: horizontal bonds h{i}x{j}, vertical bonds v{i}x{j}."""
    operands = []
    for i, j in itertools.product(range(rows), range(cols)):
        axes = [f"h{i}x{j - 1}"] * (j > 0) + [f"h{i}x{j}"] * (j < cols - 1)
        axes += [f"v{i - 1}x{j}"] * (i > 0) + [f"v{i}x{j}"] * (i < rows - 1)
        operands.append(" ".join(axes))
    return ", ".join(operands) + " ->"


@pytest.mark.parametrize("backend", BACKENDS)
def test_peps_grid_contraction(backend):
    pattern = peps_pattern(3, 3)
    f = einc.compile(pattern, backend=backend)
    symbols = {}
    compact = ",".join("".join(symbols.setdefault(a, oe.get_symbol(len(symbols))) for a in op.split())
                       for op in pattern[:-3].split(", ")) + "->"
    for bond in [2, 3, 1]:
        ts = [torch.randn(*(bond,) * len(op.split()), dtype=F64, requires_grad=True)
              for op in pattern[:-3].split(", ")]
        actual = f(*ts)
        expected = oe.contract(compact, *ts, backend="torch")
        assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        assert_all_close(grads(actual, ts), grads(torch.einsum(compact, *ts), ts), rtol=1e-9, atol=1e-10)


# ============================================================================ cross-entropy
# Token cross-entropy as in nanoGPT's model.py GPT.forward
# (F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)) and the
# README's recipe: minus gather(log_softmax(b [c]), b -> b), the target's log-probability
# (and logsumexp(b c -> b) minus the logit gathered by hand, as before the gather op).

CE_ROWS = [
    # (logits, targets)
    pytest.param([[1000.0, 0.0]], [1], id="1000-0-target-1"),           # loss 1000, grad [1, -1]
    pytest.param([[1000.0, 0.0]], [0], id="1000-0-target-0"),           # loss 0, grad 0
    pytest.param([[-1000.0, 0.0], [0.0, 1000.0]], [0, 1], id="pm1000"),
    pytest.param([[0.0, NEG_INF, 2.0]], [0], id="masked-vocab"),         # -inf logit, finite loss
    pytest.param([[1e4, -1e4, 0.0]], [2], id="1e4"),
    pytest.param(None, None, id="random-4x7"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("logits, targets", CE_ROWS)
def test_token_cross_entropy(logits, targets, dtype, backend):
    lse = einc.compile("logsumexp(b c -> b)", backend=backend)
    if logits is None:
        x, t = torch.randn(4, 7, dtype=dtype) * 5, torch.randint(0, 7, (4,))
    else:
        x, t = torch.tensor(logits, dtype=dtype), torch.tensor(targets)
    x.requires_grad_()
    gathered = einc.compile("gather(log_softmax(b [c]), b -> b)", backend=backend)
    x64 = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, t, reduction="none")
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else {}
    wanted = grads(expected, [x64])[0]
    for loss in (lse(x) - x.gather(1, t[:, None])[:, 0], -gathered(x, t)):
        assert loss.dtype == dtype
        assert_close(loss, expected, **tol)
        assert_close(grads(loss, [x])[0], wanted, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_token_cross_entropy_half(dtype):
    """Half floats: einc computes the logsumexp in float32 and returns the input dtype."""
    lse = einc.compile("logsumexp(b c -> b)")
    x = torch.tensor([[1000.0, 0.0], [0.0, 1000.0], [3.0, 1.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([1, 1, 0])
    loss = lse(x) - x.gather(1, t[:, None])[:, 0]
    assert loss.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, t, reduction="none")
    assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert_close(grads(loss, [x])[0], grads(expected, [x64])[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_sequence_loss_with_ignore_index(backend):
    # GPT.forward's loss on its lm_head (x @ wte.T, tied weights) in one pattern: the
    # fused kernel, weighted per token (0 where the target is ignored).
    loss_of = einc.compile("sum(gather(log_softmax(b t d, v d -> b t [v]), b t -> b t), b t -> )", backend=backend)
    V, D = 11, 6
    for B, T in [(2, 5), (1, 2), (3, 8)]:
        x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
        wte = torch.randn(V, D, dtype=F64, requires_grad=True)
        targets = torch.randint(0, V, (B, T))
        targets[0, -1] = -1                          # ignored position
        valid = (targets != -1).double()
        loss = -loss_of(x, wte, targets.clamp(min=0), valid / valid.sum())
        assert loss_of.explain(x, wte, targets, valid).rewrite == "cross_entropy"
        expected = F.cross_entropy((x @ wte.T).view(-1, V), targets.view(-1), ignore_index=-1)
        assert_close(loss, expected)
        for got, want in zip(grads(loss, [x, wte]), grads(expected, [x, wte])):
            assert_close(got, want)


# ============================================================================ einops pooling / patches
# lucidrains/vit-pytorch vit_pytorch/vit.py ViT.to_patch_embedding:
#   Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1=patch_height, p2=patch_width)
# timm/layers/patch_embed.py PatchEmbed: Conv2d(kernel=stride=patch), flatten(2).transpose(1, 2)
# 2x2 pooling as einops.reduce(x, 'b (h 2) (w 2) c -> b h w c', 'mean') (einops docs).

POOL_SHAPES = [(2, 4, 6, 3), (1, 8, 2, 5), (3, 2, 2, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_pool_2x2(backend):
    pool = einc.compile("mean(b (h 2) (w 2) c -> b h w c)", backend=backend)
    layer = script(einc.nn.Einsum("mean(b (h 2) (w 2) c -> b h w c)"))   # as einops' Reduce layer
    for shape in POOL_SHAPES:
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        actual = pool(x)
        assert_close(actual, einops.reduce(x, "b (h 2) (w 2) c -> b h w c", "mean"))
        assert_close(layer(x), actual)
        expected = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, [x], cot), grads(expected, [x], cot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_2x2_channels_first(backend):
    pool = einc.compile("max(b c (h 2) (w 2) -> b c h w)", backend=backend)
    for shape in [(2, 3, 4, 6), (1, 5, 8, 2), (3, 1, 2, 2)]:
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        actual, expected = pool(x), F.max_pool2d(x, 2)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, [x], cot), grads(expected, [x], cot))


PATCHES = [
    # (p1, p2, image shapes)
    pytest.param(4, 2, [(2, 3, 8, 6), (1, 1, 4, 2), (2, 3, 16, 4)], id="4x2"),
    pytest.param(2, 2, [(1, 3, 4, 4), (3, 2, 6, 2), (2, 1, 2, 8)], id="2x2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p1, p2, shapes", PATCHES)
def test_vit_patch_rearrange(p1, p2, shapes, backend):
    pattern = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"
    f = einc.compile(pattern, p1=p1, p2=p2, backend=backend)
    layer = script(einc.nn.Einsum(pattern, p1=p1, p2=p2))
    for shape in shapes:
        x = torch.randn(shape, dtype=F64)
        expected = einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p1, p2=p2)   # vit-pytorch
        assert_close(f(x), expected)
        assert_close(layer(x), expected)


def test_vit_patch_embedding_as_one_einsum_layer():
    """timm's PatchEmbed conv (kernel = stride = patch) is an Einsum whose weight has the
    conv's shape (o, c, p1, p2): nn.Conv2d's state_dict loads as it is."""
    conv = torch.nn.Conv2d(3, 5, kernel_size=(4, 2), stride=(4, 2)).double()
    embed = einc.nn.Einsum("b c (h p1) (w p2) -> b (h w) o", weight="o c p1 p2", bias="o",
                           o=5, c=3, p1=4, p2=2).double()
    embed.load_state_dict(conv.state_dict())
    for shape in [(2, 3, 8, 6), (1, 3, 4, 2), (2, 3, 16, 4)]:
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        expected = conv(x).flatten(2).transpose(1, 2)
        actual = embed(x)
        assert_close(actual, expected)
        cot = torch.randn_like(expected)
        assert_all_close(grads(actual, [x, *embed.parameters()], cot),
                         grads(expected, [x, *conv.parameters()], cot))


@pytest.mark.parametrize("pattern, sizes, shape", [
    ("mean(b (h 2) (w 2) c -> b h w c)", {}, (2, 5, 4, 3)),               # odd height
    ("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", {"p1": 4, "p2": 2}, (2, 3, 7, 4)),  # 7 rows, patch 4
])
def test_pooling_and_patching_refuse_indivisible_sizes(pattern, sizes, shape):
    with pytest.raises(einc.EincError, match="do not divide"):
        einc.compile(pattern, **sizes)(torch.randn(shape))
    with pytest.raises(einops.EinopsError):   # einops refuses as well
        if pattern.startswith("mean("):
            einops.reduce(torch.randn(shape), pattern[5:-1], "mean")
        else:
            einops.rearrange(torch.randn(shape), pattern, **sizes)


def test_rgb_to_gray_mean_and_its_refusal_of_rgba():
    gray = einc.compile("mean(b h w 3 -> b h w)")           # an anonymous axis of size 3
    for shape in [(1, 2, 2, 3), (2, 4, 3, 3), (1, 1, 1, 3)]:
        x = torch.randn(shape, dtype=F64)
        assert_close(gray(x), einops.reduce(x, "b h w 3 -> b h w", "mean"))
    with pytest.raises(einc.EincError, match="has size 4"):
        gray(torch.randn(1, 2, 2, 4))                       # an RGBA image


def test_openfold_linear_refuses_wrong_channels():
    layer = einc.nn.Einsum("... c -> ... o", weight="o c", bias="o", c=5, o=3)
    for shape in [(2, 4), (4,), (2, 3, 6)]:
        with pytest.raises(einc.EincError, match="axis 'c' has size"):
            layer(torch.randn(shape))


# ============================================================================ friction found


def test_pool_error_names_the_composition_as_written():
    with pytest.raises(einc.EincError) as info:
        einc.compile("mean(b (h 2) (w 2) c -> b h w c)")(torch.randn(2, 5, 4, 3))
    assert "(h 2)" in str(info.value) and "#" not in str(info.value)


def test_linear_port_error_message_reads_well():
    # A module's run-time check names the keyword size as a call of the expression does.
    layer = einc.nn.Einsum("... c -> ... o", weight="o c", bias="o", c=5, o=3)
    with pytest.raises(einc.EincError) as info:
        layer(torch.randn(2, 4))
    assert "in given by keyword" not in str(info.value) and "but 5 in keyword c=5" in str(info.value)


def test_rgb_mean_error_message_reads_well():
    with pytest.raises(einc.EincError) as info:
        einc.compile("mean(b h w 3 -> b h w)")(torch.randn(1, 2, 2, 4))   # an RGBA image
    message = str(info.value)
    assert "axis anonymous axis" not in message and "in its spelling" not in message
    assert "anonymous axis 3 has size 4" in message


def test_compile_refuses_a_size_for_no_axis():
    with pytest.raises(einc.EincError, match="size given for axis 'x', which is not in the pattern"):
        einc.compile("... c -> ... o", x=7)


@pytest.mark.parametrize("extra", [{"x": 7}, {"backend": "eager"}], ids=["misspelt-size", "backend"])
def test_einsum_layer_refuses_unknown_keywords(extra):
    with pytest.raises(einc.EincError):
        einc.nn.Einsum("... c -> ... o", weight="o c", c=5, o=3, **extra)
