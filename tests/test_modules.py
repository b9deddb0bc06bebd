"""Shape-generic modules (``Expression.module``, ``einc.nn``): run-time checks, any
rank of ``...``, pickling, memory limits.

References: torch.einsum in float64, and the errors an :class:`einc.Expression` call
gives for the same shapes (one rule, one message, on both paths).
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import textwrap
import timeit
import warnings

import pytest
import torch
from conftest import assert_close, randn

import einc
import einc.nn


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


# ------------------------------------------------------------ run-time checks

BAD_CALLS = [
    # (pattern, sizes, example shapes, called shapes, what the message names)
    # A batch of 1 would broadcast against 2: one name, one size.
    ("b h q d, b h k d -> b h q k", {}, [(2, 3, 4, 5), (2, 3, 6, 5)], [(2, 3, 4, 5), (1, 3, 6, 5)],
     ["axis 'b'", "size 1 in operand 1 (dimension 0)", "2 in operand 0 (dimension 0)"]),
    # The head dimension differs between the operands.
    ("b q d, b k d -> b q k", {}, [(2, 4, 5), (2, 6, 5)], [(2, 4, 5), (2, 6, 7)],
     ["axis 'd'", "size 7 in operand 1 (dimension 2)", "5 in operand 0 (dimension 2)"]),
    # A keyword size disagrees with the tensor.
    ("b (h d) -> b h d", {"h": 4}, [(2, 8)], [(2, 6)],
     ["composition (h d)", "size 6", "product 4", "axis 'd'"]),
    # Too few dimensions.
    ("b t c -> b c", {}, [(2, 3, 4)], [(2, 3)], ["operand 0 has 2 dimensions", "'b t c' has 3"]),
    # A unit axis that is not 1.
    ("b 1 c -> b c", {}, [(2, 1, 4)], [(2, 3, 4)], ["unit axis '1'", "size 3"]),
    # '...' standing for different dimensions in two operands.
    ("... i, ... i -> ...", {}, [(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (3, 3, 4)],
     ["'...' stands for dimensions [3, 3] in operand 1 but [2, 3] in operand 0"]),
    # A keyword size of a plain axis.
    ("b c, c d -> b d", {"c": 4}, [(2, 4), (4, 3)], [(2, 5), (5, 3)], ["axis 'c'", "size 5", "keyword"]),
]


@pytest.mark.parametrize("pattern, sizes, examples, shapes, fragments", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_modules_check_sizes_at_run_time(pattern, sizes, examples, shapes, fragments):
    module = einc.compile(pattern, **sizes).module(*examples)
    tensors = [randn(*s) for s in shapes]
    with pytest.raises(einc.EincError) as err:
        module(*tensors)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"
    assert repr(pattern) in str(err.value)
    # Scripted, TorchScript raises its own error type with einc's message inside.
    with pytest.raises(torch.jit.Error, match="EincError"):
        script(module)(*tensors)
    # An Expression call refuses the same shapes.
    with pytest.raises(einc.EincError):
        einc.compile(pattern, **sizes)(*tensors)


@pytest.mark.parametrize(
    "pattern, sizes, example, shapes, equation",
    [
        # One Linear applied to tensors of any rank (OpenFold's use).
        ("... c, c d -> ... d", {}, [(2, 3, 8), (8, 5)], [[(8,), (8, 5)], [(4, 8), (8, 5)], [(2, 3, 4, 8), (8, 5)]],
         "...c,cd->...d"),
        # '...' in the middle, reduced away.
        ("b ... c -> b c", {}, [(2, 3, 4)], [[(2, 4)], [(2, 5, 6, 4)]], "b...c->bc"),
        # '...' in both operands, any rank (the same dimensions).
        ("... i, ... i -> ...", {}, [(2, 4), (2, 4)], [[(4,), (4,)], [(2, 3, 4), (2, 3, 4)]], "...i,...i->..."),
        # '...' merged into one dimension in the output.
        ("b ... -> b (...)", {}, [(2, 3)], [[(2,)], [(2, 3, 4)]], None),
    ],
)
def test_modules_take_any_rank_of_ellipsis(pattern, sizes, example, shapes, equation):
    module = einc.compile(pattern, **sizes).module(*example)
    scripted = script(module)
    for call in shapes:
        tensors = [randn(*s) for s in call]
        expected = torch.einsum(equation, *tensors) if equation else tensors[0].reshape(tensors[0].shape[0], -1)
        assert_close(module(*tensors), expected)
        assert_close(scripted(*tensors), expected)


def test_einsum_layer_takes_any_rank():
    # The case: "... c -> ... o" with a weight, on a rank-3 input.
    layer = einc.nn.Einsum("... c -> ... o", weight="o c", o=5, c=8).double()
    for shape in [(8,), (3, 8), (2, 3, 8), (2, 2, 3, 8)]:
        x = randn(*shape)
        assert_close(layer(x), x @ layer.weight.T)
    with pytest.raises(einc.EincError, match="axis 'c'"):
        layer(randn(2, 7))


def test_run_time_checks_cost_a_few_microseconds():
    # The checks are integer comparisons: measured, not asserted tightly (a loose bound
    # catches an accidental per-call replan or tensor work).
    module = einc.compile("b h q d, b h k d -> b h q k").module((2, 3, 4, 5), (2, 3, 6, 5))
    q, k = randn(2, 3, 4, 5), randn(2, 3, 6, 5)
    module(q, k)
    seconds = min(timeit.repeat(lambda: module(q, k), number=200, repeat=5)) / 200
    assert seconds < 2e-3


@pytest.mark.parametrize("value, kind", [(3, "int"), ([1.0, 2.0], "list"), ("x", "str")])
def test_modules_refuse_what_is_not_a_tensor(value, kind):
    # Once an AttributeError from deep inside the generated code.
    module = einc.compile("a b -> b a").module((2, 3))
    with pytest.raises(einc.EincError, match=f"operand 0 must be a torch.Tensor, not {kind}"):
        module(value)
    layer = einc.nn.Einsum("b c -> b o", weight="o c", o=3, c=4)
    with pytest.raises(einc.EincError, match=f"operand 0 must be a torch.Tensor, not {kind}"):
        layer(value)


# ------------------------------------------------------------ dtypes

DTYPES = [
    # (pattern, dtype, torch reference): modules decide dtypes at run time, by the same rules
    # A whole-number scale keeps integers integers (it once made floats in modules).
    ("a b -> a * 3", torch.int64, lambda x: x.sum(1) * 3),
    # A size in the scale is read from the shape: still an int.
    ("a b -> a * b", torch.int32, lambda x: x.sum(1) * x.shape[1]),
    # A dividing scale gives torch's default float, as x.sum(1) / 2 does.
    ("a b -> a * 2 / 4", torch.int64, lambda x: x.sum(1) / 2),
    # Floats never wrap: 2**64 as a float scale.
    ("a b -> a * 4294967296 * 4294967296", torch.float64, lambda x: x.sum(1) * 2.0**64),
    # uint16 sums in int64, as torch.sum does (the run-time table once stopped at int32).
    ("a b -> a", torch.uint16, lambda x: x.sum(1)),
    ("a b -> a", torch.uint32, lambda x: x.sum(1)),
    # bool sums count.
    ("a b -> a", torch.bool, lambda x: x.sum(1)),
    # Half floats: logsumexp computes in float32 and returns float16.
    ("logsumexp(a b -> a)", torch.float16, lambda x: torch.logsumexp(x.float(), 1).half()),
]


@pytest.mark.parametrize("pattern, dtype, reference", DTYPES, ids=[f"{c[0]}-{c[1]}" for c in DTYPES])
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_modules_compute_in_the_same_dtypes_as_expressions(pattern, dtype, reference, backend):
    x = (torch.arange(12).reshape(3, 4) % 5).to(dtype)
    expected = reference(x)
    expression = einc.compile(pattern, backend=backend)
    for result in (expression(x), expression.module((3, 4))(x)):
        assert result.dtype == expected.dtype
        torch.testing.assert_close(result, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_modules_take_the_largest_int64_scale(backend):
    # A float check once refused it (float(2**63 - 1) == 2**63); the product is exact now.
    x = torch.zeros(3, 4, dtype=torch.int64)
    x[0, 0] = 1
    expression = einc.compile("a b -> a * 9223372036854775807", backend=backend)
    expected = torch.tensor([9223372036854775807, 0, 0])
    assert torch.equal(expression(x), expected)
    assert torch.equal(expression.module((3, 4))(x), expected)


REFUSED = [
    # (pattern, dtypes, message): the same EincError from expressions and modules
    ("logsumexp(a b -> a)", [torch.int64], "logsumexp(...) needs floating-point tensors, got torch.int64"),
    ("softmax(a [b])", [torch.uint8], "softmax(...) needs floating-point tensors, got torch.uint8"),
    ("max(a b, b c -> a c)", [torch.bool, torch.bool], "bool tensors cannot, got torch.bool"),
    ("max(a b -> a)", [torch.complex64], "max(...) needs real tensors, got torch.complex64"),
    # An integral scale beyond int64 for integer tensors.
    ("a b -> a * 3037000500 * 3037000500", [torch.int64], "does not fit in int64"),
]


@pytest.mark.parametrize("pattern, kinds, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_modules_refuse_the_dtypes_expressions_refuse(pattern, kinds, message):
    tensors = [torch.ones(2, 2, dtype=d) for d in kinds]
    expression = einc.compile(pattern)
    for function in (expression, expression.module(*[(2, 2)] * len(kinds))):
        with pytest.raises(einc.EincError, match=re.escape(message)):
            function(*tensors)


def test_a_module_scripted_by_the_user_has_exact_complex_gradients_without_graph_optimizations():
    # The documented way: TorchScript's profiling executor differentiates a scripted
    # graph itself from the second call on, without conjugating; with its optimizations
    # off from the first call, autograd differentiates torch's ops. Reference: torch.einsum.
    module = script(einc.compile("bdn,bn->bd").module((2, 3, 4), (2, 4)))
    with torch.jit.optimized_execution(False):
        for _ in range(3):
            x, c = randn(2, 3, 4, dtype=torch.complex128), randn(2, 4, dtype=torch.complex128)
            x.requires_grad_(), c.requires_grad_()
            got = torch.autograd.grad(module(x, c).real.sum(), (x, c))
            expected = torch.autograd.grad(torch.einsum("bdn,bn->bd", x, c).real.sum(), (x, c))
            for g, r in zip(got, expected):
                assert_close(g, r)


# ------------------------------------------------------------ pickling


def test_expressions_and_modules_pickle_and_load_in_a_fresh_process(tmp_path):
    x = randn(2, 5, 8, dtype=torch.float32)
    model = torch.nn.ModuleDict({
        "mlp": einc.nn.Einsum("b t c -> b t d", "c d", "d", c=8, d=4),
        "attn": einc.nn.MultiheadAttention(8, 2, batch_first=True),
        "generic": einc.compile("b t (h d) -> b h t d", h=2).module((1, 1, 8)),
    })
    expression = einc.compile("b q (h d), b k (h d) -> b h q k", h=2)
    torch.save(model, tmp_path / "model.pt")
    (tmp_path / "expression.pkl").write_bytes(pickle.dumps(expression))
    expected = {"mlp": model["mlp"](x), "attn": model["attn"](x, x, x)[0], "generic": model["generic"](x),
                "expression": expression(x, x)}
    torch.save({"x": x, **expected}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import pickle, torch
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        expression = pickle.loads(open({str(tmp_path / 'expression.pkl')!r}, "rb").read())
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        x = expected["x"]
        assert torch.equal(model["mlp"](x), expected["mlp"])
        assert torch.equal(model["attn"](x, x, x)[0], expected["attn"])
        assert torch.equal(model["generic"](x), expected["generic"])
        assert torch.equal(expression(x, x), expected["expression"])
        assert torch.equal(model["mlp"].weight, torch.load({str(tmp_path / 'model.pt')!r},
                           weights_only=False)["mlp"].weight)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_pickled_module_keeps_the_process_limit_it_was_made_under(tmp_path):
    # The limit is part of the module (checked on every call); once the loading
    # process's own setting replaced it, both ways.
    previous = einc.configure(memory_limit=1000)
    try:
        limited = einc.compile("b q d, b k d -> b q k").module((2, 4, 5), (2, 4, 5))
    finally:
        einc.configure(**previous)
    free = einc.compile("b q d, b k d -> b q k").module((2, 4, 5), (2, 4, 5))
    torch.save({"limited": limited, "free": free}, tmp_path / "modules.pt")
    code = textwrap.dedent(f"""
        import torch, einc
        einc.configure(memory_limit=10)  # this process's limit applies to what it makes, not to what it loads
        modules = torch.load({str(tmp_path / 'modules.pt')!r}, weights_only=False)
        einc.configure(memory_limit=None)
        small, large = torch.randn(2, 4, 5), torch.randn(2, 40, 5)
        assert modules["free"](large, large).shape == (2, 40, 40)
        modules["limited"](small, small)
        try:
            modules["limited"](large, large)
        except einc.EincError as err:
            assert "memory_limit=1,000 elements is too small" in str(err), err
        else:
            raise SystemExit("the limited module ran over its limit")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr + result.stdout


def test_pickled_expression_keeps_its_options_and_constants():
    weight = randn(3, 4)
    expression = einc.compile("ij,jk->ik", backend="eager", optimize="greedy", constants={1: weight})
    copy = pickle.loads(pickle.dumps(expression))
    assert copy.backend == "eager" and copy.optimize == "greedy"
    x = randn(2, 3)
    assert_close(copy(x), x @ weight)


# ------------------------------------------------------------ memory limits


def test_modules_check_the_memory_limit_for_the_actual_shapes():
    # The expression's limit: fine for the example, too small for a longer sequence.
    module = einc.compile("b q d, b k d -> b q k", memory_limit=1000).module((2, 4, 5), (2, 4, 5))
    module(randn(2, 4, 5), randn(2, 4, 5))
    with pytest.raises(einc.EincError, match="memory_limit=1,000 elements is too small"):
        module(randn(2, 40, 5), randn(2, 40, 5))


def test_process_wide_limit_applies_to_modules_made_under_it_and_to_cached_signatures():
    expression = einc.compile("b q d, b k d -> b q k", backend="eager")
    q = randn(2, 40, 5)
    expression(q, q)  # planned and cached without a limit
    previous = einc.configure(memory_limit=1000)
    try:
        # A signature cached before configure() is planned again under the new limit.
        with pytest.raises(einc.EincError, match="memory_limit"):
            expression(q, q)
        module = einc.compile("b q d, b k d -> b q k").module((2, 4, 5), (2, 4, 5))
        with pytest.raises(einc.EincError, match="memory_limit"):
            module(q, q)
        layer = einc.nn.Einsum("b t c -> b t d", "c d", c=5, d=4)
        with pytest.raises(einc.EincError, match="memory_limit"):
            layer(randn(2, 400, 5, dtype=torch.float32))
    finally:
        einc.configure(**previous)
    # Lifted again: the expression plans the signature anew.
    assert expression(q, q).shape == (2, 40, 40)


def test_configure_compiles_cached_signatures_again_only_when_the_limit_changes(monkeypatch):
    # Cache sizes do not change a plan; once every configure() made every expression
    # plan and compile every signature again.
    expression = einc.compile("ij,jk->ik", backend="eager")
    x, y = randn(2, 3), randn(3, 4)
    expression(x, y)
    compiled = []
    real = einc.api.generate
    monkeypatch.setattr(einc.api, "generate", lambda *args, **kw: compiled.append(1) or real(*args, **kw))
    previous = einc.configure(plan_cache_size=64)
    try:
        assert_close(expression(x, y), x @ y)
        assert compiled == []
        einc.configure(memory_limit=10**9)
        assert_close(expression(x, y), x @ y)
        assert compiled == [1]
    finally:
        einc.configure(**previous)


def test_a_limit_in_bytes_is_checked_with_the_actual_element_size():
    module = einc.compile("i j -> j i", memory_limit="64B").module((2, 4))
    module(torch.ones(2, 4, dtype=torch.float64))  # 8 elements of 8 bytes
    module(torch.ones(2, 8, dtype=torch.float32))  # 16 elements of 4 bytes
    with pytest.raises(einc.EincError, match="bytes is too small"):
        module(torch.ones(2, 8, dtype=torch.float64))
