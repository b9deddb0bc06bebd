"""Dtype rules: how mixed operands promote, what each operation computes in and returns.

- Operands of different dtypes meet in torch's promoted dtype (``torch.promote_types``,
  as ``a * b``).
- Reductions, semirings and normalizers of half floats compute in float32 (as
  torch.softmax does inside) and return the half dtype.
- Sums of integers and bools (a contraction, or a ``sum``/``mean``/``prod`` reduction)
  compute in int64, as torch.sum does; ``mean`` and fractional scales then give
  torch's default float.  Everything else keeps the operands' dtype.

Generated code applies these rules; shape-generic code applies them at run time
(``einc_computed`` in :mod:`einc._runtime`, written from this module's tables).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import ir
from .errors import EincError
from .sizes import show_axis

__all__ = ["HALF", "INTEGRAL", "COMPLEX", "promoted", "dtype_of", "refusals", "refusal", "check", "sums", "computed",
           "result", "name"]

HALF = (torch.float16, torch.bfloat16)
INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
            torch.uint64)
"""Every dtype that is neither floating nor complex (torch.sum of any of them gives int64)."""
COMPLEX = (torch.complex32, torch.complex64, torch.complex128)

_SUMMING = (None, "sum", "mean", "prod", "softmax", "log_softmax")
"""Operations whose reduction adds (or multiplies) numbers up."""
_NEEDS_FLOAT = ("logsumexp", "softmax", "log_softmax")
_SEMIRINGS = ("logsumexp", "max", "min")

_NAMES = {str(t).removeprefix("torch."): t for t in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}


def promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The common dtype of operands, by torch's type promotion (as ``a * b``).

    >>> promoted([torch.float32, torch.complex64, torch.int64])
    torch.complex64
    """
    return functools.reduce(torch.promote_types, dtypes)


def dtype_of(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A torch dtype given as itself or by name (``"float32"``)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _NAMES:
        return _NAMES[value.removeprefix("torch.")]
    raise EincError(f"{what} must be a torch.dtype or one of {', '.join(map(repr, _NAMES))}, not {value!r}")


def refusals(pattern: ir.Pattern) -> list[tuple[tuple[torch.dtype, ...], str]]:
    """(dtypes refused, why) for each operation of ``pattern`` that some dtypes cannot run."""
    out: list[tuple[tuple[torch.dtype, ...], str]] = []
    for level in pattern.levels():
        op = level.op
        if op not in (None, "sum", "mean", "prod", "gather"):
            out.append((COMPLEX, f"{op}(...) needs real tensors"))
        if op in _NEEDS_FLOAT:
            out.append((INTEGRAL, f"{op}(...) needs floating-point tensors"))
        if op in _SEMIRINGS and len(level.inputs) > 1:
            out.append(((torch.bool,), f"{op}(...) of several operands adds them, which bool tensors cannot"))
    return out


def refusal(why: str, dtype: torch.dtype) -> str:
    """The message for operands of ``dtype`` that an operation refuses ``why``."""
    return f"{why}, got {dtype}"


def check(pattern: ir.Pattern, dtype: torch.dtype) -> None:
    """Refuse operands promoted to ``dtype`` where an operation of ``pattern`` cannot run on them."""
    for refused, why in refusals(pattern):
        if dtype in refused:
            raise EincError(refusal(why, dtype))


def check_modifier(modifier: ir.Modifier, position: int, dtype: torch.dtype, compact: bool) -> None:
    """A ``mask`` is a bool tensor (True = attend); a ``bias`` a floating-point one (added
    to the logits in their dtype)."""
    spelled = modifier.render(compact)
    if modifier.kind == "mask" and dtype != torch.bool:
        raise EincError(f"{spelled} (operand {position}) must be a bool tensor (True = attend), not "
                        f"{str(dtype).removeprefix('torch.')}; for an additive mask use bias(...), for ones and "
                        "zeros pass .bool()")
    if modifier.kind == "bias" and not dtype.is_floating_point:
        raise EincError(f"{spelled} (operand {position}) must be a floating-point tensor (added to the logits), "
                        f"not {str(dtype).removeprefix('torch.')}")


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
"""What a gather's index may be: integers torch compares (not bool: a mask selects, it
does not index; not uint16/32/64, which torch's CPU kernels do not compare)."""


def check_index(axis: str, position: int, dtype: torch.dtype) -> None:
    """A gather's index is an integer tensor of :data:`INDEX_DTYPES`."""
    if dtype not in INDEX_DTYPES:
        raise EincError(f"operand {position} indexes {show_axis(axis, noun=True)} of gather(...): it must be an "
                        f"integer tensor (int64, int32, int16, int8 or uint8), not {str(dtype).removeprefix('torch.')}")


def sums(op: str | None, reduces: bool) -> bool:
    """Whether a level adds numbers up: it ``reduces`` axes with a summing operation."""
    return reduces and op in _SUMMING


def computed(dtype: torch.dtype, op: str | None, summing: bool) -> torch.dtype:
    """The dtype a level computes in, for operands of ``dtype``."""
    if dtype in HALF and op is not None:
        return torch.float32
    if dtype in INTEGRAL and summing:
        return torch.int64
    return dtype


def result(dtype: torch.dtype, op: str | None, summing: bool, fractional: bool) -> torch.dtype:
    """The dtype of a level's result for operands of ``dtype`` (``fractional``: a ``mean``
    or a scale that divides)."""
    inner = computed(dtype, op, summing)
    if dtype in HALF:
        return dtype
    if not (inner.is_floating_point or inner.is_complex) and fractional:
        return torch.get_default_dtype()
    return inner


def name(dtype: torch.dtype) -> str:
    """A dtype as generated code spells it: ``torch.float32``."""
    return f"torch.{str(dtype).removeprefix('torch.')}"
