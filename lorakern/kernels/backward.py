"""Backward kernels of the fused LoRA linear (dY = ∂L/∂y):

    dS = s · dY B  [M, r] fp32      and  dB = s · dYᵀ S [N, r]   (one pass over dY)
    dx = dY W + D(dS A)  [M, K]     (one GEMM; the mask is regenerated in its epilogue)
    dA = dSᵀ D(x)        [r, K]     (the mask is regenerated while x is read)

The reductions over M (dB, dA) are split across programs and each program writes its
own fp32 partial, summed afterwards in a fixed order: no atomics, so gradients are
bit-reproducible run to run.
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
    """Row block of the dS/dB pass. Each program writes an [N, r] fp32 partial of dB, so
    the partials total cdiv(M, BLOCK_M)·N·r·4 bytes: BLOCK_M grows (64 -> 256) until
    they are no larger than dY itself (M·N·itemsize), e.g. r = 64 in bf16 takes 128.
    Without this, M = 16384, N = 14336, r = 64 would allocate 940 MB of partials."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4}
    block_m = 64
    while block_m < 256 and R * 4 > block_m * dy_itemsize and block_m < M:
        block_m *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": 128 if block_m == 64 else 64, "num_warps": 4 if block_m == 64 else 8}


@triton.jit
def _lora_bwd_dsdb_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, dbp_ptr,
    scaling,
    M, N, R,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dsm, stride_dsr,
    stride_dbp, stride_dbn, stride_dbr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    scaling = load_scaling(scaling, SCALARS_IN_MEMORY)
    pid = tl.program_id(0)
    rm = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    s = cast(s, dy_ptr.dtype.element_ty, UPCAST)
    ds = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        ds = mma(dy, cast(b, dy.dtype, UPCAST), ds, UPCAST, PRECISION)
        # This program's share of dB for columns rn: s·dY[rm, rn]ᵀ S[rm] (scaled here, so
        # the host only sums the partials: one launch fewer per backward).
        db = mma(tl.trans(dy), s, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), UPCAST, PRECISION)
        tl.store(dbp_ptr + pid.to(tl.int64) * stride_dbp + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr, db * scaling, mask=n_ok[:, None] & r_ok[None, :])
    tl.store(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, ds * scaling, mask=m_ok[:, None] & r_ok[None, :])


def lora_backward_dsdb(
    dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling, reduce: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY B [M, r] (fp32) and dB = s·dYᵀ S [N, r] (lora_B's dtype).
    reduce=False: dB comes back as its fp32 partials [P, N, r] (summed by `sum_partials`).
    scaling: a float, or a DeviceScalars (common.scalar_args).
    Strides: dy, lora_B, S may have any strides; all are passed to the kernel."""
    M, N = dy.shape
    R = S.shape[1]
    if tuple(lora_B.shape) != (N, R) or S.shape[0] != M:
        raise ValueError(f"lora_backward_dsdb: dy {tuple(dy.shape)}, lora_B {tuple(lora_B.shape)}, S {tuple(S.shape)} do not agree")
    check_device("dy", dy)
    dS = torch.empty((M, R), device=dy.device, dtype=torch.float32)
    if M == 0:
        return dS, (torch.zeros_like(lora_B) if reduce else lora_B.new_zeros((1, N, R), dtype=torch.float32))
    cfg = _dsdb_config(M, R, dy.element_size())
    num_pid = cdiv(M, cfg["BLOCK_M"])
    db_partial = torch.empty((num_pid, N, R), device=dy.device, dtype=torch.float32)
    scalars = scalar_args(0.0, 0, scaling)
    (stride_dym, stride_dyn), (stride_bn, stride_br), (stride_sm, stride_sr) = dy.stride(), lora_B.stride(), S.stride()
    (stride_dsm, stride_dsr), (stride_dbp, stride_dbn, stride_dbr) = dS.stride(), db_partial.stride()
    launch(wrap_triton(_lora_bwd_dsdb_kernel, dy), (num_pid,), dict(
        dy_ptr=dy, b_ptr=lora_B, s_ptr=S, ds_ptr=dS, dbp_ptr=db_partial,
        scaling=scalars["scaling"],
        M=M, N=N, R=R,
        stride_dym=stride_dym, stride_dyn=stride_dyn,
        stride_bn=stride_bn, stride_br=stride_br,
        stride_sm=stride_sm, stride_sr=stride_sr,
        stride_dsm=stride_dsm, stride_dsr=stride_dsr,
        stride_dbp=stride_dbp, stride_dbn=stride_dbn, stride_dbr=stride_dbr,
        R_PAD=rank_pad(R), SCALARS_IN_MEMORY=scalars["SCALARS_IN_MEMORY"], **cfg, **common_meta(dy.dtype),
    ))
    if not reduce:
        return dS, db_partial
    dB = db_partial.view(N, R) if num_pid == 1 else db_partial.sum(0)
    return dS, dB.to(lora_B.dtype)


# ---------------------------------------------------------------- dx


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    seed, p, inv_keep,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, HAS_BASE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
    ds = tl.load(ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
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
    if (weight is not None and tuple(weight.shape) != (N, K)) or tuple(dS.shape) != (M, R):
        raise ValueError(
            f"lora_backward_dx: dy {tuple(dy.shape)}, weight {None if weight is None else tuple(weight.shape)}, dS {tuple(dS.shape)}, "
            f"lora_A {tuple(lora_A.shape)} do not agree"
        )
    check_device("dy", dy)
    if M == 0 or K == 0:
        return torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    args = dict(R_PAD=rank_pad(R), **scalar_args(p, seed), **common_meta(dy.dtype))
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
    (stride_dym, stride_dyn), (stride_dsm, stride_dsr) = dy.stride(), dS.stride()
    (stride_ar, stride_ak), (stride_dxm, stride_dxk) = lora_A.stride(), dx.stride()
    launch(wrap_triton(kernel, dy), grid, dict(
        dy_ptr=dy, w_ptr=dx if weight is None else weight, ds_ptr=dS, a_ptr=lora_A, dx_ptr=dx,  # w_ptr=dx: unread
        M=M, N=N, K=K, R=R, M_BUCKET=m_bucket(M),
        stride_dym=stride_dym, stride_dyn=stride_dyn,
        stride_wn=stride_wn, stride_wk=stride_wk,
        stride_dsm=stride_dsm, stride_dsr=stride_dsr,
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
    stride_dsm, stride_dsr,
    stride_xm, stride_xk,
    stride_dap, stride_dar, stride_dak,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
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
        ds_t = tl.load(ds_ptr + rm[None, :] * stride_dsm + rr[:, None] * stride_dsr, mask=m_ok[None, :] & r_ok[:, None], other=0.0)
        acc = mma(cast(ds_t, x.dtype, UPCAST), x, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep  # the inverted-dropout scale, here rather than a host pass
    tl.store(dap_ptr + pid_s.to(tl.int64) * stride_dap + rr[:, None] * stride_dar + rk[None, :] * stride_dak, acc, mask=r_ok[:, None] & k_ok[None, :])


def lora_backward_da(
    dS: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, p, seed, reduce: bool = True
) -> torch.Tensor:
    """dA = dSᵀ D(x).  dS [M, r] fp32, x [M, K] -> dA [r, K] in lora_A's dtype.
    reduce=False: its fp32 partials [P, r, K] instead (summed by `sum_partials`).
    p: float and seed: int, or one DeviceScalars as both (common.scalar_args).
    Strides: dS, x may have any strides; both are passed to the kernel."""
    M, K = x.shape
    R = lora_A.shape[0]
    if tuple(dS.shape) != (M, R) or lora_A.shape[1] != K:
        raise ValueError(f"lora_backward_da: dS {tuple(dS.shape)}, x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)} do not agree")
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
    (stride_dsm, stride_dsr), (stride_xm, stride_xk) = dS.stride(), x.stride()
    stride_dap, stride_dar, stride_dak = da_partial.stride()
    launch(wrap_triton(_lora_bwd_da_kernel, x), (k_blocks, splits), dict(
        ds_ptr=dS, x_ptr=x, dap_ptr=da_partial,
        M=M, K=K, R=R, ROWS_PER_SPLIT=rows_per_split,
        stride_dsm=stride_dsm, stride_dsr=stride_dsr,
        stride_xm=stride_xm, stride_xk=stride_xk,
        stride_dap=stride_dap, stride_dar=stride_dar, stride_dak=stride_dak,
        R_PAD=rank_pad(R), **scalar_args(p, seed), **cfg, **common_meta(x.dtype),
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
