"""Backends, autograd, memory layouts, dtypes, devices and the generated source."""

from __future__ import annotations

import io
import re
import tokenize
import warnings

import einops
import pytest
import torch

import einc
from conftest import assert_close, operands, randn, reference_einsum, tolerance, widen

# torch.compile's first use imports torch internals that warn about TorchScript's own
# deprecation (not einc's doing); TorchScript compiles by einc are checked to be silent
# in test_torchscript_compile_emits_no_warnings.
_TORCH_INTERNAL_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
BACKENDS = ["torchscript", "eager", pytest.param("compile", marks=[pytest.mark.slow, _TORCH_INTERNAL_WARNING])]

# (pattern, operand shapes, keyword sizes, reference) -- the reference is a function of
# float64 operands computed without einc.
PATTERNS = [
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)], {},
     lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k)),  # attention scores
    ("b q (h d), b k (h d) -> b h q k", [(2, 4, 6), (2, 5, 6)], {"h": 2},
     lambda q, k: torch.einsum("bqhd,bkhd->bhqk", q.reshape(2, 4, 2, 3), k.reshape(2, 5, 2, 3))),  # multi-head split
    ("h w -> (h r) w c", [(3, 4)], {"r": 2, "c": 3},
     lambda x: einops.repeat(x, "h w -> (h r) w c", r=2, c=3)),  # repeat
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, shapes, sizes, reference", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_every_backend(backend, pattern, shapes, sizes, reference):
    xs = operands(shapes)
    expr = einc.compile(pattern, backend=backend, **sizes)
    assert_close(expr(*xs), reference(*xs))
    assert_close(expr(*xs), reference(*xs))  # second call: cached function
    ys = operands(shapes, torch.float32)
    assert_close(expr(*ys), reference(*map(widen, ys)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@_TORCH_INTERNAL_WARNING
def test_compile_backend_new_shape_and_zero_size():
    expr = einc.compile("ij,jk->ik", backend="compile")
    for shapes in ([(3, 4), (4, 5)], [(2, 0), (0, 3)]):
        xs = operands(shapes)
        assert_close(expr(*xs), reference_einsum("ij,jk->ik", *xs))


@pytest.mark.parametrize(
    "pattern, shapes, sizes",
    [
        ("ij,jk->ik", [(2, 3), (3, 4)], {}),
        ("ii->i", [(3, 3)], {}),
        ("iij,jk->ik", [(2, 2, 3), (3, 2)], {}),
        ("...ij,...jk->...ik", [(2, 1, 2, 3), (3, 3, 2)], {}),
        ("b (h d), b h -> b d", [(2, 6), (2, 3)], {"h": 3}),
        ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 2)], {}),
        ("ij,ij,ij->i", [(2, 3), (2, 3), (2, 3)], {}),
        ("h w -> (h r) w", [(2, 3)], {"r": 2}),
        ("i,j->ij", [(3,), (2,)], {}),
        ("i, -> i", [(3,), ()], {}),
    ],
    ids=["matmul", "diagonal", "diagonal-contract", "ellipsis", "composition", "three-operands",
         "triple-hadamard", "repeat", "outer", "scalar"],
)
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_gradcheck(pattern, shapes, sizes, backend):
    expr = einc.compile(pattern, backend=backend, **sizes)
    xs = [randn(*s).requires_grad_() for s in shapes]
    assert torch.autograd.gradcheck(expr, xs)


def test_gradients_match_torch_einsum():
    a, b, c = [randn(*s).requires_grad_() for s in [(2, 3), (3, 4), (4, 2)]]
    einc.compile("ab,bc,cd->ad")(a, b, c).square().sum().backward()
    grads = [t.grad.clone() for t in (a, b, c)]
    for t in (a, b, c):
        t.grad = None
    torch.einsum("ab,bc,cd->ad", a, b, c).square().sum().backward()
    for mine, ref in zip(grads, (a.grad, b.grad, c.grad)):
        assert_close(mine, ref)


_base = torch.randn(6, 8, 10, dtype=torch.float64)

# (name, pattern, operands): inputs whose memory is not row-major.
NON_CONTIGUOUS = [
    ("transposed", "ij,jk->ik", lambda: [_base[0].t(), _base[1, :, :5]]),
    ("sliced-steps", "ij,jk->ik", lambda: [_base[0, ::2, ::3], _base[1, 1:5, ::2]]),
    ("expanded", "bij,bjk->bik", lambda: [_base[:1, :3, :4].expand(5, 3, 4), _base[:5, :4, :2]]),
    ("expanded-both", "ij,jk->ik", lambda: [_base[0, :1, :].expand(3, 10), _base[0, 0, :, None].expand(10, 4)]),
    ("permuted-3d", "abc,cbd->ad", lambda: [_base.permute(2, 0, 1)[:, :4, :3], _base.permute(1, 2, 0)[:3, :4, :2]]),
    ("middle-index", "ij->ji", lambda: [_base[:, 2, :]]),
    ("diagonal-of-view", "ii->i", lambda: [_base[0, :6, :6].t()]),
    ("ellipsis-broadcast-view", "...ij,...jk->...ik", lambda: [_base[:2, None, :3, :4], _base[:3, :5, :4].transpose(1, 2)]),
    ("composition-of-view", "b (h d) -> b h d", lambda: [_base[0, :, ::2].t()]),
]


@pytest.mark.parametrize("name, pattern, make", NON_CONTIGUOUS, ids=[n[0] for n in NON_CONTIGUOUS])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_non_contiguous_inputs(name, pattern, make, backend):
    xs = make()
    if pattern == "b (h d) -> b h d":
        expected = einops.rearrange(xs[0], pattern, h=2)
        assert torch.equal(einc.compile(pattern, backend=backend, h=2)(*xs), expected)
        return
    assert_close(einc.compile(pattern, backend=backend)(*xs), reference_einsum(pattern, *xs))


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
DTYPE_PATTERNS = [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),  # batched matmul
    ("ii->i", [(3, 3)]),  # diagonal
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)]),  # broadcast ellipsis
    ("i,j->ij", [(3,), (4,)]),  # outer product (mul)
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 5)]),  # chain
    ("ij->", [(3, 4)]),  # full reduction
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("equation, shapes", DTYPE_PATTERNS, ids=[e for e, _ in DTYPE_PATTERNS])
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_dtypes(dtype, equation, shapes, backend):
    xs = operands(shapes, dtype)
    out = einc.compile(equation, backend=backend)(*xs)
    assert out.dtype == dtype
    tol = tolerance(dtype)
    # Against torch.einsum in the same dtype ...
    torch.testing.assert_close(out, torch.einsum(equation, *xs), **tol)
    # ... and against the float64 reference.
    assert_close(out, reference_einsum(equation, *xs), **tol)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_integer_dtypes_are_exact(dtype):
    # Sums of integers accumulate in int64, as torch.sum does (the README's rule).
    a = torch.randint(-5, 5, (3, 4), dtype=dtype)
    b = torch.randint(-5, 5, (4, 5), dtype=dtype)
    out = einc.compile("ij,jk->ik")(a, b)
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.einsum("ij,jk->ik", a.long(), b.long()))


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("ij,jk->ik", [(0, 4), (4, 5)]),  # empty rows
        ("ij,jk->ik", [(3, 0), (0, 5)]),  # empty contraction: zeros
        ("bij,bjk->bik", [(0, 3, 4), (0, 4, 5)]),  # empty batch
        ("ij->", [(0, 3)]),  # sum of nothing
        ("i,j->ij", [(0,), (3,)]),  # empty outer product
        ("ii->i", [(0, 0)]),  # empty diagonal
        ("ab,bc,cd->ad", [(2, 3), (3, 0), (0, 4)]),  # empty in the middle of a chain
    ],
    ids=["rows", "contracted", "batch", "sum", "outer", "diagonal", "chain"],
)
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
def test_zero_size_dims(equation, shapes, backend):
    xs = operands(shapes)
    out = einc.compile(equation, backend=backend)(*xs)
    assert_close(out, reference_einsum(equation, *xs))


def test_zero_size_repeat_and_split():
    x = torch.randn(0, 6)
    assert torch.equal(einc.compile("b (h d) -> h b d", h=2)(x), einops.rearrange(x, "b (h d) -> h b d", h=2))
    assert einc.compile("b w -> b w c", c=0)(torch.randn(2, 3)).shape == (2, 3, 0)


# ---------------------------------------------------------------------- devices

DEVICES = [
    "cpu",
    # The meta device carries shapes and dtypes only: it checks device propagation
    # through every op of the generated code without a GPU.
    "meta",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torchscript", "eager"])
@pytest.mark.parametrize(
    "pattern, shapes, sizes, reference",
    [
        ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)], {}, lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k)),
        ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)], {}, lambda a, b: torch.einsum("...ij,...jk->...ik", a, b)),
        ("b (h d) -> b h d c", [(2, 6)], {"h": 2, "c": 3},
         lambda x: einops.repeat(x, "b (h d) -> b h d c", h=2, c=3)),
        ("ii,i->i", [(3, 3), (3,)], {}, lambda a, b: torch.einsum("ii,i->i", a, b)),
    ],
    ids=["attention", "ellipsis", "split-repeat", "diagonal"],
)
def test_output_on_input_device(device, backend, pattern, shapes, sizes, reference):
    cpu = operands(shapes)
    xs = [x.to(device) for x in cpu]
    out = einc.compile(pattern, backend=backend, **sizes)(*xs)
    assert out.device.type == torch.device(device).type
    assert out.dtype == torch.float64
    expected = reference(*cpu)
    assert tuple(out.shape) == tuple(expected.shape)
    if device != "meta":
        assert_close(out.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_against_float64_reference(device, dtype):
    shapes = [(2, 3, 16, 8), (2, 3, 12, 8)]
    xs = [x.to(device) for x in operands(shapes, dtype)]
    out = einc.compile("bhqd,bhkd->bhqk")(*xs)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close(out.cpu(), reference_einsum("bhqd,bhkd->bhqk", *[x.cpu() for x in xs]), **tolerance(dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_and_cpu_share_an_expression(device):
    # The same shapes on two devices: each call's result is on its inputs' device.
    expr = einc.compile("ab,bc,cd->ad")
    cpu = operands([(4, 5), (5, 6), (6, 7)])
    gpu = [x.to(device) for x in cpu]
    for xs in (cpu, gpu, cpu):
        out = expr(*xs)
        assert out.device == xs[0].device
        assert_close(out.cpu(), reference_einsum("ab,bc,cd->ad", *cpu))
    xs = [x.clone().requires_grad_() for x in gpu]
    assert torch.autograd.gradcheck(expr, xs)


# ------------------------------------------------------------- generated source

# Axis names that would be dangerous if they reached code, and names that collide
# with what codegen itself emits.
DANGEROUS = {"__import__", "os", "exec", "system", "eval", "getattr", "open", "__builtins__"}

# plain pattern -> (shapes, keyword sizes, reference on float64 operands)
PLAIN = {
    "a b, b c -> a c": ([(2, 3), (3, 4)], {}, lambda x, y: torch.einsum("ab,bc->ac", x, y)),
    "(a b) c -> c b a": ([(6, 4)], {"b": 2}, lambda x: einops.rearrange(x, "(a b) c -> c b a", b=2)),
    "a a b -> b a": ([(3, 3, 2)], {}, lambda x: torch.einsum("aab->ba", x)),
    "a -> a b": ([(3,)], {"b": 3}, lambda x: einops.repeat(x, "a -> a b", b=3)),
    "... a, a b -> ... b": ([(2, 5, 3), (3, 4)], {}, lambda x, y: torch.einsum("...a,ab->...b", x, y)),
    "a 1 b -> b 1 a": ([(2, 1, 3)], {}, lambda x: einops.rearrange(x, "a 1 b -> b 1 a")),
    "a b, b c -> c d a": ([(2, 3), (3, 4)], {"d": 2},
                          lambda x, y: einops.repeat(torch.einsum("ab,bc->ca", x, y), "c a -> c d a", d=2)),
    "a b, b c, c d -> a d": ([(2, 3), (3, 4), (4, 5)], {}, lambda x, y, z: torch.einsum("ab,bc,cd->ad", x, y, z)),
}
# (the plain pattern, its axes renamed)
RENAMES = [
    ("a b, b c -> a c", {"a": "__import__", "b": "os", "c": "exec"}),
    ("(a b) c -> c b a", {"a": "__import__", "b": "os", "c": "exec"}),
    ("a a b -> b a", {"a": "eval", "b": "system"}),
    ("a -> a b", {"a": "system", "b": "exec"}),
    ("... a, a b -> ... b", {"a": "getattr", "b": "open"}),
    ("a 1 b -> b 1 a", {"a": "open", "b": "__builtins__"}),
    ("a b, b c -> c d a", {"a": "x0", "b": "t0", "c": "torch", "d": "einc_fn"}),
    ("a b, b c, c d -> a d", {"a": "List", "b": "x1", "c": "t1", "d": "torch"}),
]


def _rename(pattern: str, names: dict[str, str]) -> str:
    return re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: names.get(m.group(0), m.group(0)), pattern)


def _tokens(source: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(source).readline))


@pytest.mark.parametrize("plain, names", RENAMES, ids=[_rename(p, n) for p, n in RENAMES])
def test_axis_names_never_reach_the_source(plain, names):
    shapes, sizes, reference = PLAIN[plain]
    odd = _rename(plain, names)
    odd_expr = einc.compile(odd, **{names[k]: v for k, v in sizes.items()})
    odd_source = odd_expr.explain(*shapes).source
    plain_source = einc.compile(plain, **sizes).explain(*shapes).source
    # The names in the pattern change nothing in the generated code ...
    assert odd_source == plain_source
    tokens = _tokens(odd_source)
    found = {t.string for t in tokens if t.type == tokenize.NAME}
    # ... none of the dangerous ones appears in it ...
    assert not found & DANGEROUS, found & DANGEROUS
    # ... it holds no string literals and only integer numbers ...
    assert not [t.string for t in tokens if t.type == tokenize.STRING]
    assert all(re.fullmatch(r"[0-9]+", t.string) for t in tokens if t.type == tokenize.NUMBER)
    # ... and, run as a module, it defines einc_fn and nothing else.
    namespace = {"torch": torch, "List": list}
    exec(compile(odd_source, "<test>", "exec"), namespace)  # noqa: S102 - the code under test
    assert set(namespace) - {"torch", "List", "__builtins__"} == {"einc_fn"}
    xs = operands(shapes)
    assert_close(namespace["einc_fn"](*xs), reference(*xs))
    assert_close(odd_expr(*xs), reference(*xs))


@pytest.mark.parametrize("plain", sorted(PLAIN), ids=sorted(PLAIN))
def test_source_is_the_same_for_every_backend_and_valid_torchscript(plain):
    shapes, sizes, reference = PLAIN[plain]
    sources = {
        einc.compile(plain, backend=b, **sizes).explain(*shapes).source for b in ("torchscript", "eager", "compile")
    }
    assert len(sources) == 1
    (source,) = sources
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.CompilationUnit(source).einc_fn
    xs = operands(shapes)
    assert_close(scripted(*xs), reference(*xs))


def test_torchscript_compile_emits_no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Fresh Expressions (not the compile() cache), so TorchScript really compiles.
        expr = einc.Expression("p q, q r -> p r", backend="torchscript")
        a, b = operands([(2, 3), (3, 4)])
        out = expr(a, b)
        expr(a, b)
        einc.Expression("ab,bc,cd->ad")(*operands([(2, 3), (3, 4), (4, 5)]))
    assert_close(out, reference_einsum("pq,qr->pr", a, b))
    relevant = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not relevant, [str(w.message) for w in relevant]


def test_torchscript_backend_is_scripted():
    expr = einc.Expression("ij,jk->ik")
    a, b = operands([(2, 3), (3, 4)])
    for _ in range(einc.api.GENERIC_CALLS + 1):  # past the shared generic code: the signature's own
        expr(a, b)
    entry = expr._entry((a, b))
    # Run with TorchScript's graph optimizations off (see test_complex_gradients_...).
    assert isinstance(entry.fn.__wrapped__, torch.jit.ScriptFunction)
    eager = einc.Expression("ij,jk->ik", backend="eager")
    for _ in range(einc.api.GENERIC_CALLS + 1):
        eager(a, b)
    assert not isinstance(getattr(eager._entry((a, b)).fn, "__wrapped__", None), torch.jit.ScriptFunction)
