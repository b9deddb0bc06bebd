"""Pattern string -> :class:`einc.ir.Pattern`.

The Lark grammar (``grammar/einc.lark``) tokenises both spellings alike; this module
decides the spelling, splits compact names into letters, fills in implicit outputs and
checks everything that can be pointed at with a caret.  Lark's ``UnexpectedInput`` is
converted to :class:`EincError` here, at the parser boundary.
"""

from __future__ import annotations

import functools
import keyword
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ir
from .errors import EincError, at

__all__ = ["parse", "grammar_path", "Notation"]

Notation = Literal["auto", "compact", "spaced"]

_GRAMMAR = "einc.lark"

_TERMINAL_WORDS = {
    "NAME": "an axis name",
    "UNIT": "'1'",
    "ELLIPSIS": "'...'",
    "ARROW": "'->'",
    "COMMA": "','",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "OP": "an operation",
    "INT": "an integer",
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

    kind: Literal["axis", "unit", "ellipsis", "group", "bracket"]
    start: int
    end: int
    name: str = ""
    items: tuple[_Term, ...] = ()


def _span(tree: Tree | Token) -> tuple[int, int]:
    tokens = [tree] if isinstance(tree, Token) else list(tree.scan_values(lambda v: isinstance(v, Token)))
    return min(t.start_pos for t in tokens), max(t.end_pos for t in tokens)


def _term(tree: Tree) -> _Term:
    start, end = _span(tree)
    if tree.data in ("axis", "unit", "ellipsis"):
        (token,) = [c for c in tree.children if isinstance(c, Token)]
        return _Term(tree.data, start, end, name=str(token))
    items = tuple(_term(c) for c in tree.children if isinstance(c, Tree))
    return _Term(tree.data, start, end, items=items)  # type: ignore[arg-type]


def _axis_list(tree: Tree) -> list[_Term]:
    return [_term(c) for c in tree.children if isinstance(c, Tree)]


def _syntax_error(pattern: str, err: UnexpectedInput) -> EincError:
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


def _is_spaced(lists: list[list[_Term]]) -> bool:
    for terms in lists:
        for term in terms:
            if term.kind in ("unit", "group") or any(i.kind == "group" for i in term.items):
                return True
        if any(a.end < b.start for a, b in zip(terms, terms[1:])):
            return True
    return False


class _Builder:
    """Turns the terms of one pattern into IR dims, with caret errors."""

    def __init__(self, pattern: str, compact: bool) -> None:
        self.pattern = pattern
        self.compact = compact

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

    def _group(self, term: _Term) -> tuple[str, ...]:
        if self.compact:
            raise self.error(term, "composition '( )' needs spaced notation")
        names: list[str] = []
        for item in term.items:
            if item.kind == "axis":
                (name, _), = self._names(item)
                if name in names:
                    raise self.error(item, f"axis {name!r} appears twice in one composition")
                names.append(name)
        return tuple(names)

    def dims(
        self, terms: list[_Term], *, brackets: bool
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
            elif term.kind == "unit":
                if self.compact:
                    raise self.error(term, "unit axis '1' needs spaced notation")
                dims.append(())
            elif term.kind == "axis":
                for name, sub in self._names(term):
                    dims.append((name,))
                    located.append((name, sub))
            elif term.kind == "group":
                group = self._group(term)
                dims.append(group)
                located.extend((name, term) for name in group)
            else:  # bracket
                if not brackets:
                    raise self.error(term, "brackets mark normalized axes, only in the output of softmax/log_softmax")
                inner, _, inner_located = self.dims(list(term.items), brackets=False)
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
        dims, marks, _ = build.dims(_axis_list(operand), brackets=arrowless_normalizer)
        inputs.append(ir.AxisList(tuple(dims)))
        bracketed.extend(marks)
    lists = [x.output if isinstance(x, ir.Pattern) else x for x in inputs]

    if output_terms is None:
        output = lists[0] if arrowless_normalizer else _implicit_output(lists)
    else:
        dims, marks, located = build.dims(output_terms, brackets=normalizer)
        bracketed.extend(marks)
        seen: set[str] = set()
        for name, term in located:
            if name in seen:
                raise build.error(term, f"axis {name!r} appears twice in the output")
            seen.add(name)
        if (ir.ELLIPSIS,) in dims and not any(x.has_ellipsis for x in lists):
            ell = next(t for t in output_terms if t.kind == "ellipsis")
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
    if notation not in ("auto", "compact", "spaced"):
        raise EincError(f"notation must be 'auto', 'compact' or 'spaced', not {notation!r}")
    try:
        tree = _lark().parse(pattern)
    except UnexpectedInput as err:
        raise _syntax_error(pattern, err) from None

    (root,) = tree.children
    compact = notation == "compact" or (notation == "auto" and not _is_spaced(_all_axis_lists(root)))
    build = _Builder(pattern, compact)
    (inputs,) = _trees(root, "inputs")
    operands = [c for c in inputs.children if isinstance(c, Tree)]
    if len(operands) == 1 and operands[0].data == "op_call" and not _trees(root, "output") \
            and not _trees(root, "scale"):
        # `softmax(...)` alone: the operation is the whole pattern.
        return _op_call(build, operands[0])
    return _contraction(build, root, None, _Term("axis", 0, len(pattern)))
