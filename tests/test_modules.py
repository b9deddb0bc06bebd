"""Shape-generic modules (``Expression.module``, ``einc.nn``): run-time checks, any
rank of ``...``, pickling, memory limits.

References: torch.einsum in float64, and the errors an :class:`einc.Expression` call
gives for the same shapes (one rule, one message, on both paths).
"""

from __future__ import annotations

import pickle
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


def test_a_limit_in_bytes_is_checked_with_the_actual_element_size():
    module = einc.compile("i j -> j i", memory_limit="64B").module((2, 4))
    module(torch.ones(2, 4, dtype=torch.float64))  # 8 elements of 8 bytes
    module(torch.ones(2, 8, dtype=torch.float32))  # 16 elements of 4 bytes
    with pytest.raises(einc.EincError, match="bytes is too small"):
        module(torch.ones(2, 8, dtype=torch.float64))
