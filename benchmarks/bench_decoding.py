"""Decoding with a key/value cache (issue 15): ``einc.nn.MultiheadAttention.decode`` against hand-written SDPA.

    python benchmarks/bench_decoding.py --markdown benchmarks/RESULTS.md

One step of decoding: new tokens (1, or 4 with lower-right causality) of a batch of
(b, e) = (4, 512), 8 heads, attend to a cache of 4096 keys and values.  The
hand-written form is what a decoder writes with torch alone: ``F.linear`` projections,
the head split by ``view``/``transpose``, ``torch.cat`` onto the cache,
``scaled_dot_product_attention`` (with a lower-right causal mask for several tokens)
and the output projection.  Grouped-query (2 key/value heads) against the same with
``enable_gqa=True``.  CPU float32, one thread; each contender is checked against a
float64 plain form (softmax of the scores plus the mask, times the values) first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Case, Target, script  # noqa: E402

import einc.nn  # noqa: E402

HEADING = "## Decoding with a key/value cache (issue 15)"
B, E, H, CACHE = 4, 512, 8, 4096


def _layer(kv_heads: int) -> einc.nn.MultiheadAttention:
    torch.manual_seed(0)
    layer = einc.nn.MultiheadAttention(E, H, batch_first=True, num_kv_heads=kv_heads).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.05, 0.05)
    return layer


def _by_hand(layer: einc.nn.MultiheadAttention, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One decoding step written with torch alone (``dtype`` float64: the reference)."""
    w = {name: p.detach().to(dtype) for name, p in layer.named_parameters()}
    g, d = layer.num_kv_heads, layer.head_dim
    x = x.to(dtype)
    bias = w["in_proj_bias"]
    if "in_proj_weight" in w:
        wq, wk, wv = w["in_proj_weight"].split([E, g * d, g * d])
    else:
        wq, wk, wv = w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"]
    bq, bk, bv = bias.split([E, g * d, g * d])
    n, t = x.shape[:2]
    q = F.linear(x, wq, bq).view(n, t, H, d).transpose(1, 2)
    k = torch.cat([cache_k.to(dtype), F.linear(x, wk, bk).view(n, t, g, d).transpose(1, 2)], 2)
    v = torch.cat([cache_v.to(dtype), F.linear(x, wv, bv).view(n, t, g, d).transpose(1, 2)], 2)
    mask = None
    if t > 1:
        total = k.shape[2]
        mask = torch.arange(total) <= torch.arange(t)[:, None] + (total - t)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g != H)
    return F.linear(out.transpose(1, 2).reshape(n, t, E), w["out_proj.weight"], w["out_proj.bias"])


def _case(new: int, kv_heads: int) -> Case:
    layer = _layer(kv_heads)
    scripted = torch.jit.script(layer)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(B, new, E, generator=generator)
    d = E // H
    cache_k, cache_v = (torch.randn(B, kv_heads, CACHE, d, generator=generator) for _ in range(2))
    grouped = f", {kv_heads} key/value heads" if kv_heads != H else ""
    return Case(
        name=f"decode-{new}{'-gqa' if kv_heads != H else ''}",
        description=f"{new} new token(s) against a cache of {CACHE} (b={B}, e={E}, {H} heads{grouped}).",
        contenders={
            "einc": lambda: scripted.decode(x, cache_k, cache_v)[0],
            "einc eager": lambda: layer.decode(x, cache_k, cache_v)[0],
            "hand-written SDPA": lambda: _by_hand(layer, x, cache_k, cache_v),
        },
        reference=lambda: _by_hand(layer, x, cache_k, cache_v, torch.float64),
        einc=["einc", "einc eager"],
    )


MAKERS = [lambda: _case(1, H), lambda: _case(4, H), lambda: _case(1, 2)]
TARGETS = [Target(name, "einc", "hand-written SDPA", 1.1, f"{name}: einc's decode within 1.1x of hand-written SDPA")
           for name in ("decode-1", "decode-4", "decode-1-gqa")]


def main(argv: Sequence[str] | None = None) -> int:
    return script(argv, __doc__, MAKERS, TARGETS, HEADING, [__doc__.split("\n\n", 2)[2].strip()])


if __name__ == "__main__":
    sys.exit(main())
