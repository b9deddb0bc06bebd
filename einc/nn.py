"""Modules written with einc: :class:`Einsum` and :class:`MultiheadAttention`.

Their computations are einc patterns compiled to shape-generic generated modules
(:meth:`einc.Expression.module`), held as submodules: the layers run eagerly, under
``torch.jit.script`` and under ``torch.compile(fullgraph=True)``, for any batch size
and sequence length.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations as objects.

import math
from collections.abc import Mapping
from typing import Any, Final, List, Optional, Tuple  # noqa: UP035 - TorchScript reads typing's names

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from . import ir
from .api import compile as _compile
from .api import compile_ir
from .backends import transformed
from .errors import EincError
from .parser import Notation, parse
from .sizes import check_keyword_axes, check_sizes

__all__ = ["Einsum", "MultiheadAttention"]

EXAMPLE_SIZE = 8
"""Size assumed, when planning a module's contraction path, for axes whose size is
not fixed (batch, sequence); the generated code reads the real sizes at run time."""


def _example_shape(axes: ir.AxisList, sizes: Mapping[str, int]) -> tuple[int, ...]:
    shape: list[int] = []
    for dim in axes.dims:
        if dim == (ir.ELLIPSIS,):
            shape.append(EXAMPLE_SIZE)  # the module takes '...' of any rank
        else:
            shape.append(math.prod(sizes.get(a, EXAMPLE_SIZE) for a in dim))
    return tuple(shape)


def _axis_list(text: str, notation: Notation, what: str) -> ir.AxisList:
    """The weight's or bias's axes: one axis list, nothing else."""
    if not isinstance(text, str):
        raise EincError(f"Einsum: the {what} must be an axis list as a string, e.g. 'o c', not {text!r}")
    parsed = parse(text, notation)
    if "->" in text or len(parsed.inputs) != 1 or parsed.op is not None or parsed.nested or parsed.scale:
        raise EincError(f"Einsum: the {what} must be one axis list such as 'o c' (no arrow, comma, operation "
                        f"or scale), not {text!r}")
    return parsed.operands[0]


def _fixed_shape(axes: ir.AxisList, sizes: Mapping[str, int], what: str) -> tuple[int, ...]:
    """The shape of a weight or bias: every axis's size must come by keyword."""
    shape: list[int] = []
    for dim in axes.dims:
        if dim == (ir.ELLIPSIS,):
            raise EincError(f"Einsum: the {what} cannot have '...'")
        for axis in dim:
            if axis not in sizes:
                raise EincError(f"Einsum: give the size of {what} axis {axis!r} by keyword, e.g. {axis}=64")
        shape.append(math.prod(sizes[a] for a in dim))
    return tuple(shape)


class Einsum(torch.nn.Module):
    """A layer ``y = einsum(pattern, x, weight) + bias`` with named axes (as einops' EinMix).

    ``pattern`` maps the input to the output; ``weight`` and ``bias`` are axis lists
    whose sizes are given by keyword.  The weight joins the contraction as a second
    operand; the bias is added to the output and must name whole output dimensions,
    in output order.  Both start uniform in ``±1/sqrt(fan_in)``, where ``fan_in`` is
    the number of weight elements summed into each output element (as
    ``torch.nn.Linear``).  Without ``weight`` the layer is a parameter-free
    rearrange/reduce.

    >>> import torch, einc.nn
    >>> layer = einc.nn.Einsum("b t (h d) -> b t h e", weight="h d e", bias="h e", h=4, d=16, e=8)
    >>> layer(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 4, 8])
    >>> torch.jit.script(layer)(torch.randn(3, 5, 64)).shape
    torch.Size([3, 5, 4, 8])
    """

    has_weight: Final[bool]
    has_bias: Final[bool]
    bias_view: List[int]

    def __init__(self, pattern: str, weight: str | None = None, bias: str | None = None, *,
                 fuse: bool = True, **sizes: int) -> None:
        super().__init__()
        check_sizes(sizes)
        parsed = parse(pattern)
        notation: Notation = "compact" if parsed.compact else "spaced"
        weight_axes = None if weight is None else _axis_list(weight, notation, "weight")
        bias_axes = None if bias is None else _axis_list(bias, notation, "bias")
        named = {a for axes in (weight_axes, bias_axes) if axes is not None for a in axes.axes}
        try:
            check_keyword_axes(sizes, parsed.all_axes | named, f"the pattern {pattern!r}, its weight or its bias "
                               "(the layer takes no other keyword)")
        except EincError as err:
            raise EincError(f"Einsum: {err}") from None
        self.pattern = pattern
        self.has_weight = weight is not None
        self.has_bias = bias is not None
        if weight_axes is not None:
            if parsed.op is not None or parsed.nested or len(parsed.inputs) != 1 or "->" not in pattern:
                raise EincError(f"Einsum: with a weight, the pattern must be one operand and an output, "
                                f"'x -> y', not {pattern!r}")
            # The weight joins as operand 1 (error messages name the joined pattern).
            full = ir.Pattern((parsed.inputs[0], weight_axes), parsed.output, compact=parsed.compact,
                              scale=parsed.scale)
            weight_shape = _fixed_shape(weight_axes, sizes, "weight")
            summed = [a for a in weight_axes.axes if a not in parsed.output.axes]
            fan_in = math.prod(sizes[a] for a in summed)
            self.weight = torch.nn.Parameter(torch.empty(weight_shape))
            operands = [parsed.operands[0], weight_axes]
        else:
            fan_in = 1
            self.register_parameter("weight", None)
            operands = list(parsed.operands)
            if len(operands) != 1:
                raise EincError(f"Einsum: the pattern takes one input, not {len(operands)}: {pattern!r}")
            full = parsed
        self.bias_view = []
        if bias_axes is not None:
            bias_shape = _fixed_shape(bias_axes, sizes, "bias")
            self.bias_view = self._bias_view(parsed.output, bias_axes, sizes)
            self.bias = torch.nn.Parameter(torch.empty(bias_shape))
        else:
            self.register_parameter("bias", None)
        self._bound = 1 / math.sqrt(fan_in)
        expression = compile_ir(full, fuse=fuse, **{a: n for a, n in sizes.items() if a in full.all_axes})
        # Weight axes all have keyword sizes, so their example is the weight's shape.
        examples = [_example_shape(axes, sizes) for axes in operands]
        self.core = expression.module(*examples)
        self.reset_parameters()

    @staticmethod
    def _bias_view(output: ir.AxisList, bias: ir.AxisList, sizes: Mapping[str, int]) -> List[int]:
        """The shape that broadcasts the bias against the output (dims after any '...')."""
        dims = list(output.dims)
        if (ir.ELLIPSIS,) in dims:
            dims = dims[dims.index((ir.ELLIPSIS,)) + 1:]
        wanted = [a for a in bias.axes]
        view: List[int] = []
        covered: list[str] = []
        for dim in dims:
            inside = [a for a in dim if a in wanted]
            if inside and len(inside) != len(dim):
                raise EincError(f"Einsum: the bias must cover whole output dimensions; it has only "
                                f"{', '.join(inside)} of ({' '.join(dim)})")
            view.append(math.prod(sizes[a] for a in dim) if inside else 1)
            covered.extend(inside)
        if covered != wanted:
            raise EincError(f"Einsum: bias axes {' '.join(wanted)} must be output axes (after any '...'), "
                            "in output order")
        return view

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for parameter in (self.weight, self.bias):
                if parameter is not None:
                    parameter.uniform_(-self._bound, self._bound)

    def extra_repr(self) -> str:
        return f"{self.pattern!r}" + "".join(
            f", {name}={tuple(p.shape)}" for name, p in (("weight", self.weight), ("bias", self.bias)) if p is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_weight:
            y = self.core(x, self.weight)
        else:
            y = self.core(x)
        if self.has_bias:
            y = y + self.bias.reshape(self.bias_view)
        return y


def _shape_text(shape: List[int]) -> str:
    return "(" + ", ".join([str(size) for size in shape]) + ("," if len(shape) == 1 else "") + ")"


def _check_mask(mask: Optional[torch.Tensor], name: str, accepted: List[List[int]],  # noqa: UP045
                forms: List[str], batched: bool) -> None:
    """Refuses what torch's layer refuses (integer masks) or would fail on deep inside (shapes)."""
    if mask is None:
        return
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        # torch's layer refuses them too: an integer mask added to the scores is rarely
        # what was meant.
        raise EincError(f"MultiheadAttention: {name} must be a bool mask (True = masked out) or a "
                        f"floating-point mask (added to the scores), not {mask.dtype}; for a mask "
                        f"of ones and zeros, pass {name}.bool()")
    shape = list(mask.shape)
    for candidate in accepted:
        if shape == candidate:
            return
    expected = " or ".join([f"{form} = {_shape_text(candidate)}" for form, candidate in zip(forms, accepted)])
    inputs = "" if batched else "for unbatched inputs, "
    raise EincError(f"MultiheadAttention: {name} has shape {_shape_text(shape)}; {inputs}it must be {expected}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as torch's layer applies it (``F._canonical_mask``): added to the scores,
    a bool mask as -inf where True, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


@torch.jit.unused
def _untransformed() -> bool:
    """Whether no torch.func transform (vmap, jvp, grad) or forward-mode AD is active."""
    return not transformed()


def _may_write() -> bool:
    """Whether the layer may normalize its own scores in place: not under torch.func
    transforms or forward-mode AD (they take no ``out=``), which only eager code can
    tell; scripted and compiled code stays out of place."""
    if torch.jit.is_scripting():
        return False
    if torch.compiler.is_compiling():
        return False
    return _untransformed()


class MultiheadAttention(torch.nn.Module):
    """Multi-head attention written with einc; loads ``torch.nn.MultiheadAttention``'s weights.

    Same constructor arguments (the common subset), parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), ``forward`` signature and outputs as torch's layer,
    so ``layer.load_state_dict(torch_layer.state_dict())`` makes the two compute the
    same thing, and it can stand in for ``self_attn``/``multihead_attn`` in torch's
    Transformer layers (it has the attributes and ``merge_masks`` their fast path reads).
    Heads are split and merged by composition inside einc patterns; with no mask, no
    returned weights and no dropout, the attention is one pattern that einc lowers to
    ``scaled_dot_product_attention``::

        softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)

    With masks or dropout and ``need_weights=False``, einc patterns split the heads to
    ``(b, h, l, d)`` for one ``scaled_dot_product_attention`` call with the merged mask
    and merge them back, as torch's layer does (so a query whose keys are all masked
    gets zeros, not NaN).  With ``need_weights=True``, scores, masks, softmax, dropout
    and the weighted sum run as separate steps (two einc patterns around torch's
    softmax), as torch's layer does.

    ``kdim``/``vdim`` (separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``),
    ``add_bias_kv`` (``bias_k``/``bias_v``, a learned key and value appended to the
    sequence) and ``add_zero_attn`` (a zero key and value appended) are torch's.  Beyond
    torch's layer, ``num_kv_heads`` (a divisor of ``num_heads``) gives grouped-query
    attention (``num_kv_heads=1``: multi-query): keys and values are projected to
    ``num_kv_heads * head_dim`` features and query head ``i`` attends with key/value head
    ``i // (num_heads // num_kv_heads)`` (as ``repeat_interleave`` and SDPA's
    ``enable_gqa``); its weights are then separate, as with ``kdim``.

    >>> import torch, einc.nn
    >>> reference = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    >>> layer = einc.nn.MultiheadAttention(32, 4, batch_first=True)
    >>> _ = layer.load_state_dict(reference.state_dict())
    >>> x = torch.randn(2, 6, 32)
    >>> torch.allclose(layer(x, x, x)[0], reference(x, x, x)[0], atol=1e-5)
    True
    """

    batch_first: Final[bool]
    num_heads: Final[int]
    num_kv_heads: Final[int]
    has_bias: Final[bool]
    add_zero_attn: Final[bool]
    # torch's Transformer layers read it to choose their fast path (packed in_proj_weight).
    _qkv_same_embed_dim: Final[bool]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, num_kv_heads: int | None = None) -> None:
        super().__init__()
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, number in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim),
                             ("num_kv_heads", num_kv_heads)):
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise EincError(f"MultiheadAttention: {name} must be a positive int, not {number!r}")
        for name, flag in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn), ("bias", bias),
                           ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise EincError(f"MultiheadAttention: {name} must be True or False, not {flag!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise EincError(f"MultiheadAttention: dropout must be a probability between 0 and 1, not {dropout!r}")
        if embed_dim % num_heads:
            raise EincError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise EincError(f"MultiheadAttention: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim, self.vdim = kdim, vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.has_bias = bias
        self.add_zero_attn = add_zero_attn
        kv = num_kv_heads * self.head_dim  # key and value features
        self._qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim and kv == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:  # torch's names for separate projections
            self.q_proj_weight = torch.nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = torch.nn.Parameter(torch.empty(kv, kdim, **factory))
            self.v_proj_weight = torch.nn.Parameter(torch.empty(kv, vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = torch.nn.Parameter(torch.empty(embed_dim + 2 * kv, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        if add_bias_kv:
            self.bias_k = torch.nn.Parameter(torch.empty(1, 1, kv, **factory))
            self.bias_v = torch.nn.Parameter(torch.empty(1, 1, kv, **factory))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        h, e, g = num_heads, embed_dim, num_kv_heads
        seq = "b l" if batch_first else "l b"
        # Tokens of either layout: (b, l, e) or (l, b, e); projections land in (b, l, (h d)),
        # and the attention patterns split the heads.  Grouped queries: head (g r) attends
        # with key/value head g.
        tokens = (EXAMPLE_SIZE, EXAMPLE_SIZE, e)
        keys = (EXAMPLE_SIZE, EXAMPLE_SIZE, kv)
        heads = (EXAMPLE_SIZE, h, EXAMPLE_SIZE, self.head_dim)
        self.project = _compile(f"{seq} e, f e -> b l f").module(tokens, (e, e))
        if g == h:
            attend = "softmax(b q (h d), b k (h d) -> b h q [k] / sqrt(d)), b k (h d) -> b q (h d)"
            scores, mix = "b q (h d), b k (h d) -> b h q k / sqrt(d)", "b h q k, b k (h d) -> b q (h d)"
            sizes = {"h": h}
        else:
            attend = "softmax(b q (g r d), b k (g d) -> b g r q [k] / sqrt(d)), b k (g d) -> b q (g r d)"
            scores, mix = "b q (g r d), b k (g d) -> b (g r) q k / sqrt(d)", "b (g r) q k, b k (g d) -> b q (g r d)"
            sizes = {"g": g, "r": h // g}
        self.attend = _compile(attend, **sizes).module(tokens, keys, keys)
        self.split_heads = _compile("b l (h d) -> b h l d", h=h).module(tokens)
        self.split_kv_heads = _compile("b l (h d) -> b h l d", h=g).module(keys)
        self.merge_heads = _compile("b h l d -> b l (h d)").module(heads)
        self.scores = _compile(scores, **sizes).module(tokens, keys)
        self.mix = _compile(mix, **sizes).module((EXAMPLE_SIZE, h, EXAMPLE_SIZE, EXAMPLE_SIZE), keys)
        self.output = _compile(f"b l f, e f -> {seq} e").module(tokens, (e, e))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation.
        if self.in_proj_weight is not None:
            torch.nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                torch.nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            torch.nn.init.constant_(self.in_proj_bias, 0.0)
            torch.nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            torch.nn.init.xavier_normal_(self.bias_k)
            torch.nn.init.xavier_normal_(self.bias_v)

    def merge_masks(
        self,
        attn_mask: Optional[torch.Tensor],  # noqa: UP045
        key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
        query: torch.Tensor,
    ) -> Tuple[Optional[torch.Tensor], Optional[int]]:  # noqa: UP006, UP045
        """``torch.nn.MultiheadAttention.merge_masks``: torch's ``TransformerEncoderLayer``
        calls it on its fast path, which then runs torch's fused kernel on this layer's
        parameters, so the mask must be laid out exactly as torch's kernel expects."""
        merge = torch.nn.MultiheadAttention.merge_masks
        return merge(self, attn_mask, key_padding_mask, query)  # type: ignore[arg-type]

    def _projected(self, x: torch.Tensor, index: int) -> torch.Tensor:
        e = self.embed_dim
        kv = self.num_kv_heads * self.head_dim
        # Rows of the packed weight and bias: queries, keys, values.
        start = 0 if index == 0 else e + (index - 1) * kv
        stop = e if index == 0 else start + kv
        packed = self.in_proj_weight
        if packed is not None:
            weight = packed[start:stop]
        elif index == 0:
            weight = self.q_proj_weight
        elif index == 1:
            weight = self.k_proj_weight
        else:
            weight = self.v_proj_weight
        assert weight is not None
        y = self.project(x, weight)
        if self.has_bias:
            bias = self.in_proj_bias
            assert bias is not None
            y = y + bias[start:stop]
        return y

    def _extended(self, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],  # noqa: UP045
                  key_padding_mask: Optional[torch.Tensor]  # noqa: UP045
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:  # noqa: UP006, UP045
        """``add_bias_kv`` then ``add_zero_attn``, as torch's layer: a key and value appended
        to the sequence (learned, then zeros), each mask padded with a column that lets
        every query attend to them."""
        extra: List[torch.Tensor] = []
        extra_v: List[torch.Tensor] = []
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            extra.append(bias_k.expand(k.shape[0], 1, k.shape[2]).to(k.dtype))
            extra_v.append(bias_v.expand(v.shape[0], 1, v.shape[2]).to(v.dtype))
        if self.add_zero_attn:
            extra.append(k.new_zeros([k.shape[0], 1, k.shape[2]]))
            extra_v.append(v.new_zeros([v.shape[0], 1, v.shape[2]]))
        if len(extra) > 0:
            k = torch.cat([k] + extra, 1)
            v = torch.cat([v] + extra_v, 1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, [0, len(extra)])
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, [0, len(extra)])
        return k, v, attn_mask, key_padding_mask

    def _merged_mask(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
                     n: int, length: int, source: int, dtype: torch.dtype) -> Optional[torch.Tensor]:  # noqa: UP045
        """Both masks as one additive mask that broadcasts against the (b, h, q, k) scores,
        as torch's layer merges them (a bool mask becomes -inf where True)."""
        merged: Optional[torch.Tensor] = None  # noqa: UP045
        if attn_mask is not None:
            merged = _additive(attn_mask, dtype)
            if merged.dim() == 3:
                merged = merged.reshape([n, self.num_heads, length, source])
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape([n, 1, 1, source])
            merged = padding if merged is None else merged + padding
        return merged

    def _check_masks(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
                     is_causal: bool, batched: bool, n: int, length: int, source: int) -> None:
        """Refuse what torch's layer refuses: the causal hint without its mask, integer
        masks, masks of other shapes."""
        if is_causal and attn_mask is None:
            raise EincError("MultiheadAttention: is_causal=True is a hint that attn_mask is causal and needs "
                            "that mask: pass attn_mask too, e.g. "
                            "torch.nn.Transformer.generate_square_subsequent_mask(L) (as torch's layer asks)")
        _check_mask(attn_mask, "attn_mask", [[length, source], [n * self.num_heads, length, source]],
                    ["(L, S)", "(N * num_heads, L, S)" if batched else "(num_heads, L, S)"], batched)
        if batched:
            _check_mask(key_padding_mask, "key_padding_mask", [[n, source]], ["(N, S)"], batched)
        else:
            _check_mask(key_padding_mask, "key_padding_mask", [[source]], ["(S,)"], batched)

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Refuse what torch's layer refuses: other ranks, ranks that differ, another embedding size."""
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        names = ["query", "key", "value"]
        tensors = [query, key, value]
        for index in range(3):
            x = tensors[index]
            if x.dim() < 2 or x.dim() > 3 or x.dim() != query.dim():
                raise EincError(f"MultiheadAttention: {names[index]} has shape {_shape_text(list(x.shape))}; "
                                f"query, key and value must all be batched {layout} or all unbatched (L, E)")
            features = [self.embed_dim, self.kdim, self.vdim][index]
            if x.shape[-1] != features:
                what = "embed_dim" if features == self.embed_dim else ["embed_dim", "kdim", "vdim"][index]
                raise EincError(f"MultiheadAttention: {names[index]} has shape {_shape_text(list(x.shape))}, "
                                f"whose last dimension is not {what}={features}")
        if key.shape[:-1] != value.shape[:-1]:
            raise EincError(f"MultiheadAttention: key has shape {_shape_text(list(key.shape))} and value "
                            f"{_shape_text(list(value.shape))}: they must have the same batch and sequence sizes")

    def _with_weights(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],  # noqa: UP045
                      dropout: float, average: bool) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
        """The unfused path, which returns the attention weights: scores, mask, softmax,
        dropout and the weighted sum, as torch's layer computes them."""
        scores = self.scores(q, k)
        if mask is not None:
            scores = scores + mask
        if scores.requires_grad or not _may_write():
            probabilities = torch.softmax(scores, -1)
        else:
            # The scores are this layer's own tensor: normalizing them in place spares
            # a score-sized allocation (as torch's native attention does).
            probabilities = torch.softmax(scores, -1, out=scores)
        if dropout > 0.0:
            probabilities = F.dropout(probabilities, p=dropout)
        return self.mix(probabilities, v), probabilities.mean(1) if average else probabilities

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:  # noqa: UP006, UP045
        """As ``torch.nn.MultiheadAttention.forward``.

        ``is_causal`` is, as there, a hint that ``attn_mask`` is causal, and needs it.
        Where torch's layer trusts the hint (``need_weights=False`` and no
        ``key_padding_mask``), ``scaled_dot_product_attention`` applies its own causal
        mask in place of ``attn_mask``; elsewhere ``attn_mask`` is what applies."""
        self._check_inputs(query, key, value)
        batched = query.dim() == 3
        sequence_axis = 1 if batched and self.batch_first else 0
        length, source = query.shape[sequence_axis], key.shape[sequence_axis]
        n = query.shape[1 - sequence_axis] if batched else 1
        self._check_masks(attn_mask, key_padding_mask, is_causal, batched, n, length, source)
        if not batched:
            axis = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(axis), key.unsqueeze(axis), value.unsqueeze(axis)
        q = self._projected(query, 0)
        k = self._projected(key, 1)
        v = self._projected(value, 2)
        k, v, attn_mask, key_padding_mask = self._extended(k, v, attn_mask, key_padding_mask)
        source = k.shape[1]
        dropout = self.dropout if self.training else 0.0
        # torch's layer drops the hint once key padding is merged into the mask (the
        # merged mask is not causal) and cannot use it when it returns weights.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._merged_mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        weights: Optional[torch.Tensor] = None  # noqa: UP045
        if not need_weights and mask is None and not causal and dropout == 0.0:
            attended = self.attend(q, k, v)
        elif not need_weights:
            attended = self.merge_heads(F.scaled_dot_product_attention(
                self.split_heads(q), self.split_kv_heads(k), self.split_kv_heads(v),
                attn_mask=mask, dropout_p=dropout, is_causal=causal,
                enable_gqa=self.num_kv_heads != self.num_heads))
        else:
            attended, weights = self._with_weights(q, k, v, mask, dropout, average_attn_weights)
        out = self._projected_out(attended)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.jit.export
    def decode(
        self,
        x: torch.Tensor,
        cache_k: Optional[torch.Tensor] = None,  # noqa: UP045
        cache_v: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: UP006
        """Causal self-attention of new tokens against a key/value cache (decoding).

        ``x`` holds the new tokens (``(N, T, E)`` batch first, else ``(T, N, E)``); the
        cache holds the keys and values of the tokens before them, heads split:
        ``(N, num_kv_heads, S, head_dim)`` each (``None`` at the start).  Each new token
        attends to the cache and to the new tokens up to itself: causality aligned to the
        lower right (the new queries are the last ``T`` of ``S + T`` positions).  Returns
        the output (laid out as ``x``) and the cache extended by the new tokens' keys and
        values.  Shape-generic, scriptable (``torch.jit.script(layer).decode``) and
        ``torch.compile(fullgraph=True)``-clean; one ``scaled_dot_product_attention``
        call (no mask for one new token, SDPA's ``enable_gqa`` for grouped heads).
        Decoding token by token gives what ``forward`` gives the whole sequence with a
        causal ``attn_mask``.

        >>> import torch, einc.nn
        >>> layer = einc.nn.MultiheadAttention(16, 4, batch_first=True).eval()
        >>> out, k, v = layer.decode(torch.randn(2, 3, 16))            # a prompt of 3 tokens
        >>> out, k, v = layer.decode(torch.randn(2, 1, 16), k, v)      # then one at a time
        >>> out.shape, k.shape
        (torch.Size([2, 1, 16]), torch.Size([2, 4, 4, 4]))
        """
        if self.bias_k is not None or self.add_zero_attn or not self._self_attention():
            raise EincError("MultiheadAttention.decode: self-attention only (kdim == vdim == embed_dim), "
                            "without add_bias_kv or add_zero_attn")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(N, T, E)" if self.batch_first else "(T, N, E)"
            raise EincError(f"MultiheadAttention.decode: x has shape {_shape_text(list(x.shape))}; expected "
                            f"{layout} with E = embed_dim = {self.embed_dim}")
        q = self.split_heads(self._projected(x, 0))
        k = self.split_kv_heads(self._projected(x, 1))
        v = self.split_kv_heads(self._projected(x, 2))
        if (cache_k is None) != (cache_v is None):
            raise EincError("MultiheadAttention.decode: pass both cache_k and cache_v, or neither")
        if cache_k is not None and cache_v is not None:
            expected = [k.shape[0], k.shape[1], cache_k.shape[2], k.shape[3]]
            for name, cached in (("cache_k", cache_k), ("cache_v", cache_v)):
                if list(cached.shape) != expected:
                    raise EincError(f"MultiheadAttention.decode: {name} has shape {_shape_text(list(cached.shape))}"
                                    f"; expected (N, num_kv_heads, S, head_dim) = {_shape_text(expected)} "
                                    f"with one S for both")
            k = torch.cat([cache_k.to(k.dtype), k], 2)
            v = torch.cat([cache_v.to(v.dtype), v], 2)
        new, total = q.shape[2], k.shape[2]
        mask: Optional[torch.Tensor] = None  # noqa: UP045
        if new > 1:
            # Lower-right causality: new token i sees positions up to (total - new) + i.
            rows = torch.arange(new, device=q.device).unsqueeze(1)
            mask = torch.arange(total, device=q.device) <= rows + (total - new)
        attended = self.merge_heads(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads))
        return self._projected_out(attended), k, v

    def _projected_out(self, attended: torch.Tensor) -> torch.Tensor:
        """``out_proj`` of the merged heads, laid out as the layer's inputs."""
        out = self.output(attended, self.out_proj.weight)
        if self.has_bias:
            out = out + self.out_proj.bias
        return out

    def _self_attention(self) -> bool:
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim
