"""TorchScript-compatible helper functions that generated code may call.

They are kept as source text: codegen prepends the ones a program uses to the
generated module, so the same text runs as Python (eager), under TorchScript (one
``CompilationUnit``) and under ``torch.compile``.  Each takes only tensors, ints,
floats and bools, so nothing from a pattern string reaches them.
"""

from __future__ import annotations

from . import dtypes

__all__ = ["HELPERS", "FLOOR", "TINY"]

FLOOR = {"float32": -87.0, "float64": -708.0}
"""Shifted exponents are clamped here: just above log(smallest normal float).

``exp`` of inputs below it produces subnormals and takes a slow path on CPU (about
3x for torch.logsumexp on wide-range fp32 data); after the max shift every row sums
to at least 1, so what the clamp changes lies far below the sum's precision.
"""

TINY = {"float32": 1e-19, "float64": 1e-154}
"""About sqrt(smallest normal): a log-matmul entry whose shifted sum falls below this
may have lost its dominant terms to underflow, and is recomputed exactly."""

SHIFTED_EXP = '''
def einc_shifted_exp(x: torch.Tensor, dims: List[int], floor: float,
                     overwrite: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raw = torch.amax(x.detach(), dims, True)
    shift = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
    e = x - shift
    if e.requires_grad or not overwrite:
        # clamp's gradient is 0 at NaN; masked_fill passes it on, as torch.logsumexp does.
        # (Nor under torch.func transforms: vmap batches no clamp_.)
        e = e.masked_fill(e < floor, floor).exp()
    else:
        e.clamp_(min=floor)
        e.exp_()
    return e, shift, raw
'''

LSE = '''
def einc_lse_block(x: torch.Tensor, dims: List[int], floor: float, overwrite: bool) -> torch.Tensor:
    e, shift, raw = einc_shifted_exp(x, dims, floor, overwrite)
    out = torch.log(e.sum(dims))
    out = out + shift.reshape(out.shape)
    empty = (raw == float("-inf")).reshape(out.shape)
    return torch.where(empty, torch.full_like(out, float("-inf")), out)


def einc_lse(x: torch.Tensor, dims: List[int], floor: float, overwrite: bool) -> torch.Tensor:
    numel = einc_prod(x.shape)
    if numel == 0:
        return torch.logsumexp(x, dims)
    if overwrite and x.requires_grad and torch.is_grad_enabled():
        # Under autograd torch's fused kernel and its one-pass backward beat the
        # shifted passes below (each of them a node to differentiate).  Its gradient,
        # exp(x - out), loses the bits of out beyond the dtype's precision (|out| of
        # 1e8 in float32 gives 1 per entry, not 1/n) and is NaN for an all -inf slice
        # where einc's is 0: results past 2**7 (float32; 2**36 in float64) or infinite
        # take the passes.  Not in transform-safe code (overwrite False): no data branches.
        out = torch.logsumexp(x, dims)
        limit = 68719476736 if x.dtype == torch.float64 else 128
        if not bool((out.abs() > limit).any()):
            return out
    width = 1
    for d in dims:
        width *= x.shape[d]
    trailing = sorted(dims) == list(range(x.dim() - len(dims), x.dim()))
    if not trailing or numel <= 262144 or width > 65536 or not x.is_contiguous():
        return einc_lse_block(x, dims, floor, overwrite)
    # Row blocks of about 1 MiB keep the five passes in cache.
    rows = x.reshape(-1, width)
    step = max(1, 262144 // width)
    parts: List[torch.Tensor] = []
    for start in range(0, rows.shape[0], step):
        parts.append(einc_lse_block(rows[start:start + step], [1], floor, overwrite))
    return torch.cat(parts).reshape(x.shape[:x.dim() - len(dims)])
'''

LOGMM = '''
def einc_logmm(a: torch.Tensor, b: torch.Tensor, floor: float, tiny: float) -> torch.Tensor:
    if einc_prod(a.shape) == 0 or einc_prod(b.shape) == 0:
        return torch.logsumexp(a.unsqueeze(3) + b.unsqueeze(1), 2)
    ea, sa, ra = einc_shifted_exp(a, [2], floor, True)
    eb, sb, rb = einc_shifted_exp(b, [1], floor, True)
    r = torch.bmm(ea, eb)
    lost = r < tiny
    if not bool(lost.any()):
        # The common case: no entry lost its dominant terms.  In place where autograd
        # does not need r.
        if r.requires_grad:
            out = torch.log(r) + sa + sb
        else:
            out = r.log_().add_(sa).add_(sb)
    else:
        out = torch.log(torch.clamp(r, min=tiny)) + sa + sb
        count = int(lost.sum())
        if count * a.shape[2] <= 4194304:
            # A few entries (wide-range data: 73 of 1024x1024 on N(0, 10^2)): exact
            # recomputation costs less than another pass over everything.
            out = einc_logmm_exact(a, b, out, lost, floor)
        else:
            # Structural -inf (forbidden transitions: no k where neither side is -inf)
            # is told from underflow by one bmm of masks.  Where many entries are lost
            # they are likely structural, so that comes first.
            out, lost = einc_structural(a, b, out, lost)
            if bool(lost.any()):
                # Second pass with k-dependent shifts: move B's row maxima into A, so
                # each entry's dominant term is shifted by at most its row's own maximum.
                ek, sk, _ = einc_shifted_exp(b, [2], floor, True)
                em, sm, _ = einc_shifted_exp(a + sk.transpose(1, 2), [2], floor, True)
                r2 = torch.bmm(em, ek)
                rescued = lost & (r2 >= tiny)
                out = torch.where(rescued, torch.log(torch.clamp(r2, min=tiny)) + sm, out)
                lost = lost & (r2 < tiny)
            if bool(lost.any()):
                out = einc_logmm_exact(a, b, out, lost, floor)
    if bool((ra == float("inf")).any()) or bool((rb == float("inf")).any()):
        # The clamp made -inf a tiny exp(floor): where +inf meets it, inf + -inf is NaN
        # in the naive form, so those entries are computed the naive way.
        infinite = (ra == float("inf")) | (rb == float("inf"))
        out = einc_logmm_exact(a, b, out, infinite.expand(out.shape), floor)
    return out
'''

STRUCTURAL = '''
def einc_structural(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                    lost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # pairs[z, i, j]: the k where a[z, i, k] and b[z, k, j] are both finite.  Where one
    # side is finite everywhere, a sum over the other gives it; where one side has few
    # finite entries (banded transitions), only those are visited; else a bmm of masks.
    ma = a != float("-inf")
    mb = b != float("-inf")
    na = int(ma.sum())
    nb = int(mb.sum())
    z = a.shape[0]
    m = a.shape[1]
    n = b.shape[2]
    if na == ma.numel():
        pairs = mb.sum(1, keepdim=True)
    elif nb == mb.numel():
        pairs = ma.sum(2, keepdim=True)
    elif min(na, nb) * 16 <= min(ma.numel(), mb.numel()) and min(na * n, nb * m) <= 16777216:
        if na * n <= nb * m:
            at = ma.nonzero()  # (z, i, k) of each finite entry of a
            rows = mb[at[:, 0], at[:, 2]].to(out.dtype)
            pairs = torch.zeros(z * m, n, dtype=out.dtype).index_add_(0, at[:, 0] * m + at[:, 1], rows)
            pairs = pairs.reshape(z, m, n)
        else:
            at = mb.nonzero()  # (z, k, j) of each finite entry of b
            cols = ma[at[:, 0], :, at[:, 1]].to(out.dtype)
            pairs = torch.zeros(z * n, m, dtype=out.dtype).index_add_(0, at[:, 0] * n + at[:, 2], cols)
            pairs = pairs.reshape(z, n, m).transpose(1, 2)
    else:
        pairs = torch.bmm(ma.to(out.dtype), mb.to(out.dtype))
    structural = lost & (pairs == 0)
    return torch.where(structural, torch.full_like(out, float("-inf")), out), lost & (pairs != 0)
'''

LOGMM_EXACT = '''
def einc_logmm_exact(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, lost: torch.Tensor,
                     floor: float) -> torch.Tensor:
    m = a.shape[1]
    n = b.shape[2]
    flat = lost.reshape(-1).nonzero().reshape(-1)
    chunk = max(1, 4194304 // max(1, a.shape[2]))
    parts: List[torch.Tensor] = []
    for start in range(0, flat.shape[0], chunk):
        index = flat[start:start + chunk]
        z = torch.div(index, m * n, rounding_mode="floor")
        rest = index - z * (m * n)
        i = torch.div(rest, n, rounding_mode="floor")
        j = rest - i * n
        parts.append(einc_lse(a[z, i, :] + b[z, :, j], [1], floor, True))
    return out.reshape(-1).index_copy(0, flat, torch.cat(parts)).reshape(out.shape)
'''

BROADCAST_CHUNK = '''
def einc_broadcast_chunk(z: int, m: int, k: int, n: int) -> int:
    # How much of k a broadcast (z, m, k, n) semiring product takes at once: all of it up
    # to 2M elements (one reduction, as the naive form); beyond, chunks of about 256K
    # elements, which keep each pass in cache.
    if z * m * n * k <= 2097152:
        return k
    return max(1, 262144 // max(1, z * m * n))
'''

LOGMM_SAFE = '''
def einc_logmm_safe(a: torch.Tensor, b: torch.Tensor, floor: float, tiny: float) -> torch.Tensor:
    # No branch on data (torch.func.vmap cannot take one): chunks of the naive
    # broadcast form, merged stably.
    z = a.shape[0]
    m = a.shape[1]
    k = a.shape[2]
    n = b.shape[2]
    if k == 0:
        return torch.logsumexp(a.unsqueeze(3) + b.unsqueeze(1), 2)
    chunk = einc_broadcast_chunk(z, m, k, n)
    out = torch.empty(0)
    for start in range(0, k, chunk):
        part = torch.logsumexp(a[:, :, start:start + chunk].unsqueeze(3) + b[:, start:start + chunk, :].unsqueeze(1), 2)
        out = part if start == 0 else torch.logaddexp(out, part)
    return out
'''

TROPICAL = '''
def einc_tropical(a: torch.Tensor, b: torch.Tensor, use_max: bool) -> torch.Tensor:
    z = a.shape[0]
    m = a.shape[1]
    k = a.shape[2]
    n = b.shape[2]
    chunk = einc_broadcast_chunk(z, m, k, n)
    out = torch.empty(0)
    for start in range(0, k, chunk):
        s = a[:, :, start:start + chunk].unsqueeze(3) + b[:, start:start + chunk, :].unsqueeze(1)
        part = torch.amax(s, 2) if use_max else torch.amin(s, 2)
        if start == 0:
            out = part
        elif use_max:
            out = torch.maximum(out, part)
        else:
            out = torch.minimum(out, part)
    return out
'''

COMPUTED = f'''
def einc_computed(dtype: torch.dtype, half: bool, sums: bool) -> torch.dtype:
    if half and ({" or ".join(f"dtype == {dtypes.name(d)}" for d in dtypes.HALF)}):
        return torch.float32
    if sums and ({" or ".join(f"dtype == {dtypes.name(d)}" for d in dtypes.INTEGRAL)}):
        return torch.int64
    return dtype
'''
"""Run-time :func:`einc.dtypes.computed`, from the same tables."""

PROD = '''
def einc_prod(sizes: List[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n
'''

INT_PRODUCT = '''
def einc_int_product(values: List[int]) -> int:
    # The product of non-negative ints, or -1 past int64 (TorchScript's ints wrap).
    n = 1
    for v in values:
        if v != 0 and n > 9223372036854775807 // v:
            return -1
        n *= v
    return n
'''

RATIO = '''
def einc_ratio(numerator: float, denominator: float) -> float:
    # IEEE, as a tensor divided by 0: inf, or NaN for 0 / 0.
    if denominator == 0.0:
        return float("nan") if numerator == 0.0 else float("inf")
    return numerator / denominator
'''

SCALES_EARLY = '''
def einc_scales_early(x: torch.Tensor, scale: float) -> bool:
    # A finite scale of floats goes on the operand; integers and inf/NaN on the result.
    return (x.is_floating_point() or x.is_complex()) and abs(scale) < float("inf")
'''

INT_BMM = '''
def einc_int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return (a.unsqueeze(3) * b.unsqueeze(1)).sum(2)
    return torch.bmm(a, b)
'''

INDEX_BAD = '''
def einc_index_bad(index: torch.Tensor, size: int) -> bool:
    # Whether an index is outside [0, size).  Not under torch.compile, which takes no
    # branch on data (torch's own kernels check the index there).
    if torch.jit.is_scripting():
        checking = True
    else:
        checking = not torch.compiler.is_compiling()
    return checking and index.numel() > 0 and (bool((index < 0).any()) or bool((index >= size).any()))
'''

HELPERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "einc_index_bad": (INDEX_BAD, ()),
    "einc_computed": (COMPUTED, ()),
    "einc_prod": (PROD, ()),
    "einc_ratio": (RATIO, ()),
    "einc_int_product": (INT_PRODUCT, ()),
    "einc_scales_early": (SCALES_EARLY, ()),
    "einc_int_bmm": (INT_BMM, ()),
    "einc_shifted_exp": (SHIFTED_EXP, ()),
    "einc_lse": (LSE, ("einc_prod", "einc_shifted_exp")),
    "einc_logmm_exact": (LOGMM_EXACT, ("einc_lse",)),
    "einc_structural": (STRUCTURAL, ()),
    "einc_logmm": (LOGMM, ("einc_prod", "einc_shifted_exp", "einc_structural", "einc_logmm_exact")),
    "einc_broadcast_chunk": (BROADCAST_CHUNK, ()),
    "einc_logmm_safe": (LOGMM_SAFE, ("einc_broadcast_chunk",)),
    "einc_tropical": (TROPICAL, ("einc_broadcast_chunk",)),
}
"""name -> (source, helpers it calls)."""
