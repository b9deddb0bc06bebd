"""Hypothesis: random valid equations against torch.einsum (float64), and random spaced
patterns with compositions, unit axes and new axes against einops + torch.einsum."""

from __future__ import annotations

from dataclasses import dataclass

import einops
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import einc
from conftest import assert_close, examples, reference_einsum, to_spaced

# Every test on shared shape-generic code and on literal code (conftest.both_codes).
pytestmark = pytest.mark.usefixtures("both_codes")

LETTERS = "abcdef"
# Mostly 1..5, sometimes 0 (hypothesis shrinks towards the first entry).
SIZES = st.sampled_from([2, 3, 1, 4, 5, 2, 3, 1, 4, 5, 0])
TOL = dict(rtol=1e-9, atol=1e-9)


@dataclass(frozen=True)
class Case:
    equation: str
    shapes: tuple[tuple[int, ...], ...]


@st.composite
def einsum_cases(draw, max_operands: int = 4) -> Case:
    """A random equation valid for torch.einsum, with shapes.

    1-4 operands of 0-4 letters from a small alphabet (repeats inside an operand are
    diagonals), one size per letter; optionally a broadcast ellipsis whose operands
    have their own ranks and size-1 dimensions; an explicit output that is a random
    subset of the input letters (with or without the ellipsis), or the implicit one.
    """
    size = {letter: draw(SIZES) for letter in LETTERS}
    n = draw(st.integers(1, max_operands))
    terms = [draw(st.lists(st.sampled_from(LETTERS), max_size=4)) for _ in range(n)]

    batch: list[int] = []
    ranks = [0] * n
    has_ellipsis = [False] * n
    if draw(st.booleans()):
        batch = draw(st.lists(st.sampled_from([2, 3, 1, 0]), max_size=2))
        has_ellipsis = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        if not any(has_ellipsis):
            has_ellipsis[draw(st.integers(0, n - 1))] = True
    shapes = []
    rendered = []
    for i, letters in enumerate(terms):
        dims = [size[a] for a in letters]
        text = "".join(letters)
        if has_ellipsis[i]:
            ranks[i] = draw(st.integers(0, len(batch)))
            own = batch[len(batch) - ranks[i]:]
            own = [b if draw(st.booleans()) else 1 for b in own]
            at = draw(st.integers(0, len(letters)))
            dims = dims[:at] + own + dims[at:]
            text = text[:at] + "..." + text[at:]
        shapes.append(tuple(dims))
        rendered.append(text)

    lhs = ",".join(rendered)
    present = sorted({a for letters in terms for a in letters})
    if draw(st.integers(0, 4)) == 0:
        equation = lhs  # implicit output
    else:
        order = draw(st.permutations(present))
        out = "".join(order[: draw(st.integers(0, len(order)))])
        if any(has_ellipsis) and draw(st.integers(0, 3)) > 0:
            at = draw(st.integers(0, len(out)))
            out = out[:at] + "..." + out[at:]
        equation = f"{lhs}->{out}"
    return Case(equation, tuple(shapes))


def _operands(case: Case) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=torch.float64) for shape in case.shapes]


@settings(max_examples=examples(400))  # with the tests below: 500+ random contractions a run
@given(einsum_cases())
def test_random_equations_eager(case):
    note(f"{case.equation} {case.shapes}")
    xs = _operands(case)
    expected = reference_einsum(case.equation, *xs)
    assert_close(einc.compile(case.equation, backend="eager")(*xs), expected, **TOL)
    spaced = to_spaced(case.equation)
    assert_close(einc.compile(spaced, backend="eager", notation="spaced")(*xs), expected, **TOL)


@settings(max_examples=examples(30))
@given(einsum_cases(max_operands=3))
def test_random_equations_torchscript(case):
    note(f"{case.equation} {case.shapes}")
    xs = _operands(case)
    assert_close(einc.compile(case.equation)(*xs), reference_einsum(case.equation, *xs), **TOL)


def _strided(shape: tuple[int, ...], layout: int) -> torch.Tensor:
    """A float64 tensor of ``shape`` whose memory is not row-major: 1 reversed axes,
    2 every other element of a wider tensor, 3 a size-1 axis expanded (stride 0)."""
    if layout == 1:
        return torch.randn(shape[::-1], dtype=torch.float64).permute(tuple(reversed(range(len(shape)))))
    if layout == 2 and shape:
        wide = torch.randn(shape[:-1] + (2 * shape[-1],), dtype=torch.float64)
        return wide[..., ::2]
    if layout == 3 and shape:
        return torch.randn(shape[:-1] + (1,), dtype=torch.float64).expand(shape)
    return torch.randn(shape, dtype=torch.float64)


@settings(max_examples=examples(100))
@given(einsum_cases(max_operands=3), st.data())
def test_random_equations_strided_inputs(case, data):
    layouts = data.draw(st.lists(st.integers(0, 3), min_size=len(case.shapes), max_size=len(case.shapes)))
    note(f"{case.equation} {case.shapes} layouts={layouts}")
    xs = [_strided(shape, layout) for shape, layout in zip(case.shapes, layouts)]
    backend = data.draw(st.sampled_from(["eager", "torchscript"]))
    out = einc.compile(case.equation, backend=backend)(*xs)
    assert_close(out, reference_einsum(case.equation, *xs), **TOL)


@settings(max_examples=examples(60))
@given(einsum_cases(max_operands=3), st.sampled_from(["greedy", "optimal", "dp", "branch-2"]))
def test_random_equations_any_strategy(case, strategy):
    note(f"{case.equation} {case.shapes} {strategy}")
    xs = _operands(case)
    out = einc.compile(case.equation, backend="eager", optimize=strategy)(*xs)
    assert_close(out, reference_einsum(case.equation, *xs), **TOL)


# ------------------------------------------------------------ spaced compositions

NAMES = ["a", "b", "c", "dd", "e_1", "Fx"]
ATOM_SIZES = st.sampled_from([2, 3, 1, 4])


@dataclass(frozen=True)
class SpacedCase:
    pattern: str
    sizes: dict
    atom_terms: tuple[str, ...]
    """Per operand: the einops axis list of the operand's atom tensor."""
    grouped_terms: tuple[str, ...]
    """Per operand: the einops axis list of the tensor given to einc."""
    atom_shapes: tuple[tuple[int, ...], ...]
    out_atoms: str
    out_pattern: str
    new_sizes: dict


def _groups(draw, atoms: list[str], unit_ok: bool = True) -> list[list[str]]:
    """Split ``atoms`` (already in order) into consecutive groups, with random unit dims."""
    groups: list[list[str]] = []
    for atom in atoms:
        if groups and draw(st.integers(0, 2)) == 0:
            groups[-1].append(atom)
        else:
            groups.append([atom])
    if unit_ok and draw(st.integers(0, 3)) == 0:
        groups.insert(draw(st.integers(0, len(groups))), [])
    return groups


def _spell(groups: list[list[str]]) -> str:
    return " ".join("1" if not g else g[0] if len(g) == 1 else "(" + " ".join(g) + ")" for g in groups)


@st.composite
def spaced_cases(draw) -> SpacedCase:
    size = {name: draw(ATOM_SIZES) for name in NAMES}
    n = draw(st.integers(1, 3))
    atom_terms, grouped_terms, atom_shapes, einc_terms = [], [], [], []
    composed: list[list[str]] = []
    for _ in range(n):
        atoms = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
        atom_shapes.append(tuple(size[a] for a in atoms))
        atom_terms.append(" ".join(atoms))
        # The tensor einc sees: the atoms permuted, then grouped (row-major merges).
        order = list(draw(st.permutations(atoms)))
        groups = _groups(draw, order)
        composed.extend(g for g in groups if len(g) > 1)
        spelled = _spell(groups)
        grouped_terms.append(spelled)
        einc_terms.append(spelled)

    present = list(dict.fromkeys(a for t in atom_terms for a in t.split()))
    kept = list(draw(st.permutations(present)))[: draw(st.integers(0, len(present)))]
    new = [f"n{i}" for i in range(draw(st.integers(0, 2)))]
    new_sizes = {name: draw(st.integers(1, 3)) for name in new}
    out_order = list(draw(st.permutations(kept + new)))
    out_groups = _groups(draw, out_order)
    out_pattern = _spell(out_groups)

    # Keyword sizes: every composed atom, except that each composition may leave one
    # atom out to be inferred (then every composition still has at most one unknown).
    sizes = {a: size[a] for g in composed for a in g}
    inferred: set[str] = set()
    for g in composed:
        candidate = g[-1]
        if draw(st.booleans()) and all(
            candidate not in other or not (set(other) & inferred) for other in composed
        ):
            inferred.add(candidate)
    for a in inferred:
        sizes.pop(a, None)
    sizes.update(new_sizes)

    pattern = ", ".join(einc_terms) + " -> " + out_pattern
    return SpacedCase(
        pattern=pattern,
        sizes=sizes,
        atom_terms=tuple(atom_terms),
        grouped_terms=tuple(grouped_terms),
        atom_shapes=tuple(atom_shapes),
        out_atoms=" ".join(kept),
        out_pattern=out_pattern,
        new_sizes=new_sizes,
    )


def _letters(names: str, table: dict[str, str]) -> str:
    return "".join(table[a] for a in names.split())


@settings(max_examples=examples(120))
@given(spaced_cases(), st.sampled_from(["eager", "torchscript"]))
def test_random_spaced_compositions(case, backend):
    note(f"{case.pattern} sizes={case.sizes} atoms={case.atom_shapes}")
    atoms = [torch.randn(shape, dtype=torch.float64) for shape in case.atom_shapes]
    # einc gets each atom tensor regrouped by einops.rearrange ...
    given_tensors = [
        einops.rearrange(t, f"{src} -> {dst}") for t, src, dst in zip(atoms, case.atom_terms, case.grouped_terms)
    ]
    # ... and the reference contracts the atom tensors with torch.einsum, then lays the
    # result out with einops (repeat adds the new axes).
    table = {name: chr(ord("a") + i) for i, name in enumerate(NAMES)}
    equation = ",".join(_letters(t, table) for t in case.atom_terms) + "->" + _letters(case.out_atoms, table)
    contracted = torch.einsum(equation, *atoms)
    expected = einops.repeat(contracted, f"{case.out_atoms} -> {case.out_pattern}", **case.new_sizes)

    out = einc.compile(case.pattern, backend=backend, notation="spaced", **case.sizes)(*given_tensors)
    assert_close(out, expected, **TOL)


@settings(max_examples=examples(80))
@given(
    st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=4).flatmap(
        lambda names: st.tuples(
            st.just(names),
            st.lists(ATOM_SIZES, min_size=len(names), max_size=len(names)),
            st.permutations(names),
            st.randoms(use_true_random=False),
        )
    )
)
def test_random_rearrange_is_exact(args):
    names, shape, out_order, rnd = args
    # Random grouping on both sides, compared exactly with einops.rearrange.
    def group(order):
        groups: list[list[str]] = []
        for name in order:
            if groups and rnd.random() < 0.4:
                groups[-1].append(name)
            else:
                groups.append([name])
        return groups

    in_groups = group(names)
    src = _spell(in_groups)
    dst = _spell(group(list(out_order)))
    x = torch.randn(shape)
    given_x = einops.rearrange(x, f"{' '.join(names)} -> {src}")
    extent = dict(zip(names, shape))
    sizes = {a: extent[a] for g in in_groups if len(g) > 1 for a in g[:-1]}
    note(f"{src} -> {dst} {sizes}")
    expected = einops.rearrange(given_x, f"{src} -> {dst}", **sizes)
    assert torch.equal(einc.compile(f"{src} -> {dst}", backend="eager", notation="spaced", **sizes)(given_x), expected)
