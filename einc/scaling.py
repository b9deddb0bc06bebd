"""How a level applies its scale (``* 2 / sqrt(d)``) in generated code.

The scale is an expression of integer literals and sizes only.  A sum of products is
linear in each operand, so scaling the smallest operand costs least; the result is
scaled instead where that would change the answer: a fractional scale of integers (it
would make floats before the product) and a zero divisor (an empty axis: ``0 / 0`` is
NaN, as ``x.sum() / 0``, where scaling an operand gives 0).  Generic code decides these
at run time.  Floats never wrap: ``* 4294967296 * 4294967296`` is 2**64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import EincError
from .ir import INT64_LIMIT, Factor

if TYPE_CHECKING:
    from .codegen import Emitter

__all__ = ["Scaling", "integral"]

_TOO_BIG = "the scale {} does not fit in int64, which integer tensors are scaled in"


def integral(factors: Sequence[Factor]) -> bool:
    """Whether a scale only multiplies by ints (integer tensors stay integers)."""
    return all(not f.divide and not f.sqrt for f in factors)


class Scaling:
    """The scale of one level, for its emitter (see the module docstring)."""

    def __init__(self, emit: Emitter) -> None:
        self.emit = emit
        self.factors = emit.program.ir.scale
        self.integral = integral(self.factors)
        self.variable = ""
        self.early = ""
        """Generic code: the variable saying whether the operand took the scale."""

    def _parts(self) -> tuple[list[str], list[str]]:
        numerator, denominator = [], []
        for factor in self.factors:
            value = str(int(factor.value)) if isinstance(factor.value, int) else self.emit.size(factor.value)
            value = f"{value} ** 0.5" if factor.sqrt else value
            (denominator if factor.divide else numerator).append(value)
        return numerator, denominator

    def _value(self) -> float | int:
        """Literal code: the scale's value, exact for integers, IEEE for a zero divisor."""
        value: float | int = 1
        divisor: float | int = 1
        for factor in self.factors:
            number = factor.value if isinstance(factor.value, int) else self.emit.sizes[factor.value]
            number = math.sqrt(number) if factor.sqrt else number
            if factor.divide:
                divisor *= number
            else:
                value *= number
        if divisor == 0:
            return math.nan if value == 0 else math.inf
        return value / divisor if not self.integral else value

    def expression(self) -> str:
        """The scale as code: an int product for integral scales of integers, else a float."""
        numerator, denominator = self._parts()
        if self.integral and self.emit.integral():
            return "(" + " * ".join(numerator or ["1"]) + ")"
        if denominator and (self.emit.generic or math.isinf(self._value()) or math.isnan(self._value())):
            return f"{self.emit.helper('einc_ratio')}({' * '.join(['1.0', *numerator])}, " \
                   f"{' * '.join(['1.0', *denominator])})"
        return "(" + " ".join(["1.0", *(f"* {v}" for v in numerator), *(f"/ {v}" for v in denominator)]) + ")"

    def _on_result(self) -> bool:
        """Literal code: whether the result takes the scale (see the class docstring)."""
        if self.integral:
            return False
        value = self._value()
        return self.emit.integral() or math.isinf(value) or math.isnan(value)

    def operand(self, value: str, emit: Emitter) -> str:
        """``value`` scaled if it takes the scale, the code written by ``emit``."""
        if not emit.generic:
            if self.integral and emit.integral() and self._value() >= INT64_LIMIT:
                raise EincError(_TOO_BIG.format(f"{self._value():,}"))
            return value if self._on_result() else emit.assign(f"{value} * {self.expression()}")
        if self.integral:
            # Integers stay integers (an int product, checked against int64 in floats,
            # which never wrap); floats take the float product.
            numerator, _ = self._parts()
            floating = emit.assign(f"{value}.is_floating_point() or {value}.is_complex()")
            wide = emit.assign(self.expression())
            # Exact: the int product with an overflow test at each factor (-1 if over).
            whole = emit.assign(f"{emit.helper('einc_int_product')}([{', '.join(numerator or ['1'])}])")
            emit.unit.check(emit.lines, f"not {floating} and {whole} < 0", _TOO_BIG, wide)
            return emit.assign(f"{value} * {wide} if {floating} else {value} * {whole}")
        self.variable = emit.assign(self.expression())
        self.early = emit.assign(f"{emit.helper('einc_scales_early')}({value}, {self.variable})")
        return emit.assign(f"{value} * {self.variable} if {self.early} else {value}")

    def result(self, value: str, emit: Emitter) -> str:
        """The level's result scaled if it takes the scale, the code written by ``emit``."""
        if not emit.generic:
            return emit.assign(f"{value} * {self.expression()}") if self._on_result() else value
        if self.integral:
            return value
        return emit.assign(f"{value} if {self.early} else {value} * {self.variable}")

    def float_value(self) -> str:
        """The scale as a float expression (SDPA's ``scale=``)."""
        numerator, denominator = self._parts()
        if denominator and self.emit.generic:
            return f"{self.emit.helper('einc_ratio')}({' * '.join(['1.0', *numerator])}, " \
                   f"{' * '.join(['1.0', *denominator])})"
        return "(" + " ".join(["1.0", *(f"* {v}" for v in numerator), *(f"/ {v}" for v in denominator)]) + ")"


# ------------------------------------------------------------------ levels
