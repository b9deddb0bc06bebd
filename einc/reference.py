"""The plain-torch reference of a pattern, and the comparison ``validate`` makes.

The reference is computed the naive way, in float64 (complex128): torch.einsum for sums
of products, the broadcast form with torch.logsumexp/amax/amin for semirings, and
``x - logsumexp(x)`` for normalizers, advanced indexing for a gather.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from . import ir
from .errors import EincError

__all__ = ["compare", "letters", "reference", "tolerance", "widen", "LETTERS"]


def compare(result: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, *,
            rtol: float | None = None, atol: float | None = None) -> float:
    """Max abs error of ``result`` against ``reference``; :class:`EincError` (saying how
    the result is off) beyond
    ``atol + rtol * bound`` per element or where inf/NaN entries differ.  ``rtol``/``atol``
    default to :func:`tolerance` of ``dtype``."""
    default_rtol, default_atol = tolerance(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if result.shape != reference.shape:
        raise EincError(f"has shape {list(result.shape)} but the reference has {list(reference.shape)}")
    if result.numel() == 0:
        return 0.0
    result = result.to(reference.dtype)
    finite = torch.isfinite(reference)
    # inf and NaN entries must agree exactly; finite ones within the bound.
    if not bool((torch.isnan(result) == torch.isnan(reference)).all()) or not bool(
        (result[torch.isinf(reference)] == reference[torch.isinf(reference)]).all()
    ):
        raise EincError("disagrees with the reference on inf/NaN entries")
    error = (result - reference).abs()[finite]
    worst = float(error.max()) if error.numel() else 0.0
    if bool((error > atol + rtol * bound.abs()[finite]).any()):
        raise EincError(f"differs from the float64 reference by up to {worst:.3g} (rtol={rtol}, atol={atol})")
    return worst


def widen(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """Default ``(rtol, atol)`` of :meth:`Expression.validate` for inputs of ``dtype``."""
    if dtype in (torch.float16,):
        return 1e-2, 1e-3
    if dtype in (torch.bfloat16,):
        return 4e-2, 1e-2
    if dtype in (torch.float32, torch.complex64):
        return 1e-5, 1e-6
    return 1e-10, 1e-12


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The letters torch.einsum takes for axes (at most 52 distinct ones)."""


def letters(axes: Sequence[str]) -> dict[str, str]:
    """A torch.einsum letter for each distinct axis, in order of appearance.

    >>> letters(["b", "h", "b", "q"])
    {'b': 'a', 'h': 'b', 'q': 'c'}
    """
    distinct = list(dict.fromkeys(axes))
    if len(distinct) > len(LETTERS):
        raise EincError(f"validate supports at most {len(LETTERS)} distinct axes (torch.einsum's limit)")
    return dict(zip(distinct, LETTERS))


def reference(pattern: ir.Pattern, tensors: Sequence[torch.Tensor], sizes: Mapping[str, int],
              absolute: bool = False) -> torch.Tensor:
    """``pattern`` evaluated the plain way on ``tensors`` (with keyword ``sizes``), in the
    tensors' dtype: what einc's result must equal, computed from the pattern and the
    tensors alone (no plan).

    Sums of products go through torch.einsum (which broadcasts size-1 ellipsis
    dimensions and takes diagonals); semirings through the naive broadcast form
    (combine by addition, then torch.logsumexp/amax/amin); normalizers as
    ``x - logsumexp(x)`` over the bracketed axes.  A nested operation's reference is
    computed first and is an operand.  ``absolute`` contracts absolute values (the
    error bound of a sum of products).

    >>> from einc.parser import parse
    >>> a, b = torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    >>> reference(parse("i j, j k -> i (k 2)"), [a, b], {})[0, :3]
    tensor([3., 3., 3.], dtype=torch.float64)
    """
    table = {**sizes, **{a: n for a in pattern.all_axes if (n := ir.anonymous_size(a)) is not None}}
    rest = iter(tensors)
    # Plain axes of every tensor first: a nested level may need one another level has.
    for axes, tensor in zip(pattern.leaf_lists(), tensors):
        for dim, start, _ in axes.spans(tensor.dim()):
            if len(dim) == 1 and dim != (ir.ELLIPSIS,):
                table.setdefault(dim[0], tensor.shape[start])
    return _level(pattern, rest, table, absolute)


def _split(axes: ir.AxisList, tensor: torch.Tensor, table: dict[str, int]) -> tuple[torch.Tensor, list[str]]:
    """``tensor`` with its compositions split and unit dimensions dropped; its axes, the
    ellipsis dimensions as ``"..."`` each.  Sizes of composed axes missing from
    ``table`` are learned into it."""
    spans = axes.spans(tensor.dim())
    groups = [(dim, tensor.shape[start]) for dim, start, _ in spans if len(dim) > 1]
    while any(a not in table for dim, _ in groups for a in dim):
        learned = len(table)
        for dim, extent in groups:
            unknown = [a for a in dim if a not in table]
            if len(unknown) == 1:
                known = math.prod(table[a] for a in dim if a in table)
                table[unknown[0]] = extent // known if known else 0
        if len(table) == learned:
            missing = sorted({a for dim, _ in groups for a in dim if a not in table})
            raise EincError(f"the reference cannot split a composition: give the size of "
                            f"{', '.join(map(repr, missing))} by keyword")
    shape: list[int] = []
    names: list[str] = []
    for dim, start, count in spans:
        if dim == (ir.ELLIPSIS,):
            shape.extend(tensor.shape[start:start + count])
            names.extend([ir.ELLIPSIS] * count)
        else:
            shape.extend(table[a] for a in dim)
            names.extend(dim)
    return tensor.reshape(shape), names


def _level(pattern: ir.Pattern, tensors: Iterator[torch.Tensor], table: dict[str, int],
           absolute: bool) -> torch.Tensor:
    values = [_level(x, tensors, table, False) if isinstance(x, ir.Pattern) else next(tensors)
              for x in pattern.inputs]
    modifying = [next(tensors) for _ in pattern.tensor_modifiers]
    if pattern.op == "gather":
        return _gathered(pattern, [v.abs() if absolute and i == 0 else v for i, v in enumerate(values)], table)
    if absolute:
        values = [t.abs() for t in values]
    split = [_split(axes, t, table) for axes, t in zip(pattern.operands, values)]
    rank = max([names.count(ir.ELLIPSIS) for _, names in split], default=0)
    ellipsis = [f"{ir.ELLIPSIS}{i}" for i in range(rank)]
    # Ellipsis dimensions right-aligned, as torch broadcasts them.
    operands = [(t, [ellipsis[rank - names.count(ir.ELLIPSIS) + names[:i].count(ir.ELLIPSIS)]
                     if a == ir.ELLIPSIS else a for i, a in enumerate(names)]) for t, names in split]
    output = pattern.output
    kept_ellipsis = ellipsis if output.has_ellipsis else []
    out_atoms: list[str] = []
    for dim in output.dims:
        for a in dim:
            out_atoms.extend(kept_ellipsis if a in (ir.ELLIPSIS, ir.MERGED_ELLIPSIS) else [a])
    present = [a for a in out_atoms if any(a in names for _, names in operands)]
    result = _combine(pattern.op, operands, present)
    # New axes: broadcast (einops.repeat), then the scale, the normalizer, the layout.
    result = result.reshape([_size(a, table, operands) if a in present else 1 for a in out_atoms])
    result = result.expand([_size(a, table, operands) for a in out_atoms])
    for factor in pattern.scale:  # on the tensor: a zero divisor is IEEE, as x / 0
        number = factor.value if isinstance(factor.value, int) else table[factor.value]
        number = math.sqrt(number) if factor.sqrt else number
        result = result / number if factor.divide else result * number
    if pattern.op in ir.NORMALIZERS:
        marked = [i for i, a in enumerate(out_atoms) if a in pattern.normalized]
        if pattern.modifiers:
            result = _modified(pattern, result, out_atoms, modifying, table)
            # A row whose logits are all -inf (masked out) normalizes to zeros, as SDPA's.
            dead = result == float("-inf")
            for dim in marked:
                dead = dead.all(dim, keepdim=True)
            result = result.masked_fill(dead, 0.0)
        result = result - torch.logsumexp(result, marked, keepdim=True)
        if pattern.op == "softmax":
            result = result.exp()
        if pattern.modifiers:
            result = result.masked_fill(dead, 0.0 if pattern.op == "softmax" else float("-inf"))
    shape = []
    for dim in output.dims:
        atoms = [x for a in dim for x in (kept_ellipsis if a in (ir.ELLIPSIS, ir.MERGED_ELLIPSIS) else [a])]
        sizes = [_size(a, table, operands) for a in atoms]
        shape.extend(sizes if dim == (ir.ELLIPSIS,) else [math.prod(sizes)])
    result = result.reshape(shape)
    if pattern.op == "mean":
        everything = {a: _size(a, table, operands) for _, names in operands for a in names}
        result = result / math.prod(n for a, n in everything.items() if a not in out_atoms)
    return result


def _gathered(pattern: ir.Pattern, values: Sequence[torch.Tensor], table: dict[str, int]) -> torch.Tensor:
    """A gather by advanced indexing: the data indexed along each of its dimensions by a
    tensor over the output's axes (its index tensor for an indexed axis, ``arange`` for
    the others), broadcast by name."""
    data, names = _split(pattern.operands[0], values[0], table)
    out_atoms = [a for dim in pattern.output.dims for a in dim]

    def laid(t: torch.Tensor, axes: list[str]) -> torch.Tensor:
        present = [a for a in out_atoms if a in axes]
        t = t.permute([axes.index(a) for a in present])
        return t.reshape([t.shape[present.index(a)] if a in axes else 1 for a in out_atoms])

    indices = iter(_split(axes, t, table) for axes, t in zip(pattern.operands[1:], values[1:]))
    picks = []
    for position, axis in enumerate(names):
        if axis in pattern.indexed:
            index, axes = next(indices)
            picks.append(laid(index.long(), axes))
        else:
            picks.append(laid(torch.arange(data.shape[position], device=data.device), [axis]))
    result = data[tuple(picks)].expand([table[a] for a in out_atoms])
    return result.reshape([math.prod(table[a] for a in dim) for dim in pattern.output.dims])


def _modified(pattern: ir.Pattern, logits: torch.Tensor, atoms: list[str], tensors: Sequence[torch.Tensor],
              table: Mapping[str, int]) -> torch.Tensor:
    """The logits with the pattern's bias added and its masks applied (-inf where not attended)."""
    def spread(tensor: torch.Tensor, axes: Sequence[str]) -> torch.Tensor:
        order = [a for a in atoms if a in axes]
        moved = tensor.permute([list(axes).index(a) for a in order])
        return moved.reshape([table[a] if a in axes else 1 for a in atoms])

    allowed = torch.ones((), dtype=torch.bool, device=logits.device)
    for modifier, tensor in zip(pattern.tensor_modifiers, tensors):
        if modifier.kind == "bias":
            logits = logits + spread(tensor, modifier.axes)
        else:
            allowed = allowed & spread(tensor, modifier.axes)
    lower_right = any(m.kind == "causal_lower_right" for m in pattern.modifiers)
    for modifier in pattern.modifiers:
        if modifier.tensor:
            continue
        q, k = modifier.axes
        i = spread(torch.arange(table[q], device=logits.device), (q,))
        j = spread(torch.arange(table[k], device=logits.device), (k,))
        if lower_right:
            i = i + (table[k] - table[q])  # the queries are the last positions
        if modifier.kind == "window":
            allowed = allowed & (i - j >= 0) & (i - j < modifier.size)
        else:
            allowed = allowed & (j <= i)
    return logits.masked_fill(~allowed, float("-inf"))


def _size(axis: str, table: Mapping[str, int], operands: Sequence[tuple[torch.Tensor, list[str]]]) -> int:
    """An axis's size: the table's, or (an ellipsis dimension) the broadcast of the tensors'."""
    if axis in table and not axis.startswith(ir.ELLIPSIS):
        return table[axis]
    extents = [t.shape[names.index(axis)] for t, names in operands if axis in names]
    return max(extents, default=1) if 0 not in extents else 0


def _combine(op: str | None, operands: Sequence[tuple[torch.Tensor, list[str]]], present: list[str]) -> torch.Tensor:
    """The contraction of ``operands`` to the ``present`` output axes, in that order."""
    spell = letters([a for _, names in operands for a in names] + present)
    if op not in _SEMIRING_REDUCE and op != "prod":
        equation = ",".join("".join(spell[a] for a in names) for _, names in operands)
        return torch.einsum(f"{equation}->{''.join(spell[a] for a in present)}", *[t for t, _ in operands])
    # Naive broadcast: every operand spread over all axes, combined by addition, reduced.
    atoms = list(dict.fromkeys(a for _, names in operands for a in names))
    full = None
    for tensor, names in operands:
        own = [a for a in atoms if a in names]
        spread = torch.einsum(f"{''.join(spell[a] for a in names)}->{''.join(spell[a] for a in own)}", tensor)
        spread = spread.reshape([spread.shape[own.index(a)] if a in own else 1 for a in atoms])
        full = spread if full is None else full + spread
    assert full is not None
    dims = [i for i, a in enumerate(atoms) if a not in present]
    if dims and op == "prod":
        for position in sorted(dims, reverse=True):
            full = full.prod(position)
    elif dims:
        full = _SEMIRING_REDUCE[op](full, dims)  # type: ignore[index]
    kept = [a for a in atoms if a in present]
    return torch.einsum(f"{''.join(spell[a] for a in kept)}->{''.join(spell[a] for a in present)}", full)


_SEMIRING_REDUCE: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor]] = {
    "logsumexp": lambda x, dims: torch.logsumexp(x, dims),
    "max": lambda x, dims: torch.amax(x, dims),
    "min": lambda x, dims: torch.amin(x, dims),
}
