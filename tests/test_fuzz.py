"""Fuzzing einc: any input gives a result or an ``einc.EincError``, and no pattern
text reaches the generated source.

Three sources of patterns feed one property test (``test_fuzz_result_or_einc_error``):

(a) arbitrary strings: unicode, control characters, quotes, brackets, digits, ``->``,
    ``...``, op names;
(b) near misses: valid patterns from a grammar-like strategy (compact and spaced
    spellings, ellipsis, compositions, units, ``op(...)`` forms, brackets), then
    mutated (a character or a token deleted, duplicated, swapped, inserted, or the
    pattern truncated);
(c) valid patterns, which must compile, called on shapes that fit them (with a random
    path strategy, sometimes a memory limit, one in twenty through TorchScript): with
    every size >= 1 the call must succeed (or be refused for the memory limit) and
    agree with ``Expression.validate``'s float64 reference.

For every pattern that compiles, ``explain`` and a call are tried with random shapes
(1-3 dimensions, sizes 0-4) and with shapes that fit the pattern; only ``EincError``
is accepted, ``explain`` and the call must agree on whether the shapes are an error,
and every generated source passes the token check of the injection tests.  Each case
runs under a time limit (a hang fails the test) and its sizes are kept small.

The default run is a fast slice (600 cases, a few seconds).  The long run is::

    EINC_FUZZ_EXAMPLES=10000 /work/venv/bin/python -m pytest tests/test_fuzz.py -q \
        --hypothesis-show-statistics

``EINC_FUZZ_SEED=<int>`` draws a fresh (still reproducible) set of cases instead of
the derandomized default; ``EINC_EXAMPLES_SCALE`` (see conftest.py) multiplies every
budget here as everywhere.

The injection tests feed axis names that are Python syntax, dunder names, einc's own
generated names (``x0``, ``t0``, ``einc_fn``, ``einc_lse``, ...), unicode look-alikes
and 10,000-character names, and check with :mod:`tokenize` that the generated source
holds only keywords, einc's own identifiers, torch attributes, integers, einc's float
constants and punctuation.  Axis names that coincide with einc's vocabulary cannot be
told apart by spelling, so for those the source must be identical to the source of the
same pattern with neutral names.
"""

from __future__ import annotations

import contextlib
import io
import keyword
import math
import os
import re
import signal
import threading
import tokenize
from dataclasses import dataclass, field

import pytest
import torch
from conftest import examples, reference_einsum
from hypothesis import event, given, note, seed, settings
from hypothesis import strategies as st

import einc
from einc import ir
from einc._runtime import FLOOR, HELPERS, TINY
from einc.codegen import CONSTANT_FUNCTION_NAME, FUNCTION_NAME
from einc.parser import parse

# ------------------------------------------------------------------ budgets

FUZZ_EXAMPLES = examples(int(os.environ.get("EINC_FUZZ_EXAMPLES", "600")))
"""Cases of the main fuzz test (all three sources together)."""
_FUZZ_SEED = os.environ.get("EINC_FUZZ_SEED")

CASE_SECONDS = 60
"""A case that takes longer than this is a hang (the first one also imports and builds
the parser; typical cases take a few milliseconds)."""

MAX_ELEMENTS = 4096
"""Fitted shapes keep the product of every axis size (the whole broadcast space) below this."""
MAX_INTERMEDIATE = 1 << 16
"""Random shapes are only run when the plan's largest tensor is at most this."""

_COMPILE_OPTIONS = frozenset({"pattern", "backend", "optimize", "notation", "memory_limit", "constants"})
"""Axes with these names cannot be sized by keyword (they are compile()'s own options)."""
_UNSIZABLE = _COMPILE_OPTIONS | {"self", "cache_size"}
"""Names the fuzzers never size by keyword: compile()'s options, and the two names that
reach Expression.__init__'s own parameters (a bug, pinned by
test_axis_names_like_parameter_names_are_sizes)."""


def _fuzz_settings(n: int):
    def decorate(fn):
        fn = settings(max_examples=n, deadline=None, derandomize=_FUZZ_SEED is None)(fn)
        return seed(int(_FUZZ_SEED))(fn) if _FUZZ_SEED is not None else fn
    return decorate


class Hang(AssertionError):
    """A fuzz case ran longer than :data:`CASE_SECONDS`."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (rather than hang) when the body runs past ``seconds`` (main thread, POSIX)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"fuzz case ran longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------- the source token check


def _tokens(source: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(source).readline))


def _runtime_vocabulary() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(names, string literals, comments) of einc's runtime helpers, as they appear in
    generated source: their function names, parameters, locals and the builtins they call."""
    names, strings, comments = set(), set(), set()
    for source, _ in HELPERS.values():
        for tok in _tokens(source):
            if tok.type == tokenize.NAME:
                names.add(tok.string)
            elif tok.type == tokenize.STRING:
                strings.add(tok.string)
            elif tok.type == tokenize.COMMENT:
                comments.add(tok.string)
    return frozenset(names), frozenset(strings), frozenset(comments)


_HELPER_NAMES, _HELPER_STRINGS, _HELPER_COMMENTS = _runtime_vocabulary()
EINC_NAMES = frozenset({FUNCTION_NAME, CONSTANT_FUNCTION_NAME, "torch", "List", "Tuple"}) | _HELPER_NAMES
"""Identifiers (not after a dot) the generated source may hold, besides keywords and
the generated parameters/temporaries matched by :data:`GENERATED`."""
GENERATED = re.compile(r"[xckt][0-9]+\Z")
"""einc's generated names: parameters ``x<N>``, constants ``c<N>``, folded ``k<N>``, temps ``t<N>``."""
EINC_FLOATS = frozenset(repr(abs(v)) for v in (*FLOOR.values(), *TINY.values()))
"""The clamp floors and underflow thresholds of einc/_runtime.py, as float literals."""
_ATTRIBUTE_OWNERS = (torch, torch.Tensor, torch.jit, torch.linalg)


def _is_attribute(name: str) -> bool:
    return any(hasattr(owner, name) for owner in _ATTRIBUTE_OWNERS)


def in_einc_vocabulary(name: str) -> bool:
    """Whether ``name`` could legitimately appear in generated source (so its presence
    there proves nothing: see :func:`check_renaming_invariance`)."""
    return keyword.iskeyword(name) or name in EINC_NAMES or bool(GENERATED.match(name)) or _is_attribute(name)


def check_source(source: str, axes=()) -> None:
    """``source`` holds only einc's own tokens, and none of ``axes`` as an identifier.

    String literals and comments must be those of einc's runtime helpers verbatim, so
    no pattern text can hide inside one; names that are also einc's own vocabulary are
    covered by :func:`check_renaming_invariance` instead.
    """
    previous = None
    names = set()
    for tok in _tokens(source):
        kind, text = tok.type, tok.string
        where = f"{tokenize.tok_name[kind]} {text!r} at {tok.start} in:\n{source}"
        if kind == tokenize.NAME:
            names.add(text)
            if previous is not None and previous.type == tokenize.OP and previous.string == ".":
                assert _is_attribute(text) or text in _HELPER_NAMES, "attribute not of torch: " + where
            else:
                assert keyword.iskeyword(text) or text in EINC_NAMES or GENERATED.match(text), "identifier " + where
        elif kind == tokenize.NUMBER:
            assert text.isdigit() or text in EINC_FLOATS, "number " + where
        elif kind == tokenize.STRING:
            assert text in _HELPER_STRINGS, "string " + where
        elif kind == tokenize.COMMENT:
            assert text in _HELPER_COMMENTS, "comment " + where
        else:
            assert kind in (tokenize.OP, tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER), "token " + where
        if kind not in (tokenize.NL, tokenize.COMMENT):
            previous = tok
    for axis in axes:
        if not in_einc_vocabulary(axis):
            assert axis not in names, f"axis {axis!r} is an identifier in:\n{source}"


def pattern_axes(pattern: ir.Pattern) -> set[str]:
    return set(pattern.all_axes)


def leaf_lists(pattern: ir.Pattern) -> list[ir.AxisList]:
    """The axis list of each tensor the pattern takes (nested operations' included)."""
    out: list[ir.AxisList] = []
    for operand in pattern.inputs:
        out.extend(leaf_lists(operand) if isinstance(operand, ir.Pattern) else [operand])
    return out


def all_new_axes(pattern: ir.Pattern) -> set[str]:
    """Output axes no input has, at every level: their sizes come by keyword."""
    axes = set(pattern.new_axes)
    for operand in pattern.inputs:
        if isinstance(operand, ir.Pattern):
            axes |= all_new_axes(operand)
    return axes


def all_lists(pattern: ir.Pattern) -> list[ir.AxisList]:
    out = [pattern.output]
    for operand in pattern.inputs:
        out.extend(all_lists(operand) if isinstance(operand, ir.Pattern) else [operand])
    return out


# --------------------------------------------------------------- strategies


# (gather has rules of its own: test_indexing.py generates its patterns)
OPS = (None,) + tuple(op for op in ir.OPS if op not in ir.INDEXERS)
SPACED_NAMES = ["a", "b", "c", "h", "d", "i", "j", "bb", "x_1", "Q", "_z", "ab"]
COMPACT_LETTERS = "abcdhijkQz"
WHITESPACE = st.sampled_from([" ", " ", " ", "  ", "\t", "\n", " \n "])
SEP_SPACE = st.sampled_from(["", "", " ", "  ", "\t"])


@dataclass(frozen=True)
class Case:
    """One fuzz input: the pattern, the notation to compile it with, keyword sizes the
    fitted call needs, and (for valid patterns) the axis sizes to build tensors from."""

    source: str
    pattern: str
    notation: str = "auto"
    valid: bool = False
    sizes: dict = field(default_factory=dict)
    """Keyword sizes (new output axes, composition atoms) of a valid pattern."""
    atom_sizes: dict = field(default_factory=dict)
    """Every atom's size, for valid patterns: tensors are built from these."""
    batch: tuple = ()
    """The broadcast ellipsis shape, for valid patterns."""
    optimize: str = "auto"
    """The path strategy of the fitted call."""
    backend: str = "eager"
    """The backend of the fitted call: sometimes TorchScript, whose compiler checks the source too."""
    memory_limit: int | str | None = None
    """The fitted call's memory limit: a refusal must then name ``memory_limit``."""


def _spell(dims, compact: bool, draw) -> str:
    """Spell one axis list: dims are ("axis", a) / ("group", (a, b)) / ("unit",) /
    ("ellipsis",) / ("bracket", [dims])."""
    parts = []
    for dim in dims:
        kind = dim[0]
        if kind == "axis":
            parts.append(dim[1])
        elif kind == "unit":
            parts.append("1")
        elif kind == "ellipsis":
            parts.append("...")
        elif kind == "group":
            inner = draw(WHITESPACE).join(dim[1])
            parts.append("(" + draw(SEP_SPACE) + inner + draw(SEP_SPACE) + ")")
        else:  # bracket
            parts.append("[" + _spell(dim[1], compact, draw) + "]")
    if compact:
        return "".join(parts)
    return "".join(p + (draw(WHITESPACE) if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def _groups_of(dims) -> list[tuple[str, ...]]:
    """The compositions of an axis list, those inside brackets included."""
    out = []
    for dim in dims:
        if dim[0] == "group":
            out.append(dim[1])
        elif dim[0] == "bracket":
            out.extend(_groups_of(dim[1]))
    return out


def _atoms_of(dims) -> list[str]:
    out = []
    for dim in dims:
        if dim[0] == "axis":
            out.append(dim[1])
        elif dim[0] == "group":
            out.extend(dim[1])
        elif dim[0] == "bracket":
            out.extend(_atoms_of(dim[1]))
    return out


@st.composite
def valid_patterns(draw) -> Case:
    """A pattern einc must accept, with sizes and shapes that fit it."""
    compact = draw(st.booleans())
    op = draw(st.sampled_from(OPS))
    n = 1 if op == "prod" else draw(st.sampled_from([1, 2, 2, 3, 1, 2, 4]))
    pool = list(COMPACT_LETTERS) if compact else SPACED_NAMES
    atoms_pool = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=True))
    normalizer = op in ir.NORMALIZERS
    arrowless = normalizer and n == 1 and draw(st.integers(0, 2)) == 0
    implicit = not normalizer and draw(st.integers(0, 5)) == 0

    inputs = []
    any_ellipsis = False
    for _ in range(n):
        names = draw(st.lists(st.sampled_from(atoms_pool), max_size=4, unique=arrowless))
        dims: list = []
        i = 0
        while i < len(names):
            # Compositions of 2-3 distinct atoms (spaced only), else a plain axis.
            width = 1 if compact else draw(st.sampled_from([1, 1, 1, 2, 3]))
            chunk = list(dict.fromkeys(names[i:i + width]))
            dims.append(("group", tuple(chunk)) if width > 1 else ("axis", chunk[0]))
            i += width
        if not compact and draw(st.integers(0, 4)) == 0:
            dims.insert(draw(st.integers(0, len(dims))), ("unit",))
        if draw(st.integers(0, 3)) == 0:
            dims.insert(draw(st.integers(0, len(dims))), ("ellipsis",))
            any_ellipsis = True
        inputs.append(dims)
    input_atoms = list(dict.fromkeys(a for dims in inputs for a in _atoms_of(dims)))

    if arrowless:
        # `softmax(a [b])`: bracket at least one named dim of the single input.
        named = [i for i, d in enumerate(inputs[0]) if d[0] in ("axis", "group")]
        if not named:
            inputs[0].append(("axis", atoms_pool[0]))
            named = [len(inputs[0]) - 1]
            input_atoms = list(dict.fromkeys(input_atoms + [atoms_pool[0]]))
        marked = draw(st.lists(st.sampled_from(named), min_size=1, unique=True))
        inputs[0] = [("bracket", [d]) if i in marked else d for i, d in enumerate(inputs[0])]
        output = None
    elif implicit:
        output = None
    else:
        kept = draw(st.permutations(input_atoms))[: draw(st.integers(0, len(input_atoms)))]
        fresh = [a for a in pool if a not in input_atoms]
        new = draw(st.lists(st.sampled_from(fresh), max_size=1 if fresh else 0, unique=True))
        order = draw(st.permutations(list(kept) + new))
        output: list = []
        i = 0
        while i < len(order):
            width = 1 if compact else draw(st.sampled_from([1, 1, 2]))
            chunk = order[i:i + width]
            output.append(("group", tuple(chunk)) if len(chunk) > 1 else ("axis", chunk[0]))
            i += width
        if not compact and draw(st.integers(0, 5)) == 0:
            output.insert(draw(st.integers(0, len(output))), ("unit",))
        if any_ellipsis and draw(st.integers(0, 3)) > 0:
            output.insert(draw(st.integers(0, len(output))), ("ellipsis",))
        if normalizer:
            named = [i for i, d in enumerate(output) if d[0] in ("axis", "group")]
            if not named:
                name = new[0] if new else draw(st.sampled_from(atoms_pool))
                if name in _atoms_of(output):  # pragma: no cover - named is empty, so it is not
                    raise AssertionError
                output.append(("axis", name))
                named = [len(output) - 1]
            marked = draw(st.lists(st.sampled_from(named), min_size=1, unique=True))
            if draw(st.booleans()) and len(marked) > 1 and marked == list(range(marked[0], marked[0] + len(marked))):
                # Adjacent marked dims in one bracket: `[a b]`.
                start = marked[0]
                output = output[:start] + [("bracket", output[start:start + len(marked)])] + output[start + len(marked):]
            else:
                output = [("bracket", [d]) if i in marked else d for i, d in enumerate(output)]

    body = (draw(SEP_SPACE) + "," + draw(SEP_SPACE)).join(_spell(d, compact, draw) for d in inputs)
    if output is not None:
        body += draw(SEP_SPACE) + "->" + draw(SEP_SPACE) + _spell(output, compact, draw)
    pattern = f"{op}({body})" if op else body

    # Sizes: small, the whole broadcast space under MAX_ELEMENTS.
    all_atoms = list(dict.fromkeys(input_atoms + (_atoms_of(output) if output else [])))
    atom_sizes, total = {}, 1
    for a in all_atoms:
        size = draw(st.sampled_from([2, 3, 1, 2, 0]))
        if total * max(size, 1) > MAX_ELEMENTS:
            size = 1
        atom_sizes[a] = size
        total *= max(size, 1)
    batch = tuple(draw(st.lists(st.sampled_from([2, 1, 3]), max_size=2))) if any_ellipsis else ()
    groups_in = [_groups_of(dims) for dims in inputs]
    groups_out = _groups_of(output or [])
    grouped = {a for g in [*(g for gs in groups_in for g in gs), *groups_out] for a in g}
    new_axes = set(all_atoms) - set(input_atoms)
    sizes = {a: atom_sizes[a] for a in sorted(grouped | new_axes)}
    # Each input composition may leave one atom to be inferred, if that atom is in no
    # other composition (so no composition has two unknowns).
    for dims in inputs:
        for group in _groups_of(dims):
            if draw(st.booleans()):
                last = group[-1]
                owners = [g for gs in groups_in for g in gs if last in g]
                out_groups = [g for g in groups_out if last in g]
                if len(owners) == 1 and not out_groups and last not in new_axes:
                    sizes.pop(last, None)
    if compact:
        notation = draw(st.sampled_from(["auto", "compact"]))
    else:
        notation = "spaced"
    optimize = draw(st.sampled_from(["auto", "auto", "greedy", "optimal", "dp", "branch-2"]))
    backend = "torchscript" if draw(st.integers(0, 19)) == 0 else "eager"
    memory_limit = draw(st.sampled_from([None] * 12 + [1, 4, 16, 64, "3b", "64b", "1KiB"]))
    return Case("valid", pattern, notation, True, sizes, atom_sizes, batch, optimize, backend, memory_limit)


def _pattern_tokens(pattern: str) -> list[str]:
    return re.findall(r"\.\.\.|->|[A-Za-z_][A-Za-z0-9_]*\(?|\s+|.", pattern, flags=re.DOTALL)


MUTATION_ALPHABET = list("ijkab(),[]->. 1_9'\"\\;#\t\n\x00") + ["\u0430", "\uff41", "\u200d", "\u2192", "\u00e9"]
MUTATION_TOKENS = ["...", "->", ",", "(", ")", "[", "]", "1", "0", "sum(", "softmax(", "log_softmax(",
                   "prod(", "max(", "lambda", "__import__", "x0", "a", "ij", " ", "\n"]


@st.composite
def near_miss_patterns(draw) -> Case:
    """A valid pattern with 1-3 character- or token-level mutations."""
    base = draw(valid_patterns())
    text = base.pattern
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "tdelete",
                                     "tduplicate", "tswap", "tinsert", "truncate"]))
        at = draw(st.integers(0, 1 << 16))
        steps.append(kind)
        if kind.startswith("t") and kind != "truncate":
            tokens = _pattern_tokens(text)
            i = at % (len(tokens) + 1)
            if kind == "tinsert":
                tokens.insert(i, draw(st.sampled_from(MUTATION_TOKENS)))
            elif tokens and i < len(tokens):
                if kind == "tdelete":
                    del tokens[i]
                elif kind == "tduplicate":
                    tokens.insert(i, tokens[i])
                elif i + 1 < len(tokens):
                    tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
            text = "".join(tokens)
            continue
        i = at % (len(text) + 1)
        if kind == "truncate":
            text = text[:i]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(MUTATION_ALPHABET)) + text[i:]
        elif i < len(text):
            if kind == "delete":
                text = text[:i] + text[i + 1:]
            elif kind == "duplicate":
                text = text[:i] + text[i] + text[i:]
            elif kind == "replace":
                text = text[:i] + draw(st.sampled_from(MUTATION_ALPHABET)) + text[i + 1:]
            elif i + 1 < len(text):
                text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
    notation = draw(st.sampled_from(["auto", "auto", base.notation, "compact", "spaced"]))
    return Case("near-miss:" + "+".join(steps), text, notation, optimize=base.optimize,
                memory_limit=base.memory_limit)


ARBITRARY_PIECES = st.sampled_from(
    ["...", "->", ",", "(", ")", "[", "]", "1", "0", "7", "'", '"', "\\", ";", "\n", "\t", "\r", "\x00",
     "\x1b", " ", "sum(", "mean(", "max(", "min(", "prod(", "logsumexp(", "softmax(", "log_softmax(",
     "i", "j", "ab", "x0", "_", "__class__", "\u0430", "\uff41", "\u200b", "\u2192", "\U0001f600"]
)


@st.composite
def arbitrary_patterns(draw) -> Case:
    """Any string: unicode text (control characters, surrogate-free), or pieces of syntax."""
    text = draw(st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="ascii"), max_size=30),
        st.lists(st.one_of(ARBITRARY_PIECES, st.text(max_size=2)), max_size=16).map("".join),
    ))
    notation = draw(st.sampled_from(["auto", "auto", "compact", "spaced"]))
    return Case("arbitrary", text, notation)


ANY_PATTERN = st.one_of(arbitrary_patterns(), near_miss_patterns(), valid_patterns())

RANDOM_SHAPE = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)


# ----------------------------------------------------------------- exercising


def _fitted(pattern: ir.Pattern, case: Case, data) -> tuple[dict, list[tuple[int, ...]]]:
    """Keyword sizes and shapes that fit the parsed ``pattern``."""
    if case.valid:
        atom_sizes, batch, sizes = dict(case.atom_sizes), case.batch, dict(case.sizes)
    else:
        atoms = sorted(pattern_axes(pattern))
        atom_sizes, total = {}, 1
        for a in atoms:
            size = data.draw(st.sampled_from([2, 1, 3, 0]), label=f"size of {a}")
            if total * max(size, 1) > MAX_ELEMENTS:
                size = 1
            atom_sizes[a] = size
            total *= max(size, 1)
        batch = tuple(data.draw(st.lists(st.sampled_from([2, 1, 3]), max_size=2), label="batch"))
        grouped = {a for x in all_lists(pattern) for d in x.dims if len(d) > 1 for a in d}
        sizes = {a: atom_sizes[a] for a in all_new_axes(pattern) | grouped if a not in _UNSIZABLE}
    shapes = []
    for operand in leaf_lists(pattern):
        shape = []
        for dim in operand.dims:
            if dim == (ir.ELLIPSIS,):
                own = batch[len(batch) - (data.draw(st.integers(0, len(batch)), label="ellipsis rank")):] if batch else ()
                shape.extend(b if data.draw(st.booleans(), label="broadcast") else 1 for b in own)
            else:
                shape.append(math.prod(atom_sizes[a] for a in dim))
        shapes.append(tuple(shape))
    return sizes, shapes


def _attempt(fn):
    """``(result, None)`` or ``(None, EincError)``; any other exception propagates."""
    try:
        return fn(), None
    except einc.EincError as err:
        return None, err


def _explain_and_call(expr: einc.Expression, shapes, *, run: bool = True):
    """explain() and a call agree: both fail with EincError, or the call's output has the
    plan's shape.  Returns (plan, output); output is None if not run or failed."""
    plan, plan_err = _attempt(lambda: expr.explain(*shapes, dtype=torch.float64))
    if plan is not None:
        check_source(plan.source, pattern_axes(expr.ir))
        assert isinstance(str(plan), str) and plan.to_dict()["pattern"] == expr.pattern
        big = max(plan.largest_intermediate, math.prod(plan.output_shape), *(math.prod(s) for s in shapes), 0)
        if big > MAX_INTERMEDIATE:
            event("fitted/random call skipped: too large")
            return plan, None
    if not run:
        return plan, None
    tensors = [torch.randn(s, dtype=torch.float64) for s in shapes]
    out, call_err = _attempt(lambda: expr(*tensors))
    assert (plan_err is None) == (call_err is None), (
        f"explain and call disagree on shapes {shapes}:\n explain: {plan_err}\n call: {call_err}"
    )
    if out is not None:
        assert isinstance(out, torch.Tensor)
        assert tuple(out.shape) == tuple(plan.output_shape), (tuple(out.shape), plan.output_shape)
    return plan, out


def check_fitted(expr: einc.Expression, shapes) -> torch.Tensor | None:
    """explain() and a call agree on ``shapes``; a result also passes ``validate``
    (whose float64 reference may refuse only its documented 52-axis limit)."""
    _, out = _explain_and_call(expr, shapes)
    if out is not None:
        xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
        try:
            expr.validate(*xs)
        except einc.EincError as err:
            assert "validate supports at most" in str(err), f"{expr.pattern!r} on {shapes}: {err}"
    return out


def exercise(case: Case, data) -> None:
    kind = case.source.split(":")[0]
    note(f"{case.source}: {case.pattern!r} notation={case.notation}")
    expr, err = _attempt(lambda: einc.compile(case.pattern, backend="eager", notation=case.notation))
    # Output axes in no input need keyword sizes, and say so when the expression is made.
    needs_sizes = err is not None and "so its size must be given" in str(err)
    if case.valid:
        assert err is None or needs_sizes, f"valid pattern {case.pattern!r} was refused: {err}"
    if expr is None and not needs_sizes:
        event(f"{kind}: compile error")
        return
    event(f"{kind}: compiled")

    if expr is not None:
        # Random shapes, with a random number of operands around the right one.
        n = expr.ir.leaves
        count = data.draw(st.sampled_from([n, n, n, max(0, n - 1), n + 1]), label="operand count")
        shapes = data.draw(st.lists(RANDOM_SHAPE, min_size=count, max_size=count), label="random shapes")
        _explain_and_call(expr, shapes)

    # Shapes (and keyword sizes) that fit the pattern.
    sizes, fitted = _fitted(expr.ir if expr is not None else parse(case.pattern, case.notation), case, data)
    sized, err = _attempt(lambda: einc.compile(case.pattern, backend=case.backend, notation=case.notation,
                                               optimize=case.optimize, memory_limit=case.memory_limit, **sizes))
    assert err is None, f"{case.pattern!r} compiled, but not with sizes {sizes}: {err}"
    note(f"keyword sizes {sizes}, fitted shapes {fitted}, optimize={case.optimize!r}, "
         f"backend={case.backend!r}, memory_limit={case.memory_limit!r}")
    out = check_fitted(sized, fitted)
    if case.valid and all(s >= 1 for s in case.atom_sizes.values()) and out is None:
        refusal = _attempt(lambda: sized.explain(*fitted, dtype=torch.float64))[1]
        assert case.memory_limit is not None and "memory_limit" in str(refusal), (
            f"valid {case.pattern!r} with sizes {sizes} failed on shapes {fitted}: {refusal}")
    if out is not None:
        event(f"{kind}: called")


# ------------------------------------------------------------------ the tests


@pytest.mark.slow
@_fuzz_settings(FUZZ_EXAMPLES)
@given(ANY_PATTERN, st.data())
def test_fuzz_result_or_einc_error(case, data):
    torch.manual_seed(0)
    with time_limit(CASE_SECONDS):
        exercise(case, data)


# Minimal, deterministic cases the fuzzer found: each gets the fuzz property (explain and
# call agree, a result passes validate, anything else is an EincError).
FUZZ_FINDINGS = [
    # validate() raises IndexError from torch.amax: a max-plus contraction over an empty
    # axis returns -inf, and validate's reference reduces the empty axis with amax.
    pytest.param("max(ab,b)", [(2, 0), (0,)], {}, id="validate-maxplus-empty-contraction"),
    pytest.param("min(c a, c)", [(0, 2), (0,)], {}, id="validate-minplus-empty-contraction"),
]


@pytest.mark.parametrize("pattern, shapes, sizes", FUZZ_FINDINGS)
def test_fuzz_findings(pattern, shapes, sizes):
    torch.manual_seed(0)
    expr = einc.compile(pattern, backend="eager", **sizes)
    check_fitted(expr, shapes)


def test_max_over_an_empty_contracted_axis_is_an_error_as_readme_says():
    # README: "max/min over an axis of size 0 is an EincError".  It is for a one-operand
    # reduction and for an axis reduced before the product, but a max-plus/min-plus
    # contraction over an empty axis returns -inf instead (found by the fuzzer).
    b0 = torch.zeros(2, 0)
    for pattern, xs in [("max(a b -> a)", [b0]), ("max(a b, a -> a)", [b0, torch.zeros(2)]),
                        ("max(a b, b -> a)", [b0, torch.zeros(0)]), ("min(a b, b c -> a c)", [b0, torch.zeros(0, 3)])]:
        with pytest.raises(einc.EincError, match="size 0"):
            einc.compile(pattern, backend="eager")(*xs)


# ------------------------------------------------------------ code injection

LONG = "a" * 10_000
HOSTILE_NAMES = [
    "__import__", "__class__", "__builtins__", "__dict__", "exec", "eval", "os", "sys", "torch", "List",
    "Tuple", "einc_fn", "einc_constants", "einc_lse", "einc_logmm", "einc_tropical", "einc_shifted_exp",
    "x0", "x1", "t0", "t1", "k0", "c0", "c1", "self", "print", "open", "compile", "globals", "float",
    "inf", "nan", "floor", "dims", "e", "out", "shift", "raw", "permute", "reshape", "_", "__", "___",
    "N" * 10_000, "_" + "x" * 9_999, LONG,
]
"""Identifiers that are valid axis names: they must compile and stay out of the source."""

INVALID_NAMES = [
    "a'b", 'a"b', "a;b", "a\\b", "a.b", "a#b", "a\x00", "os.system('rm')", "a}", "a{",
    "a=b", "a+b", "a\nimport(os)", "a@b", "a`b", "a$b", "a%b", "a!b", "a?b", "a:b", "a|b", "a&b", "a^b", "a~b", "a<b", "a>b",
    "'''", '"""', "\\n", "\\x00",
    "\u0430",  # Cyrillic a
    "\u0430b",  # Cyrillic a, then ASCII
    "b\u0430",
    "\uff41",  # fullwidth a
    "a\u200db",  # zero-width joiner
    "\u200b",  # zero-width space
    "a\u00a0b",  # no-break space
    "\u00e9",  # e acute
    "\U0001d41a",  # mathematical bold a
    "\u2160",  # roman numeral one
    "a\u0301",  # combining acute accent
    "\ufeffa",  # byte order mark
    "0", "2a",  # ("9" alone is an anonymous axis of size 9, as in einops)
    "\u0430" * 10_000,
]
"""Text that is no identifier (or not ASCII): such patterns must raise EincError."""

TEMPLATES = [
    # (template with {0} {1} {2} as axis names, shapes, keyword sizes by name position)
    ("{0} {1}, {1} {2} -> {0} {2}", [(2, 3), (3, 4)], {}),
    ("{0} {1} -> {1} {0}", [(2, 3)], {}),
    ("{0} {0} -> {0}", [(3, 3)], {}),
    ("{0} {1} {2} -> {2}", [(2, 3, 4)], {}),
    ("({0} {1}) {2} -> {2} {0} {1}", [(6, 4)], {0: 2}),
    ("{2} ({0} {1}) -> ({1} {2}) {0}", [(4, 6)], {1: 3}),
    ("... {0}, {0} {1} -> ... {1}", [(5, 2, 3), (3, 4)], {}),
    ("{0} 1 {1} -> {1} 1 {0}", [(2, 1, 3)], {}),
    ("{0} {1}, {1} {2}, {2} {0} -> {0}", [(2, 3), (3, 4), (4, 2)], {}),
    ("sum({0} {1} -> {0})", [(2, 3)], {}),
    ("mean({0} {1}, {1} {2} -> {0} {2})", [(2, 3), (3, 4)], {}),
    ("max({0} {1}, {1} {2} -> {0} {2})", [(2, 3), (3, 4)], {}),
    ("min({0} {1} -> {1})", [(2, 3)], {}),
    ("prod({0} {1} -> {0})", [(2, 3)], {}),
    ("logsumexp({0} {1}, {1} {2} -> {0} {2})", [(2, 3), (3, 4)], {}),
    ("logsumexp({0} {1} {2} -> {0})", [(2, 3, 4)], {}),
    ("softmax({0} {1}, {1} {2} -> {0} [{2}])", [(2, 3), (3, 4)], {}),
    ("log_softmax({0} [{1}])", [(2, 3)], {}),
    ("log_softmax({0} [{1} {2}])", [(2, 3, 4)], {}),
    ("{0} {1} -> {0} {1} {2}", [(2, 3)], {2: 5}),  # {2} is new: sized by keyword
]


def _fill(template: str, names) -> str:
    return template.format(*names)


def _sizes(names, by_position: dict) -> dict:
    return {names[i]: n for i, n in by_position.items()}


def _explain_checked(pattern: str, shapes, sizes, **options) -> einc.Plan:
    expr = einc.compile(pattern, backend="eager", **options, **sizes)
    plan = expr.explain(*shapes)
    check_source(plan.source, pattern_axes(expr.ir))
    return plan


NEUTRAL = ("p", "q", "r")


def check_renaming_invariance(template: str, names, shapes, by_position: dict, **options) -> None:
    """The source of ``template`` filled with ``names`` equals the one with neutral names."""
    hostile = _explain_checked(_fill(template, names), shapes, _sizes(names, by_position), **options)
    plain = _explain_checked(_fill(template, NEUTRAL), shapes, _sizes(NEUTRAL, by_position), **options)
    assert hostile.source == plain.source, f"{names}:\n{hostile.source}\nvs\n{plain.source}"
    assert hostile.path == plain.path


def _triples(names):
    """Each hostile name in each of the three axis roles (the others neutral), then the
    short ones three at a time."""
    out = []
    for name in names:
        for role in range(3):
            triple = list(NEUTRAL)
            triple[role] = name
            out.append(tuple(triple))
    short = [n for n in names if len(n) < 100]
    for i in range(0, len(short) - 2, 3):
        out.append(tuple(short[i:i + 3]))
    return out


@pytest.mark.parametrize("template, shapes, by_position", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_hostile_identifiers_never_reach_the_source(template, shapes, by_position):
    for names in _triples(HOSTILE_NAMES):
        if any(names[i] in _UNSIZABLE for i in by_position):
            continue  # see test_axis_names_like_parameter_names_are_sizes
        check_renaming_invariance(template, names, shapes, by_position)


@pytest.mark.parametrize("name", INVALID_NAMES, ids=[ascii(n)[:30] for n in INVALID_NAMES])
def test_non_identifiers_are_einc_errors(name):
    # In every position, in every kind of pattern, with every notation: EincError.
    for template, _, _ in TEMPLATES:
        for role in range(3):
            names = list(NEUTRAL)
            names[role] = name
            pattern = _fill(template, names)
            if name not in pattern:  # the template has no third axis
                continue
            for notation in ("auto", "spaced", "compact"):
                with pytest.raises(einc.EincError):
                    einc.compile(pattern, backend="eager", notation=notation)


@pytest.mark.parametrize(
    "pattern",
    [
        "__import__('os').system('echo pwned')",
        "i j -> i j; import os",
        "i j -> i j\nimport os",
        "i j -> i j # comment",
        "exec('1'), a -> a",
        "eval(a -> a)",
        "sum(a -> a) or __import__('os')",
        "lambda: 0",
        "a -> b if True else c",
        "a -> {b}",
        "a -> f'{b}'",
        "a -> b\\\nc",
        "sum(a b -> a)); import os; (",
        "softmax(a [b]); exec('x')",
        "a -> a.__class__",
        "a -> a[0]",
        "x0 -> x0.__globals__",
        "torch.load -> torch",
        "a, b -> a * -b",
        "a -> a * 0.5",  # scale factors are ints and axis sizes, no float literals
        "a -> a * 1e3",
        "a -> a / sqrt(a) ** 2",
        "a -> a * __import__",
        "a -> -a",
        "i j -> j i\x00",
        "\u0430 b -> b \u0430",  # Cyrillic a
        "\uff41\uff42->\uff42\uff41",  # fullwidth letters, compact
        "a\u200d b -> b a",  # zero-width joiner
        "sum\u200b(a -> a)",
        "\u0455um(a b -> a)",  # Cyrillic dze looks like s
    ],
)
def test_code_like_patterns_are_einc_errors(pattern):
    for notation in ("auto", "spaced", "compact"):
        with pytest.raises(einc.EincError):
            einc.compile(pattern, backend="eager", notation=notation)


def test_constants_with_hostile_names_keep_the_source_clean():
    # Constant folding emits einc_constants, c<N> and k<N>: axis names c0/k0/einc_constants
    # must not interfere with it.
    w = torch.randn(3, 4, dtype=torch.float64)
    for names in [("c0", "k0", "einc_constants"), ("einc_constants", "c1", "k1"), ("p", "q", "r")]:
        pattern = "{0} {1}, {1} {2} -> {0} {2}".format(*names)
        expr = einc.compile(pattern, backend="eager", constants={1: w})
        plan = expr.explain((2, 3))
        check_source(plan.source, pattern_axes(expr.ir))
        assert CONSTANT_FUNCTION_NAME in plan.source
        x = torch.randn(2, 3, dtype=torch.float64)
        torch.testing.assert_close(expr(x), x @ w)
    plain = einc.compile("p q, q r -> p r", backend="eager", constants={1: w}).explain((2, 3)).source
    hostile = einc.compile("c0 k0, k0 einc_constants -> c0 einc_constants", backend="eager",
                           constants={1: w}).explain((2, 3)).source
    assert plain == hostile


@pytest.mark.parametrize("names", [("torch", "List", "x0"), ("einc_fn", "t0", "einc_lse"), ("__import__", "os", "sys")])
def test_hostile_names_compile_under_torchscript(names):
    # The same source through TorchScript: names that match the module's globals or the
    # generated locals change nothing.
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    f = einc.compile("logsumexp({0} {1}, {1} {2} -> {0} {2})".format(*names))
    torch.testing.assert_close(f(a, b), torch.logsumexp(a[:, :, None] + b[None], 1))
    g = einc.compile("{0} {1}, {1} {2} -> {2} {0}".format(*names))
    torch.testing.assert_close(g(a, b), (a @ b).T)


# Spaced patterns whose axis names are dunders, builtins and einc's own names evaluate as
# the same pattern in compact letters does.
DUNDER_EQUIVALENTS = [
    ("__import__ os, os sys -> __import__ sys", "ab,bc->ac", [(2, 3), (3, 4)]),
    ("os __import__ -> __import__ os", "ab->ba", [(2, 3)]),
    ("__class__ __class__ -> __class__", "aa->a", [(3, 3)]),
    ("exec eval, eval sys, sys os -> exec os", "ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)]),
    ("torch List, List x0 -> x0 torch", "ab,bc->ca", [(2, 3), (3, 4)]),
    ("x0 x1, x1 t0, t0 k0 -> x0 k0", "ab,bc,cd->ad", [(2, 3), (3, 4), (4, 2)]),
    ("einc_fn einc_lse, einc_lse c0 -> einc_fn", "ab,bc->a", [(2, 3), (3, 4)]),
    ("t0 t1 t2, t2 t1 -> t0", "abc,cb->a", [(2, 3, 4), (4, 3)]),
    ("... x0, x0 einc_constants -> ... einc_constants", "...a,ab->...b", [(5, 2, 3), (3, 4)]),
    ("Tuple k0, k0 -> Tuple", "ab,b->a", [(2, 3), (3,)]),
    ("__builtins__ self, self print, print open -> open __builtins__", "ab,bc,cd->da", [(2, 3), (3, 2), (2, 4)]),
]


@pytest.mark.parametrize("spaced, compact, shapes", DUNDER_EQUIVALENTS, ids=[d[0] for d in DUNDER_EQUIVALENTS])
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_dunder_axis_names_evaluate_like_compact_letters(spaced, compact, shapes, backend):
    xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    expected = reference_einsum(compact, *xs)
    out = einc.compile(spaced, backend=backend)(*xs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out = einc.einsum(compact, *xs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_very_long_names_compile_and_evaluate():
    a, b = "a" * 10_000, "B_" * 5_000
    x, w = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expr = einc.compile(f"{a} {b}, {b} c -> c {a}", backend="eager")
    plan = expr.explain(x, w)
    check_source(plan.source, pattern_axes(expr.ir))
    assert len(plan.source) < 1000
    torch.testing.assert_close(expr(x, w), (x @ w).T)
    # A 10,000-letter compact operand is 10,000 axes: an EincError on a mismatched tensor.
    with pytest.raises(einc.EincError):
        einc.compile("a" * 10_000 + "->a", backend="eager")(x)


HOSTILE_OR_INVALID = st.one_of(
    st.sampled_from(HOSTILE_NAMES + INVALID_NAMES),
    st.from_regex(r"\A_{0,2}[A-Za-z][A-Za-z0-9_]{0,12}\Z"),
    st.text(min_size=1, max_size=12),
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@settings(max_examples=examples(150), deadline=None)
@given(
    st.sampled_from(TEMPLATES),
    st.lists(HOSTILE_OR_INVALID, min_size=3, max_size=3, unique=True),
    st.sampled_from(["auto", "spaced"]),
)
def test_fuzzed_names_never_reach_the_source(template_row, names, notation):
    """Random names in every template: an EincError, or a clean source; with valid
    identifiers, the same source as with neutral names."""
    template, shapes, by_position = template_row
    if set(names) & set(NEUTRAL):
        return
    pattern = _fill(template, names)
    used = [names[i] for i in range(3) if f"{{{i}}}" in template]
    identifiers = all(_IDENTIFIER.match(n) and not keyword.iskeyword(n) for n in used)
    sizes = {k: v for k, v in _sizes(names, by_position).items() if k not in _UNSIZABLE}
    note(repr(pattern))
    with time_limit(CASE_SECONDS):
        expr, err = _attempt(lambda: einc.compile(pattern, backend="eager", notation=notation, **sizes))
        if identifiers and (notation == "spaced" or len(used) == 3):
            assert err is None, f"{pattern!r} was refused: {err}"
        if expr is None:
            return
        plan, err = _attempt(lambda: expr.explain(*shapes))
        if plan is None:
            return
        check_source(plan.source, pattern_axes(expr.ir))
        if identifiers and notation == "spaced" and len(sizes) == len(by_position):
            plain = einc.compile(_fill(template, NEUTRAL), backend="eager", notation=notation,
                                 **_sizes(NEUTRAL, by_position)).explain(*shapes)
            assert plan.source == plain.source


# Axis sizes are keyword arguments (SPEC: ``einc.compile(pattern, *, backend=..., **sizes)``),
# so any valid axis name other than compile()'s documented options (backend, optimize,
# notation, memory_limit, constants) must work as a size.  Found by the injection tests:
# ``self`` and ``pattern`` collide with positional parameters (TypeError), and
# ``cache_size`` is taken as Expression's cache size instead of an axis size.
PARAMETER_LIKE_AXES = ["self", "pattern", "cache_size", "sizes", "tensors", "tensors_or_shapes", "cls", "kwargs"]


@pytest.mark.parametrize("entry", ["compile", "einsum"])
@pytest.mark.parametrize("name", PARAMETER_LIKE_AXES)
def test_axis_names_like_parameter_names_are_sizes(name, entry):
    x = torch.arange(6.0, dtype=torch.float64)
    pattern = f"({name} d) -> d {name}"
    expected = x.reshape(2, 3).T
    try:
        if entry == "compile":
            out = einc.compile(pattern, backend="eager", **{name: 2})(x)
        else:
            out = einc.einsum(pattern, x, **{name: 2})
    except einc.EincError as err:
        pytest.fail(f"{entry}({pattern!r}, {name}=2) refused a valid axis size: {err}")
    torch.testing.assert_close(out, expected)


# Found by probing beyond patterns: inputs that pass einc's checks and reach torch, which
# raises its own exception types instead of an EincError.
@pytest.mark.parametrize(
    "pattern, tensors",
    [
        # torch.logsumexp itself accepts integer tensors (and returns floats).
        pytest.param("logsumexp(a b -> a)", [torch.ones(2, 3, dtype=torch.int64)], id="int-logsumexp"),
        pytest.param("logsumexp(a b, b c -> a c)", [torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)],
                     id="int-log-semiring"),
        pytest.param("softmax(a [b])", [torch.ones(2, 3, dtype=torch.int64)], id="int-softmax"),
    ],
)
def test_unsupported_dtypes_are_einc_errors(pattern, tensors):
    # Every user error is an EincError; integers have no logsumexp or softmax in einc.
    with pytest.raises(einc.EincError, match="needs floating-point tensors"):
        einc.compile(pattern, backend="eager")(*tensors)


@pytest.mark.parametrize(
    "pattern, sizes, shape",
    [
        pytest.param("a -> a b", {"b": 2**62}, (2,), id="new-axis-numel-overflow"),  # RuntimeError
        pytest.param("a -> a b", {"b": 10**30}, (2,), id="new-axis-beyond-int64"),  # TypeError
        pytest.param("(a b) -> a b", {"a": 10**30}, (0,), id="composition-beyond-int64"),  # TypeError
    ],
)
def test_oversized_keyword_sizes_are_einc_errors(pattern, sizes, shape):
    # Sizes past what a tensor can index: refused before torch sees them.
    with pytest.raises(einc.EincError, match="2\\*\\*63"):
        einc.compile(pattern, backend="eager", **sizes)(torch.ones(shape))
