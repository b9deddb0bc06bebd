"""einc: an einsum/einops expression compiler for PyTorch.

>>> import torch, einc
>>> f = einc.compile("b h q d, b h k d -> b h q k")
>>> f(torch.randn(2, 4, 8, 16), torch.randn(2, 4, 5, 16)).shape
torch.Size([2, 4, 8, 5])
"""

from .api import Expression, compile, configure, einsum
from .errors import EincError
from .report import Plan, PlanStep

__all__ = ["EincError", "Expression", "Plan", "PlanStep", "compile", "configure", "einsum", "__version__"]

__version__ = "0.1.0"
