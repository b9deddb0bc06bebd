"""Options of a compiled expression and einc's process-wide settings.

:class:`Options` is validated once, when an expression is made, and is hashable, so it
keys :func:`einc.compile`'s cache; nothing downstream re-checks an option.
:func:`configure` (in :mod:`einc.api`) changes the process-wide defaults in
:data:`settings`; every change bumps :attr:`Settings.version`, which expressions read
to re-plan what they cached before.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import opt_einsum as oe
import torch

from .backends import get_backend
from .errors import EincError

__all__ = ["Backend", "Options", "Settings", "settings", "element_limit", "dtype_of", "parse_memory_limit",
           "STRATEGIES", "BYTE_UNITS"]

Backend = Literal["torchscript", "eager", "compile"]

STRATEGIES: tuple[str, ...] = tuple(sorted({*oe.paths._PATH_OPTIONS, "auto", "cotengra"}))
"""Strategy names ``optimize`` takes: opt_einsum's, and cotengra's hyper-optimizer."""

BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]+)\s*\Z")
_LIMIT = 2**63


def parse_memory_limit(value: int | str | None) -> tuple[int | None, bool]:
    """``(limit, in_bytes)``: an int counts elements, a string such as ``"64MiB"`` bytes.

    >>> parse_memory_limit("1.5 KiB")
    (1536, True)
    """
    if value is None:
        return None, False
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _LIMIT:
        return value, False
    if isinstance(value, str):
        match = _BYTES.match(value.lower())
        if match and match.group(2) in BYTE_UNITS:
            number = float(match.group(1)) * BYTE_UNITS[match.group(2)]
            if 1 <= number < _LIMIT:
                return int(number), True
    raise EincError(
        f"memory_limit must be a positive int (elements) below 2**63 or a size in bytes such as '64MiB' "
        f"(units {', '.join(BYTE_UNITS)}), not {value!r}"
    )


def _check_optimize(optimize: Any) -> Any:
    """``optimize`` as the planner takes it (an explicit path as a tuple of tuples)."""
    if isinstance(optimize, str):
        if optimize in STRATEGIES:
            return optimize
        raise EincError(f"optimize={optimize!r} is not a path strategy; use one of {', '.join(map(repr, STRATEGIES))}, "
                        "a PathOptimizer, or an explicit path such as [(0, 1), (0, 1)]")
    if isinstance(optimize, oe.paths.PathOptimizer):
        return optimize
    if isinstance(optimize, (list, tuple)) and all(
        isinstance(step, (list, tuple)) and all(type(i) is int for i in step) for step in optimize
    ):
        return tuple(tuple(step) for step in optimize)
    raise EincError(f"optimize must be a strategy name ({', '.join(map(repr, STRATEGIES))}), a PathOptimizer "
                    f"or an explicit path of int tuples such as [(0, 1), (0, 1)], not {optimize!r}")


@dataclass(frozen=True)
class Options:
    """How an expression is compiled; validated on construction, hashable (a cache key).

    >>> Options(optimize=[[0, 1]]).optimize
    ((0, 1),)
    """

    backend: str = "torchscript"
    optimize: Any = "auto"
    notation: str = "auto"
    memory_limit: int | str | None = None
    fuse: bool = True
    cache_size: int | None = None
    limit: tuple[int | None, bool] = field(init=False, repr=False, compare=False)
    """``memory_limit`` parsed: ``(limit, in_bytes)``."""

    def __post_init__(self) -> None:
        get_backend(self.backend)
        object.__setattr__(self, "optimize", _check_optimize(self.optimize))
        if not isinstance(self.notation, str) or self.notation not in ("auto", "compact", "spaced"):
            raise EincError(f"notation must be 'auto', 'compact' or 'spaced', not {self.notation!r}")
        object.__setattr__(self, "limit", parse_memory_limit(self.memory_limit))
        if not isinstance(self.fuse, bool):
            raise EincError(f"fuse must be True or False, not {self.fuse!r}")
        if self.cache_size is not None and (
            isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 1
        ):
            raise EincError(f"cache_size must be a positive int, not {self.cache_size!r}")

    def element_limit(self, itemsize: int) -> int | None:
        """The tighter of this and the process-wide memory limit, in elements of ``itemsize`` bytes."""
        return element_limit([self.limit, settings.limit], itemsize)


def element_limit(limits: list[tuple[int | None, bool]], itemsize: int) -> int | None:
    """The tightest of parsed ``limits``, in elements of ``itemsize`` bytes."""
    elements = [limit // itemsize if in_bytes else limit for limit, in_bytes in limits if limit is not None]
    return min(elements, default=None)


_DTYPE_NAMES = {str(t).removeprefix("torch."): t for t in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}


def dtype_of(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A torch dtype given as itself or by name (``"float32"``)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    raise EincError(f"{what} must be a torch.dtype or one of {', '.join(map(repr, _DTYPE_NAMES))}, not {value!r}")


PLAN_CACHE_SIZE = 256
"""Default number of input signatures an expression keeps compiled (LRU)."""
EXPRESSION_CACHE_SIZE = 512
"""Default number of ``(pattern, options)`` that ``compile`` and ``einsum`` keep (LRU)."""


class Settings:
    """Process-wide defaults, changed through :func:`configure`."""

    def __init__(self) -> None:
        self.plan_cache_size = PLAN_CACHE_SIZE
        self.expression_cache_size = EXPRESSION_CACHE_SIZE
        self.memory_limit: int | str | None = None
        self.limit: tuple[int | None, bool] = (None, False)
        self.version = 0
        """Bumped by every :func:`configure`: signatures planned under older settings are planned again."""
        self.lock = threading.Lock()


settings = Settings()
