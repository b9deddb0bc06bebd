"""Masked and causal attention patterns (issue 15) against hand-written SDPA and the masked einsum form.

    python benchmarks/bench_masks.py --rounds 3 --markdown benchmarks/RESULTS.md

(b, h, L, d) = (8, 8, 1024, 64) float32 (``--quick``: (2, 2, 128, 16)), CPU, one thread.
Contenders: the einc pattern with ``causal(q k)`` (lowered to SDPA with ``is_causal=True``)
or ``mask(b k) causal(q k)`` (SDPA with one additive mask), SDPA written by hand with
the same arguments, and the plain masked form ``einsum, masked_fill, softmax, einsum``.
Each is checked against the float64 plain form first.  And key-padding-masked
self-attention through ``einc.nn.MultiheadAttention`` against ``torch.nn.MultiheadAttention``
(embed_dim 512, 8 heads, (8, 512) tokens; same weights; eval, no_grad).

Long causal attention under a memory budget: (1, 8, 4096, 64) float32 (``--quick``: (1, 2,
512, 16)), whose scores (512 MiB) are over a 64 MiB ``memory_limit`` (``--quick``: 1 MiB):
einc slices the queries, each slice taking only the keys its queries see (causal block
skipping), on the plain lowering (``fuse=False``) and on SDPA; against the same pattern
unsliced, SDPA with ``is_causal=True`` and the masked einsum form; and each one's peak
memory in a fresh process (``common.run_memory_probe``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Case, Result, Target, parse_args, peak_rss_growth, probe_contenders, script  # noqa: E402

import einc  # noqa: E402
import einc.nn  # noqa: E402

HEADING = "## Masked and causal attention (issue 15)"
PATTERN = "softmax(b h q d, b h k d -> b h q [k] / sqrt(d){}), b h k e -> b h q e"


def _shape(quick: bool) -> tuple[int, int, int, int]:
    return (2, 2, 128, 16) if quick else (8, 8, 1024, 64)


def _plain(q, k, v, allowed):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bhke->bhqe", torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v)


def _case(padded: bool, quick: bool) -> Case:
    b, h, length, d = _shape(quick)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    padding = torch.ones(b, length, dtype=torch.bool)
    padding[:, length - length // 8:] = False  # the last eighth of every sequence is padding
    if padded:
        f = einc.compile(PATTERN.format(" mask(b k) causal(q k)"))
        allowed = causal & padding[:, None, None, :]
        einc_call, args = (lambda: f(q, k, padding, v)), "key padding + causal"
        by_hand = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # noqa: E731
    else:
        f = einc.compile(PATTERN.format(" causal(q k)"))
        allowed = causal.expand(b, 1, length, length)
        einc_call, args = (lambda: f(q, k, v)), "causal"
        by_hand = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return Case(
        name="causal+padding" if padded else "causal",
        description=f"{args} attention, (b, h, L, d) = {(b, h, length, d)}",
        contenders={"einc": einc_call, "hand-written SDPA": by_hand,
                    "einsum+masked_fill+softmax+einsum": lambda: _plain(q, k, v, allowed)},
        reference=lambda: _plain(q.double(), k.double(), v.double(), allowed).float(),
        einc=["einc"],
    )


def _layer_case(quick: bool) -> Case:
    """Key-padding-masked self-attention through the layers (same weights), eval, no_grad."""
    b, length, e, h = (2, 64, 32, 4) if quick else (8, 512, 512, 8)
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(e, h, batch_first=True).eval()
    mine = einc.nn.MultiheadAttention(e, h, batch_first=True).eval()
    mine.load_state_dict(reference.state_dict())
    scripted = torch.jit.script(mine)
    wide = einc.nn.MultiheadAttention(e, h, batch_first=True).double().eval()
    wide.load_state_dict(reference.state_dict())
    x = torch.randn(b, length, e, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(b, length, dtype=torch.bool)
    padding[:, length - length // 8:] = True  # torch's convention here: True = padded out

    def call(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return layer(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return run

    return Case(
        name="mha-key-padding",
        description=f"`layer(x, x, x, key_padding_mask=..., need_weights=False)`, embed_dim {e}, {h} heads, "
                    f"x {(b, length, e)}, the last eighth padded, eval, no_grad",
        contenders={"einc.nn": call(mine, x), "einc.nn scripted": call(scripted, x),
                    "torch.nn.MultiheadAttention": call(reference, x)},
        reference=lambda: call(wide, x.double())().float(),
        einc=["einc.nn", "einc.nn scripted"],
    )


def _long_shape(quick: bool) -> tuple[tuple[int, int, int, int], str]:
    return ((1, 2, 512, 16), "1MiB") if quick else ((1, 8, 4096, 64), "64MiB")


def _long_contenders(quick: bool) -> tuple[dict[str, Callable[..., torch.Tensor]], tuple[torch.Tensor, ...]]:
    (b, h, length, d), budget = _long_shape(quick)
    g = torch.Generator().manual_seed(0)
    tensors = tuple(torch.randn(b, h, length, d, generator=g) for _ in range(3))
    pattern = PATTERN.format(" causal(q k)")
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return {
        "einc, fuse=False, sliced": einc.compile(pattern, fuse=False, memory_limit=budget),
        "einc, SDPA, sliced": einc.compile(pattern, memory_limit=budget),
        "einc, fuse=False, no limit": einc.compile(pattern, fuse=False),
        "hand-written SDPA(is_causal=True)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "einsum+masked_fill+softmax+einsum": lambda q, k, v: _plain(q, k, v, causal),
    }, tensors


def _long_case(quick: bool) -> Case:
    (b, h, length, d), budget = _long_shape(quick)
    contenders, (q, k, v) = _long_contenders(quick)
    sliced = contenders["einc, fuse=False, sliced"].explain(q, k, v).slicing
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return Case(
        name="causal-long-sliced",
        description=f"causal attention, (b, h, L, d) = {(b, h, length, d)}, scores "
                    f"{b * h * length * length * 4 / 2**20:.0f} MiB, memory_limit={budget}: sliced "
                    f"{', '.join(f'{a.name} in {a.count} chunks of {a.chunk}' for a in sliced.axes)}, "
                    f"{sliced.overhead:.2f}x the unsliced FLOPs (blocks above the diagonal skipped)",
        contenders={name: (lambda f=f: f(q, k, v)) for name, f in contenders.items()},
        reference=lambda: _plain(q.double(), k.double(), v.double(), causal).float(),
        einc=["einc, fuse=False, sliced", "einc, SDPA, sliced"],
    )


def _probe(name: str, quick: bool) -> dict:
    """In a fresh process (``--memory-probe``): peak RSS growth of one call of a contender."""
    torch.set_num_threads(1)
    contenders, tensors = _long_contenders(quick)
    f = contenders[name]
    f(*tensors)  # imports, compilation: not counted
    held: list[torch.Tensor] = []
    grown, method = peak_rss_growth(lambda: held.append(f(*tensors)))
    return {"forward": grown, "method": method}


def _memory(results: dict[str, Result], args) -> list[str]:
    if "causal-long-sliced" not in results:
        return []
    lines = ["", "Peak memory of one call of `causal-long-sliced` (growth of the peak RSS, fresh process each):", "",
             "| contender | peak growth |", "|---|---:|"]
    for name, got in probe_contenders(__file__, list(_long_contenders(True)[0]), args.quick).items():
        lines.append(f"| `{name}` | {got['forward'] / 2**20:.1f} MiB |")
        print(lines[-1], flush=True)
    return lines + [f"({got['method']})"]


TARGETS = [Target("causal", "einc", "hand-written SDPA", 1.05, "causal: einc ≤ 1.05x SDPA(is_causal=True)"),
           Target("causal", "einc", "einsum+masked_fill+softmax+einsum", 0.5,
                  "causal: einc ≤ 0.5x the masked einsum form"),
           Target("causal+padding", "einc", "hand-written SDPA", 1.05, "causal+padding: einc ≤ 1.05x SDPA"),
           Target("mha-key-padding", "einc.nn", "torch.nn.MultiheadAttention", 1.0,
                  "key-padding MHA (need_weights=False): einc.nn ≤ 1.0x torch's layer")]


def main(argv: Sequence[str] | None = None) -> int:
    quick = parse_args(argv).quick
    makers = [lambda: _case(False, quick), lambda: _case(True, quick), lambda: _layer_case(quick),
              lambda: _long_case(quick)]
    return script(argv, __doc__, makers, TARGETS, HEADING, [__doc__.split("\n\n", 2)[2].strip()], _memory, _probe)


if __name__ == "__main__":
    sys.exit(main())
