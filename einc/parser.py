"""Pattern string -> :class:`einc.ir.Pattern`.

The Lark grammar (``grammar/einc.lark``) tokenises both spellings alike; this module
decides the spelling, splits compact names into letters, fills in implicit outputs and
checks everything that can be pointed at with a caret.  Lark's ``UnexpectedInput`` is
converted to :class:`EincError` here, at the parser boundary.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import keyword
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ir
from .errors import EincError, at

__all__ = ["parse", "grammar_path", "Notation", "MAX_PATTERN_LENGTH", "MAX_NESTING"]

Notation = Literal["auto", "compact", "spaced"]

MAX_PATTERN_LENGTH = 65_536
"""Longest pattern accepted, in characters: a network of hundreds of operands fits;
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


@functools.cache
def _lark() -> Lark:
    # Built on first use, not at import: importing einc stays cheap.
    return Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        keep_all_tokens=True,
        maybe_placeholders=False,
    )


@dataclass(frozen=True, slots=True)
class _Term:
    """One parsed term of an axis list, with its place in the pattern string."""

    kind: Literal["axis", "number", "ellipsis", "group", "bracket"]
    start: int
    end: int
    name: str = ""
    items: tuple[_Term, ...] = ()


def _span(tree: Tree | Token) -> tuple[int, int]:
    tokens = [tree] if isinstance(tree, Token) else list(tree.scan_values(lambda v: isinstance(v, Token)))
    return min(t.start_pos for t in tokens), max(t.end_pos for t in tokens)


def _term(tree: Tree) -> _Term:
    start, end = _span(tree)
    if tree.data in ("axis", "number", "ellipsis"):
        (token,) = [c for c in tree.children if isinstance(c, Token)]
        return _Term(tree.data, start, end, name=str(token))
    items = tuple(_term(c) for c in tree.children if isinstance(c, Tree))
    return _Term(tree.data, start, end, items=items)  # type: ignore[arg-type]


def _axis_list(tree: Tree) -> list[_Term]:
    return [_term(c) for c in tree.children if isinstance(c, Tree)]


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
    if isinstance(err, UnexpectedCharacters):
        what = f"unexpected character {pattern[err.pos_in_stream]!r}"
    elif isinstance(err, UnexpectedEOF) or err.token.type == "$END":  # type: ignore[attr-defined]
        what = "the pattern ends too early"
    elif isinstance(err, UnexpectedToken):
        what = f"unexpected {str(err.token)!r}"
    else:  # pragma: no cover - lark has no other UnexpectedInput kinds today
        what = "invalid pattern"
    expected_terminals = set(getattr(err, "expected", ()) or ())
    if isinstance(err, UnexpectedToken) and err.interactive_parser is not None:
        # The LALR state's lookaheads are shared with nested calls (they list ')' at
        # the top level); the interactive parser knows what can really follow here.
        expected_terminals = set(err.interactive_parser.accepts())
    expected = sorted({_TERMINAL_WORDS.get(e, e) for e in expected_terminals})
    if expected:
        what += f" (expected {', '.join(expected)})"
    ended = isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END")
    pos = len(pattern) if ended or err.pos_in_stream is None else err.pos_in_stream
    return at(pattern, pos, None, what)


def _check_nesting(pattern: str) -> None:
    depth = 0
    for index, char in enumerate(pattern):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth > MAX_NESTING:
            raise at(pattern, index, None, f"parentheses nest deeper than {MAX_NESTING} levels")


def _check_not_mixed(pattern: str, lists: list[list[_Term]]) -> None:
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


def _is_spaced(lists: list[list[_Term]]) -> bool:
    for terms in lists:
        for term in terms:
            if term.kind in ("number", "group") or any(i.kind == "group" for i in term.items):
                return True
        if any(a.end < b.start for a, b in zip(terms, terms[1:])):
            return True
    return False


class _Builder:
    """Turns the terms of one pattern into IR dims, with caret errors."""

    def __init__(self, pattern: str, compact: bool) -> None:
        self.pattern = pattern
        self.compact = compact
        self._anonymous = itertools.count()

    def number(self, term: _Term, anonymous: bool = True) -> str | None:
        """A number term: ``None`` for the unit ``1``, else a new anonymous axis (where
        ``anonymous`` allows one)."""
        if self.compact:
            what = "unit axis '1'" if term.name == "1" else f"anonymous axis {term.name!r}"
            raise self.error(term, f"{what} needs spaced notation")
        if term.end < len(self.pattern) and (self.pattern[term.end].isalpha() or self.pattern[term.end] == "_"):
            raise self.error(term, "an axis name starts with a letter or '_'; a number is an anonymous axis")
        size = int(term.name)
        if size == 0:
            raise self.error(term, "an anonymous axis needs a positive size")
        if size != 1 and not anonymous:
            raise self.error(term, "an anonymous axis in an input is reduced, which needs an operation: "
                                   "write sum(...), mean(...) or another (einops' rearrange refuses it too)")
        return None if size == 1 else ir.anonymous_axis(size, next(self._anonymous))

    def error(self, term: _Term, message: str) -> EincError:
        return at(self.pattern, term.start, term.end, message)

    def _names(self, term: _Term) -> list[tuple[str, _Term]]:
        """The axis names of an ``axis`` term: one, or its letters when compact."""
        if not self.compact:
            if term.name in _KEYWORDS:
                raise self.error(term, f"axis name {term.name!r} is a Python keyword")
            return [(term.name, term)]
        out = []
        for i, letter in enumerate(term.name):
            sub = _Term("axis", term.start + i, term.start + i + 1, name=letter)
            if not letter.isalpha() or not letter.isascii():
                raise self.error(sub, "compact notation takes letters only (use spaces for named axes)")
            out.append((letter, sub))
        return out

    def _group(self, term: _Term, *, output: bool, ellipsis_seen: bool, anonymous: bool) -> tuple[str, ...]:
        if self.compact:
            raise self.error(term, "composition '( )' needs spaced notation")
        names: list[str] = []
        for item in term.items:
            if item.kind == "axis":
                (name, _), = self._names(item)
                if name in names:
                    raise self.error(item, f"axis {name!r} appears twice in one composition")
                names.append(name)
            elif item.kind == "number":
                axis = self.number(item, anonymous)
                if axis is not None:
                    names.append(axis)
            else:  # ellipsis
                if not output:
                    raise self.error(item, "'...' inside parentheses merges dimensions: only in the output (as einops)")
                if ellipsis_seen or ir.MERGED_ELLIPSIS in names:
                    raise self.error(item, "'...' may appear once per operand")
                names.append(ir.MERGED_ELLIPSIS)
        return tuple(names)

    def dims(
        self, terms: list[_Term], *, brackets: bool, output: bool = False, anonymous: bool = True
    ) -> tuple[list[tuple[str, ...]], list[str], list[tuple[str, _Term]]]:
        """(dims, bracketed names, every named axis with its term) of one axis list."""
        dims: list[tuple[str, ...]] = []
        bracketed: list[str] = []
        located: list[tuple[str, _Term]] = []
        seen_ellipsis = False
        for term in terms:
            if term.kind == "ellipsis":
                if seen_ellipsis:
                    raise self.error(term, "'...' may appear once per operand")
                seen_ellipsis = True
                dims.append((ir.ELLIPSIS,))
            elif term.kind == "number":
                axis = self.number(term, anonymous)
                dims.append(() if axis is None else (axis,))
            elif term.kind == "axis":
                for name, sub in self._names(term):
                    dims.append((name,))
                    located.append((name, sub))
            elif term.kind == "group":
                group = self._group(term, output=output, ellipsis_seen=seen_ellipsis, anonymous=anonymous)
                seen_ellipsis = seen_ellipsis or ir.MERGED_ELLIPSIS in group
                dims.append(group)
                located.extend((name, term) for name in group if name != ir.MERGED_ELLIPSIS)
            else:  # bracket
                if not brackets:
                    raise self.error(term, "brackets mark normalized axes, only in the output of softmax/log_softmax")
                inner, _, inner_located = self.dims(list(term.items), brackets=False, output=output)
                dims.extend(inner)
                bracketed.extend(name for name, _ in inner_located)
                located.extend(inner_located)
        return dims, bracketed, located


_KEYWORDS = frozenset(keyword.kwlist)


def _implicit_output(inputs: list[ir.AxisList]) -> ir.AxisList:
    counts = Counter(a for operand in inputs for a in operand.axes)
    once = sorted(a for a, n in counts.items() if n == 1)
    ellipsis = [(ir.ELLIPSIS,)] if any(x.has_ellipsis for x in inputs) else []
    return ir.AxisList(tuple(ellipsis + [(a,) for a in once]))


def _trees(tree: Tree, data: str) -> list[Tree]:
    return [c for c in tree.children if isinstance(c, Tree) and c.data == data]


def _all_axis_lists(contraction: Tree) -> list[list[_Term]]:
    """Every axis list of a contraction, nested operations' included (spelling is global)."""
    lists: list[list[_Term]] = []
    (inputs,) = _trees(contraction, "inputs")
    for operand in (c for c in inputs.children if isinstance(c, Tree)):
        if operand.data == "op_call":
            lists.extend(_all_axis_lists(_trees(operand, "contraction")[0]))
        else:
            lists.append(_axis_list(operand))
    for output in _trees(contraction, "output"):
        lists.append(_axis_list(output.children[0]))
    return lists


def _factor(build: _Builder, tree: Tree) -> ir.Factor:
    sign, factor = tree.children
    divide = str(sign) == "/"
    (value,) = [t for t in factor.children if isinstance(t, Token) and t.type in ("INT", "NAME")]
    term = _Term("axis", value.start_pos, value.end_pos, name=str(value))
    if value.type == "INT":
        number = int(value)
        if number == 0:
            raise build.error(term, "a scale factor must be positive")
        if number >= 2**63:
            raise build.error(term, "a scale factor must be below 2**63")
        return ir.Factor(divide, number, sqrt=factor.data == "sqrt_factor")
    if str(value) in _KEYWORDS:
        raise build.error(term, f"axis name {str(value)!r} is a Python keyword")
    return ir.Factor(divide, str(value), sqrt=factor.data == "sqrt_factor")


def _contraction(build: _Builder, tree: Tree, op: str | None, op_term: _Term) -> ir.Pattern:
    """The pattern of one contraction (an operation's body when ``op`` is given)."""
    (inputs_tree,) = _trees(tree, "inputs")
    output_trees = _trees(tree, "output")
    output_terms = _axis_list(output_trees[0].children[0]) if output_trees else None
    operands = [c for c in inputs_tree.children if isinstance(c, Tree)]

    normalizer = op in ir.NORMALIZERS
    arrowless_normalizer = normalizer and output_terms is None
    if arrowless_normalizer and len(operands) != 1:
        raise build.error(op_term, f"{op} without '->' takes exactly one operand")

    inputs: list[ir.AxisList | ir.Pattern] = []
    bracketed: list[str] = []
    for operand in operands:
        if operand.data == "op_call":
            inputs.append(_op_call(build, operand))
            if arrowless_normalizer:
                raise build.error(op_term, f"{op} without '->' takes an axis list, not a nested operation")
            continue
        # An anonymous input axis is reduced: a plain contraction would sum it silently.
        dims, marks, _ = build.dims(_axis_list(operand), brackets=arrowless_normalizer, anonymous=op is not None)
        inputs.append(ir.AxisList(tuple(dims)))
        bracketed.extend(marks)
    lists = [x.output if isinstance(x, ir.Pattern) else x for x in inputs]

    if output_terms is None:
        output = lists[0] if arrowless_normalizer else _implicit_output(lists)
    else:
        dims, marks, located = build.dims(output_terms, brackets=normalizer, output=True)
        bracketed.extend(marks)
        seen: set[str] = set()
        for name, term in located:
            if name in seen:
                raise build.error(term, f"axis {name!r} appears twice in the output")
            seen.add(name)
        if any(ir.ELLIPSIS in d or ir.MERGED_ELLIPSIS in d for d in dims) and not any(x.has_ellipsis for x in lists):
            ell = next(t for t in output_terms if t.kind == "ellipsis" or any(i.kind == "ellipsis" for i in t.items))
            raise build.error(ell, "the output has '...' but no input has")
        output = ir.AxisList(tuple(dims))

    if normalizer and not bracketed:
        raise build.error(op_term, f"{op} needs the normalized axes in brackets, e.g. '{op}(b [c])'")
    if op == "prod" and len(inputs) > 1:
        raise build.error(
            op_term, "prod takes one operand only (products of several operands have no reduction semiring)"
        )
    scale = tuple(_factor(build, t) for t in _trees(tree, "scale"))
    if scale:
        first = _trees(tree, "scale")[0]
        where = _Term("axis", *_span(first))
        if op not in ir.SCALED_OPS:
            raise build.error(
                where, f"a scale applies to sums of products and the logits of softmax/log_softmax, not to {op}(...)"
            )
        known = {a for x in lists for a in x.axes} | set(output.axes)
        for factor, factor_tree in zip(scale, _trees(tree, "scale")):
            if isinstance(factor.value, str) and factor.value not in known:
                raise build.error(_Term("axis", *_span(factor_tree)),
                                  f"scale factor axis {factor.value!r} is not an axis of this contraction")
    return ir.Pattern(
        inputs=tuple(inputs),
        output=output,
        op=op,
        normalized=tuple(dict.fromkeys(bracketed)),
        compact=build.compact,
        scale=scale,
    )


def _op_call(build: _Builder, tree: Tree) -> ir.Pattern:
    token = tree.children[0]
    op_term = _Term("axis", token.start_pos, token.end_pos, name=str(token))
    (body,) = _trees(tree, "contraction")
    return _contraction(build, body, str(token), op_term)


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
        tree = _lark().parse(pattern)
    except UnexpectedInput as err:
        raise _syntax_error(pattern, err) from None

    (root,) = tree.children
    lists = _all_axis_lists(root)
    compact = notation == "compact" or (notation == "auto" and not _is_spaced(lists))
    if notation == "auto" and not compact:
        _check_not_mixed(pattern, lists)
    build = _Builder(pattern, compact)
    (inputs,) = _trees(root, "inputs")
    operands = [c for c in inputs.children if isinstance(c, Tree)]
    if len(operands) == 1 and operands[0].data == "op_call" and not _trees(root, "output") \
            and not _trees(root, "scale"):
        # `softmax(...)` alone: the operation is the whole pattern.
        return _op_call(build, operands[0])
    return _contraction(build, root, None, _Term("axis", 0, len(pattern)))
