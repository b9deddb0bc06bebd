"""Token log-probabilities over a projection without the logits: the fused kernel of
``gather(log_softmax(h, w -> rows [v]), ids -> rows)``.

``log p[r] = h[r]·w[ids[r]] - logsumexp_v h[r]·w[v]`` is computed in chunks of rows,
each holding its ``rows x V`` logits within a budget (the expression's
``memory_limit``, else :data:`DEFAULT_BUDGET` elements), so the ``N x V`` logits never
exist.  Where gradients are wanted, each chunk also computes its share of the gradients
for an upstream gradient of ones, in the same pass (as Liger's fused linear
cross-entropy): ``onehot - softmax`` times ``w`` for ``h`` (``N x D``) and summed into
``w``'s (``V x D``).  Backward then scales them: exactly, for ``h`` (its gradient
separates by row), and for ``w`` where the upstream gradient is the same for every
row (a sum or mean of the log-probabilities: the loss); otherwise ``w``'s is computed
again in chunks.  Half floats compute in float32.

It is a torch custom op (``torch.ops.einc.linear_log_softmax_gather``) with its own
autograd, so TorchScript, eager code and ``torch.compile`` call it alike; it is
registered the first time a pattern lowers to it, not at import.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .dtypes import HALF
from .errors import EincError

__all__ = ["DEFAULT_BUDGET", "OP", "register", "token_logprobs"]

DEFAULT_BUDGET = 2**23
"""Elements of one chunk's logits without a ``memory_limit`` (32 MiB of float32)."""

OP = "torch.ops.einc.linear_log_softmax_gather"
"""How generated code calls the kernel."""


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _rows(budget: int, vocabulary: int) -> int:
    return max(1, budget // max(1, vocabulary))


def _shifted(logits: Tensor, lse: Tensor, ids: Tensor) -> Tensor:
    """``onehot(ids) - softmax`` of a chunk, in place of its logits: the gradient of each
    row's log-probability with respect to its logits."""
    probabilities = logits.sub_(lse[:, None]).exp_().neg_()
    return probabilities.scatter_add_(1, ids[:, None], torch.ones_like(probabilities[:, :1]))


def token_logprobs(h: Tensor, w: Tensor, ids: Tensor, budget: int, speculate: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p, the gradient of sum(log p) for h, ... for w)``: ``h`` (N, D), ``w`` (V, D),
    ``ids`` (N,) int64; the gradients only with ``speculate`` (else empty)."""
    wide = _wide(h.dtype)
    weights = w.to(wide)
    n, d = h.shape
    logp = torch.empty(n, dtype=wide, device=h.device)
    grad_h = torch.empty((n, d) if speculate else (0,), dtype=wide, device=h.device)
    grad_w = torch.zeros_like(weights) if speculate else weights.new_empty(0)
    rows = _rows(budget, w.shape[0])
    for start in range(0, n, rows):
        hidden = h[start:start + rows].to(wide)
        chosen = ids[start:start + rows]
        logits = hidden @ weights.T
        lse = torch.logsumexp(logits, 1)
        logp[start:start + rows] = logits.gather(1, chosen[:, None])[:, 0] - lse
        if speculate:
            shifted = _shifted(logits, lse, chosen)
            torch.mm(shifted, weights, out=grad_h[start:start + rows])
            grad_w.addmm_(shifted.T, hidden)
    return logp.to(h.dtype), grad_h, grad_w


def _weight_gradient(h: Tensor, w: Tensor, ids: Tensor, upstream: Tensor, budget: int) -> Tensor:
    """``w``'s gradient for a per-row upstream gradient, computed again in chunks."""
    wide = _wide(h.dtype)
    weights = w.to(wide)
    grad_w = torch.zeros_like(weights)
    rows = _rows(budget, w.shape[0])
    for start in range(0, h.shape[0], rows):
        hidden = h[start:start + rows].to(wide)
        chosen = ids[start:start + rows]
        logits = hidden @ weights.T
        shifted = _shifted(logits, torch.logsumexp(logits, 1), chosen)
        grad_w.addmm_(shifted.mul_(upstream[start:start + rows, None]).T, hidden)
    return grad_w


@functools.cache
def register() -> str:
    """Register the custom op (once); the name generated code calls."""

    @torch.library.custom_op("einc::linear_log_softmax_gather", mutates_args=())
    def kernel(h: Tensor, w: Tensor, ids: Tensor, budget: int, speculate: bool) -> tuple[Tensor, Tensor, Tensor]:
        return token_logprobs(h, w, ids, budget, speculate)

    @kernel.register_fake
    def _(h: Tensor, w: Tensor, ids: Tensor, budget: int, speculate: bool) -> tuple[Tensor, Tensor, Tensor]:
        wide = _wide(h.dtype)
        return (h.new_empty(h.shape[:1]), h.new_empty(h.shape if speculate else (0,), dtype=wide),
                w.new_empty(w.shape if speculate else (0,), dtype=wide))

    @torch.library.custom_op("einc::linear_log_softmax_gather_backward", mutates_args=())
    def gradients(h: Tensor, w: Tensor, ids: Tensor, grad_h: Tensor, grad_w: Tensor, upstream: Tensor,
                  budget: int) -> tuple[Tensor, Tensor]:
        # (An op of its own: its branch on the upstream gradient's values stays out of
        # torch.compile's graph.)
        upstream = upstream.to(_wide(h.dtype))
        if grad_h.numel() != h.numel():  # computed without gradients in mind: everything again
            _, grad_h, _ = token_logprobs(h, w, ids, budget, True)
            grad_w = _weight_gradient(h, w, ids, upstream, budget)
        elif upstream.numel() and bool((upstream == upstream[0]).all()):
            grad_w = grad_w * upstream[0]  # the usual loss: one upstream gradient for every row
        else:
            grad_w = _weight_gradient(h, w, ids, upstream, budget)
        return (grad_h * upstream[:, None]).to(h.dtype), grad_w.to(w.dtype)

    @gradients.register_fake
    def _(h: Tensor, w: Tensor, ids: Tensor, grad_h: Tensor, grad_w: Tensor, upstream: Tensor,
          budget: int) -> tuple[Tensor, Tensor]:
        return h.new_empty(h.shape), w.new_empty(w.shape)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        h, w, ids, budget, _ = inputs
        ctx.budget = budget
        # The gradients computed ahead take no gradient: autograd must not make zeros
        # of their size (W's, h's) for backward's arguments.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, w, ids, output[1], output[2])

    def backward(ctx: Any, upstream: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise EincError("the fused cross-entropy (gather of a log_softmax over a projection) has no double "
                            "backward (create_graph=True); compile with fuse=False for one")
        if upstream is None:  # (not materialized: no gradient reached the log-probabilities)
            return None, None, None, None, None
        h, w, ids, grad_h, grad_w = ctx.saved_tensors
        grad_h, grad_w = gradients(h, w, ids, grad_h, grad_w, upstream, ctx.budget)
        return grad_h, grad_w, None, None, None

    kernel.register_autograd(backward, setup_context=setup)
    return OP
