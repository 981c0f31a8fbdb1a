"""Shrink: S = D(x) Aᵀ, dropout mask regenerated from (seed, element index), never stored.

x [M, K] (input dtype), lora_A [r, K] (input dtype or fp32, cast in registers)
-> S [M, r] float32. The mask is applied to the x tile (exact), the 1/(1-p) factor to
the fp32 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    cast, cdiv, check_device, common_meta, drop, interpreting, keep_mask, load_dropout, mma, rank_pad, scalar_args, wrap_triton,
)
from .launch import launch


def _config(K: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_K": 128 if K >= 128 else 64, "num_warps": 4}


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    seed, p, inv_keep,
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    if HAS_DROPOUT:
        p, inv_keep, seed = load_dropout(p, inv_keep, seed, SCALARS_IN_MEMORY)
    pid = tl.program_id(0)
    rm = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            x = drop(x, keep_mask(seed, rm, k0, K, p, BLOCK_K))
        a_mask = (rr[None, :] < R) & (rk[:, None] < K)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak, mask=a_mask, other=0.0)
        acc = mma(x, cast(a_t, x.dtype, UPCAST), acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    s_mask = (rm[:, None] < M) & (rr[None, :] < R)
    tl.store(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, acc, mask=s_mask)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, p, seed) -> torch.Tensor:
    """S = D(x) Aᵀ.  x [M, K], lora_A [r, K] -> S [M, r] float32.

    p: float and seed: int, or one DeviceScalars as both (common.scalar_args).
    Strides: x, lora_A (and the new S) may have any strides; all are passed to the kernel."""
    if x.dim() != 2 or lora_A.dim() != 2 or x.shape[1] != lora_A.shape[1]:
        raise ValueError(f"lora_shrink: expected x [M, K] and lora_A [r, K], got {tuple(x.shape)} and {tuple(lora_A.shape)}")
    check_device("x", x)
    M, K = x.shape
    R = lora_A.shape[0]
    S = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return S
    cfg = _config(K)
    grid = (cdiv(M, cfg["BLOCK_M"]),)
    (stride_xm, stride_xk), (stride_ar, stride_ak), (stride_sm, stride_sr) = x.stride(), lora_A.stride(), S.stride()
    launch(wrap_triton(_lora_shrink_kernel, x), grid, dict(
        x_ptr=x, a_ptr=lora_A, s_ptr=S,
        M=M, K=K, R=R,
        stride_xm=stride_xm, stride_xk=stride_xk,
        stride_ar=stride_ar, stride_ak=stride_ak,
        stride_sm=stride_sm, stride_sr=stride_sr,
        R_PAD=rank_pad(R), **scalar_args(p, seed), **cfg, **common_meta(x.dtype),
    ))
    return S
