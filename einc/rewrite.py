"""IR -> IR-level optimisations: patterns that one fused kernel computes.

Two rewrites.  Attention: ``softmax(Q, K -> ... [k] * scale), V -> out`` is
``torch.nn.functional.scaled_dot_product_attention`` once each axis is given its
role (batch, query, key, head, value), whatever the axes are called and however the
operands spell them (compositions, unit axes, any order).  Cross-entropy:
``gather(log_softmax(h, w -> rows [v]), ids -> rows)`` (token log-probabilities over a
projection) is :mod:`einc.crossentropy`'s kernel, which never holds the logits.  Each
pass finds the roles or says the pattern does not fit; codegen then emits the fused
call with permutes/reshapes around it, and the plain lowering otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ir

__all__ = ["Attention", "CrossEntropy", "Fusion", "attention", "cross_entropy", "fusions", "refusal", "PASSES"]


@dataclass(frozen=True, slots=True)
class Attention:
    """The roles of the axes of an attention pattern, SDPA's ``(N..., L, E)`` layout.

    ``out[batch, query, value] = sum_key softmax_key(scale * sum_head q*k) * v``.
    """

    batch: tuple[str, ...]
    """Axes of q, k, v and the output (SDPA's leading dimensions)."""
    query: tuple[str, ...]
    """Axes of q and the output only: merged into SDPA's L."""
    key: tuple[str, ...]
    """The normalized axes, of k and v: merged into S, summed over."""
    head: tuple[str, ...]
    """Axes of q and k contracted inside the softmax: merged into E."""
    value: tuple[str, ...]
    """Axes of v and the output only: merged into Ev."""
    q: int
    k: int
    v: int
    """Positions of the three tensors among the pattern's operands."""
    scale: tuple[ir.Factor, ...]

    bounded = False
    """A ``memory_limit`` counts the unfused intermediates (SDPA may fall back to a
    kernel that makes them)."""
    transforms = True
    """torch.func transforms (vmap, grad, jvp) run SDPA."""


@dataclass(frozen=True, slots=True)
class CrossEntropy:
    """The roles of the axes of ``gather(log_softmax(h, w -> rows [vocab]), ids -> rows)``:
    ``out[rows] = h[rows]·w[ids[rows]] - logsumexp_vocab h[rows]·w[vocab]``."""

    rows: tuple[str, ...]
    """Axes of h, the index and the output (flattened into the kernel's N)."""
    vocab: str
    """The normalized and indexed axis, of w."""
    hidden: tuple[str, ...]
    """Axes of h and w, contracted (the kernel's D)."""
    h: int
    w: int
    """Positions of h and w among the log_softmax's operands."""

    bounded = True
    """The kernel keeps its own workspace within the memory budget (the unfused
    intermediates never exist, so a ``memory_limit`` does not count them)."""
    transforms = False
    """A custom op with its own autograd: torch.func's grad cannot run it (the plain
    lowering runs under transforms)."""


Fusion = Attention | CrossEntropy
"""What a rewrite pass found: the roles one fused kernel takes."""


def _plain(axes: ir.AxisList) -> bool:
    # Compositions and units are fine (the operand's preparation splits/drops them);
    # diagonals and the broadcast ellipsis are not attention.
    return not axes.has_ellipsis and len(set(axes.axes)) == len(axes.axes)


def attention(pattern: ir.Pattern) -> Attention | None:
    """The attention roles of ``pattern``, or ``None`` where it is not SDPA's computation.

    >>> from einc.parser import parse
    >>> roles = attention(parse("softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h e) -> b q (h e)"))
    >>> roles.batch, roles.query, roles.key, roles.head, roles.value
    (('b', 'h'), ('q',), ('k',), ('d',), ('e',))
    >>> attention(parse("log_softmax(b q d, b k d -> b q [k]), b k e -> b q e")) is None
    True
    """
    shape = _shape(pattern)
    if shape is None:
        return None
    inner, v_axes, inner_first = shape
    a, b = inner.operands
    key = set(inner.normalized)
    # k is the operand holding the normalized axes; q the other.
    if key <= set(b.axes) and not key & set(a.axes):
        q_axes, k_axes, q_first = a, b, True
    elif key <= set(a.axes) and not key & set(b.axes):
        q_axes, k_axes, q_first = b, a, False
    else:
        return None
    qs, ks, vs = set(q_axes.axes), set(k_axes.axes), set(v_axes.axes)
    scores, out = set(inner.output.axes), set(pattern.output.axes)
    head, batch, query, value = (qs & ks) - scores, qs & ks & scores, qs - ks, vs - (qs & ks & scores) - key
    fits = (head and ks - qs == key and query <= scores and scores == batch | query | key
            and batch | key <= vs and not query & vs and out == batch | query | value)
    if not fits:
        return None
    in_order = lambda axes: tuple(x for x in inner.output.axes if x in axes)  # noqa: E731
    first_leaf = 0 if inner_first else 1  # the softmax's two tensors, then v (or v first)
    return Attention(
        batch=in_order(batch),
        query=in_order(query),
        key=in_order(key),
        head=tuple(x for x in q_axes.axes if x in head),
        value=tuple(x for x in v_axes.axes if x in value),
        q=first_leaf + (0 if q_first else 1),
        k=first_leaf + (1 if q_first else 0),
        v=2 if inner_first else 0,
        scale=inner.scale,
    )


def cross_entropy(pattern: ir.Pattern) -> CrossEntropy | None:
    """The roles of token log-probabilities over a projection, or ``None``: a gather of a
    log_softmax of two plain operands (h: rows and hidden axes; w: the vocabulary and
    the hidden axes, no row: one projection for every row) along its normalized axis,
    by an index over exactly the rows.

    >>> from einc.parser import parse
    >>> cross_entropy(parse("gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)"))
    CrossEntropy(rows=('b', 't'), vocab='v', hidden=('d',), h=0, w=1)
    >>> cross_entropy(parse("gather(softmax(b t d, v d -> b t [v]), b t -> b t)")) is None
    True
    """
    if pattern.op != "gather" or len(pattern.inputs) != 2 or not isinstance(pattern.inputs[0], ir.Pattern):
        return None
    inner, index = pattern.inputs
    if (inner.op != "log_softmax" or len(inner.normalized) != 1 or inner.modifiers or inner.scale or inner.nested
            or len(inner.inputs) != 2 or pattern.indexed != inner.normalized):
        return None
    if not all(_plain(x) for x in (*inner.operands, inner.output, index, pattern.output)):
        return None
    (vocab,) = inner.normalized
    first, second = inner.operands
    h, w = (0, 1) if vocab in second.axes else (1, 0)
    h_axes, w_axes = set(inner.operands[h].axes), set(inner.operands[w].axes)
    hidden = h_axes & w_axes
    rows = set(index.axes)
    if not hidden or hidden & rows or vocab in h_axes or w_axes != hidden | {vocab} or h_axes != rows | hidden \
            or set(inner.output.axes) != rows | {vocab}:
        return None
    return CrossEntropy(tuple(index.axes), vocab, tuple(a for a in inner.operands[h].axes if a in hidden), h, w)


def _shape(pattern: ir.Pattern) -> tuple[ir.Pattern, ir.AxisList, bool] | None:
    """(softmax, v's axes, softmax first) where ``pattern`` is a plain sum of a softmax of
    two plain operands and a plain operand v; else ``None``."""
    if pattern.op not in (None, "sum") or pattern.scale or len(pattern.inputs) != 2:
        return None
    first, second = pattern.inputs
    if isinstance(first, ir.Pattern) and isinstance(second, ir.AxisList):
        inner, v_axes, inner_first = first, second, True
    elif isinstance(second, ir.Pattern) and isinstance(first, ir.AxisList):
        inner, v_axes, inner_first = second, first, False
    else:
        return None
    if inner.op != "softmax" or len(inner.inputs) != 2 or inner.nested:
        return None
    if not all(_plain(x) for x in (*inner.operands, v_axes, inner.output, pattern.output)):
        return None
    return inner, v_axes, inner_first


def refusal(pattern: ir.Pattern) -> str:
    """Why the attention rewrite does not take a level of ``pattern`` that holds a nested
    softmax or log_softmax (what ``explain`` reports), or ``""`` where it does or where
    nothing looks like attention.

    >>> from einc.parser import parse
    >>> refusal(parse("log_softmax(b q d, b k d -> b q [k]), b k e -> b q e"))
    'log_softmax: SDPA computes a softmax'
    """
    for level in pattern.levels():
        nested = [x for x in level.inputs if isinstance(x, ir.Pattern) and x.op in ir.NORMALIZERS]
        if not nested or attention(level) is not None or level.op == "gather":  # (a gather is not attention)
            continue
        inner = nested[0]
        reasons = [
            (inner.op != "softmax", f"{inner.op}: SDPA computes a softmax"),
            (level.op not in (None, "sum"), f"the outer operation is {level.op}, not a sum of products"),
            (bool(level.scale), "the outer contraction has a scale (SDPA scales the logits only)"),
            (len(level.inputs) != 2, f"the outer contraction has {len(level.inputs)} operands, not softmax and v"),
            (len(inner.inputs) != 2 or inner.nested, "the softmax is not of two plain operands (q and k)"),
            (any(x.has_ellipsis or len(set(x.axes)) != len(x.axes) for x in (*inner.operands, *level.operands)),
             "an operand has '...' or a repeated axis"),
        ]
        found = next((why for broken, why in reasons if broken), None)
        return found or ("the axes do not take SDPA's roles: batch axes in q, k, v and the output, "
                         "the head summed inside the softmax, the keys normalized and summed outside")
    return ""


PASSES: dict[str, Callable[[ir.Pattern], Fusion | None]] = {"attention": attention, "cross_entropy": cross_entropy}
"""The rewrite passes, by name: each looks at one level of a pattern and says what
fused kernel computes it, or ``None``."""


def fusions(pattern: ir.Pattern) -> dict[ir.Pattern, Fusion]:
    """Every level of ``pattern`` (nested ones included) that a pass fuses, with what
    the pass found; the planner decides per signature whether the fusion applies (an
    empty axis or integer tensors keep the plain lowering).

    >>> from einc.parser import parse
    >>> found = fusions(parse("softmax(b q d, b k d -> b q [k]), b k e -> b q e"))
    >>> [roles.key for roles in found.values()]
    [('k',)]
    """
    found: dict[ir.Pattern, Fusion] = {}
    for level in (x for x in pattern.inputs if isinstance(x, ir.Pattern)):
        found.update(fusions(level))
    for run in PASSES.values():
        result = run(pattern)
        if result is not None:
            found[pattern] = result
            break
    return found
