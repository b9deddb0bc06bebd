"""IR -> IR-level optimisations: patterns that one fused torch kernel computes.

Today one rewrite: attention.  ``softmax(Q, K -> ... [k] * scale), V -> out`` is
``torch.nn.functional.scaled_dot_product_attention`` once each axis is given its
role (batch, query, key, head, value), whatever the axes are called and however the
operands spell them (compositions, unit axes, any order).  :func:`attention` finds
the roles or says the pattern does not fit; codegen then emits the SDPA call with
permutes/reshapes around it, and the plain lowering otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ir

__all__ = ["Attention", "attention", "fusions", "refusal", "PASSES"]


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
        if not nested or attention(level) is not None:
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


PASSES: dict[str, Callable[[ir.Pattern], Attention | None]] = {"attention": attention}
"""The rewrite passes, by name: each looks at one level of a pattern and says what
fused kernel computes it, or ``None``.  (Slicing and masking passes come next.)"""


def fusions(pattern: ir.Pattern) -> dict[ir.Pattern, Attention]:
    """Every level of ``pattern`` (nested ones included) that a pass fuses, with what
    the pass found; the planner decides per signature whether the fusion applies (an
    empty axis or integer tensors keep the plain lowering).

    >>> from einc.parser import parse
    >>> found = fusions(parse("softmax(b q d, b k d -> b q [k]), b k e -> b q e"))
    >>> [roles.key for roles in found.values()]
    [('k',)]
    """
    found: dict[ir.Pattern, Attention] = {}
    for level in (x for x in pattern.inputs if isinstance(x, ir.Pattern)):
        found.update(fusions(level))
    for run in PASSES.values():
        result = run(pattern)
        if result is not None:
            found[pattern] = result
            break
    return found
