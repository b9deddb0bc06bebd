"""Checks that run inside spawned gloo ranks for ``test_distributed.py``.

Each check runs on every rank and raises on failure; the worker records each check's
outcome per rank in a JSON file.  References are computed on each rank without einc:
torch in float64 (complex128), torch.einsum and naive broadcast forms.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import einc
from einc.errors import EincError

CHECKS: dict[str, Callable[[int, int], None]] = {}


def check(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _semiring(op: str) -> Callable[..., torch.Tensor]:
    """(b i, i j, j k -> b k) reduced by ``op`` over i and j, the naive way."""
    def ref(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if op == "sum":
            return torch.einsum("bi,ij,jk->bk", a, b, c)
        x = a[:, :, None, None] + b[None, :, :, None] + c[None, None, :, :]
        if op == "mean":
            return torch.einsum("bi,ij,jk->bk", a, b, c) / (a.shape[1] * b.shape[1])
        if op == "logsumexp":
            return torch.logsumexp(x.flatten(1, 2), 1)
        return getattr(torch, f"a{op}")(x, (1, 2))
    return ref


CHAIN = [(1, 48), (48, 48), (48, 2)]

# (name, pattern, shapes, float64 reference, the role the split axis gets)
PATTERNS: list[tuple[str, str, list[tuple[int, ...]], Callable[..., torch.Tensor], str]] = [
    # a batch axis: parts gathered
    ("batched-matmul", "b i j, b j k -> b i k", [(6, 8, 16), (6, 16, 8)],
     lambda a, b: a @ b, "output"),
    # a chain's middle axis: the cheapest part sums over it
    ("sum-chain", "b i, i j, j k -> b k", CHAIN, _semiring("sum"), "sum"),
    ("mean-chain", "mean(b i, i j, j k -> b k)", CHAIN, _semiring("mean"), "mean"),
    ("max-plus", "max(b i, i j, j k -> b k)", CHAIN, _semiring("max"), "max"),
    ("min-plus", "min(b i, i j, j k -> b k)", CHAIN, _semiring("min"), "min"),
    ("log-semiring", "logsumexp(b i, i j, j k -> b k)", CHAIN, _semiring("logsumexp"), "logsumexp"),
    # a large-vocabulary log-partition: the vocabulary split, logsumexp combined
    ("log-partition", "logsumexp(sum(b t d, v d -> b t v) -> b t)", [(1, 1, 8), (96, 8)],
     lambda h, w: torch.logsumexp(h @ w.T, -1), "logsumexp"),
    # attention over a long key axis: flash attention's recurrence across ranks
    ("attention-keys", "softmax(q d, k d -> q [k]), k e -> q e", [(1, 4), (96, 4), (96, 1)],
     lambda q, k, v: torch.softmax(q @ k.T, -1) @ v, "softmax"),
    # attention with a batch: split along the batch
    ("attention-batch", "softmax(b q d, b k d -> b q [k] / sqrt(d)), b k e -> b q e",
     [(4, 8, 8), (4, 16, 8), (4, 16, 8)],
     lambda q, k, v: torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v, "output"),
    # soft-label cross-entropy over a vocabulary split across ranks
    ("soft-label-ce", "log_softmax(b t d, v d -> b t [v]), b t v -> b t", [(1, 1, 8), (96, 8), (1, 1, 96)],
     lambda h, w, y: (torch.log_softmax(h @ w.T, -1) * y).sum(-1), "log_softmax"),
    ("log-prob-sums", "sum(log_softmax(b t d, v d -> b t [v]) -> b t)", [(1, 1, 8), (96, 8)],
     lambda h, w: torch.log_softmax(h @ w.T, -1).sum(-1), "log_softmax"),
    # a top-level normalizer: its rows split
    ("softmax-rows", "softmax(i j, j k -> i [k])", [(12, 16), (16, 6)],
     lambda a, b: torch.softmax(a @ b, -1), "output"),
    # a closed tensor network (every axis summed): the cheapest axis to split
    ("tensor-network", "a b c, c d e, e f a, b d f -> ", [(4, 6, 5), (5, 4, 6), (6, 5, 4), (6, 4, 5)],
     lambda *t: torch.einsum("abc,cde,efa,bdf->", *t), "sum"),
    # a composition and a keyword size
    ("heads", "b (h d), h d e -> b h e", [(9, 8), (2, 4, 3)],
     lambda x, w: torch.einsum("bhd,hde->bhe", x.reshape(9, 2, 4), w), "output"),
]
SIZES = {"heads": {"h": 2}}


def _inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)  # the same on every rank: replicated inputs
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def _refused(call: Callable[[], Any], message: str) -> str:
    """``call()`` raises an EincError containing ``message``; its text."""
    try:
        call()
    except EincError as err:
        assert message in str(err), str(err)
        return str(err)
    raise AssertionError(f"no EincError ({message!r} expected)")


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    if not torch.allclose(got.to(want.dtype), want, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(f"{what}: max difference {(got.to(want.dtype) - want).abs().max().item():.3g}")


def _pattern_check(name: str, pattern: str, shapes: list[tuple[int, ...]], ref: Callable[..., torch.Tensor],
                   role: str) -> Callable[[int, int], None]:
    def run(rank: int, world: int) -> None:
        f = einc.compile(pattern, distributed=True, **SIZES.get(name, {}))
        plan = f.explain(*shapes, dtype=torch.float64).distribution
        assert plan is not None and plan.role == role, f"split role {plan and plan.role}, expected {role}"
        xs = [x.requires_grad_() for x in _inputs(shapes)]
        out = f(*xs)
        want = ref(*xs)
        _close(out, want.detach(), "values")
        # A loss that weighs every entry differently (the same on every rank: SPMD).
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = torch.autograd.grad((out * weights).sum(), xs)
        expected = torch.autograd.grad((want * weights).sum(), xs)
        for i, (g, e) in enumerate(zip(got, expected)):
            _close(g, e, f"gradient of operand {i}")
    return run


for _row in PATTERNS:
    CHECKS[f"pattern:{_row[0]}"] = _pattern_check(*_row)


@check
def dtypes(rank: int, world: int) -> None:
    """Half floats (combined in float32), complex, integers: as one process computes them."""
    f = einc.compile("b i, i j, j k -> b k", distributed=True)
    for dtype, tol in [(torch.float16, 1e-2), (torch.bfloat16, 5e-2), (torch.float32, 1e-5)]:
        xs = _inputs(CHAIN, dtype)
        want = _semiring("sum")(*[x.double() for x in xs])
        out = f(*xs)
        assert out.dtype == dtype, out.dtype
        _close(out, want, str(dtype), rtol=tol, atol=tol * want.abs().max().item())
    generator = torch.Generator().manual_seed(2)
    for dtype, tol in [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)]:  # parts gathered in their own dtype
        x, y = _inputs([(6, 8, 16), (6, 16, 8)], dtype)
        out = einc.compile("b i j, b j k -> b i k", distributed=True)(x, y)
        assert out.dtype == dtype, out.dtype
        _close(out, x.double() @ y.double(), f"{dtype} gathered", rtol=tol, atol=tol * 4)
        m = einc.compile("max(b i, i j, j k -> b k)", distributed=True)
        xs = _inputs(CHAIN, dtype)
        _close(m(*xs), _semiring("max")(*[t.double() for t in xs]), f"{dtype} max", rtol=tol, atol=tol)
    a, b = (torch.randn(s, dtype=torch.complex128, generator=generator) for s in [(4, 32), (32, 3)])
    g = einc.compile("i j, j k -> i k", distributed=True)
    a.requires_grad_(), b.requires_grad_()
    out = g(a, b)
    _close(out, a @ b, "complex")
    w = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * w).real.sum(), (a, b))
    want = torch.autograd.grad(((a @ b) * w).real.sum(), (a, b))
    for x, y in zip(got, want):
        _close(x, y, "complex gradient")
    ints = [torch.randint(-5, 5, s, generator=torch.Generator().manual_seed(4)) for s in CHAIN]
    out = f(*ints)
    assert out.dtype == torch.int64 and torch.equal(out, _semiring("sum")(*ints)), "int64"


@check
def nan_and_infinities(rank: int, world: int) -> None:
    """NaN propagates through every combine; -inf slices and 1e30 stay exact."""
    for op, row in itertools.product(("max", "min", "logsumexp", "sum"), (5, 47)):  # the first rank's, the last's
        f = einc.compile(f"{op}(b i, i j, j k -> b k)", distributed=True)
        xs = _inputs(CHAIN)
        xs[1][5, row] = float("nan")  # on one rank's part only
        out = f(*xs)
        assert torch.isnan(out).all(), f"{op}: NaN at j={row} lost: {out}"
    f = einc.compile("logsumexp(b i, i j, j k -> b k)", distributed=True)
    xs = _inputs(CHAIN)
    xs[1][:, :24] = float("-inf")  # one rank's whole part is -inf
    _close(f(*xs), _semiring("logsumexp")(*xs), "-inf part")
    xs = _inputs(CHAIN, torch.float32)
    xs[0] = xs[0] * 1e30
    want = _semiring("logsumexp")(*[x.double() for x in xs])
    _close(f(*xs), want, "1e30 in float32", rtol=1e-6, atol=0)


@check
def a_part_whose_keys_are_all_masked(rank: int, world: int) -> None:
    """A rank whose share of a softmax's (log_softmax's) axis is all -inf contributes nothing:
    values and gradients as torch's over the whole axis (padding at the end of a sequence)."""
    generator = torch.Generator().manual_seed(5)
    s, v = torch.randn(1, 12, generator=generator, dtype=torch.float64), \
        torch.randn(12, 1, generator=generator, dtype=torch.float64)
    s[:, 12 - 12 // world:] = float("-inf")  # the last rank's keys
    # (A log_softmax of masked logits is -inf there, as torch's, whatever splits it.)
    rows = [("softmax(q k -> q [k]), k e -> q e", "softmax", lambda s, v: torch.softmax(s, -1) @ v)]
    for pattern, role, ref in rows:
        other = v
        f = einc.compile(pattern, distributed=True)
        assert f.explain(s, other).distribution.role == role, f.explain(s, other).distribution
        a, b = s.clone().requires_grad_(), other.clone().requires_grad_()
        out, want = f(a, b), ref(a, b)
        _close(out, want.detach(), f"{role}: values")
        got, expected = torch.autograd.grad(out.sum(), (a, b)), torch.autograd.grad(want.sum(), (a, b))
        for g, e in zip(got, expected):
            _close(g, e, f"{role}: gradient")


@check
def memory_limit_per_rank(rank: int, world: int) -> None:
    """Under a memory limit each rank's part runs in slices: at most ceil(slices / world) each."""
    pattern = "logsumexp(sum(b t d, v d -> b t v) -> b t)"
    shapes = [(2, 8, 16), (256, 16)]
    f = einc.compile(pattern, distributed=True, memory_limit=1024)
    plan = f.explain(*shapes, dtype=torch.float64).distribution
    assert plan is not None and max(plan.slices) > 1, plan
    assert max(plan.slices) <= -(-sum(plan.slices) // world), plan.slices
    xs = [x.requires_grad_() for x in _inputs(shapes)]
    with _CountSlices() as ran:
        out = f(*xs)
    assert ran.slices == plan.slices[rank], (ran.slices, plan.slices)
    h, w = xs
    want = torch.logsumexp(h @ w.T, -1)
    _close(out, want.detach(), "values")
    got = torch.autograd.grad(out.sum(), xs)
    expected = torch.autograd.grad(want.sum(), xs)
    for g, e in zip(got, expected):
        _close(g, e, "gradient")


class _CountSlices:
    """Counts the forward slices this rank runs (each Sliced.narrow call is one slice)."""

    def __enter__(self) -> _CountSlices:
        from einc import slicing

        self.slices = 0
        self.original = original = slicing.Sliced.narrow

        def narrow(runner: Any, tensors: Any, spans: Any) -> Any:
            self.slices += 1
            return original(runner, tensors, spans)

        slicing.Sliced.narrow = narrow  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        from einc import slicing

        slicing.Sliced.narrow = self.original  # type: ignore[method-assign]


class _Counter:
    """Bytes this rank hands to collectives, counted by wrapping torch.distributed's."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_into_tensor")

    def __init__(self) -> None:
        self.bytes = 0
        self.saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    def __enter__(self) -> _Counter:
        for name, original in self.saved.items():
            def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                tensor = args[0]
                self.bytes += tensor.numel() * tensor.element_size()
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


@check
def bytes_communicated(rank: int, world: int) -> None:
    """The bytes each rank hands to collectives equal the plan's figure, forward and with gradients."""
    mixed = [("float32 and float64", "i j, j k -> i k", [(1, 64), (64, 1)], [torch.float32, torch.float64]),
             ("int64 and float32", "b i j, b j k -> b i k", [(6, 8, 16), (6, 16, 8)], [torch.int64, torch.float32])]
    rows = [(name, pattern, shapes, [dtype] * len(shapes))
            for (name, pattern, shapes, _, _), dtype in itertools.product(PATTERNS, (torch.float32, torch.bfloat16))]
    for name, pattern, shapes, types in rows + mixed:
        f = einc.compile(pattern, distributed=True, **SIZES.get(name, {}))
        xs = [x.to(t) for x, t in zip(_inputs(shapes), types)]
        plan = f.explain(*xs).distribution
        f(*xs)  # compiled before counting
        with _Counter() as counter:
            f(*xs)
        assert counter.bytes == plan.bytes(), f"{name}: counted {counter.bytes}, plan {plan.bytes()}"
        xs = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
        with _Counter() as counter:
            f(*xs).sum().backward()
        assert counter.bytes == plan.bytes(True), f"{name} with gradients: counted {counter.bytes}, " \
                                                  f"plan {plan.bytes(True)}"


@check
def output_bytes_equal_output(rank: int, world: int) -> None:
    """An output split gathers (about) the output; a sharded output moves nothing but the check."""
    f = einc.compile("b i j, b j k -> b i k", distributed=True)
    shapes = [(6 * world, 8, 16), (6 * world, 16, 8)]
    plan = f.explain(*shapes).distribution
    assert plan.bytes() == 6 * world * 8 * 8 * 4 + 8 * world, plan.bytes()
    sharded = einc.compile("b i j, b j k -> b i k", distributed=True, shard_output=True)
    assert sharded.explain(*shapes).distribution.bytes() == 8 * world


@check
def shard_output(rank: int, world: int) -> None:
    """shard_output=True: a DTensor sharded along the split output axis, in DTensor's layout."""
    from torch.distributed.tensor import DTensor, Shard

    f = einc.compile("b i j, b j k -> b i k", distributed=True, shard_output=True)
    shapes = [(7, 9, 16), (7, 16, 8)]
    plan = f.explain(*shapes).distribution
    dim = ["b", "i", "k"].index(plan.axis)
    a, b = [x.requires_grad_() for x in _inputs(shapes)]
    out = f(a, b)
    assert isinstance(out, DTensor) and out.placements == (Shard(dim),), out.placements
    want = a @ b
    start, length = plan.spans()[rank]
    assert (start, length) == (min(rank * plan.chunk, plan.size), len(range(plan.size)[start:start + plan.chunk]))
    _close(out.to_local(), want.narrow(dim, start, length).detach(), "local shard")
    _close(out.full_tensor(), want.detach(), "whole")
    got = torch.autograd.grad(out.full_tensor().sum(), (a, b))
    expected = torch.autograd.grad(want.sum(), (a, b))
    for g, e in zip(got, expected):
        _close(g, e, "gradient")


def _with_grad(enabled: bool, call: Callable[[], Any]) -> Any:
    with torch.set_grad_enabled(enabled):
        return call()


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


def _dtensors(tensors: list[torch.Tensor], placements: list[Any]) -> list[Any]:
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return [distribute_tensor(t.detach(), mesh, [p]).requires_grad_() for t, p in zip(tensors, placements)]


@check
def dtensor_inputs(rank: int, world: int) -> None:
    """DTensor operands: the parts are their shards; Shard / Partial / Replicate results as DTensor's mm."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    x, w = _inputs([(7, 12), (12, 5)])
    rows = [  # placements of x and w, pattern, reference, the result's placement
        ((Shard(0), Replicate()), "b d, d e -> b e", lambda x, w: x @ w, Shard(0)),
        ((Shard(1), Shard(0)), "b d, d e -> b e", lambda x, w: x @ w, Partial("sum")),
        ((Shard(1), Replicate()), "b d, d e -> b e", lambda x, w: x @ w, Partial("sum")),
        ((Shard(1), Replicate()), "logsumexp(b d, d e -> b e)",
         lambda x, w: torch.logsumexp(x[:, :, None] + w[None], 1), Replicate()),
        ((Shard(1), Replicate()), "max(b d, d e -> b e)",
         lambda x, w: torch.amax(x[:, :, None] + w[None], 1), Replicate()),
        ((Replicate(), Replicate()), "b d, d e -> b e", lambda x, w: x @ w, Replicate()),
        # sharded along a contracted axis on one operand and an output axis on the other: redistributed
        ((Shard(0), Shard(1)), "b d, d e -> b e", lambda x, w: x @ w, Shard(0)),
    ]
    for placements, pattern, ref, expected in rows:
        dx, dw = _dtensors([x, w], list(placements))
        out = einc.compile(pattern, distributed=True)(dx, dw)
        assert out.placements == (expected,), f"{pattern} {placements}: {out.placements}"
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        want = ref(xr, wr)
        _close(out.full_tensor(), want.detach(), f"{pattern} {placements}")
        out.full_tensor().sum().backward()
        want.sum().backward()
        _close(dx.grad.full_tensor(), xr.grad, f"{pattern} {placements}: gradient of x")
        _close(dw.grad.full_tensor(), wr.grad, f"{pattern} {placements}: gradient of w")
        f = einc.compile(pattern, distributed=True)
        plan = f.explain(dx, dw).distribution  # the call's own split, from the placements
        if placements[0] == Shard(1) and placements[1] != Shard(1):
            assert plan.axis == "d", (pattern, placements, plan.axis)
        assert f.validate(dx, dw) < 1e-9


@check
def mismatched_ranks(rank: int, world: int) -> None:
    """Ranks that disagree get an EincError on every rank, naming each rank's call."""
    f = einc.compile("i j, j k -> i k", distributed=True)
    cases = [
        ("shapes", lambda: f(torch.ones(4, 3 + (rank == 1)), torch.ones(3 + (rank == 1), 2))),
        ("dtypes", lambda: f(torch.ones(4, 3, dtype=torch.float64 if rank == 1 else torch.float32),
                             torch.ones(3, 2, dtype=torch.float64 if rank == 1 else torch.float32))),
        ("patterns", lambda: einc.compile("i j, j k -> i k" if rank else "i j, j k -> k i", distributed=True)(
            torch.ones(4, 3), torch.ones(3, 2))),
    ]
    x, w = _inputs([(4, 3), (3, 2)])
    (dx,) = _dtensors([x], [_replicate()])  # made on every rank (distribute_tensor communicates)
    cases += [
        # what decides the collectives autograd adds: requires_grad, grad mode
        ("requires_grad", lambda: f(x.clone().requires_grad_(rank == 0), w)),
        ("grad mode", lambda: _with_grad(rank == 0, lambda: f(x.clone().requires_grad_(), w))),
        # an invalid call on one rank only: the others are told, not left waiting
        ("a DTensor among plain tensors", lambda: f(dx if rank == 0 else x, w)),
    ]
    for what, call in cases:
        message = _refused(call, "ranks called a distributed expression differently")
        assert "rank 0: " in message and "rank 1: " in message, f"{what}: {message}"
    # The group is still usable after a refused call.
    _close(f(torch.ones(4, 3), torch.ones(3, 2)), torch.full((4, 2), 3.0), "after a mismatch")


@check
def process_group(rank: int, world: int) -> None:
    """distributed=<ProcessGroup>: only its ranks take part."""
    group = dist.new_group([0, 1])
    if rank > 1:
        return
    f = einc.compile("b i, i j, j k -> b k", distributed=group)
    xs = _inputs(CHAIN)
    _close(f(*xs), _semiring("sum")(*xs), "values on a two-rank group")
    assert f.explain(*CHAIN).distribution.world_size == 2


@check
def uneven_and_empty_parts(rank: int, world: int) -> None:
    """Parts of ceil(n / world): the last shorter, or empty (an output or a sum takes an empty part)."""
    a, b = _inputs([(4, 1), (1, 1)])
    f = einc.compile("i j, j k -> i k", distributed=True)
    plan = f.explain(a, b).distribution
    assert plan.axis == "i" and [n for _, n in plan.spans()] == ([2, 2] if world == 2 else [2, 2, 0]), plan
    a.requires_grad_(), b.requires_grad_()
    out = f(a, b)
    _close(out, (a @ b).detach(), "values")
    got = torch.autograd.grad(out.sum(), (a, b))
    expected = torch.autograd.grad((a @ b).sum(), (a, b))
    for g, e in zip(got, expected):
        _close(g, e, "gradient")
    x, y = _inputs([(4,), (4,)])
    g = einc.compile("i, i ->", distributed=True)
    assert g.explain(x, y).distribution.role == "sum"
    _close(g(x, y), x @ y, "a sum with an empty part")


@check
def gathers(rank: int, world: int) -> None:
    """Indexing split over ranks: a batch gather along its batch, and the fused
    cross-entropy along its tokens (each rank's chunks, W's gradient summed once)."""
    generator = torch.Generator().manual_seed(3)  # the same on every rank
    cases = [
        ("gather(b [n] d, b k -> b k d)", [(6, 5, 3)], [((6, 4), 5)],
         lambda x, idx: x[torch.arange(6)[:, None], idx]),
        ("gather(log_softmax(b t d, v d -> b t [v]), b t -> b t)", [(6, 2, 4), (9, 4)], [((6, 2), 9)],
         lambda h, w, ids: torch.log_softmax(h @ w.T, -1).gather(2, ids[..., None])[..., 0]),
    ]
    for pattern, shapes, index_shapes, reference in cases:
        data = [x.requires_grad_() for x in _inputs(shapes)]
        indices = [torch.randint(0, n, shape, generator=generator) for shape, n in index_shapes]
        f = einc.compile(pattern, distributed=True)
        assert f.explain(*data, *indices).distribution.axis == "b"
        out = f(*data, *indices)
        want = reference(*data, *indices)
        _close(out, want.detach(), f"{pattern}: values")
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for g, e in zip(torch.autograd.grad((out * weights).sum(), data),
                        torch.autograd.grad((want * weights).sum(), data)):
            _close(g, e, f"{pattern}: gradient")
    # A bad index in the last rank's part only: every rank raises (none waits for it).
    bad = torch.zeros(6, 4, dtype=torch.long)
    bad[5, 3] = 5
    _refused(lambda: einc.compile("gather(b [n] d, b k -> b k d)", distributed=True)(*_inputs([(6, 5, 3)]), bad),
             "operand 1 indexes axis 'n' of size 5 but holds the index 5")


@check
def eager_backend_and_double_backward(rank: int, world: int) -> None:
    """The eager backend computes the parts the same; double backward is refused on every rank."""
    f = einc.compile("logsumexp(b i, i j, j k -> b k)", distributed=True, backend="eager")
    xs = [x.requires_grad_() for x in _inputs(CHAIN)]
    out = f(*xs)
    _close(out, _semiring("logsumexp")(*xs).detach(), "eager")
    (grad,) = torch.autograd.grad(out.sum(), xs[1], create_graph=False)
    _refused(lambda: torch.autograd.grad(f(*xs).sum(), xs[1], create_graph=True), "no double backward")


@check
def dtensors_mixed_with_plain_tensors(rank: int, world: int) -> None:
    """Plain tensors among DTensors: an EincError on every rank, before any collective."""
    x, w = _inputs([(4, 6), (6, 2)])
    (dx,) = _dtensors([x], [__import__("torch.distributed.tensor", fromlist=["Shard"]).Shard(0)])
    _refused(lambda: einc.compile("b d, d e -> b e", distributed=True)(dx, w),
             "operands [1] are plain tensors among DTensors")


@check
def explain_and_validate(rank: int, world: int) -> None:
    """explain() of a distributed expression shows its group's size; validate() compares the result."""
    f = einc.compile("logsumexp(b i, i j, j k -> b k)", distributed=True)
    plan = f.explain(*CHAIN)
    assert plan.distribution.world_size == world and f"{world} ranks split j (logsumexp)" in str(plan), str(plan)
    assert f.validate(*_inputs(CHAIN)) < 1e-9


def worker(rank: int, world: int, port: int, directory: str, names: list[str]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict[str, str] = {}
    try:
        for name in names:
            try:
                CHECKS[name](rank, world)
                results[name] = "ok"
            except Exception as err:  # recorded: the test reports it with the check's name
                results[name] = f"{type(err).__name__}: {err}"
            dist.barrier()
    finally:
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as out:
            json.dump(results, out)
        dist.destroy_process_group()
