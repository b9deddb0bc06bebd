"""Options of a compiled expression and einc's process-wide settings.

:class:`Options` is validated once, when an expression is made, and is hashable, so it
keys :func:`einc.compile`'s cache; nothing downstream re-checks an option.
:func:`configure` changes the process-wide defaults in :data:`settings`; a new memory
limit bumps :attr:`Settings.version`, which expressions read to re-plan what they
cached before.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import opt_einsum as oe
import torch

from .backends import get_backend
from .errors import EincError
from .ir import INT64_LIMIT
from .paths import STRATEGY_NAMES

__all__ = ["Backend", "Options", "Settings", "settings", "check_constants", "configure", "element_limit",
           "parse_memory_limit",
           "STRATEGY_NAMES", "BYTE_UNITS"]

Backend = Literal["torchscript", "eager", "compile"]


BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]+)\s*\Z")


def parse_memory_limit(value: int | str | None) -> tuple[int | None, bool]:
    """``(limit, in_bytes)``: an int counts elements, a string such as ``"64MiB"`` bytes.

    >>> parse_memory_limit("1.5 KiB")
    (1536, True)
    """
    if value is None:
        return None, False
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < INT64_LIMIT:
        return value, False
    if isinstance(value, str):
        match = _BYTES.match(value.lower())
        if match and match.group(2) in BYTE_UNITS:
            number = float(match.group(1)) * BYTE_UNITS[match.group(2)]
            if 1 <= number < INT64_LIMIT:
                return int(number), True
    raise EincError(
        f"memory_limit must be a positive int (elements) below 2**63 or a size in bytes such as '64MiB' "
        f"(units {', '.join(BYTE_UNITS)}), not {value!r}"
    )


def _check_optimize(optimize: Any) -> Any:
    """``optimize`` as the planner takes it (an explicit path as a tuple of tuples)."""
    if isinstance(optimize, str):
        if optimize in STRATEGY_NAMES:
            return optimize
        raise EincError(f"optimize={optimize!r} is not a path strategy; use one of "
                        f"{', '.join(map(repr, STRATEGY_NAMES))}, a PathOptimizer, or an explicit path such as "
                        "[(0, 1), (0, 1)]")
    if isinstance(optimize, oe.paths.PathOptimizer):
        return optimize
    if isinstance(optimize, (list, tuple)) and all(
        isinstance(step, (list, tuple)) and all(type(i) is int for i in step) for step in optimize
    ):
        return tuple(tuple(step) for step in optimize)
    raise EincError(f"optimize must be a strategy name ({', '.join(map(repr, STRATEGY_NAMES))}), a PathOptimizer "
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
    slice: bool = True
    """Run a plan over the memory limit in slices (:mod:`einc.slicing`); ``False`` refuses it."""
    distributed: Any = False
    """Spread each call over the ranks of a process group (:mod:`einc.distributed`):
    ``True`` for the default group, or a ``torch.distributed.ProcessGroup``."""
    dropout: float = 0.0
    """Dropout probability for the weights of every softmax (attention's), as SDPA's
    ``dropout_p``: drawn on every call (for training; compile with 0.0 to evaluate)."""
    part: bool = False
    """Internal: the expression computes one part (a slice, a rank's share) of a
    normalizer's own axis, where a row all -inf normalizes to zeros (its share is zero)."""
    shard_output: bool = False
    """With ``distributed``: return the result as a ``DTensor`` sharded along an output
    axis (each rank keeps its part) instead of gathering it on every rank."""
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
        if not isinstance(self.slice, bool):
            raise EincError(f"slice must be True or False, not {self.slice!r}")
        if self.distributed is not True and self.distributed is not False and not _is_group(self.distributed):
            raise EincError(f"distributed must be True, False or a torch.distributed.ProcessGroup, "
                            f"not {self.distributed!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise EincError(f"dropout must be a probability in [0, 1), not {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.dropout and self.distributed is not False:
            raise EincError("dropout with distributed: every rank would draw the same masks for its part; "
                            "apply dropout outside the distributed call")
        if not isinstance(self.shard_output, bool):
            raise EincError(f"shard_output must be True or False, not {self.shard_output!r}")
        if self.shard_output and self.distributed is False:
            raise EincError("shard_output=True needs distributed=True (or a ProcessGroup)")
        if self.cache_size is not None and (
            isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 1
        ):
            raise EincError(f"cache_size must be a positive int, not {self.cache_size!r}")


def _is_group(value: Any) -> bool:
    # torch.distributed is importable on every build, but ProcessGroup only where it is available.
    import torch.distributed as dist

    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def element_limit(limits: list[tuple[int | None, bool]], itemsize: int) -> int | None:
    """The tightest of parsed ``limits``, in elements of ``itemsize`` bytes."""
    elements = [limit // itemsize if in_bytes else limit for limit, in_bytes in limits if limit is not None]
    return min(elements, default=None)


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
        """Bumped by :func:`configure` when the memory limit changes: signatures planned under
        another limit are planned again."""
        self.lock = threading.Lock()
        self.on_change: list[Callable[[int], None]] = []
        """Called after every :func:`configure` with the expression cache's size (the
        API's cache of compiled expressions empties and resizes itself)."""


settings = Settings()


def check_constants(value: Mapping[int, torch.Tensor] | None, operands: int) -> tuple[tuple[int, torch.Tensor], ...]:
    """``constants=`` as sorted ``(position, tensor)`` pairs, checked against ``operands``
    (not part of :class:`Options`: tensors key no cache)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise EincError(f"constants must map operand positions to tensors, e.g. {{1: weight}}, not {value!r}")
    for position, tensor in value.items():
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < operands:
            raise EincError(f"constants: {position!r} is not an operand position (0..{operands - 1})")
        if not isinstance(tensor, torch.Tensor):
            raise EincError(f"constants: operand {position} is a {type(tensor).__name__}, not a torch.Tensor")
    return tuple(sorted(value.items()))


_UNSET: Any = object()


def configure(
    *,
    plan_cache_size: int = _UNSET,
    expression_cache_size: int = _UNSET,
    memory_limit: int | str | None = _UNSET,
) -> dict[str, Any]:
    """Set process-wide defaults; returns the previous values (pass them back to restore).

    - ``plan_cache_size``: input signatures each new ``einc.Expression`` keeps (LRU).
    - ``expression_cache_size``: expressions ``einc.compile``/``einc.einsum`` keep (LRU).
    - ``memory_limit``: a cap on every intermediate and output, in elements (int) or
      bytes (``"8GiB"``), on top of each expression's own; ``None`` for no cap.  It
      applies to every call from now on, of expressions compiled before too (what they
      cached is planned again); a module made by ``Expression.module`` or
      ``einc.nn`` checks, on every call, the limits in effect when it was made.  A
      plan over it raises ``EincError`` before anything is allocated.  Any call empties
      the expression cache, so later ``compile`` calls see the new values.

    >>> import einc
    >>> previous = einc.configure(memory_limit="1GiB")
    >>> einc.configure(**previous)["memory_limit"]
    '1GiB'
    """
    for name, value in (("plan_cache_size", plan_cache_size), ("expression_cache_size", expression_cache_size)):
        if value is not _UNSET and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EincError(f"{name} must be a positive int, not {value!r}")
    limit = parse_memory_limit(memory_limit) if memory_limit is not _UNSET else None
    with settings.lock:
        previous = {
            "plan_cache_size": settings.plan_cache_size,
            "expression_cache_size": settings.expression_cache_size,
            "memory_limit": settings.memory_limit,
        }
        if limit is not None:
            if limit != settings.limit:
                # Only the limit changes plans: cached signatures are planned again.
                settings.version += 1
            settings.limit = limit
            settings.memory_limit = memory_limit
        if plan_cache_size is not _UNSET:
            settings.plan_cache_size = plan_cache_size
        if expression_cache_size is not _UNSET:
            settings.expression_cache_size = expression_cache_size
    for hook in settings.on_change:
        hook(settings.expression_cache_size)
    return previous
