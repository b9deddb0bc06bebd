"""The independent reference (:mod:`einc.reference`) at stage level: it reads a parsed
pattern and tensors, never a plan.  References: torch.einsum in float64."""

from __future__ import annotations

import pytest
import torch

import einc
from einc.parser import parse
from einc.reference import reference


def test_compositions_split_by_learned_sizes():
    # (h d) split with h from the keyword and d learned from the composition's extent.
    x = torch.randn(2, 12, dtype=torch.float64)
    expected = torch.einsum("bhd->bh", x.reshape(2, 3, 4))
    torch.testing.assert_close(reference(parse("b (h d) -> b h"), [x], {"h": 3}), expected)


def test_a_composition_of_two_unknown_sizes_is_refused_not_looped_over():
    # Once an endless loop: nothing tells how (h d) = 12 splits.
    with pytest.raises(einc.EincError, match="give the size of 'd', 'h' by keyword"):
        reference(parse("b (h d) -> b h"), [torch.randn(2, 12, dtype=torch.float64)], {})
