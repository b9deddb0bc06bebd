"""Distributed execution: one call's work spread over the ranks of a torch.distributed group.

SPMD, as torch.distributed programs are: after ``init_process_group`` every rank calls
the same expression (``distributed=True``, or a ``ProcessGroup``) on the same inputs.
einc splits the work along one axis of the pattern into one part per rank, in
DTensor's ``Shard`` layout (parts of ``ceil(n / world)``, the last ones shorter or
empty), each rank computes its part with the expression's own code (in slices, under a
``memory_limit``: :mod:`einc.slicing`), and the parts are combined by the axis' role,
the same roles slicing combines slices by:

- an axis of the output: ``all_gather`` (or, ``shard_output=True``, a ``DTensor``
  sharded along it, nothing gathered);
- ``sum`` / ``mean``: ``all_reduce`` SUM (a ``mean`` part weighed by its share);
- ``max`` / ``min``: ``all_reduce`` MAX / MIN (and, for gradients, SUM of how many
  ranks hold each extremum);
- ``logsumexp`` and the log semiring: MAX, then SUM of the parts rescaled by it;
- the normalized axis of a nested softmax / log_softmax: the log-normalizers combined
  as logsumexp, then SUM of the parts rescaled (softmax) or corrected (log_softmax) by
  their share, as flash attention's recurrence.

Which axis: among those slicing can cut (:func:`einc.slicing.roles`), the one whose
part costs least, counting each element a rank hands to a collective as
:data:`COMM_WEIGHT` FLOPs.  ``DTensor`` operands bring their own: a tensor sharded
along an axis splits the work along it (replicated operands that have it are narrowed
locally), and the result is a ``DTensor`` (``Shard`` for an output axis, ``Partial``
for a summed one, as DTensor's own mm gives, ``Replicate`` where einc combined it).

Gradients: each rank differentiates its part; for plain (replicated) inputs, the
input gradients are summed over ranks once (``all_reduce`` in backward, not the
forward's, which would give each rank ``world`` times the gradient); for DTensor
inputs, replicated operands get ``Partial`` gradients that DTensor reduces.

Before any collective of a call, every rank checks a fingerprint of the pattern,
options, shapes, dtypes and placements against every other rank's (one
``all_gather`` of ``world`` int64): ranks that disagree all raise :class:`EincError`
naming the differences, instead of waiting in mismatched collectives.  A rank that
stops calling (or fails after the check) leaves the others waiting until the process
group's timeout (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import slicing
from .errors import EincError
from .planner import Program

__all__ = ["COMM_WEIGHT", "Collective", "Distribution", "Placed", "Runner", "check_agreement", "check_device",
           "choose", "collectives", "group_of", "mesh_of", "placements", "world_of"]

COMM_WEIGHT = 256
"""FLOPs one element handed to a collective counts as when the axis to split is chosen
(gloo moves about 1 GB/s where a CPU core does tens of GFLOP/s; NCCL's ratio is similar)."""

HALF = slicing.HALF


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective a rank takes part in during a call."""

    op: str
    """``"all_gather"``, ``"all_reduce SUM"``, ``"all_reduce MAX"``, ..."""
    what: str
    """What it carries: ``"output"``, ``"log-normalizer"``, ``"count"``, ``"input 0 gradient"``, ..."""
    elements: int
    """Elements of the buffer each rank hands over (for ``all_gather``, the gathered whole)."""
    itemsize: int
    when: str = "forward"
    """``"forward"``, ``"forward, for gradients"`` (only when an input requires grad) or ``"backward"``."""

    @property
    def bytes(self) -> int:
        return self.elements * self.itemsize


@dataclass(frozen=True, slots=True)
class Distribution:
    """How one input signature is spread over ranks (``Plan.distribution``)."""

    world_size: int
    axis: str | None
    """The split axis; ``None`` where no axis can be split (every rank computes it all)."""
    role: str
    """How the parts combine (:data:`einc.slicing.ROLE_OF_OP` roles, ``"output"``,
    ``"softmax"``/``"log_softmax"``); ``"replicated"`` without an axis."""
    size: int
    chunk: int
    """Elements of the axis per rank (DTensor's ``Shard`` layout: the last parts may be shorter or empty)."""
    flops: tuple[int, ...]
    """Each rank's FLOPs (for its part's plan, slices included)."""
    slices: tuple[int, ...]
    """Each rank's slices under the memory limit (1: its part fits)."""
    collectives: tuple[Collective, ...]
    check: Collective
    """The per-call fingerprint check."""
    sharded: bool = False
    """The result stays sharded along :attr:`axis` (``shard_output=True`` or DTensor inputs)."""

    def spans(self) -> list[tuple[int, int]]:
        """Each rank's (start, length) of :attr:`axis`."""
        return [(min(r * self.chunk, self.size), max(0, min(self.chunk, self.size - r * self.chunk)))
                for r in range(self.world_size)]

    def bytes(self, gradients: bool = False) -> int:
        """Bytes each rank hands to collectives in one call (forward; with ``gradients``,
        forward and backward of a call whose inputs require grad), the check included."""
        wanted = ("forward", "forward, for gradients", "backward") if gradients else ("forward",)
        return self.check.bytes + sum(c.bytes for c in self.collectives if c.when in wanted)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "axis": self.axis, "role": self.role, "size": self.size,
                "chunk": self.chunk, "spans": [list(s) for s in self.spans()], "flops": list(self.flops),
                "slices": list(self.slices), "sharded": self.sharded,
                "collectives": [{"op": c.op, "what": c.what, "elements": c.elements, "bytes": c.bytes,
                                 "when": c.when} for c in (*self.collectives, self.check)],
                "bytes": self.bytes(), "bytes_with_gradients": self.bytes(True)}

    def lines(self) -> list[str]:
        if self.axis is None:
            head = f"  distributed:           {self.world_size} ranks; no axis splits: every rank computes it all"
        else:
            parts = ", ".join(str(n) for _, n in self.spans())
            kept = " (left sharded)" if self.sharded else ""
            head = (f"  distributed:           {self.world_size} ranks split {self.axis} ({self.role}{kept}) "
                    f"{self.size} as {parts}")
        rows = [head,
                f"  per rank:              flops {', '.join(f'{f:,}' for f in self.flops)}; "
                f"slices {', '.join(map(str, self.slices))}",
                f"  communication:         {self.bytes():,} bytes per rank a call "
                f"({self.bytes(True):,} with every input's gradient)"]
        rows += [f"    {c.op:<16} {c.what:<20} {c.bytes:>14,} bytes  {c.when}" for c in (*self.collectives, self.check)]
        return rows


def group_of(option: Any) -> Any:
    """The process group of a ``distributed`` option (``None``: the default group)."""
    return None if option is True else option


def world_of(option: Any) -> int:
    """The world size of a ``distributed`` option's group (the group must exist)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise EincError("distributed=True needs torch.distributed.init_process_group() first "
                        "(or pass explain(world_size=N) to see the plan without processes)")
    return dist.get_world_size(group_of(option))


def check_device(device: torch.device, group: Any) -> None:
    """The group's backend must take tensors on ``device`` (NCCL takes CUDA tensors only)."""
    backend = str(dist.get_backend(group))
    kinds = {part.split(":")[0] for part in backend.split(",")} if ":" in backend else None
    takes = (kinds is not None and device.type in kinds) or (kinds is None and (
        backend != "nccl" or device.type == "cuda"))
    if not takes:
        raise EincError(f"the process group's backend {backend!r} does not take {device.type} tensors: "
                        "init_process_group('gloo') for CPU tensors, 'nccl' for CUDA ones, or "
                        "'cpu:gloo,cuda:nccl' for both")


def mesh_of(group: Any, device: str) -> Any:
    """A one-dimensional DeviceMesh over ``group`` (for a sharded result)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(dist.group.WORLD if group is None else group, device)


@dataclass(frozen=True)
class Placed:
    """The placements of a call's ``DTensor`` operands (all on one 1-D mesh)."""

    mesh: Any
    specs: tuple[tuple[str, int], ...]
    """Per operand: ``("shard", dim)``, ``("replicate", -1)`` or ``("partial", -1)``."""

    def __str__(self) -> str:
        return ", ".join(f"Shard({d})" if kind == "shard" else kind.capitalize() for kind, d in self.specs)

    def split(self, leaves: Sequence[Sequence[tuple[str, ...]]], candidates: Mapping[str, str],
              sizes: Mapping[str, int], world: int) -> tuple[str, int] | None:
        """The axis the first sharded operand is sharded along, where einc can combine
        parts along it (DTensor's layout, chunks of ``ceil(n / world)``); else ``None``:
        every operand is replicated and every rank computes it all."""
        for dims, (kind, dim) in zip(leaves, self.specs):
            if kind != "shard":
                continue
            group = tuple(dims[dim])
            if len(group) != 1 or group[0] not in candidates:
                return None
            axis = group[0]
            chunk = -(-sizes[axis] // world)
            if -(-sizes[axis] // chunk) < world and candidates[axis] not in ("output", "sum"):
                return None  # an empty shard: no part to start a max or logsumexp from
            return axis, chunk
        return None

    def kinds(self, leaves: Sequence[Sequence[tuple[str, ...]]], axis: str | None) -> tuple[str, ...]:
        """How each operand becomes this rank's: ``"shard"`` (its local shard is the part),
        ``"replicate"`` (narrowed where it has the axis; its gradient is ``Partial``),
        ``"whole"`` (every rank computes it all: replicated gradient), or ``"redistribute"``
        (sharded along another axis, or partial: replicated first)."""
        found = []
        for dims, (kind, dim) in zip(leaves, self.specs):
            if axis is None:
                found.append("whole" if kind == "replicate" else "redistribute")
            elif kind == "shard" and tuple(dims[dim]) == (axis,):
                found.append("shard")
            else:
                found.append("replicate" if kind == "replicate" else "redistribute")
        return tuple(found)


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


def is_dtensor(value: Any) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(value, kind)


def placements(tensors: Sequence[Any]) -> Placed | None:
    """The DTensor placements of a call, or ``None`` for plain tensors."""
    kind = _dtensor_type()
    if kind is None:  # pragma: no cover
        return None
    given = [isinstance(t, kind) for t in tensors]
    if not any(given):
        return None
    if not all(given):
        plain = [i for i, is_d in enumerate(given) if not is_d]
        raise EincError(f"operands {plain} are plain tensors among DTensors: make every operand a DTensor "
                        "(DTensor.from_local(t, mesh, [Replicate()]) for replicated ones), or none")
    mesh = tensors[0].device_mesh
    if mesh.ndim != 1 or any(t.device_mesh != mesh for t in tensors):
        raise EincError("DTensor operands must share one one-dimensional DeviceMesh")
    specs = []
    for t in tensors:
        (placement,) = t.placements
        if placement.is_shard():
            specs.append(("shard", placement.dim % t.dim()))
        else:
            specs.append(("replicate" if placement.is_replicate() else "partial", -1))
    return Placed(mesh, tuple(specs))


def collectives(role: str, *, output: int, factor: int, gathered: int, dtype: torch.dtype,
                inputs: Sequence[tuple[int, torch.dtype]], sharded: bool, dtensor: bool, world: int
                ) -> tuple[Collective, ...]:
    """The collectives of a call by role: ``output`` elements of the result, ``factor``
    of a nested normalizer's log-normalizer, ``gathered`` of an all_gather (padded
    parts), ``inputs`` the elements and dtype of each operand (plain inputs: the
    gradients of floating ones are summed).  Parts are gathered in the result's
    ``dtype``, combined in float32 where it is a half float.  One rank communicates nothing."""
    if world == 1:
        return ()
    found: list[Collective] = []
    itemsize = (torch.float32 if dtype in HALF else dtype).itemsize
    if role == "output":
        if not sharded:
            found.append(Collective("all_gather", "output", gathered, dtype.itemsize))
    elif role in ("sum", "mean"):
        if not dtensor:
            found.append(Collective("all_reduce SUM", "output", output, itemsize))
    elif role in ("max", "min"):
        found += [Collective(f"all_reduce {role.upper()}", "output", output, itemsize),
                  Collective("all_reduce MAX", "NaN flags", output, 1),
                  Collective("all_reduce SUM", "count", output, 4, "forward, for gradients")]
    elif role == "logsumexp":
        found += [Collective("all_reduce MAX", "output", output, itemsize),
                  Collective("all_reduce SUM", "output", output, itemsize)]
    elif role in ("softmax", "log_softmax"):
        found += [Collective("all_reduce MAX", "log-normalizer", factor, itemsize),
                  Collective("all_reduce SUM", "log-normalizer", factor, itemsize),
                  Collective("all_reduce SUM", "output", output, itemsize)]
        if role == "log_softmax":
            found.append(Collective("all_reduce SUM", "ones contraction", output, itemsize,
                                    "forward, for gradients"))
    if role != "replicated" and not dtensor:
        found += [Collective("all_reduce SUM", f"input {i} gradient", n,
                             (torch.float32 if kind in HALF else kind).itemsize, "backward")
                  for i, (n, kind) in enumerate(inputs) if kind.is_floating_point or kind.is_complex]
    return tuple(found)


def choose(candidates: Mapping[str, str], sizes: Mapping[str, int], world: int,
           cost_at: Callable[[str, int], tuple[int, int]], outputs_only: bool = False) -> tuple[str, int] | None:
    """The axis to split and its chunk: the least ``flops + COMM_WEIGHT * elements`` of
    one rank's part (``cost_at(axis, chunk)`` gives both), then output axes first.
    Parts of reduced axes other than sums must not be empty (no rank could start
    their combine).  ``None`` where no axis qualifies."""
    best: tuple[tuple[int, bool, str], tuple[str, int]] | None = None
    for axis, role in candidates.items():
        n = sizes[axis]
        if n < 2 or (outputs_only and role != "output"):
            continue
        chunk = -(-n // world)
        if -(-n // chunk) < world and role not in ("output", "sum"):
            continue
        flops, elements = cost_at(axis, chunk)
        key = (flops + COMM_WEIGHT * elements, role != "output", axis)
        if best is None or key < best[0]:
            best = (key, (axis, chunk))
    return None if best is None else best[1]


# ------------------------------------------------------------------ running


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half floats combine in float32 (as slices accumulate)."""
    return t.float() if t.dtype in HALF else t


def _reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _first_order() -> None:
    """Backward of a combine is not itself differentiable (its collectives are not recorded)."""
    if torch.is_grad_enabled():
        raise EincError("a distributed call has no double backward (create_graph=True)")


def _all_gather(whole: torch.Tensor, part: torch.Tensor, group: Any) -> None:
    # all_gather_single replaces all_gather_into_tensor (deprecated) from torch 2.10.
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(whole, part, group=group)


def _logsumexp(local: torch.Tensor, group: Any) -> torch.Tensor:
    """log(sum over ranks of exp(local)), stably: MAX, then SUM of the rescaled parts."""
    top = _reduce(local.clone(), dist.ReduceOp.MAX, group)
    # An all -inf (or +inf) entry keeps its top: shifting by it would give NaN.
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = _reduce(torch.exp(local - shift), dist.ReduceOp.SUM, group)
    return shift + torch.log(total)


class _Replicated(torch.autograd.Function):
    """A replicated input: each rank's gradient is its part's, summed over ranks once."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        total = _wide(grad).contiguous()
        return _reduce(total, dist.ReduceOp.SUM, ctx.group).to(grad.dtype), None


class _Gather(torch.autograd.Function):
    """Parts along an output dimension gathered into the whole (padded to equal parts)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, dim: int, size: int, chunk: int, start: int, group: Any
                ) -> torch.Tensor:
        ctx.dim, ctx.start, ctx.length = dim, start, local.shape[dim]
        world = dist.get_world_size(group)
        part = local.movedim(dim, 0)
        if part.shape[0] == chunk:
            padded = part.contiguous()
        else:  # a shorter last part (or an empty one): padded to the others' length
            padded = part.new_zeros((chunk, *part.shape[1:]))
            padded[:part.shape[0]] = part
        whole = part.new_empty((world * chunk, *part.shape[1:]))
        _all_gather(whole, padded, group)
        return whole[:size].movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        return grad.narrow(ctx.dim, ctx.start, ctx.length), None, None, None, None, None


class _Sum(torch.autograd.Function):
    """Parts summed over ranks; every rank's gradient of its part is the result's."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        return _reduce(_wide(local).clone(), dist.ReduceOp.SUM, group).to(local.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        return grad, None


class _Extremum(torch.autograd.Function):
    """MAX/MIN over ranks; the gradient shared by the ranks holding the extremum."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
        result = _reduce(_wide(local).clone(), op, group)
        # gloo's MAX/MIN drop NaN: a flag (MAX over ranks) puts it back.
        nan = _reduce(torch.isnan(local).to(torch.uint8), dist.ReduceOp.MAX, group)
        result = result.masked_fill(nan.bool(), float("nan"))
        if ctx.needs_input_grad[0]:
            hit = _wide(local) == result
            count = _reduce(hit.to(torch.int32), dist.ReduceOp.SUM, group)
            ctx.save_for_backward(hit, count)
        return result.to(local.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        hit, count = ctx.saved_tensors
        # No rank holds a NaN extremum: 0/0 keeps the NaN in the gradient.
        return grad * hit / count, None, None


class _LogSumExp(torch.autograd.Function):
    """logsumexp over ranks."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        result = _logsumexp(_wide(local), group)
        ctx.save_for_backward(local, result)
        return result.to(local.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        local, result = ctx.saved_tensors
        share = torch.exp(_wide(local) - result).masked_fill(result == float("-inf"), 0.0)
        return (grad * share).to(local.dtype), None


class _Normalized(torch.autograd.Function):
    """Parts of a nested softmax / log_softmax cut along its normalized axis, combined by
    the log-normalizers' shares (the rank-wise form of :class:`einc.slicing.Sliced`'s)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, lse: torch.Tensor, ones: torch.Tensor | None,
                norm: slicing.Normalized, group: Any) -> torch.Tensor:
        wide_lse = _wide(lse)
        whole = _logsumexp(wide_lse, group)
        part = _wide(local)
        if ones is None:  # softmax: each part rescaled by its share of the whole normalizer
            share = torch.exp(wide_lse - whole)
            result = _reduce(part * norm.to_output(share).to(part.dtype), dist.ReduceOp.SUM, group)
            ctx.save_for_backward(local, result, share)
        else:  # log_softmax: each part corrected by (its lse - the whole) times its contraction with ones
            gap = torch.where(wide_lse == float("-inf"), torch.zeros_like(wide_lse), wide_lse - whole)
            result = _reduce(part + norm.to_output(gap).to(part.dtype) * _wide(ones), dist.ReduceOp.SUM, group)
            every = None
            if any(ctx.needs_input_grad[:3]):
                every = _reduce(_wide(ones).clone(), dist.ReduceOp.SUM, group)
            ctx.save_for_backward(ones, every, gap, torch.exp(wide_lse - whole))
        ctx.norm, ctx.softmax = norm, ones is None
        ctx.dtypes = (local.dtype, lse.dtype)
        return result.to(local.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _first_order()
        norm = ctx.norm
        g = _wide(grad)
        if ctx.softmax:
            local, result, share = ctx.saved_tensors
            d_local = g * norm.to_output(share).to(g.dtype)
            d_lse = share * (norm.to_factor(g * _wide(local)) - norm.to_factor(g * result))
            return d_local.to(ctx.dtypes[0]), d_lse.to(ctx.dtypes[1]), None, None, None
        ones, every, gap, share = ctx.saved_tensors
        d_ones = g * norm.to_output(gap).to(g.dtype)
        d_lse = norm.to_factor(g * _wide(ones)) - share * norm.to_factor(g * every)
        return grad, d_lse.to(ctx.dtypes[1]), d_ones.to(ones.dtype), None, None


def fingerprint(text: str) -> int:
    """A signed 64-bit digest of ``text`` (what ranks compare before any collective)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def check_agreement(description: str, device: torch.device, group: Any) -> None:
    """Raise :class:`EincError` on every rank unless every rank's ``description`` is the same."""
    world = dist.get_world_size(group)
    mine = torch.tensor([fingerprint(description)], dtype=torch.int64, device=device)
    every = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(every, mine, group)
    if bool((every == every[0]).all()):
        return
    # Every rank saw the mismatch: they all take part in gathering what differs.
    told: list[Any] = [None] * world
    dist.all_gather_object(told, description, group=group)
    lines = "; ".join(f"rank {r}: {text}" for r, text in enumerate(told))
    raise EincError(f"ranks called a distributed expression differently ({lines})")


@dataclass(frozen=True)
class Runner:
    """Runs one input signature on this rank: its part, then the combine."""

    distribution: Distribution
    local: Callable[..., torch.Tensor]
    """The expression's own code (memory-bounded) on this rank's part."""
    places: tuple[tuple[int, int], ...]
    """(operand, dimension) of each operand that has the split axis."""
    output_dim: int | None
    rank: int
    group: Any
    norm: slicing.Normalized | None = None
    mesh: Any = None
    """The DeviceMesh of a sharded result (``shard_output=True``, DTensor inputs)."""
    kinds: tuple[str, ...] | None = None
    """For DTensor operands: how each becomes local (:meth:`Placed.kinds`)."""

    @property
    def dtensor(self) -> bool:
        return self.kinds is not None

    def _locals(self, tensors: Sequence[Any]) -> tuple[list[torch.Tensor], list[bool]]:
        from torch.distributed.tensor import Partial, Replicate

        assert self.kinds is not None
        found = []
        for t, kind in zip(tensors, self.kinds):
            if kind == "redistribute":
                t = t.redistribute(self.mesh, [Replicate()])
            if kind in ("shard", "whole") or (kind == "redistribute" and self.distribution.axis is None):
                found.append(t.to_local())
            else:  # each rank's gradient of a replicated operand is its part's: DTensor sums them
                found.append(t.to_local(grad_placements=[Partial()]))
        return found, [kind != "shard" for kind in self.kinds]

    def part(self, tensors: Sequence[torch.Tensor], narrow: Sequence[bool]) -> list[torch.Tensor]:
        start, length = self.distribution.spans()[self.rank]
        views = list(tensors)
        for index, dim in self.places:
            if narrow[index]:
                views[index] = views[index].narrow(dim, start, length)
        return views

    def __call__(self, tensors: Sequence[Any]) -> Any:
        """The result of the whole call on every rank (or its shard, or a DTensor)."""
        plan = self.distribution
        narrow = [True] * len(tensors)
        if self.dtensor:
            tensors, narrow = self._locals(tensors)
        if plan.axis is None:
            return self._replicated(self.local(*tensors))
        if not self.dtensor and plan.world_size > 1:
            tensors = [_Replicated.apply(t, self.group) if t.requires_grad else t for t in tensors]
        views = self.part(tensors, narrow)
        start, length = plan.spans()[self.rank]
        role = plan.role
        if plan.world_size == 1:  # the part is the whole: nothing to combine
            whole = self.local(*views)
            if plan.sharded:
                return self._sharded(whole)
            return self._partial(whole) if self.dtensor and role in ("sum", "mean") else self._replicated(whole)
        if role == "output":
            local = self.local(*views)
            if plan.sharded:
                return self._sharded(local)
            assert self.output_dim is not None
            return _Gather.apply(local, self.output_dim, plan.size, plan.chunk, start, self.group)
        if role in ("sum", "mean"):
            local = self.local(*views)
            if role == "mean":
                local = local * (length / plan.size)
            return self._partial(local) if self.dtensor else _Sum.apply(local, self.group)
        if role in ("max", "min"):
            op = dist.ReduceOp.MAX if role == "max" else dist.ReduceOp.MIN
            return self._replicated(_Extremum.apply(self.local(*views), op, self.group))
        if role == "logsumexp":
            return self._replicated(_LogSumExp.apply(self.local(*views), self.group))
        norm = self.norm
        assert norm is not None
        lse = norm.fn(*[_wide(views[i]) for i in norm.leaves])
        ones = norm.ones_for(views, lse, length) if role == "log_softmax" else None
        return self._replicated(_Normalized.apply(self.local(*views), lse, ones, norm, self.group))

    def _sharded(self, local: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor, Shard

        assert self.output_dim is not None
        shape = list(local.shape)
        shape[self.output_dim] = self.distribution.size
        return DTensor.from_local(local, self.mesh, [Shard(self.output_dim)], shape=torch.Size(shape),
                                  stride=_contiguous(shape))

    def _partial(self, local: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor, Partial

        return DTensor.from_local(local, self.mesh, [Partial("sum")])

    def _replicated(self, result: torch.Tensor) -> Any:
        if not self.dtensor:
            return result
        from torch.distributed.tensor import DTensor, Replicate

        return DTensor.from_local(result, self.mesh, [Replicate()])


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def factor_elements(program: Program, role: str) -> int:
    """Elements of a nested normalizer's log-normalizer (0 for other roles)."""
    if role not in ("softmax", "log_softmax"):
        return 0
    found = slicing.normalized_level(program)
    assert found is not None
    axis, _, level = found
    sizes = dict(level.sizes)
    return math.prod(sizes[g[0]] for g in level.output_dims if g != (axis,))
