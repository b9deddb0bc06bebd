"""Token log-probabilities over a projection without the logits: the fused kernel of
``gather(log_softmax(h, w -> rows [v]), ids -> rows)``.

``log p[r] = h[r]·w[ids[r]] - logsumexp_v h[r]·w[v]`` is computed in chunks of rows,
each holding its ``rows x V`` logits within a budget (the expression's
``memory_limit``, else :data:`DEFAULT_BUDGET` elements), so the ``N x V`` logits never
exist; where not even one row of ``V`` logits fits, a chunk's rows meet the vocabulary
in blocks (the log-partition online, as Cut Cross-Entropy does, the chosen logit as a
dot product with the chosen rows of ``w``, the gradients in a second pass).

Where gradients are wanted, each chunk also computes its share of the gradients for an
upstream gradient of ones, in the same pass (as Liger's fused linear cross-entropy):
``onehot - softmax`` times ``w`` for ``h`` (``N x D``) and summed into ``w``'s
(``V x D``).  Backward then scales them: exactly, for ``h`` (its gradient
separates by row), and for ``w`` where the upstream gradient is the same for every
row (a sum or mean of the log-probabilities: the loss); otherwise ``w``'s is computed
again in chunks.  Half floats compute in float32.

It is a torch custom op (``torch.ops.einc.linear_log_softmax_gather``) with its own
autograd, so TorchScript, eager code and ``torch.compile`` call it alike; it is
registered the first time a pattern lowers to it, not at import.
"""

from __future__ import annotations

import functools
import math
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


def _blocks(budget: int, n: int, vocabulary: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary entries per block) whose logits fit ``budget``: the whole
    vocabulary against as many rows as fit; where not even one row does, about
    sqrt(budget) rows against blocks of the vocabulary."""
    if vocabulary <= budget:
        return max(1, min(n, budget // max(1, vocabulary))), vocabulary
    rows = max(1, min(n, math.isqrt(budget)))
    return rows, max(1, budget // rows)


def _shifted(logits: Tensor, lse: Tensor, ids: Tensor, first: int) -> Tensor:
    """``onehot(ids) - softmax`` over vocabulary entries ``first..`` (a block's logits,
    overwritten): the gradient of each row's log-probability with respect to them."""
    shifted = logits.sub_(lse[:, None]).exp_().neg_()
    inside = (ids >= first) & (ids < first + shifted.shape[1])
    where = (ids - first).clamp(0, max(0, shifted.shape[1] - 1))[:, None]
    return shifted.scatter_add_(1, where, inside[:, None].to(shifted.dtype))


def _log_partition(hidden: Tensor, weights: Tensor, block: int) -> tuple[Tensor, Tensor | None]:
    """logsumexp over the vocabulary of ``hidden @ weights.T``, and those logits where one
    block holds the whole vocabulary (they serve the gradients too); else block by
    block, online."""
    if block >= weights.shape[0]:
        logits = hidden @ weights.T
        return torch.logsumexp(logits, 1), logits
    lse = torch.full(hidden.shape[:1], float("-inf"), dtype=hidden.dtype, device=hidden.device)
    for first in range(0, weights.shape[0], block):
        lse = torch.logaddexp(lse, torch.logsumexp(hidden @ weights[first:first + block].T, 1))
    return lse, None


def _backward_chunk(hidden: Tensor, weights: Tensor, chosen: Tensor, lse: Tensor, logits: Tensor | None, block: int,
                    upstream: Tensor | None, grad_h: Tensor | None, grad_w: Tensor | None) -> None:
    """One chunk of rows' share of the gradients (``upstream`` per row, or ones): into
    ``grad_h`` (the chunk's rows, zeroed) and summed into ``grad_w``, each where given;
    from ``logits`` (the whole vocabulary's, overwritten) where given, else block by block."""
    for first in range(0, weights.shape[0], block):
        part = weights[first:first + block]
        shifted = _shifted(logits if logits is not None else hidden @ part.T, lse, chosen, first)
        if upstream is not None:
            shifted.mul_(upstream[:, None])
        if grad_h is not None:
            grad_h.addmm_(shifted, part)
        if grad_w is not None:
            grad_w[first:first + block].addmm_(shifted.T, hidden)


def token_logprobs(h: Tensor, w: Tensor, ids: Tensor, budget: int, want_h: bool, want_w: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p, the gradient of sum(log p) for h, ... for w)``: ``h`` (N, D), ``w`` (V, D),
    ``ids`` (N,) int64; each gradient only where wanted (else empty)."""
    wide = _wide(h.dtype)
    weights = w.to(wide)
    n, d = h.shape
    logp = torch.empty(n, dtype=wide, device=h.device)
    grad_h = torch.zeros((n, d) if want_h else (0,), dtype=wide, device=h.device)
    grad_w = torch.zeros_like(weights) if want_w else weights.new_empty(0)
    rows, block = _blocks(budget, n, w.shape[0])
    for start in range(0, n, rows):
        hidden = h[start:start + rows].to(wide)
        chosen = ids[start:start + rows]
        lse, logits = _log_partition(hidden, weights, block)
        # The chosen logit: read off the logits, or (vocabulary blocks) a dot product
        # with the chosen rows of w.
        picked = logits.gather(1, chosen[:, None])[:, 0] if logits is not None else \
            (hidden * weights.index_select(0, chosen)).sum(1)
        logp[start:start + rows] = picked - lse
        if want_h or want_w:
            _backward_chunk(hidden, weights, chosen, lse, logits, block, None,
                            grad_h[start:start + rows] if want_h else None, grad_w if want_w else None)
    return logp.to(h.dtype), grad_h, grad_w


def _weight_gradient(h: Tensor, w: Tensor, ids: Tensor, upstream: Tensor, budget: int) -> Tensor:
    """``w``'s gradient for a per-row upstream gradient, computed again in chunks."""
    wide = _wide(h.dtype)
    weights = w.to(wide)
    grad_w = torch.zeros_like(weights)
    rows, block = _blocks(budget, h.shape[0], w.shape[0])
    for start in range(0, h.shape[0], rows):
        hidden = h[start:start + rows].to(wide)
        lse, logits = _log_partition(hidden, weights, block)
        _backward_chunk(hidden, weights, ids[start:start + rows], lse, logits, block, upstream[start:start + rows],
                        None, grad_w)
    return grad_w


@functools.cache
def register() -> str:
    """Register the custom op (once); the name generated code calls."""

    @torch.library.custom_op("einc::linear_log_softmax_gather", mutates_args=())
    def kernel(h: Tensor, w: Tensor, ids: Tensor, budget: int, want_h: bool, want_w: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        return token_logprobs(h, w, ids, budget, want_h, want_w)

    @kernel.register_fake
    def _(h: Tensor, w: Tensor, ids: Tensor, budget: int, want_h: bool, want_w: bool
          ) -> tuple[Tensor, Tensor, Tensor]:
        wide = _wide(h.dtype)
        return (h.new_empty(h.shape[:1]), h.new_empty(h.shape if want_h else (0,), dtype=wide),
                w.new_empty(w.shape if want_w else (0,), dtype=wide))

    @torch.library.custom_op("einc::linear_log_softmax_gather_backward", mutates_args=())
    def gradients(h: Tensor, w: Tensor, ids: Tensor, grad_h: Tensor, grad_w: Tensor, upstream: Tensor,
                  budget: int, need_h: bool, need_w: bool) -> tuple[Tensor, Tensor]:
        # (An op of its own: its branch on the upstream gradient's values stays out of
        # torch.compile's graph.)
        upstream = upstream.to(_wide(h.dtype))
        out_h, out_w = h.new_empty(0), w.new_empty(0)
        if need_h:
            if grad_h.numel() != h.numel():  # not computed ahead (gradients were not wanted then)
                grad_h = token_logprobs(h, w, ids, budget, True, False)[1]
            out_h = (grad_h * upstream[:, None]).to(h.dtype)
        if need_w:
            if grad_w.numel() == w.numel() and upstream.numel() and bool((upstream == upstream[0]).all()):
                grad_w = grad_w * upstream[0]  # the usual loss: one upstream gradient for every row
            else:
                grad_w = _weight_gradient(h, w, ids, upstream, budget)
            out_w = grad_w.to(w.dtype)
        return out_h, out_w

    @gradients.register_fake
    def _(h: Tensor, w: Tensor, ids: Tensor, grad_h: Tensor, grad_w: Tensor, upstream: Tensor,
          budget: int, need_h: bool, need_w: bool) -> tuple[Tensor, Tensor]:
        return h.new_empty(h.shape if need_h else (0,)), w.new_empty(w.shape if need_w else (0,))

    def setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        h, w, ids, budget, _, _ = inputs
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
            return None, None, None, None, None, None
        h, w, ids, grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h, grad_w = gradients(h, w, ids, grad_h, grad_w, upstream, ctx.budget, need_h, need_w)
        return grad_h if need_h else None, grad_w if need_w else None, None, None, None, None

    kernel.register_autograd(backward, setup_context=setup)
    return OP
