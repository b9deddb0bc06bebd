"""Generated source -> callables: TorchScript (default), eager Python, ``torch.compile``.

:func:`namespace` executes a :class:`~einc.codegen.Generated` value as Python and keeps
its source in :mod:`linecache` (so tracebacks and ``torch.jit.script`` can read it) for
as long as something it defined is alive: the cache stays as bounded as the
expressions' caches that hold the code.
"""

from __future__ import annotations

import linecache
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad

from .codegen import CONSTANT_FUNCTION_NAME, FUNCTION_NAME, MODULE_NAME, Generated
from .errors import EincError

__all__ = ["Functions", "BACKENDS", "compiled", "get_backend", "instantiate", "namespace", "registered_sources",
           "transformed"]


class Functions(NamedTuple):
    """A backend's callables for one generated source."""

    main: Callable[..., torch.Tensor]
    """``einc_fn``."""
    constants: Callable[..., list[torch.Tensor]] | None
    """``einc_constants``, for expressions with constant operands."""


_lines_lock = threading.Lock()
_holders: dict[str, int] = {}
"""linecache filename -> how many live objects were defined from it."""


def _release(filename: str) -> None:
    with _lines_lock:
        _holders[filename] -= 1
        if not _holders[filename]:
            del _holders[filename]
            linecache.cache.pop(filename, None)


def registered_sources() -> int:
    """How many generated sources are in :mod:`linecache` now (for tests of the bound)."""
    return len(_holders)


def namespace(code: Generated) -> dict[str, Any]:
    """The source's functions and classes as plain Python, its text registered in
    :mod:`linecache` while any of them is alive."""
    result = dict(code.globals)
    exec(compile(code.source, code.filename, "exec"), result)  # noqa: S102 - generated, validated
    # TorchScript names what it compiles by __module__ (None after exec); a name per
    # source keeps two generated modules apart.  No __name__ in the namespace itself:
    # torch.compile would try to import it.
    owner = "einc.generated_" + code.filename.removeprefix("<einc-generated-").removesuffix(">")
    defined = [value for value in result.values()
               if getattr(value, "__code__", None) is not None and value.__code__.co_filename == code.filename
               or isinstance(value, type) and value.__module__ == "builtins"]
    with _lines_lock:
        linecache.cache[code.filename] = (len(code.source), None, code.source.splitlines(True), code.filename)
        _holders[code.filename] = _holders.get(code.filename, 0) + len(defined)
    for value in defined:
        value.__module__ = owner
        weakref.finalize(value, _release, code.filename)
    return result


def instantiate(code: Generated, reduce: tuple[Callable[..., Any], tuple[Any, ...]]) -> torch.nn.Module:
    """The module class that generic ``code`` defines, made with its messages; pickled,
    it is ``reduce`` (a function that makes it again, and its arguments)."""
    cls = namespace(code)[MODULE_NAME]
    cls.__reduce__ = lambda _: reduce
    module: torch.nn.Module = cls(list(code.messages))
    module.einc_source = code.source  # type: ignore[assignment]
    return module


_functorch_level = torch._C._functorch.maybe_current_level


def transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) or forward-mode AD is active:
    their tensors take no in-place writes and no branches on data, so they run the
    safe code."""
    return _functorch_level() is not None or _forward_ad._current_level >= 0


_get_optimize = torch._C._get_graph_executor_optimize
_set_optimize = torch._C._set_graph_executor_optimize


def _unoptimized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with TorchScript's graph optimizations off, as under
    ``torch.jit.optimized_execution(False)`` (a thread-local switch).

    The profiling executor differentiates the graph itself from the second call on,
    and gets complex gradients wrong (it does not conjugate); einc's functions are
    chains of large kernels that its fusions do not speed up, so autograd of the
    plain ops is kept, and calls get cheaper too.
    """

    def run(*args: Any) -> Any:
        previous = _get_optimize()
        _set_optimize(False)
        try:
            return fn(*args)
        finally:
            _set_optimize(previous)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _torchscript(code: Generated) -> Functions:
    # TorchScript cannot script exec-made functions (no source file); a
    # CompilationUnit compiles the source text itself.  Its deprecation notice is
    # about TorchScript in general and would repeat on every compile.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        unit = torch.jit.CompilationUnit(code.source)
    folding = getattr(unit, CONSTANT_FUNCTION_NAME) if code.folds_constants else None
    return Functions(_unoptimized(getattr(unit, FUNCTION_NAME)), folding and _unoptimized(folding))


def _eager(code: Generated) -> Functions:
    functions = namespace(code)
    return Functions(functions[FUNCTION_NAME], functions.get(CONSTANT_FUNCTION_NAME))


def _compiled(code: Generated) -> Functions:
    # Shapes are baked into the source, so a dynamic-shape graph would buy nothing.
    # Not fullgraph: the log-semiring guard branches on data (underflow recovery).
    # Constants are folded once, so their function stays plain Python.
    main, folding = _eager(code)
    return Functions(torch.compile(main, dynamic=False), folding)


BACKENDS: dict[str, Callable[[Generated], Functions]] = {
    "torchscript": _torchscript,
    "eager": _eager,
    "compile": _compiled,
}


def get_backend(name: str) -> Callable[[Generated], Functions]:
    """The compiler of backend ``name``; the error lists the valid names."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise EincError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {name!r}") from None


COMPILED_CACHE_SIZE = 256
"""Compiled sources kept process-wide (:func:`compiled`)."""

_compiled_lock = threading.Lock()
_compiled: OrderedDict[tuple[str, str], Functions] = OrderedDict()


def compiled(backend: str, code: Generated) -> Functions:
    """``code`` compiled by ``backend``, once per source text in the process.

    Sources are made of generated names and integers only, so two spellings of one
    pattern (``ij,jk->ik``, ``ab,bc->ac``), and every shape that shares shape-generic
    code, give the same text and share one compiled function.  A bounded LRU cache.
    """
    key = (backend, code.source)
    with _compiled_lock:
        hit = _compiled.get(key)
        if hit is not None:
            _compiled.move_to_end(key)
            return hit
    functions = get_backend(backend)(code)
    with _compiled_lock:
        functions = _compiled.setdefault(key, functions)
        _compiled.move_to_end(key)
        while len(_compiled) > COMPILED_CACHE_SIZE:
            _compiled.popitem(last=False)
    return functions
