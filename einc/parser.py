"""Pattern string -> :class:`einc.ir.Pattern`.

The Lark grammar (``grammar/einc.lark``) tokenises both spellings alike; a Lark
``Transformer`` turns the parse tree into located terms (each with its place in the
string).  This module then decides the spelling, splits compact names into letters,
fills in implicit outputs and builds the IR.  The rules of the pattern language are
the IR's (:mod:`einc.ir`): the parser adds the caret under what broke one.  Only
syntax is checked here (what the notation allows where), and Lark's
``UnexpectedInput`` becomes an :class:`EincError` at this boundary.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)

from . import ir
from .errors import EincError, PatternError, at

__all__ = ["parse", "grammar_path", "tables_path", "write_tables", "Notation", "MAX_PATTERN_LENGTH", "MAX_NESTING"]

Notation = Literal["auto", "compact", "spaced"]

MAX_PATTERN_LENGTH = 65_536
"""Longest pattern accepted, in characters: a network of thousands of operands fits;
parsing a pattern is linear in its length, but nothing useful is megabytes long."""

MAX_NESTING = 32
"""Deepest nesting of parentheses (nested operations and compositions) accepted."""

_GRAMMAR = "einc.lark"

_TERMINAL_WORDS = {
    "NAME": "an axis name",
    "ELLIPSIS": "'...'",
    "ARROW": "'->'",
    "COMMA": "','",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "OP": "an operation",
    "INT": "a number",
    "SCALE_OP": "'*' or '/'",
    "SQRT": "'sqrt'",
    "$END": "the end of the pattern",
    "<END-OF-FILE>": "the end of the pattern",
}


def grammar_path() -> Path:
    """Where ``einc.lark`` is: inside the installed package, else the source tree's ``grammar/``."""
    packaged = resources.files("einc") / "grammar" / _GRAMMAR
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "grammar" / _GRAMMAR


_OPTIONS: dict[str, Any] = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": False}


def tables_path() -> Path:
    """The LALR tables built from the grammar, shipped beside it (``einc.lark.tables``)."""
    return grammar_path().with_name(_GRAMMAR + ".tables")


def _tables_key(grammar: str) -> bytes:
    """What the tables were built from: the grammar, the options and lark's version."""
    text = grammar + repr(sorted(_OPTIONS.items())) + lark.__version__
    return hashlib.sha256(text.encode()).hexdigest().encode() + b"\n"


def write_tables(path: Path | None = None) -> Path:
    """Build the parser from the grammar and save its tables: after changing the grammar,
    ``python -c "from einc.parser import write_tables; write_tables()"``.

    Building the LALR tables takes about 100 ms, loading them about 2 ms: they ship with
    einc, and a test checks that they match the grammar.
    """
    grammar = grammar_path().read_text(encoding="utf-8")
    path = path or tables_path()
    with open(path, "wb") as f:
        f.write(_tables_key(grammar))
        Lark(grammar, **_OPTIONS).save(f)
    return path


@functools.cache
def _lark() -> Lark:
    # Made on first use, not at import: importing einc stays cheap.  The shipped tables
    # are einc's own file; where they do not match (another lark version), build.
    grammar = grammar_path().read_text(encoding="utf-8")
    try:
        with open(tables_path(), "rb") as f:
            if f.readline() == _tables_key(grammar):
                return Lark.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        pass
    return Lark(grammar, **_OPTIONS)


# ------------------------------------------------------------------ located terms


@dataclass(frozen=True, slots=True)
class _Term:
    """One term of an axis list, with its place in the pattern string."""

    kind: Literal["axis", "number", "ellipsis", "group", "bracket"]
    start: int
    end: int
    name: str = ""
    items: tuple[_Term, ...] = ()


@dataclass(frozen=True, slots=True)
class _Scale:
    divide: bool
    value: str
    is_int: bool
    sqrt: bool
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Modifier:
    kind: str
    axes: tuple[_Term, ...]
    size: int | None
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Contraction:
    inputs: tuple[tuple[_Term, ...] | _Call, ...]
    output: tuple[_Term, ...] | None
    scale: tuple[_Scale, ...]
    modifiers: tuple[_Modifier, ...] = ()


@dataclass(frozen=True, slots=True)
class _Call:
    op: str
    start: int
    end: int
    body: _Contraction


def _token_term(kind: Any, token: Token) -> _Term:
    return _Term(kind, token.start_pos, token.end_pos, name=str(token))


@v_args(meta=True, inline=True)
class _Located(Transformer):
    """Parse tree -> located terms, calls and contractions (positions from ``meta``)."""

    def axis(self, meta: Any, token: Token) -> _Term:
        return _token_term("axis", token)

    def number(self, meta: Any, token: Token) -> _Term:
        return _token_term("number", token)

    def ellipsis(self, meta: Any, token: Token) -> _Term:
        return _token_term("ellipsis", token)

    def group(self, meta: Any, *items: _Term) -> _Term:
        return _Term("group", meta.start_pos, meta.end_pos, items=items)

    def bracket(self, meta: Any, *items: _Term) -> _Term:
        return _Term("bracket", meta.start_pos, meta.end_pos, items=items)

    def axis_list(self, meta: Any, *terms: _Term) -> tuple[_Term, ...]:
        return terms

    def output(self, meta: Any, terms: tuple[_Term, ...]) -> tuple[str, tuple[_Term, ...]]:
        return "output", terms

    def inputs(self, meta: Any, *operands: tuple[_Term, ...] | _Call) -> tuple[str, tuple[Any, ...]]:
        return "inputs", operands

    def scale(self, meta: Any, sign: Token, factor: tuple[str, Token, bool]) -> _Scale:
        _, value, sqrt = factor
        return _Scale(str(sign) == "/", str(value), value.type == "INT", sqrt, meta.start_pos, meta.end_pos)

    def int_factor(self, meta: Any, token: Token) -> tuple[str, Token, bool]:
        return "factor", token, False

    axis_factor = int_factor

    def sqrt_factor(self, meta: Any, _sqrt: Token, token: Token) -> tuple[str, Token, bool]:
        return "factor", token, True

    def modifier(self, meta: Any, kind: Token, axes: tuple[_Term, ...], size: Token | None = None) -> _Modifier:
        return _Modifier(str(kind), axes, None if size is None else int(size), meta.start_pos, meta.end_pos)

    def contraction(self, meta: Any, *parts: Any) -> _Contraction:
        named = [p for p in parts if isinstance(p, tuple)]
        inputs = next(value for key, value in named if key == "inputs")
        output = next((value for key, value in named if key == "output"), None)
        return _Contraction(inputs, output, tuple(p for p in parts if isinstance(p, _Scale)),
                            tuple(p for p in parts if isinstance(p, _Modifier)))

    def op_call(self, meta: Any, op: Token, body: _Contraction) -> _Call:
        return _Call(str(op), op.start_pos, op.end_pos, body)

    def start(self, meta: Any, body: _Contraction) -> _Contraction:
        return body


# ------------------------------------------------------------------ syntax errors


_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\(")


def _unknown_operation(pattern: str, position: int) -> EincError | None:
    """A misspelt operation around ``position``: ``softmx(b [c])`` reads as an axis
    ``softmx`` and a composition, which fails inside the parentheses."""
    for match in _CALL.finditer(pattern):
        name = match.group(1)
        if name in ir.OPS or name == "sqrt" or position < match.end():
            continue
        depth, close = 1, len(pattern)
        for index in range(match.end(), len(pattern)):
            depth += {"(": 1, ")": -1}.get(pattern[index], 0)
            if depth == 0:
                close = index
                break
        if position <= close:
            close_match = difflib.get_close_matches(name, ir.OPS, n=1)
            hint = f" (did you mean {close_match[0]!r}?)" if close_match else ""
            return at(pattern, match.start(1), match.end(1),
                      f"unknown operation {name!r}{hint}; the operations are {', '.join(ir.OPS)}")
    return None


def _syntax_error(pattern: str, err: UnexpectedInput) -> EincError:
    if not isinstance(err, UnexpectedCharacters):  # a stray character is reported as such
        unknown = _unknown_operation(pattern, err.pos_in_stream or 0)
        if unknown is not None:
            return unknown
    ended = isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END")
    if isinstance(err, UnexpectedCharacters):
        what = f"unexpected character {pattern[err.pos_in_stream]!r}"
    elif ended:
        what = "the pattern ends too early"
    else:
        what = f"unexpected {str(err.token)!r}"  # type: ignore[attr-defined]
    expected_terminals = set(getattr(err, "expected", ()) or ())
    if isinstance(err, UnexpectedToken) and err.interactive_parser is not None:
        # The LALR state's lookaheads are shared with nested calls (they list ')' at
        # the top level); the interactive parser knows what can really follow here.
        expected_terminals = set(err.interactive_parser.accepts())
    # Modifiers (mask(...), causal(...)) may follow any output, but mean something only
    # after a normalizer's: listing them everywhere would mislead.
    expected = sorted({_TERMINAL_WORDS.get(e, e) for e in expected_terminals - {"MODIFIER"}})
    if expected:
        what += f" (expected {', '.join(expected)})"
    pos = len(pattern) if ended or err.pos_in_stream is None else err.pos_in_stream
    return at(pattern, pos, None, what)


def _check_nesting(pattern: str) -> None:
    depth = 0
    for index, char in enumerate(pattern):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth > MAX_NESTING:
            raise at(pattern, index, None, f"parentheses nest deeper than {MAX_NESTING} levels")


# ------------------------------------------------------------------ spelling


def _axis_lists(body: _Contraction) -> list[tuple[_Term, ...]]:
    """Every axis list of a contraction, nested operations' included (spelling is global)."""
    lists: list[tuple[_Term, ...]] = []
    for operand in body.inputs:
        lists.extend(_axis_lists(operand.body) if isinstance(operand, _Call) else [operand])
    if body.output is not None:
        lists.append(body.output)
    lists.extend(m.axes for m in body.modifiers)
    return lists


def _is_spaced(lists: list[tuple[_Term, ...]]) -> bool:
    for terms in lists:
        for term in terms:
            if term.kind in ("number", "group") or any(i.kind == "group" for i in term.items):
                return True
        if any(a.end < b.start for a, b in zip(terms, terms[1:])):
            return True
    return False


def _check_not_mixed(pattern: str, lists: list[tuple[_Term, ...]]) -> None:
    """Refuse a pattern that reads as spaced but has a compact-looking axis list.

    ``"ij, j k -> ik"`` is spaced (``j k``), so ``ij`` and ``ik`` would be single
    axes: a name of several letters used once, beside a list of one-letter axes, is
    almost surely a compact list that slipped in.
    """
    letters = [terms for terms in lists if len(terms) >= 2 and all(
        t.kind == "axis" and len(t.name) == 1 for t in terms)]
    if not letters:
        return
    counts = Counter(t.name for terms in lists for t in terms if t.kind == "axis")
    for terms in lists:
        if len(terms) == 1 and terms[0].kind == "axis" and len(terms[0].name) > 1 \
                and terms[0].name.isalpha() and counts[terms[0].name] == 1:
            spaced = " ".join(t.name for t in letters[0])
            raise at(pattern, terms[0].start, terms[0].end,
                     f"the pattern mixes compact and spaced axis lists: {terms[0].name!r} is one axis "
                     f"where {spaced!r} are several; write {' '.join(terms[0].name)!r}, or pass "
                     f"notation='spaced' if {terms[0].name!r} is one axis")


# ------------------------------------------------------------------ building the IR


Span = tuple[int, int]


@dataclass
class _Spans:
    """Where each part of one contraction is, for carets under IR rule errors."""

    whole: Span
    op: Span
    inputs: list[dict[str, Span]] = field(default_factory=list)
    output: dict[str, Span] = field(default_factory=dict)
    scale: list[Span] = field(default_factory=list)
    modifiers: list[Span] = field(default_factory=list)

    def of(self, subject: tuple[object, ...]) -> Span:
        kind = subject[0] if subject else None
        if kind == "input" and len(subject) == 3 and isinstance(subject[1], int) and subject[1] < len(self.inputs):
            return self.inputs[subject[1]].get(str(subject[2]), self.whole)
        if kind == "output" and len(subject) == 2:
            return self.output.get(str(subject[1]), self.whole)
        if kind == "scale" and len(subject) == 2 and isinstance(subject[1], int) and subject[1] < len(self.scale):
            return self.scale[subject[1]]
        if kind == "modifier" and len(subject) == 2 and isinstance(subject[1], int) \
                and subject[1] < len(self.modifiers):
            return self.modifiers[subject[1]]
        return self.op if kind == "op" else self.whole


class _Builder:
    """Turns located terms into IR, with caret errors."""

    def __init__(self, pattern: str, compact: bool) -> None:
        self.pattern = pattern
        self.compact = compact
        self._anonymous = itertools.count()

    def error(self, start: int, end: int, message: str) -> EincError:
        return at(self.pattern, start, end, message)

    def _names(self, term: _Term) -> list[tuple[str, _Term]]:
        """The axis names of an ``axis`` term: one, or its letters when compact."""
        if not self.compact:
            return [(term.name, term)]
        out = []
        for i, letter in enumerate(term.name):
            sub = _Term("axis", term.start + i, term.start + i + 1, name=letter)
            if not letter.isalpha() or not letter.isascii():
                raise self.error(sub.start, sub.end, "compact notation takes letters only (use spaces for named axes)")
            out.append((letter, sub))
        return out

    def _number(self, term: _Term) -> str | None:
        """A number term: ``None`` for the unit ``1``, else a new anonymous axis."""
        if self.compact:
            what = "unit axis '1'" if term.name == "1" else f"anonymous axis {term.name!r}"
            raise self.error(term.start, term.end, f"{what} needs spaced notation")
        if term.end < len(self.pattern) and (self.pattern[term.end].isalpha() or self.pattern[term.end] == "_"):
            raise self.error(term.start, term.end, "an axis name starts with a letter or '_'; a number is an "
                                                   "anonymous axis")
        size = int(term.name)
        if size == 1:
            return None
        try:
            return ir.anonymous_axis(size, next(self._anonymous))
        except PatternError as err:
            raise self.error(term.start, term.end, err.message) from None

    def _group(self, term: _Term, located: dict[str, Span]) -> tuple[str, ...]:
        if self.compact:
            raise self.error(term.start, term.end, "composition '( )' needs spaced notation")
        names: list[str] = []
        for item in term.items:
            if item.kind == "axis":
                (name, _), = self._names(item)
            elif item.kind == "number":
                anonymous = self._number(item)
                if anonymous is None:
                    continue
                name = anonymous
            else:  # ellipsis: its dimensions merge into this one (the IR allows it in outputs only)
                name = ir.MERGED_ELLIPSIS
            names.append(name)
            located[name] = (item.start, item.end)
        return tuple(names)

    def axis_list(self, terms: tuple[_Term, ...], *, brackets: bool
                  ) -> tuple[ir.AxisList, list[str], dict[str, Span]]:
        """(axis list, bracketed names, where each name's term is) of one list of terms.

        A rule broken inside the list (a keyword, a repeat in a composition) gets its
        caret under the axis itself; the returned spans are of whole terms (an axis of
        a composition is shown with its composition), the last occurrence winning, for
        rules across lists.
        """
        dims: list[tuple[str, ...]] = []
        bracketed: list[str] = []
        located: dict[str, Span] = {}
        whole: dict[str, Span] = {}
        for term in terms:
            before = set(located.items())
            if term.kind == "ellipsis":
                if ir.ELLIPSIS in located or ir.MERGED_ELLIPSIS in located:
                    raise self.error(term.start, term.end, "'...' may appear once per operand")
                dims.append((ir.ELLIPSIS,))
                located[ir.ELLIPSIS] = (term.start, term.end)
            elif term.kind == "number":
                anonymous = self._number(term)
                dims.append(() if anonymous is None else (anonymous,))
                if anonymous is not None:
                    located[anonymous] = (term.start, term.end)
            elif term.kind == "axis":
                for name, sub in self._names(term):
                    dims.append((name,))
                    located[name] = (sub.start, sub.end)
            elif term.kind == "group":
                dims.append(self._group(term, located))
            else:  # bracket
                if not brackets:
                    raise self.error(term.start, term.end,
                                     "brackets mark normalized axes, only in the output of softmax/log_softmax "
                                     "(or a gather's indexed axes, in its data)")
                inner, _, inner_located = self.axis_list(term.items, brackets=False)
                dims.extend(inner.dims)
                bracketed.extend(inner.axes)
                located.update(inner_located)
            span = (term.start, term.end) if term.kind == "group" else None
            for name, at_ in set(located.items()) - before:
                whole[name] = span or at_
        try:
            return ir.AxisList(tuple(dims)), bracketed, whole
        except PatternError as err:
            start, end = located.get(str(err.subject[-1]) if err.subject else "", (terms[0].start, terms[-1].end))
            raise self.error(start, end, err.message) from None

    def factor(self, scale: _Scale) -> ir.Factor:
        value: int | str = int(scale.value) if scale.is_int else scale.value
        start = scale.end - len(scale.value) - (1 if scale.sqrt else 0)
        try:
            return ir.Factor(scale.divide, value, sqrt=scale.sqrt)
        except PatternError as err:
            raise self.error(start, start + len(scale.value), err.message) from None

    def modifier(self, modifier: _Modifier) -> ir.Modifier:
        axes, _, _ = self.axis_list(modifier.axes, brackets=False)
        if any(len(dim) != 1 for dim in axes.dims):
            raise self.error(modifier.start, modifier.end, f"{modifier.kind}(...) takes plain axis names")
        try:
            return ir.Modifier(modifier.kind, axes.axes, modifier.size)
        except PatternError as err:
            raise self.error(modifier.start, modifier.end, err.message) from None

    def contraction(self, body: _Contraction, op: str | None, op_span: Span) -> ir.Pattern:
        """The pattern of one contraction (an operation's body when ``op`` is given)."""
        normalizer = op in ir.NORMALIZERS
        arrowless = normalizer and body.output is None
        if arrowless and len(body.inputs) != 1:
            raise self.error(*op_span, f"{op} without '->' takes exactly one operand")
        if op == "gather" and body.output is None:
            raise self.error(*op_span, "gather(...) needs '->' and its output, e.g. gather(b t [v], b t -> b t)")
        spans = _Spans(whole=op_span if op else (0, len(self.pattern)), op=op_span)
        inputs: list[ir.AxisList | ir.Pattern] = []
        bracketed: list[str] = []
        marked: list[str] = []  # a gather's data: its indexed axes, einx's spelling
        for position, operand in enumerate(body.inputs):
            if isinstance(operand, _Call):
                if arrowless:
                    raise self.error(*op_span, f"{op} without '->' takes an axis list, not a nested operation")
                inputs.append(self.contraction(operand.body, operand.op, (operand.start, operand.end)))
                spans.inputs.append({})
                continue
            gathered = op == "gather" and position == 0
            axes, marks, located = self.axis_list(operand, brackets=arrowless or gathered)
            inputs.append(axes)
            (marked if gathered else bracketed).extend(marks)
            spans.inputs.append(located)
        lists = [x.output if isinstance(x, ir.Pattern) else x for x in inputs]
        if body.output is None:
            output = lists[0] if arrowless else _implicit_output(lists)
        else:
            output, marks, spans.output = self.axis_list(body.output, brackets=normalizer)
            bracketed.extend(marks)
        scale = tuple(self.factor(s) for s in body.scale)
        spans.scale = [(s.start, s.end) for s in body.scale]
        modifiers = tuple(self.modifier(m) for m in body.modifiers)
        spans.modifiers = [(m.start, m.end) for m in body.modifiers]
        try:
            pattern = ir.Pattern(inputs=tuple(inputs), output=output, op=op,
                                 normalized=tuple(dict.fromkeys(bracketed)), compact=self.compact, scale=scale,
                                 modifiers=modifiers)
        except PatternError as err:
            raise self.error(*spans.of(err.subject), err.message) from None
        if marked and set(marked) != set(pattern.indexed):
            raise self.error(*spans.of(("input", 0, marked[0])),
                             f"brackets in gather(...)'s data mark its indexed axes, those the output drops "
                             f"({', '.join(map(repr, pattern.indexed)) or 'none'}), not "
                             f"{', '.join(map(repr, marked))}")
        return pattern


def _implicit_output(inputs: list[ir.AxisList]) -> ir.AxisList:
    counts = Counter(a for operand in inputs for a in operand.axes)
    once = sorted(a for a, n in counts.items() if n == 1)
    ellipsis = [(ir.ELLIPSIS,)] if any(x.has_ellipsis for x in inputs) else []
    return ir.AxisList(tuple(ellipsis + [(a,) for a in once]))


def parse(pattern: str, notation: Notation = "auto") -> ir.Pattern:
    """Parse ``pattern`` into an :class:`einc.ir.Pattern`.

    >>> parse("bhqd,bhkd->bhqk").render()
    'bhqd,bhkd->bhqk'
    >>> parse("b h q d, b h k d -> b h q k").output.dims
    (('b',), ('h',), ('q',), ('k',))
    >>> parse("logsumexp(b (h d) -> b h)").op
    'logsumexp'
    >>> parse("softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e").render()
    'softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e'
    """
    if not isinstance(pattern, str):
        raise EincError(f"a pattern must be a string, not {type(pattern).__name__}")
    if not isinstance(notation, str) or notation not in ("auto", "compact", "spaced"):
        raise EincError(f"notation must be 'auto', 'compact' or 'spaced', not {notation!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise EincError(f"the pattern has {len(pattern):,} characters; einc takes at most {MAX_PATTERN_LENGTH:,}")
    _check_nesting(pattern)
    try:
        body = _Located().transform(_lark().parse(pattern))
    except UnexpectedInput as err:
        raise _syntax_error(pattern, err) from None

    lists = _axis_lists(body)
    compact = notation == "compact" or (notation == "auto" and not _is_spaced(lists))
    if notation == "auto" and not compact:
        _check_not_mixed(pattern, lists)
    build = _Builder(pattern, compact)
    (first,) = body.inputs if len(body.inputs) == 1 else (None,)
    if isinstance(first, _Call) and body.output is None and not body.scale and not body.modifiers:
        # `softmax(...)` alone: the operation is the whole pattern.
        return build.contraction(first.body, first.op, (first.start, first.end))
    return build.contraction(body, None, (0, len(pattern)))
