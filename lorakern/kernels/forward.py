"""Fused forward GEMM: y = x Wᵀ + s · S Bᵀ + bias, y written once.

x [M, K], weight [N, K], bias [N] (x's dtype), S [M, r] fp32, lora_B [N, r]
(x's dtype or fp32) -> y [M, N] in x's dtype. The base GEMM accumulates in fp32 on
tensor cores; the rank-r B-projection is one more tl.dot in the epilogue, with S and
B cast to x's dtype in registers.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import settings
from .common import (
    cast, cdiv, check_device, common_meta, drop, interpreting, keep_mask, load_dropout, load_scaling, mma, next_pow2, rank_pad,
    scalar_args, wrap_triton,
)
from .launch import launch
from .shrink import lora_shrink as _lora_shrink


# Output-tile shapes tried by both GEMMs (forward and dx): (rows, cols, reduction step,
# warps, stages). The last three serve decode-sized M: there the GEMM reads W once and
# the grid is N / cols programs, so 32 columns give 128 programs at N = 4096, about one
# per SM of an H100 / H200 (64 columns left half of them idle: benchmarks/NOTES.md).
GEMM_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 32, 128, 4, 4),
]
# M buckets at or below SMALL_M_BUCKET autotune only tiles of <= 64 rows; buckets at or
# above LARGE_M_BUCKET skip the 16-row ones (prune_tiles).
SMALL_M_BUCKET, LARGE_M_BUCKET = 32, 256


def prune_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early pruning (triton.autotune prune_configs_by): a 128- or 256-row
    tile wastes most of its rows at decode-sized M, a 16-row tile re-reads W M/16 times at
    large M, so neither is compiled and timed there (fewer configs: a shorter first call
    per key). A symbolic M (bucket 0) or an unknown one keeps every config."""
    bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 0))
    if not isinstance(bucket, int) or bucket <= 0:
        return configs
    if bucket <= SMALL_M_BUCKET:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    elif bucket >= LARGE_M_BUCKET:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] > 16]
    else:
        kept = configs
    return kept or configs


# torch.compile honours a user kernel's prune_configs_by from torch 2.7 on (pytorch#142207);
# torch 2.6 refuses the argument on the traced triton_op path, so there every tile is timed.
PRUNE_BY_M = {"early_config_prune": prune_tiles} if torch.torch_version.TorchVersion(torch.__version__) >= "2.7" else None
# The one tile used when autotuning is off (LORAKERN_AUTOTUNE=0): it fits the shared
# memory of sm_80/sm_90 in every variant and dtype, fp32 one-pass included (checked
# by kernels/aot.py; 128x128x64 with 4 stages does not: 236 KiB in fp32).
SINGLE_TILE = (64, 128, 64, 4, 4)


def gemm_configs(cols: str, reduction: str) -> list[triton.Config]:
    """Autotune configs from GEMM_TILES, naming the output-column and reduction block
    meta-parameters (`BLOCK_N`/`BLOCK_K` in the forward, swapped in dx).

    LORAKERN_AUTOTUNE=0 (read when the kernels are imported) keeps only SINGLE_TILE:
    the CUDA test suite sets it, because it compiles hundreds of small
    specialisations and would otherwise time every tile for each. With autotuning on,
    tiles that do not fit a variant's shared memory are skipped by the autotuner.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, cols: 32, reduction: 64, "GROUP_M": 4}, num_warps=4)]
    tiles = GEMM_TILES if settings.autotune else [SINGLE_TILE]
    return [
        triton.Config({"BLOCK_M": bm, cols: bc, reduction: br, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bc, br, w, st in tiles
    ]


def accumulate_config(cols: str, reduction: str) -> dict:
    """Launch settings of the accumulate variants (HAS_BASE=False: cuBLAS already wrote the
    GEMM into the output, the kernel adds the LoRA term): one 64-row x 128-column tile, not
    autotuned, since timing candidates would add into the output again and again.
    Built once per (cols, reduction): it is read on every launch."""
    cached = _ACCUMULATE_CONFIGS.get((cols, reduction))
    if cached is None:
        if interpreting():
            cfg = gemm_configs(cols, reduction)[0]
        else:
            cfg = triton.Config({"BLOCK_M": 64, cols: 128, reduction: 64, "GROUP_M": 8}, num_warps=4)
        cached = _ACCUMULATE_CONFIGS[(cols, reduction)] = dict(cfg.kwargs, num_warps=cfg.num_warps)
    return cached


_ACCUMULATE_CONFIGS: dict[tuple[str, str], dict] = {}


def small_m_accumulate_config() -> dict:
    """Tile of the small-M accumulate variant that also computes S (decode: cuBLAS wrote
    x Wᵀ, one pass adds s·(x Aᵀ) Bᵀ): 16 rows, so an M = 16 call wastes no rows, and
    128 columns, so each program's recomputation of S (x and A re-read from L2) is
    shared by 128 outputs."""
    if interpreting():
        return accumulate_config("BLOCK_N", "BLOCK_K")
    return _SMALL_M_ACCUMULATE


_SMALL_M_ACCUMULATE = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4}


def m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two, so varying sequence lengths do not retune.
    A symbolic M (a dynamic dimension while torch.compile traces) gets one bucket, 0."""
    if isinstance(M, torch.SymInt):
        return 0
    return next_pow2(M)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (pid_m, pid_n) in GROUP_M-row bands, for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows
    pid_n = (pid % group_size) // rows
    return pid_m, pid_n


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, s_ptr, b_ptr, y_ptr,
    scaling, seed, p, inv_keep,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BASE: tl.constexpr, STORE_S: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    scaling = load_scaling(scaling, SCALARS_IN_MEMORY)
    if HAS_DROPOUT:
        p, inv_keep, seed = load_dropout(p, inv_keep, seed, SCALARS_IN_MEMORY)
    # FUSE_SHRINK (small M): S = D(x) Aᵀ is accumulated in the same K loop from the x
    # tiles already loaded, and written (STORE_S: a backward will read it) by the pid_n == 0
    # column of programs; every other column recomputes it (x is tiny) instead of waiting
    # for a second launch.
    # Otherwise S comes precomputed from the shrink kernel.
    # Without HAS_BASE, x Wᵀ (+ bias) is already in y (cuBLAS) and this adds s·S Bᵀ to it:
    # one launch that reads S and B in their own dtypes (no casts on the host); with
    # FUSE_SHRINK too, the K loop reads x and A only (S computed here, W not read).
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    if HAS_BASE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.load(y_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K if (HAS_BASE or FUSE_SHRINK) else 0, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_BASE:
            w_t = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = mma(x, w_t, acc, UPCAST, PRECISION)
        if FUSE_SHRINK:
            xd = x
            if HAS_DROPOUT:
                xd = drop(x, keep_mask(seed, rm, k0, K, p, BLOCK_K))
            a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            s = mma(xd, cast(a_t, x.dtype, UPCAST), s, UPCAST, PRECISION)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    s_mask = m_ok[:, None] & r_ok[None, :]
    if FUSE_SHRINK:
        # The rank padding's columns hold x·0, NaN where x is ±Inf: zero them, as the
        # two-pass path's masked load of S does, before they meet B's zero padding.
        s = tl.where(r_ok[None, :], s, 0.0)
        if HAS_DROPOUT:
            s = s * inv_keep
        if STORE_S and pid_n == 0:
            tl.store(s_ptrs, s, mask=s_mask)
    else:
        s = tl.load(s_ptrs, mask=s_mask, other=0.0)
    # Epilogue: the rank-r B-projection, then bias; y is written once.
    b_t = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br, mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    lora = mma(cast(s, y_ptr.dtype.element_ty, UPCAST), cast(b_t, y_ptr.dtype.element_ty, UPCAST), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


# The autotuned variant computes the whole GEMM (it writes y without reading it, so
# timing candidates is harmless); the accumulate variant runs accumulate_config's tile.
_lora_fwd_kernel_tuned = triton.autotune(
    configs=gemm_configs("BLOCK_N", "BLOCK_K"), key=["M_BUCKET", "N", "K", "FUSE_SHRINK", "HAS_DROPOUT"],
    prune_configs_by=PRUNE_BY_M,
)(_lora_fwd_kernel)


def _check_forward_shapes(x, weight, bias, lora_B, R, S=None) -> None:
    M, K = x.shape
    N = lora_B.shape[0] if weight is None else weight.shape[0]
    if (weight is not None and weight.shape[1] != K) or tuple(lora_B.shape) != (N, R) or (S is not None and S.shape[0] != M) or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(
            f"lora_forward: shapes do not agree: x {tuple(x.shape)}, weight {None if weight is None else tuple(weight.shape)}, "
            f"S {None if S is None else tuple(S.shape)}, r {R}, lora_B {tuple(lora_B.shape)}, "
            f"bias {None if bias is None else tuple(bias.shape)}"
        )
    check_device("x", x)


def _launch_forward(x, weight, bias, lora_A, S, lora_B, y, scaling, p, seed, fuse_shrink: bool, has_base: bool = True) -> None:
    """S None with fuse_shrink: the kernel computes S for the epilogue but does not store it."""
    M, K = x.shape
    N, R = lora_B.shape
    store_s = fuse_shrink and S is not None
    if S is None:
        S = y  # never read or written (STORE_S off): any valid pointer; strides below unused

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    a = lora_A if lora_A is not None else S  # unused pointer when not fusing the shrink
    # One name per assignment: how torch's source reading follows `kernel` (wrap_triton).
    kernel = _lora_fwd_kernel_tuned if has_base else _lora_fwd_kernel
    tile = {} if has_base else (small_m_accumulate_config() if fuse_shrink else accumulate_config("BLOCK_N", "BLOCK_K"))
    w = x if weight is None else weight  # unread without HAS_BASE: any valid pointer
    (stride_xm, stride_xk), (stride_wn, stride_wk), (stride_ar, stride_ak) = x.stride(), w.stride(), a.stride()
    (stride_sm, stride_sr), (stride_bn, stride_br), (stride_ym, stride_yn) = S.stride(), lora_B.stride(), y.stride()
    has_bias = has_base and bias is not None
    launch(wrap_triton(kernel, x), grid, dict(
        x_ptr=x, w_ptr=w, bias_ptr=bias if has_bias else x, a_ptr=a, s_ptr=S, b_ptr=lora_B, y_ptr=y,
        M=M, N=N, K=K, R=R, M_BUCKET=m_bucket(M),
        stride_xm=stride_xm, stride_xk=stride_xk,
        stride_wn=stride_wn, stride_wk=stride_wk,
        stride_ar=stride_ar, stride_ak=stride_ak,
        stride_sm=stride_sm, stride_sr=stride_sr,
        stride_bn=stride_bn, stride_br=stride_br,
        stride_ym=stride_ym, stride_yn=stride_yn,
        stride_bias=bias.stride(0) if has_bias else 0,
        R_PAD=rank_pad(R), HAS_BIAS=has_bias, FUSE_SHRINK=fuse_shrink, STORE_S=store_s,
        HAS_BASE=has_base, **scalar_args(p, seed, scaling), **tile, **common_meta(x.dtype),
    ))


def lora_forward_onepass(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
    p,
    seed,
    cublas_base: bool = False,
    base: torch.Tensor | None = None,
    need_S: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shrink and B-projection without S leaving the kernel (for small M, e.g. decode):
    returns (y [M, N], S [M, r] fp32); with need_S=False (no backward will run) S is
    neither allocated nor stored, and comes back None.

    x [M, K], weight [N, K], bias [N] | None, lora_A [r, K], lora_B [N, r]; scaling, p,
    seed by value (float, float, int) or one DeviceScalars as all three (common.scalar_args).
    Every tensor may have any strides (all are passed to the kernel).

    cublas_base=False: one launch, the base GEMM in the same kernel. True: x Wᵀ + bias by
    cuBLAS (F.linear), then one Triton pass computes S and adds s·S Bᵀ (two launches;
    the base at cuBLAS's speed, which a GEMV-shaped Triton tile does not reach).
    base: y = x Wᵀ + bias [M, N] already computed by the caller (e.g. from a quantized
    weight, kernels/qgemm.py; weight and bias then None): the pass adds s·S Bᵀ into it in
    place and returns it.
    """
    R = lora_A.shape[0]
    if lora_A.shape[1] != x.shape[1]:
        raise ValueError(f"lora_forward: x {tuple(x.shape)} and lora_A {tuple(lora_A.shape)} disagree on K")
    _check_forward_shapes(x, weight, bias, lora_B, R)
    M, N = x.shape[0], lora_B.shape[0]
    if base is not None:
        if tuple(base.shape) != (M, N) or base.dtype != x.dtype:
            raise ValueError(f"lora_forward_onepass: base must be [{M}, {N}] in {x.dtype}, got "
                             f"{tuple(base.shape)} {base.dtype}")
        y = base
    elif cublas_base:
        y = torch.nn.functional.linear(x, weight, bias)
    else:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    S = torch.empty((M, R), device=x.device, dtype=torch.float32) if need_S else None
    if M == 0:
        return y, S
    if N == 0:  # no program would write S
        return y, _lora_shrink(x, lora_A, p, seed) if need_S else None
    has_base = base is None and not cublas_base
    _launch_forward(x, weight, bias, lora_A, S, lora_B, y, scaling, p, seed, fuse_shrink=True, has_base=has_base)
    return y, S


def lora_forward_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
) -> torch.Tensor:
    """y = x Wᵀ + s·S Bᵀ + bias in one kernel.  x [M, K], weight [N, K], S [M, r], lora_B [N, r] -> [M, N].

    scaling: a float, or a DeviceScalars (common.scalar_args).
    Strides: x, weight, bias, S, lora_B may have any strides; all are passed to the kernel."""
    _check_forward_shapes(x, weight, bias, lora_B, S.shape[1], S)
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    _launch_forward(x, weight, bias, None, S, lora_B, y, scaling, 0.0, 0, fuse_shrink=False)
    return y


def lora_forward_unfused(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
) -> torch.Tensor:
    """The same y, as x Wᵀ + bias by cuBLAS (F.linear) then one Triton pass adding s·S Bᵀ
    in place (S and B read in their own dtypes, rounded to x's in registers, as in the
    fused kernel). Two launches: the cuBLAS GEMM and the epilogue.

    weight None: the LoRA term alone, added to zeros (no base GEMM, bias must be None).
    Strides: any, for every argument (x, weight, bias go to F.linear; S, lora_B and y's
    strides are passed to the kernel).
    """
    _check_forward_shapes(x, weight, bias, lora_B, S.shape[1], S)
    if weight is None:
        y = torch.zeros((x.shape[0], lora_B.shape[0]), device=x.device, dtype=x.dtype)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
    if y.shape[0] == 0 or y.shape[1] == 0:
        return y
    _launch_forward(x, weight, None, None, S, lora_B, y, scaling, 0.0, 0, fuse_shrink=False, has_base=False)
    return y
