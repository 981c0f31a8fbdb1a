"""Backward kernels of the fused LoRA linear (dY = ∂L/∂y):

    dS = s · dY B  [M, r] fp32      and  dB = s · dYᵀ S [N, r]   (one pass over dY)
    dx = dY W + D(dS A)  [M, K]     (one GEMM; the mask is regenerated in its epilogue)
    dA = dSᵀ D(x)        [r, K]     (the mask is regenerated while x is read)

The reductions over M (dB, dA) are split across programs and each program writes its
own fp32 partial, summed afterwards in a fixed order: no atomics, so gradients are
bit-reproducible run to run. The dS/dB pass may also split N across programs (its 2-D
grid); dS then comes out as fp32 partials [P, M, r] that the dx and dA kernels add, in
index order, as they load each [BLOCK_M, r] tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    cast, cdiv, check_device, common_meta, drop, interpreting, keep_mask, load_dropout, load_scaling, mma, rank_pad, scalar_args,
    wrap_triton,
)
from .forward import PRUNE_BY_M, accumulate_config, gemm_configs, grouped_tile, m_bucket
from .launch import launch

# ---------------------------------------------------------------- dS and dB


def _dsdb_config(M: int, R: int, dy_itemsize: int) -> dict:
    """Row block of the dS/dB pass's 1-D grid ("rows"). Each program writes an [N, r] fp32
    partial of dB, so the partials total cdiv(M, BLOCK_M)·N·r·4 bytes: BLOCK_M grows (64 ->
    256) until they are no larger than dY itself (M·N·itemsize), e.g. r = 64 in bf16 takes
    128. Without this, M = 16384, N = 14336, r = 64 would allocate 940 MB of partials."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4}
    block_m = 64
    while block_m < 256 and R * 4 > block_m * dy_itemsize and block_m < M:
        block_m *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": 128 if block_m == 64 else 64, "num_warps": 4 if block_m == 64 else 8}


# Programs of one H200 wave (132 SMs), rounded down to a power of two like the row blocks.
_WAVE = 128
# At most this many column splits: dS comes out as SPLIT_N fp32 partials [SPLIT_N, M, r],
# which dx and dA read (and add) tile by tile, so their bytes grow with it.
_MAX_SPLIT_N = 8


def _dsdb_split_config(M: int, N: int, R: int, dy_itemsize: int) -> dict:
    """Blocks and SPLIT_N of the 2-D grid ("split"): row blocks of 256 (128 where M is too
    small to fill a wave even with _MAX_SPLIT_N splits) times SPLIT_N column ranges of N,
    SPLIT_N chosen for about one wave of programs. dB's partials shrink to
    cdiv(M, BLOCK_M)·N·r·4 bytes (8.4 MB instead of the rows grid's 33.5 MB at M = 8192,
    N = 4096, r = 16) for SPLIT_N·M·r·4 bytes of dS partials (2 MB there). SPLIT_N = 1:
    splitting does not pay (M fills a wave alone) and dispatch does not offer this grid."""
    if interpreting():  # small blocks and 2-3 splits, so the tests' small N take this grid
        block_m, block_n, warps, wanted = 32, 16, 4, 3
    elif isinstance(M, torch.SymInt):  # torch.compile, dynamic M: comparing M would specialise the graph on it
        return {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "SPLIT_N": 1}
    else:
        block_m = 256 if cdiv(M, 256) * _MAX_SPLIT_N >= _WAVE else 128
        block_n, warps, wanted = 64, 8, cdiv(_WAVE, cdiv(M, block_m))
    n_blocks = cdiv(N, block_n)
    split_n = max(1, min(wanted, _MAX_SPLIT_N, n_blocks))
    if n_blocks:  # as few splits as give the same column blocks per split: no empty split
        split_n = cdiv(n_blocks, cdiv(n_blocks, split_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "SPLIT_N": split_n}


def dsdb_split_n(M: int, N: int, R: int, dy_dtype: torch.dtype) -> int:
    """The column splits `_dsdb_split_config` gives dY [M, N] at rank R: the `split_n` to
    pass to `lora_backward_dsdb` for its 2-D grid, 1 where that grid is not worth trying."""
    return _dsdb_split_config(M, N, R, dy_dtype.itemsize)["SPLIT_N"]


@triton.jit
def _lora_bwd_dsdb_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, dbp_ptr,
    scaling,
    M, N, R, N_PER_SPLIT,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dsp, stride_dsm, stride_dsr,
    stride_dbp, stride_dbn, stride_dbr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    scaling = load_scaling(scaling, SCALARS_IN_MEMORY)
    # Program (pid_m, pid_n): rows rm, columns [pid_n·N_PER_SPLIT, + N_PER_SPLIT) of N. Its
    # dS over those columns goes to partial pid_n, its dB rows rn to partial pid_m. The 1-D
    # grid is one split (N_PER_SPLIT >= N). The last split may be short or empty (masked).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    s = cast(s, dy_ptr.dtype.element_ty, UPCAST)
    ds = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    col0 = pid_n.to(tl.int64) * N_PER_SPLIT
    for n0 in range(0, N_PER_SPLIT, BLOCK_N):
        rn = col0 + n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        ds = mma(dy, cast(b, dy.dtype, UPCAST), ds, UPCAST, PRECISION)
        # This program's share of dB for columns rn: s·dY[rm, rn]ᵀ S[rm] (scaled here, so
        # the host only sums the partials: one launch fewer per backward).
        db = mma(tl.trans(dy), s, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), UPCAST, PRECISION)
        tl.store(dbp_ptr + pid_m.to(tl.int64) * stride_dbp + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr, db * scaling, mask=n_ok[:, None] & r_ok[None, :])
    tl.store(ds_ptr + pid_n.to(tl.int64) * stride_dsp + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, ds * scaling,
             mask=m_ok[:, None] & r_ok[None, :])


def lora_backward_dsdb(
    dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling, reduce: bool = True, split_n: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY B [M, r] (fp32) and dB = s·dYᵀ S [N, r] (lora_B's dtype), in one pass over
    dy [M, N]; lora_B [N, r], S [M, r].

    split_n = 1: a 1-D grid over row blocks (`_dsdb_config`), each program over all of N.
    split_n > 1: a 2-D grid (`_dsdb_split_config`'s blocks), N cut into split_n column
    ranges, so row blocks can be larger at the same program count (fewer dB partials);
    dS then comes out of the kernel as split_n partials. `dsdb_split_n` gives the config's
    choice. Both sum every partial in index order: bit-reproducible run to run.

    reduce=True: (dS [M, r] fp32, dB [N, r] in lora_B's dtype).
    reduce=False: (dS as fp32 partials [split_n, M, r] when split_n > 1, else [M, r];
    dB as fp32 partials [P, N, r]) — `lora_backward_dx` / `lora_backward_da` take either
    form of dS, `sum_partials` sums dB's.
    scaling: a float, or a DeviceScalars (common.scalar_args).
    Strides: dy, lora_B, S may have any strides; all are passed to the kernel."""
    M, N = dy.shape
    R = S.shape[1]
    if tuple(lora_B.shape) != (N, R) or S.shape[0] != M:
        raise ValueError(f"lora_backward_dsdb: dy {tuple(dy.shape)}, lora_B {tuple(lora_B.shape)}, S {tuple(S.shape)} do not agree")
    if split_n < 1:
        raise ValueError(f"lora_backward_dsdb: split_n must be >= 1, got {split_n} (dy {tuple(dy.shape)})")
    check_device("dy", dy)
    if M == 0:
        dS = torch.empty((M, R), device=dy.device, dtype=torch.float32)
        return dS, (torch.zeros_like(lora_B) if reduce else lora_B.new_zeros((1, N, R), dtype=torch.float32))
    if split_n == 1:
        cfg = _dsdb_config(M, R, dy.element_size())
    else:
        cfg = {k: v for k, v in _dsdb_split_config(M, N, R, dy.element_size()).items() if k != "SPLIT_N"}
    row_blocks = cdiv(M, cfg["BLOCK_M"])
    n_per_split = cdiv(cdiv(N, cfg["BLOCK_N"]), split_n) * cfg["BLOCK_N"]
    dS = torch.empty((split_n, M, R) if split_n > 1 else (M, R), device=dy.device, dtype=torch.float32)
    db_partial = torch.empty((row_blocks, N, R), device=dy.device, dtype=torch.float32)
    scalars = scalar_args(0.0, 0, scaling)
    (stride_dym, stride_dyn), (stride_bn, stride_br), (stride_sm, stride_sr) = dy.stride(), lora_B.stride(), S.stride()
    stride_dsp, (stride_dsm, stride_dsr) = (dS.stride(0) if split_n > 1 else 0), dS.stride()[-2:]
    stride_dbp, stride_dbn, stride_dbr = db_partial.stride()
    launch(wrap_triton(_lora_bwd_dsdb_kernel, dy), (row_blocks, split_n), dict(
        dy_ptr=dy, b_ptr=lora_B, s_ptr=S, ds_ptr=dS, dbp_ptr=db_partial,
        scaling=scalars["scaling"],
        M=M, N=N, R=R, N_PER_SPLIT=n_per_split,
        stride_dym=stride_dym, stride_dyn=stride_dyn,
        stride_bn=stride_bn, stride_br=stride_br,
        stride_sm=stride_sm, stride_sr=stride_sr,
        stride_dsp=stride_dsp, stride_dsm=stride_dsm, stride_dsr=stride_dsr,
        stride_dbp=stride_dbp, stride_dbn=stride_dbn, stride_dbr=stride_dbr,
        R_PAD=rank_pad(R), SCALARS_IN_MEMORY=scalars["SCALARS_IN_MEMORY"], **cfg, **common_meta(dy.dtype),
    ))
    if not reduce:
        return dS, db_partial
    if split_n > 1:  # dS's partials and dB's, each added in index order, in one launch
        return sum_partials(dS, torch.float32, db_partial, lora_B.dtype)
    dB = db_partial.view(N, R) if row_blocks == 1 else db_partial.sum(0)
    return dS, dB.to(lora_B.dtype)


def _ds_form(dS: torch.Tensor, M: int, R: int) -> tuple[int, int] | None:
    """(DS_SPLIT, stride_dsp) of a dS given as [M, r] -> (1, 0) or as fp32 partials
    [P, M, r], P >= 1 -> (P, its stride); None when its shape is neither."""
    if dS.dim() == 2 and tuple(dS.shape) == (M, R):
        return 1, 0
    if dS.dim() == 3 and dS.shape[0] >= 1 and tuple(dS.shape[1:]) == (M, R):
        return dS.shape[0], dS.stride(0)
    return None


@triton.jit
def _load_ds(ptrs, stride_dsp, mask, DS_SPLIT: tl.constexpr):
    """The dS tile at `ptrs`, summed over its DS_SPLIT partials (stride_dsp apart) in index
    order: the same fp32 sum on every run, and only [BLOCK_M, r] elements per partial."""
    ds = tl.load(ptrs, mask=mask, other=0.0)
    for _ in tl.static_range(1, DS_SPLIT):
        ptrs += stride_dsp  # 64-bit pointer steps: P·M·r may pass 2**31
        ds += tl.load(ptrs, mask=mask, other=0.0)
    return ds


# ---------------------------------------------------------------- dx


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    seed, p, inv_keep,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dsp, stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, DS_SPLIT: tl.constexpr, HAS_BASE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    if HAS_DROPOUT:
        p, inv_keep, seed = load_dropout(p, inv_keep, seed, SCALARS_IN_MEMORY)
    # Output tile dx[rm, rk]; the GEMM reduces over N. Without HAS_BASE, dY W is
    # already in dx (computed by cuBLAS) and this adds the LoRA term to it.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    out_mask = m_ok[:, None] & k_ok[None, :]
    dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
    if HAS_BASE:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            n_ok = rn < N
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma(dy, w, acc, UPCAST, PRECISION)
    else:
        acc = tl.load(dx_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    # Epilogue: D(dS A) with the forward's mask, regenerated from the seed.
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    ds = _load_ds(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, stride_dsp, m_ok[:, None] & r_ok[None, :], DS_SPLIT)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    lora = mma(cast(ds, dx_ptr.dtype.element_ty, UPCAST), cast(a, dx_ptr.dtype.element_ty, UPCAST), tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
    if HAS_DROPOUT:
        lora = drop(lora * inv_keep, keep_mask(seed, rm, pid_k * BLOCK_K, K, p, BLOCK_K))
    acc += lora
    tl.store(dx_ptrs, cast(acc, dx_ptr.dtype.element_ty, UPCAST), mask=out_mask)


# Autotuned variant for the fused GEMM (it writes dx without reading it, so timing
# candidates is harmless); the accumulate variant keeps one config.
_lora_bwd_dx_kernel_tuned = triton.autotune(
    configs=gemm_configs("BLOCK_K", "BLOCK_N"), key=["M_BUCKET", "N", "K"], prune_configs_by=PRUNE_BY_M,
)(_lora_bwd_dx_kernel)


def lora_backward_dx(
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    dS: torch.Tensor,
    lora_A: torch.Tensor,
    p,
    seed,
    fused: bool = True,
) -> torch.Tensor:
    """dx = dY W + D(dS A).  dy [M, N], weight [N, K], dS [M, r] fp32, lora_A [r, K] -> [M, K].
    dS may also be its fp32 partials [P, M, r] (`lora_backward_dsdb(..., reduce=False,
    split_n=P)`), summed in index order as each tile is loaded.
    p: float and seed: int, or one DeviceScalars as both (common.scalar_args).

    fused=True: one Triton GEMM with the LoRA term in its epilogue. fused=False: dY W
    by cuBLAS (torch.mm), then one Triton pass adds D(dS A) in place. weight None: the
    LoRA term alone (the pass adds it to zeros).
    Strides: dy, weight, dS, lora_A may have any strides; all are passed to the kernel
    (or to torch.mm for dY W when fused=False).
    """
    M, N = dy.shape
    K = lora_A.shape[1]
    R = lora_A.shape[0]
    ds_form = _ds_form(dS, M, R)
    if (weight is not None and tuple(weight.shape) != (N, K)) or ds_form is None:
        raise ValueError(
            f"lora_backward_dx: dy {tuple(dy.shape)}, weight {None if weight is None else tuple(weight.shape)}, dS {tuple(dS.shape)}, "
            f"lora_A {tuple(lora_A.shape)} do not agree (dS is [M, r] or [P, M, r])"
        )
    check_device("dy", dy)
    if M == 0 or K == 0:
        return torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    ds_split, stride_dsp = ds_form
    args = dict(R_PAD=rank_pad(R), DS_SPLIT=ds_split, **scalar_args(p, seed), **common_meta(dy.dtype))
    if fused and weight is not None:
        dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
        kernel = _lora_bwd_dx_kernel_tuned
        args["HAS_BASE"] = True
    else:
        dx = torch.zeros((M, K), device=dy.device, dtype=dy.dtype) if weight is None else dy @ weight
        kernel = _lora_bwd_dx_kernel
        args.update(accumulate_config("BLOCK_K", "BLOCK_N"), HAS_BASE=False)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)

    stride_wn, stride_wk = (0, 0) if weight is None else weight.stride()
    (stride_dym, stride_dyn), (stride_dsm, stride_dsr) = dy.stride(), dS.stride()[-2:]
    (stride_ar, stride_ak), (stride_dxm, stride_dxk) = lora_A.stride(), dx.stride()
    launch(wrap_triton(kernel, dy), grid, dict(
        dy_ptr=dy, w_ptr=dx if weight is None else weight, ds_ptr=dS, a_ptr=lora_A, dx_ptr=dx,  # w_ptr=dx: unread
        M=M, N=N, K=K, R=R, M_BUCKET=m_bucket(M),
        stride_dym=stride_dym, stride_dyn=stride_dyn,
        stride_wn=stride_wn, stride_wk=stride_wk,
        stride_dsp=stride_dsp, stride_dsm=stride_dsm, stride_dsr=stride_dsr,
        stride_ar=stride_ar, stride_ak=stride_ak,
        stride_dxm=stride_dxm, stride_dxk=stride_dxk,
        **args,
    ))
    return dx


# ---------------------------------------------------------------- dA


def _da_config() -> dict:
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4}


@triton.jit
def _lora_bwd_da_kernel(
    ds_ptr, x_ptr, dap_ptr,
    seed, p, inv_keep,
    M, K, R, ROWS_PER_SPLIT,
    stride_dsp, stride_dsm, stride_dsr,
    stride_xm, stride_xk,
    stride_dap, stride_dar, stride_dak,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DS_SPLIT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    if HAS_DROPOUT:
        p, inv_keep, seed = load_dropout(p, inv_keep, seed, SCALARS_IN_MEMORY)
    # Program (pid_k, pid_s): columns rk, rows [pid_s * ROWS_PER_SPLIT, ... + ROWS_PER_SPLIT).
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    k_ok = rk < K
    r_ok = rr < R
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    row0 = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rm = row0 + m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = drop(x, keep_mask(seed, rm, pid_k * BLOCK_K, K, p, BLOCK_K))
        ds_t = _load_ds(ds_ptr + rm[None, :] * stride_dsm + rr[:, None] * stride_dsr, stride_dsp, m_ok[None, :] & r_ok[:, None], DS_SPLIT)
        acc = mma(cast(ds_t, x.dtype, UPCAST), x, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep  # the inverted-dropout scale, here rather than a host pass
    tl.store(dap_ptr + pid_s.to(tl.int64) * stride_dap + rr[:, None] * stride_dar + rk[None, :] * stride_dak, acc, mask=r_ok[:, None] & k_ok[None, :])


def lora_backward_da(
    dS: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, p, seed, reduce: bool = True
) -> torch.Tensor:
    """dA = dSᵀ D(x).  dS [M, r] fp32, x [M, K] -> dA [r, K] in lora_A's dtype.
    dS may also be its fp32 partials [P, M, r] (`lora_backward_dsdb(..., reduce=False,
    split_n=P)`), summed in index order as each tile is loaded.
    reduce=False: its fp32 partials [P, r, K] instead (summed by `sum_partials`).
    p: float and seed: int, or one DeviceScalars as both (common.scalar_args).
    Strides: dS, x may have any strides; both are passed to the kernel."""
    M, K = x.shape
    R = lora_A.shape[0]
    ds_form = _ds_form(dS, M, R)
    if ds_form is None or lora_A.shape[1] != K:
        raise ValueError(f"lora_backward_da: dS {tuple(dS.shape)}, x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)} do not agree "
                         "(dS is [M, r] or [P, M, r])")
    check_device("x", x)
    if M == 0 or K == 0:  # nothing to reduce, or nothing to reduce into
        return torch.zeros_like(lora_A) if reduce else lora_A.new_zeros((1, R, K), dtype=torch.float32)
    cfg = _da_config()
    k_blocks = cdiv(K, cfg["BLOCK_K"])
    m_blocks = cdiv(M, cfg["BLOCK_M"])
    # Enough programs to fill the GPU (~2 waves of 132 SMs), few partials to sum.
    splits = max(1, min(m_blocks, cdiv(264, k_blocks)))
    rows_per_split = cdiv(m_blocks, splits) * cfg["BLOCK_M"]
    splits = cdiv(M, rows_per_split)
    da_partial = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    ds_split, stride_dsp = ds_form
    (stride_dsm, stride_dsr), (stride_xm, stride_xk) = dS.stride()[-2:], x.stride()
    stride_dap, stride_dar, stride_dak = da_partial.stride()
    launch(wrap_triton(_lora_bwd_da_kernel, x), (k_blocks, splits), dict(
        ds_ptr=dS, x_ptr=x, dap_ptr=da_partial,
        M=M, K=K, R=R, ROWS_PER_SPLIT=rows_per_split,
        stride_dsp=stride_dsp, stride_dsm=stride_dsm, stride_dsr=stride_dsr,
        stride_xm=stride_xm, stride_xk=stride_xk,
        stride_dap=stride_dap, stride_dar=stride_dar, stride_dak=stride_dak,
        R_PAD=rank_pad(R), DS_SPLIT=ds_split, **scalar_args(p, seed), **cfg, **common_meta(x.dtype),
    ))
    if not reduce:
        return da_partial
    dA = da_partial.view(R, K) if splits == 1 else da_partial.sum(0)
    return dA.to(lora_A.dtype)


# ---------------------------------------------------------------- the partials' sums


@triton.jit
def _sum_stack(src_ptr, out_ptr, P, NUMEL, block, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """out[i] = Σ_p src[p, i] for the BLOCK elements of `block`: fp32, added in p order, cast once."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = src_ptr + offs  # 64-bit pointer steps: P · NUMEL may pass 2**31
    for _ in range(0, P):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += NUMEL
    tl.store(out_ptr + offs, cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _sum_partials_kernel(
    a_ptr, out_a_ptr, P_A, NUMEL_A,
    b_ptr, out_b_ptr, P_B, NUMEL_B,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    # Programs [0, cdiv(NUMEL_A, BLOCK)) sum stack a over its leading dim, the rest stack b:
    # two reductions, one launch. Each element's partials are added in index order, so the
    # result does not depend on the grid (bit-reproducible).
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(NUMEL_A, BLOCK)
    if pid < blocks_a:
        _sum_stack(a_ptr, out_a_ptr, P_A, NUMEL_A, pid, BLOCK, UPCAST)
    else:
        _sum_stack(b_ptr, out_b_ptr, P_B, NUMEL_B, pid - blocks_a, BLOCK, UPCAST)


SUM_BLOCK = 1024


def sum_partials(a_partial: torch.Tensor, a_dtype: torch.dtype, b_partial: torch.Tensor, b_dtype: torch.dtype):
    """(Σ_p a_partial[p] in a_dtype, Σ_p b_partial[p] in b_dtype) in one launch: the dB and dA
    partials [P, ...] (fp32, contiguous) of a backward, which two torch sums (and casts)
    would reduce in two to four. Sums in fp32, added in partial order, cast once."""
    for name, t in (("a_partial", a_partial), ("b_partial", b_partial)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.dim() < 2:
            raise ValueError(f"sum_partials: {name} must be a contiguous fp32 [P, ...] stack, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()}")
    out_a = torch.empty(a_partial.shape[1:], device=a_partial.device, dtype=a_dtype)
    out_b = torch.empty(b_partial.shape[1:], device=b_partial.device, dtype=b_dtype)
    numel_a, numel_b = out_a.numel(), out_b.numel()
    blocks = cdiv(numel_a, SUM_BLOCK) + cdiv(numel_b, SUM_BLOCK)
    if blocks == 0:
        return out_a, out_b
    launch(wrap_triton(_sum_partials_kernel, a_partial), (blocks,), dict(
        a_ptr=a_partial, out_a_ptr=out_a, P_A=a_partial.shape[0], NUMEL_A=numel_a,
        b_ptr=b_partial, out_b_ptr=out_b, P_B=b_partial.shape[0], NUMEL_B=numel_b,
        BLOCK=SUM_BLOCK, UPCAST=interpreting(), num_warps=4,
    ))
    return out_a, out_b
