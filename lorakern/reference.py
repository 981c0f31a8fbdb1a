"""Pure-PyTorch reference for every lorakern kernel.

One function per kernel, with the same math, the same dtypes in and out, and the
same dropout mask for the same seed (bit for bit: `philox_uniform` reproduces
Triton's `tl.rand`). This module is both the CPU execution path and the oracle the
Triton kernels are tested against. It imports nothing from lorakern.

Shapes (DESIGN.md §1): x [M, K], weight [N, K], bias [N], lora_A [r, K],
lora_B [N, r], S [M, r] (fp32), dy [M, N].
"""

from __future__ import annotations

import concurrent.futures
import functools

import numpy as np
import torch

try:  # the compiled mask generator (lorakern/_philox.c), built when a C compiler was there
    from lorakern import _philox
except ImportError:
    _philox = None

# Philox4x32-10 constants, as in triton.language.random.
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
# tl.rand's uint32 -> [0, 1) scale (the largest value with MAX_INT * scale < 1).
_UNIFORM_SCALE = 4.6566127342e-10
# Philox counters per chunk when generating masks: keeps the six uint64 buffers (768 KiB)
# in L2; 1 << 16 was 1.7x slower for a 1024x1792 mask on one EPYC core.
_CHUNK = 1 << 14


def _philox_np(seed: int, counters: np.ndarray) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 on uint64 numpy counters; the four output words as uint64 arrays.

    numpy, not torch: torch has no uint64 multiply, and uint64 products of 32-bit
    words give the high and low halves exactly (3 ops instead of ~10 with int64 splits).
    The rounds run in place on preallocated buffers (no temporaries per round).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    round_a, round_b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    c0 = counters & mask
    c1 = counters >> shift
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    prod_a, prod_b = np.empty_like(c0), np.empty_like(c0)
    for _ in range(10):
        np.multiply(c2, round_b, out=prod_b)
        np.multiply(c0, round_a, out=prod_a)
        np.right_shift(prod_b, shift, out=c0)
        np.bitwise_xor(c0, c1, out=c0)
        np.bitwise_xor(c0, np.uint64(k0), out=c0)
        np.right_shift(prod_a, shift, out=c2)
        np.bitwise_xor(c2, c3, out=c2)
        np.bitwise_xor(c2, np.uint64(k1), out=c2)
        np.bitwise_and(prod_b, mask, out=c1)
        np.bitwise_and(prod_a, mask, out=c3)
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform_np(u: np.ndarray) -> np.ndarray:
    # Triton's uint32 -> [0, 1) map: reinterpret as int32, fold negatives with ~x, scale in fp32.
    folded = np.where(u >= np.uint64(1 << 31), np.uint64(_MASK32) - u, u)
    return folded.astype(np.float32) * np.float32(_UNIFORM_SCALE)


def philox4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1) = (low, high 32 bits), c2 = c3 = 0, key = seed.

    Bit-identical to Triton's `tl.randint4x(seed, counters)`. counters: int64 >= 0.
    Returns four int64 CPU tensors with values in [0, 2**32).
    """
    words = _philox_np(int(seed), counters.cpu().numpy().astype(np.uint64))
    return tuple(torch.from_numpy(w.astype(np.int64)) for w in words)


def uint_to_uniform(u: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) float32 map: reinterpret as int32, fold negatives with ~x, scale."""
    return torch.from_numpy(_uniform_np(u.cpu().numpy().astype(np.uint64)))


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats, bit-identical to Triton's `tl.rand(seed, offsets)`.

    seed: 0 <= seed < 2**63; offsets: int64 tensor (>= 0). Returns float32 of offsets' shape.
    """
    return uint_to_uniform(philox4x32(seed, offsets)[0])


@functools.lru_cache(maxsize=64)
def _keep_threshold(p: float) -> int:
    """Smallest folded uint31 value v whose uniform fl32(fl32(v) * scale) is > fl32(p),
    or 2**31 when none is. That map is monotone in v, so `uniform > p` is `v >= T`."""
    p32, scale = np.float32(p), np.float32(_UNIFORM_SCALE)
    lo, hi = 0, 1 << 31  # invariant: uniform(hi) > p or hi == 2**31; uniform(v) <= p for v < lo
    while lo < hi:
        mid = (lo + hi) // 2
        if np.float32(mid) * scale > p32:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _philox_keep(seed: int, counters: np.ndarray, threshold: int, out: np.ndarray) -> None:
    """out[n, lane] = keep bit of lane `lane` of Philox4x32-10 at counters[n] (T < 2**31).

    The uniform > p test is one unsigned range check on the raw word: the folded value
    (u, or 2**32-1-u for u >= 2**31) is >= T exactly when T <= u <= 2**32-1-T, i.e. when
    (u - T) mod 2**64 <= 2**32-1-2T.
    """
    words = _philox_np(seed, counters)
    t, span = np.uint64(threshold), np.uint64(_MASK32 - 2 * threshold)
    scratch = np.empty_like(words[0])
    for lane, word in enumerate(words):
        np.subtract(word, t, out=scratch)  # wraps below T: unsigned
        np.less_equal(scratch, span, out=out[:, lane])


def compiled_mask_generator() -> bool:
    """True when the C mask generator is built (else the numpy one runs: same bits)."""
    return _philox is not None


def _keep_bits(seed: int, m: int, k: int, p: float, dtype=np.bool_) -> np.ndarray:
    """The keep mask of `dropout_keep_mask` as a numpy array [m, 4·ceil(k/4)] (the columns
    past k are padding): bool, or 1 / 0 in float32 / float64 (`dtype`), which the C
    generator writes directly (the mask the reference multiplies by, without a conversion
    pass). The C generator when built, else `_philox_keep`."""
    groups = -(-k // 4)
    threshold = _keep_threshold(float(p))
    if threshold >= 1 << 31:  # no uniform exceeds p: nothing is kept
        return np.zeros((m, 4 * groups), dtype=dtype)
    keep = np.empty((m, 4 * groups), dtype=dtype)
    rows_per_chunk = max(1, _CHUNK // max(groups, 1))

    def fill(r0: int) -> None:
        r1 = min(r0 + rows_per_chunk, m)
        if _philox is not None:
            _philox.keep_values(int(seed), r0 * groups, (r1 - r0) * groups, threshold, keep[r0:r1], keep.itemsize)
            return
        counters = np.arange(r0 * groups, r1 * groups, dtype=np.uint64)
        if keep.dtype == np.bool_:
            _philox_keep(int(seed), counters, threshold, keep[r0:r1].reshape(-1, 4))
        else:
            bits = np.empty((r1 - r0, 4 * groups), dtype=np.bool_)
            _philox_keep(int(seed), counters, threshold, bits.reshape(-1, 4))
            keep[r0:r1] = bits

    if m <= rows_per_chunk:  # one chunk (a layer's mask at small M): no thread pool to set up
        fill(0)
        return keep
    starts = range(0, m, rows_per_chunk)
    threads = min(torch.get_num_threads(), len(starts))
    if threads > 1:
        # numpy releases the GIL inside its array loops: chunks run in parallel, on as
        # many threads as torch itself is allowed (torch.set_num_threads).
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, starts))
    else:
        for r0 in starts:
            fill(r0)
    return keep


def dropout_keep_mask(seed: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """Keep mask [m, k] (bool) of inverted dropout.

    One Philox call yields four uniforms, so element (i, j) takes lane j % 4 of the
    call at counter i * ceil(k / 4) + j // 4 (the kernels do the same, 4x fewer Philox
    evaluations than one per element). An element is kept when its uniform is > p,
    compared in fp32 as the kernels do.
    """
    return torch.from_numpy(_keep_bits(seed, m, k, p)[:, :k]).to(device)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` (t itself when it already is: skips `.to`'s ~1 µs dispatch per call)."""
    return t if t.dtype == dtype else t.to(dtype)


_ACC_DTYPES = (torch.float32, torch.float64)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: float32, or float64 for float64 inputs (never rounded down)."""
    return t if t.dtype in _ACC_DTYPES else t.to(torch.float32)


def _keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    """The keep mask for a 2-D tensor shaped like x as 0/1 in x's dtype, or None when p == 0.

    As x's dtype, not bool: multiplying by a bool tensor converts it on every use (4 ms
    against 1 ms for a 1024x1792 fp32 tile on one core). Generated as float32 (float64
    for float64 x) by `_keep_bits` itself; a view past the padding columns.
    """
    if p == 0.0:
        return None
    m, k = x.shape
    keep = torch.from_numpy(_keep_bits(seed, m, k, p, np.float64 if x.dtype == torch.float64 else np.float32)[:, :k])
    return keep.to(device=x.device, dtype=x.dtype)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    # Multiply, as torch's dropout and the kernels do: a dropped finite element becomes
    # exactly ±0, a dropped Inf/NaN becomes NaN (non-finite inputs propagate as in PyTorch).
    # `keep` is bool (a caller's mask) or 0/1 in t's dtype (from `_keep`).
    return t if keep is None else t * keep


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout D(x) of a 2-D x [M, K] with the seeded mask; identity when p == 0."""
    keep = _keep(x, p, seed)
    return x if keep is None else _masked(x, keep) / (1.0 - p)


# The kernels apply the mask to the operand (exact) and the 1/(1-p) factor to the fp32
# accumulator after the dot; the functions below do the same, so their roundings match.


def lora_shrink(
    x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """S = D(x) Aᵀ.  x [M, K], lora_A [r, K] -> S [M, r] float32.

    Computed in x's dtype (lora_A cast to it), returned in fp32 (fp64 for fp64 x).
    `keep` is the mask when the caller already has it (else regenerated from the seed).
    """
    keep = _keep(x, p, seed) if keep is None else keep
    S = _acc(_masked(x, keep) @ _as(lora_A, x.dtype).t())
    return S if p == 0.0 else S.mul_(1.0 / (1.0 - p))


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x Wᵀ + s·S Bᵀ + bias.  x [M, K], weight [N, K], S [M, r], lora_B [N, r] -> y [M, N].

    weight None: the LoRA term alone (no base GEMM, no bias).
    """
    if weight is None:
        y = x.new_zeros((x.shape[0], lora_B.shape[0]))
    else:
        y = torch.nn.functional.linear(x, weight, bias)
    # S and B enter the epilogue in x's dtype, as the kernel's tensor-core dot does.
    S, lora_B = _as(S, x.dtype), _as(lora_B, x.dtype)
    if scaling == 0.0:
        # addmm_ with alpha=0 skips the product (BLAS semantics): a NaN or Inf in S or B
        # would vanish. The kernels and PEFT compute 0·(S Bᵀ), NaN where the product is.
        return y.add_((S @ lora_B.t()).mul_(0.0))
    return y.addmm_(S, lora_B.t(), alpha=scaling)


def lora_backward_dsdb(
    dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY B [M, r] (fp32) and dB = s·dYᵀ S [N, r] (lora_B's dtype)."""
    dS = _acc(dy @ _as(lora_B, dy.dtype)).mul_(scaling)
    dB = _acc(dy.t() @ _as(S, dy.dtype)).mul_(scaling)
    return dS, _as(dB, lora_B.dtype)


def lora_backward_dx(
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    dS: torch.Tensor,
    lora_A: torch.Tensor,
    p: float,
    seed: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx = dY W + D(dS A).  dy [M, N], weight [N, K] (None: no dY W term), dS [M, r] fp32,
    lora_A [r, K] -> [M, K]."""
    dx = dy.new_zeros((dy.shape[0], lora_A.shape[1])) if weight is None else dy @ weight
    dS, lora_A = _as(dS, dy.dtype), _as(lora_A, dy.dtype)
    if p == 0.0:
        return dx.addmm_(dS, lora_A)  # no [M, K] temporary for the LoRA term
    keep = _keep(dx, p, seed) if keep is None else keep
    return dx.add_(_masked(dS @ lora_A, keep), alpha=1.0 / (1.0 - p))


def lora_backward_da(
    dS: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    p: float,
    seed: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """dA = dSᵀ D(x).  dS [M, r] fp32, x [M, K] -> dA [r, K] in lora_A's dtype."""
    keep = _keep(x, p, seed) if keep is None else keep
    dA = _acc(_as(dS, x.dtype).t() @ _masked(x, keep))
    if p != 0.0:
        dA.mul_(1.0 / (1.0 - p))
    return _as(dA, lora_A.dtype)


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, need_S: bool = True):
    """Whole forward on 2-D x [M, K]: returns (y [M, N], S [M, r] fp32). need_S is the
    kernels' signature (their merged variant may skip S); here S is needed for y anyway."""
    if p == 0.0 and x.dtype == lora_A.dtype == lora_B.dtype in _ACC_DTYPES and weight is not None and scaling != 0.0:
        # fp32 / fp64 throughout without dropout: lora_shrink and lora_forward reduce to these
        # products (the same ops, the same bits — tested), spelled out for the host time of
        # the CPU path (see lora_linear_backward).
        S = x @ lora_A.t()
        return torch.nn.functional.linear(x, weight, bias).addmm_(S, lora_B.t(), alpha=scaling), S
    S = lora_shrink(x, lora_A, p, seed)
    return lora_forward(x, weight, bias, S, lora_B, scaling), S


def lora_linear_backward(dy, x, weight, lora_A, lora_B, S, scaling, p, seed, needs):
    """Whole LoRA backward on 2-D tensors; `needs` = (dx, dA, dB) flags.

    Returns (dx, dA, dB), None where not needed. The mask is generated once and
    shared by dx and dA.
    """
    need_x, need_a, need_b = needs
    if p == 0.0 and dy.dtype == x.dtype == S.dtype == lora_A.dtype == lora_B.dtype:
        # fp32 / fp64 throughout without dropout: the functions below reduce to these products
        # (no cast, no mask; the same ops in the same order, so the same bits — tested). Spelled
        # out because this is the CPU training step's backward, where each Python call of the
        # general path is measurable host time (benchmarks/NOTES.md, 2026-12-01).
        dS = (dy @ lora_B).mul_(scaling)
        dx = None
        if need_x:
            dx = (dy.new_zeros((dy.shape[0], lora_A.shape[1])) if weight is None else dy @ weight).addmm_(dS, lora_A)
        return dx, (dS.t() @ x if need_a else None), ((dy.t() @ S).mul_(scaling) if need_b else None)
    dS, dB = lora_backward_dsdb(dy, lora_B, S, scaling)
    keep = _keep(x, p, seed) if (need_x or need_a) else None
    dx = lora_backward_dx(dy, weight, dS, lora_A, p, seed, keep) if need_x else None
    dA = lora_backward_da(dS, x, lora_A, p, seed, keep) if need_a else None
    return dx, dA, (dB if need_b else None)


# ---- mixed batches: one adapter per row (the SGMV kernels of lorakern/kernels/sgmv.py) ----------
# Adapters stacked and zero-padded to the largest rank R: A [n, R, K], B [n, N, R].
# seg = (order, starts, counts) from `segments`: adapter a owns the rows
# order[starts[a] : starts[a] + counts[a]]. Dropout keeps element (m, k) by the
# single-adapter mask of the whole [M, k] tensor (global row m) with adapter a's p;
# p[a] <= 0 keeps everything.


def segments(row_adapter: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by adapter, on row_adapter's device and without reading it on the host.

    row_adapter: [M] int64, the adapter of each row in [0, n), or -1 for none.
    Returns (order [M], starts [n], counts [n]) int64: order lists the rows sorted by
    adapter (stable; the rows without one first), adapter a owns
    order[starts[a] : starts[a] + counts[a]].
    """
    order = torch.argsort(row_adapter, stable=True)
    # a scatter, not torch.bincount: bincount reads the maximum on the host (a sync on CUDA)
    full = torch.zeros(n + 1, dtype=torch.int64, device=row_adapter.device)
    full.scatter_add_(0, row_adapter + 1, torch.ones_like(row_adapter))
    counts = full[1:]
    starts = torch.cumsum(full, 0)[1:] - counts
    return order, starts, counts


def _segment_rows(seg, a: int) -> torch.Tensor:
    order, starts, counts = seg
    start, count = int(starts[a]), int(counts[a])
    return order[start : start + count]


def _segment_keep(p: torch.Tensor | None, a: int, seed: int, like: torch.Tensor, rows: torch.Tensor):
    """Adapter a's keep mask (0/1 in like's dtype) on `rows` of a [M, C] tensor like `like`, or None."""
    if p is None or float(p[a]) <= 0.0:
        return None
    keep = _keep(like, float(p[a]), seed)
    return keep.index_select(0, rows.to(keep.device))


def sgmv_shrink(x, weights, seg, scale, p=None, seed=0) -> torch.Tensor:
    """out[m] = scale[a]·D_a(x[m]) W_aᵀ for each row m of adapter a; other rows 0.
    x [M, K], weights [n, R, K] -> [M, R] float32 (fp64 for fp64 x)."""
    out = x.new_zeros((x.shape[0], weights.shape[1]), dtype=_acc(x[:0]).dtype)
    for a in range(weights.shape[0]):
        rows = _segment_rows(seg, a)
        if rows.numel() == 0:
            continue
        part = _masked(x.index_select(0, rows), _segment_keep(p, a, seed, x, rows))
        res = _acc(part @ _as(weights[a], x.dtype).t()) * scale[a].to(out.dtype)
        out.index_copy_(0, rows, res)
    return out


def sgmv_expand(out, S, weights, seg, scale, p=None, seed=0) -> torch.Tensor:
    """out[m] += scale[a]·D_a(S[m] W_aᵀ) in place for each row m of adapter a.
    out [M, N], S [M, R] fp32, weights [n, N, R]; the product in out's dtype."""
    for a in range(weights.shape[0]):
        rows = _segment_rows(seg, a)
        if rows.numel() == 0:
            continue
        prod = _as(S.index_select(0, rows), out.dtype) @ _as(weights[a], out.dtype).t()
        prod = _masked(prod, _segment_keep(p, a, seed, out, rows))
        out.index_copy_(0, rows, out.index_select(0, rows).add_(prod, alpha=float(scale[a])))
    return out


def sgmv_grad(left, right, seg, scale, p=None, seed=0, *, rank_side: str) -> torch.Tensor:
    """out[a] = scale[a]·Σ_m left[m]ᵀ D_a(right[m]) over adapter a's rows: [n, P, Q] float32
    (fp64 for fp64 inputs). The fp32 operand is cast to the other's dtype for the product;
    rank_side is the kernels' tiling hint (unused here)."""
    act = right if left.dtype == torch.float32 else left
    n = seg[2].shape[0]
    out = left.new_zeros((n, left.shape[1], right.shape[1]), dtype=_acc(act[:0]).dtype)
    for a in range(n):
        rows = _segment_rows(seg, a)
        if rows.numel() == 0:
            continue
        r = _masked(right.index_select(0, rows), _segment_keep(p, a, seed, right, rows))
        out[a] = _acc(_as(left.index_select(0, rows), act.dtype).t() @ _as(r, act.dtype)) * scale[a].to(out.dtype)
    return out
