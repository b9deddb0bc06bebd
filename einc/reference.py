"""The plain-torch reference of a pattern, and the comparison ``validate`` makes.

The reference is computed the naive way, in float64 (complex128): torch.einsum for sums
of products, the broadcast form with torch.logsumexp/amax/amin for semirings, and
``x - logsumexp(x)`` for normalizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from . import ir
from .errors import EincError
from .planner import Program

__all__ = ["compare", "reference", "tolerance", "widen"]


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


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def reference(program: Program, tensors: Sequence[torch.Tensor], absolute: bool = False) -> torch.Tensor:
    """The pattern evaluated the plain way, in the tensors' (float64) dtype.

    Sums of products go through torch.einsum (which also broadcasts size-1 ellipsis
    dimensions); semirings through the naive broadcast form (combine by addition, then
    torch.logsumexp/amax/amin); normalizers as ``x - logsumexp(x)`` over the marked axes.
    A nested operation's reference is computed first and is an operand.  ``absolute``
    contracts absolute values (the error bound of a sum of products).
    """
    pattern = program.pattern
    sizes = dict(program.sizes)
    rank = sum(1 for a in sizes if a.startswith(ir.ELLIPSIS))
    nested = dict(program.nested)
    rest = iter(tensors)
    values: list[torch.Tensor] = []
    for index, operand in enumerate(pattern.inputs):
        if index in nested:
            inner = nested[index]
            values.append(reference(inner, [next(rest) for _ in range(inner.pattern.leaves)]))
        else:
            values.append(next(rest))
    if absolute:
        values = [t.abs() for t in values]
    operands: list[torch.Tensor] = []
    names: list[list[str]] = []
    for operand, tensor in zip(pattern.operands, values):
        own = tensor.dim() - (len(operand.dims) - operand.has_ellipsis)
        shape: list[int] = []
        axes: list[str] = []
        position = 0
        for dim in operand.dims:
            if dim == (ir.ELLIPSIS,):
                for j in range(own):
                    axes.append(ir.ellipsis_axis(rank - own + j))
                    shape.append(tensor.shape[position + j])
                position += own
            else:
                axes.extend(dim)
                shape.extend(sizes[a] for a in dim)
                position += 1
        operands.append(tensor.reshape(shape))
        names.append(axes)
    atoms = list(dict.fromkeys(a for axes in names for a in axes))
    if len(atoms) > len(_LETTERS):
        raise EincError(f"validate supports at most {len(_LETTERS)} distinct axes (torch.einsum's limit)")
    letter = dict(zip(atoms, _LETTERS))
    spell = lambda axes: "".join(letter[a] for a in axes)  # noqa: E731
    present = [a for a in program.output_axes if a in letter]
    if pattern.op in _SEMIRING_REDUCE or pattern.op == "prod":
        # Naive broadcast: every operand spread over all axes, combined, then reduced.
        full = None
        for tensor, axes in zip(operands, names):
            own = [a for a in atoms if a in axes]
            spread = torch.einsum(f"{spell(axes)}->{spell(own)}", tensor)
            spread = spread.reshape([spread.shape[own.index(a)] if a in own else 1 for a in atoms])
            full = spread if full is None else full + spread
        assert full is not None
        dims = [i for i, a in enumerate(atoms) if a not in present]
        if dims and pattern.op == "prod":
            for position in sorted(dims, reverse=True):
                full = full.prod(position)
        elif dims:
            full = _SEMIRING_REDUCE[pattern.op](full, dims)
        kept = [a for a in atoms if a in present]
        result = torch.einsum(f"{spell(kept)}->{spell(present)}", full)
    else:
        equation = ",".join(spell(axes) for axes in names) + "->" + spell(present)
        result = torch.einsum(equation, *operands)
    if len(present) != len(program.output_axes):
        result = result.reshape([sizes[a] if a in letter else 1 for a in program.output_axes])
        result = result.expand([sizes[a] for a in program.output_axes])
    if pattern.scale:
        result = result * abs(_scale_value(pattern.scale, sizes)) if absolute else result * _scale_value(
            pattern.scale, sizes)
    if pattern.op in ir.NORMALIZERS:
        marked = [i for i, a in enumerate(program.output_axes) if a in pattern.normalized]
        result = result - torch.logsumexp(result, marked, keepdim=True)
        if pattern.op == "softmax":
            result = result.exp()
    result = result.reshape(program.output_shape)
    if pattern.op == "mean":
        result = result / program.reduced_count
    return result


def _scale_value(factors: Sequence[ir.Factor], sizes: Mapping[str, int]) -> float:
    value = 1.0
    for factor in factors:
        number = float(factor.value if isinstance(factor.value, int) else sizes[factor.value])
        number = math.sqrt(number) if factor.sqrt else number
        value = value / number if factor.divide else value * number
    return value


_SEMIRING_REDUCE: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor]] = {
    "logsumexp": lambda x, dims: torch.logsumexp(x, dims),
    "max": lambda x, dims: torch.amax(x, dims),
    "min": lambda x, dims: torch.amin(x, dims),
}
