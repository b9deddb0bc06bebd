"""Indexing (issue 16): gather patterns against torch's indexing, and the fused cross-entropy.

    python benchmarks/bench_indexing.py --rounds 3 --markdown benchmarks/RESULTS.md

CPU float32, one thread; each contender is checked against float64 torch first.
Gathers (``--quick``: smaller): token logits ``gather(b t [v], b t -> b t)`` at (64,
1024, 1024) against ``torch.gather``; the batch gather ``gather(b [n] d, b k -> b k d)`` at
(16, 4096, 64) with k = 1024 against ``torch.gather`` of an expanded index; the
embedding lookup ``gather([v] d, b t -> b t d)`` at v = 32768, d = 1024, (8, 512)
tokens against ``W[ids]`` and ``F.embedding``.
Cross-entropy over a projection, ``mean(gather(log_softmax(n d, v d -> n [v]), n -> n)
-> )`` (minus the loss) at n = b·t = 8192, d = 1024, v = 32768 (``--quick``: 512,
128, 4096): einc fused (chunks of rows, never the n × v logits), einc with
``fuse=False``, and ``F.cross_entropy(h @ W.T, ids)``; forward (no_grad: with
gradients wanted, the fused forward also computes the gradients, see the README) and
forward+backward (``.backward()`` of the loss); and each one's peak memory over one
forward+backward in a fresh process (``common.run_memory_probe``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Case, Result, Target, parse_args, peak_rss_growth, probe_contenders, script  # noqa: E402

import einc  # noqa: E402

HEADING = "## Indexing (issue 16)"
LOSS = "mean(gather(log_softmax(n d, v d -> n [v]), n -> n) -> )"


def _token_case(quick: bool) -> Case:
    b, t, v = (4, 128, 1024) if quick else (64, 1024, 1024)
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)
    f = einc.compile("gather(b t [v], b t -> b t)")
    return Case("token-logits", f"`gather(b t [v], b t -> b t)`, x {(b, t, v)}",
                {"einc": lambda: f(x, ids), "torch.gather": lambda: x.gather(2, ids[..., None])[..., 0]},
                lambda: x.double().gather(2, ids[..., None])[..., 0], ["einc"])


def _batch_case(quick: bool) -> Case:
    b, n, d, k = (4, 512, 32, 128) if quick else (16, 4096, 64, 1024)
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(b, n, d, generator=g), torch.randint(0, n, (b, k), generator=g)
    f = einc.compile("gather(b [n] d, b k -> b k d)")
    return Case("batch-gather", f"`gather(b [n] d, b k -> b k d)` (x[b, idx[b, k], d]), x {(b, n, d)}, k = {k}",
                {"einc": lambda: f(x, idx), "torch.gather": lambda: x.gather(1, idx[..., None].expand(b, k, d)),
                 "advanced indexing": lambda: x[torch.arange(b)[:, None], idx]},
                lambda: x.double()[torch.arange(b)[:, None], idx], ["einc"])


def _embedding_case(quick: bool) -> Case:
    v, d, b, t = (4096, 128, 4, 128) if quick else (32768, 1024, 8, 512)
    g = torch.Generator().manual_seed(0)
    w, ids = torch.randn(v, d, generator=g), torch.randint(0, v, (b, t), generator=g)
    f = einc.compile("gather([v] d, b t -> b t d)")
    return Case("embedding", f"`gather([v] d, b t -> b t d)`, W {(v, d)}, ids {(b, t)}",
                {"einc": lambda: f(w, ids), "W[ids]": lambda: w[ids], "F.embedding": lambda: F.embedding(ids, w)},
                lambda: w.double()[ids], ["einc"])


def _loss_shape(quick: bool) -> tuple[int, int, int]:
    return (512, 128, 4096) if quick else (8192, 1024, 32768)


def _loss_contenders(quick: bool) -> tuple[dict[str, Callable[..., torch.Tensor]], tuple[torch.Tensor, ...]]:
    n, d, v = _loss_shape(quick)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    ids = torch.randint(0, v, (n,), generator=g)
    fused, plain = einc.compile(LOSS), einc.compile(LOSS, fuse=False)
    return {"einc, fused": lambda h, w, ids: -fused(h, w, ids),
            "einc, fuse=False": lambda h, w, ids: -plain(h, w, ids),
            "F.cross_entropy(h @ W.T, ids)": lambda h, w, ids: F.cross_entropy(h @ w.T, ids)}, (h, w, ids)


def _loss_case(quick: bool, backward: bool) -> Case:
    n, d, v = _loss_shape(quick)
    contenders, (h, w, ids) = _loss_contenders(quick)
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]

    def forward(f: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return f(h, w, ids)
        return run

    def both(f: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            for leaf in inputs:
                leaf.grad = None
            f(*inputs, ids).backward()
            return inputs[1].grad
        return run

    reference = contenders["F.cross_entropy(h @ W.T, ids)"]
    wide = [h.double().requires_grad_(), w.double().requires_grad_()]
    return Case(
        name="cross-entropy fwd+bwd" if backward else "cross-entropy",
        description=f"`{LOSS}` (minus the loss), n = {n}, d = {d}, v = {v} (logits {n * v * 4 / 2**20:.0f} MiB), "
                    + ("forward+backward" if backward else "forward under no_grad"),
        contenders={name: both(f, leaves) if backward else forward(f) for name, f in contenders.items()},
        reference=both(reference, wide) if backward else lambda: reference(h.double(), w.double(), ids),
        einc=["einc, fused", "einc, fuse=False"],
    )


def _probe(name: str, quick: bool) -> dict:
    """In a fresh process (``--memory-probe``): peak RSS growth of one forward+backward."""
    torch.set_num_threads(1)
    contenders, (h, w, ids) = _loss_contenders(quick)
    h.requires_grad_()
    w.requires_grad_()
    f = contenders[name]
    f(h, w, ids).backward()  # imports, compilation, first-backward setup: not counted
    h.grad = w.grad = None
    grown, method = peak_rss_growth(lambda: f(h, w, ids).backward())
    return {"peak": grown, "method": method}


def _memory(results: dict[str, Result], args) -> list[str]:
    if not any(name.startswith("cross-entropy") for name in results):
        return []
    lines = ["", "Peak memory of one forward+backward of the cross-entropy (growth of the peak RSS over the call, "
             "gradients of h and W included; a fresh process each):", "",
             "| contender | peak growth | / F.cross_entropy |", "|---|---:|---:|"]
    got = probe_contenders(__file__, list(_loss_contenders(True)[0]), args.quick)
    torch_peak = got["F.cross_entropy(h @ W.T, ids)"]["peak"]
    for name, found in got.items():
        lines.append(f"| `{name}` | {found['peak'] / 2**20:.1f} MiB | {found['peak'] / torch_peak:.3f} |")
        print(lines[-1], flush=True)
    return lines + ["", f"({found['method']}, `MALLOC_MMAP_THRESHOLD_=131072`)"]


TARGETS = [
    Target("token-logits", "einc", "torch.gather", 1.1, "token logits: einc ≤ 1.1x torch.gather"),
    Target("batch-gather", "einc", "torch.gather", 1.1, "batch gather: einc ≤ 1.1x torch.gather"),
    Target("embedding", "einc", "W[ids]", 1.1, "embedding: einc ≤ 1.1x W[ids]"),
    Target("cross-entropy", "einc, fused", "F.cross_entropy(h @ W.T, ids)", 1.3,
           "fused cross-entropy, forward: ≤ 1.3x F.cross_entropy"),
    Target("cross-entropy fwd+bwd", "einc, fused", "F.cross_entropy(h @ W.T, ids)", 1.3,
           "fused cross-entropy, forward+backward: ≤ 1.3x F.cross_entropy"),
]


def main(argv: Sequence[str] | None = None) -> int:
    quick = parse_args(argv).quick
    makers = [lambda: _token_case(quick), lambda: _batch_case(quick), lambda: _embedding_case(quick),
              lambda: _loss_case(quick, False), lambda: _loss_case(quick, True)]
    return script(argv, __doc__, makers, TARGETS, HEADING, [__doc__.split("\n\n", 2)[2].strip()], _memory, _probe)


if __name__ == "__main__":
    sys.exit(main())
