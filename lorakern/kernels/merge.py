"""Merged-weight variant (dropout 0 only): W′ = W + s·B A by one small kernel, then cuBLAS.

weight [N, K] (x's dtype), lora_A [r, K] and lora_B [N, r] (x's dtype or fp32)
-> W′ [N, K] in weight's dtype, the rank-r product accumulated in fp32 and W + s·(B A)
rounded once. With dropout 0 the LoRA linear is then one cuBLAS GEMM:

    y  = x W′ᵀ + bias          (forward)
    dx = dY W′                 (backward; W′ rebuilt, never kept between the two)

Building W′ moves 2·N·K elements (read W, write W′) instead of the 2·M·N (forward) or
2·M·K (dx) that "cuBLAS GEMM + a LoRA pass adding into the output" moves, so it wins
when M exceeds K (forward) or N (dx). Which variant runs is the measured
dispatch's choice (kernels/dispatch.py); these are the candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DeviceScalars, cast, cdiv, check_device, common_meta, interpreting, load_scaling, mma, rank_pad, scalar_args, wrap_triton,
)
from .launch import launch

# One tile of W′ per program, no K loop: each element is read once and written once
# and costs 2·r_pad FLOPs (32 at r <= 16): ~8 FLOP per byte moved in bf16, far below
# the H200's ridge point (~180 FLOP/B: 770 TFLOP/s bf16 over 4.2 TB/s), so the kernel
# is bound by HBM bandwidth and the tile only has to keep enough loads in flight.
# (fp32 with matmul precision 'highest' runs the dot on FMA units: still under their
# ridge at r_pad 16, about at it at r_pad 64.) 64 x 128 with 4 warps (one warp group:
# a 64-row wgmma) keeps the fp32 tile at 64 registers a thread, so several programs
# share an SM and cover the memory latency; each row of the tile is 256 contiguous
# bytes of W (bf16). The A and B tiles are re-read by every program, from L2 (r x K and
# N x r are small).
MERGE_TILE = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}
# Under the interpreter: small tiles, so test shapes span several tiles in both
# dimensions with ragged edges.
_INTERPRET_TILE = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}


def merge_config() -> dict:
    """Launch settings of `_lora_merge_kernel` (the AOT check reads MERGE_TILE)."""
    return _INTERPRET_TILE if interpreting() else MERGE_TILE


@triton.jit
def _lora_merge_kernel(
    w_ptr, a_ptr, b_ptr, y_ptr,
    scaling,
    N, K, R,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_yn, stride_yk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    SCALARS_IN_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # y_ptr is W′ (named like every kernel's output, so kernels/aot.py's pointer roles
    # give it the compute dtype). Axis 0 walks K fastest: consecutive programs cover one
    # band of BLOCK_N rows of W and share its B tile in L2.
    scaling = load_scaling(scaling, SCALARS_IN_MEMORY)
    rk = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    n_ok = rn < N
    k_ok = rk < K
    r_ok = rr < R
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    # The adapters enter the dot in their own dtype, not rounded to W's (the dot's cost
    # hides behind the memory traffic either way): fp32 ones at PRECISION (tf32 on a GPU
    # with half-precision W), a mixed pair in fp32.
    if a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    ba = mma(b, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
    mask = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
    merged = w.to(tl.float32) + scaling * ba
    tl.store(y_ptr + rn[:, None] * stride_yn + rk[None, :] * stride_yk, cast(merged, y_ptr.dtype.element_ty, UPCAST), mask=mask)


def _check_adapters(name: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{name}: expected weight [N, K], lora_A [r, K], lora_B [N, r], got "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    (N, K), R = weight.shape, lora_A.shape[0]
    if lora_A.shape[1] != K or tuple(lora_B.shape) != (N, R):
        raise ValueError(f"{name}: shapes do not agree: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}")
    check_device("weight", weight)


def _check_no_dropout(name: str, scaling) -> None:
    if isinstance(scaling, DeviceScalars) and scaling.has_dropout:
        raise ValueError(f"{name}: the merged-weight variant is exact only with dropout 0, "
                         "got DeviceScalars with has_dropout=True")


def lora_merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling) -> torch.Tensor:
    """W′ = W + s·B A.  weight [N, K], lora_A [r, K], lora_B [N, r] -> W′ [N, K] (new, weight's dtype).

    B A is accumulated in fp32 (adapters read in their own dtype: W's or fp32) and
    W + s·(B A) rounded once to weight's dtype; weight is not modified.
    In half precision each element is the exact W + s·B A rounded to nearest (up to the
    fp32 error of the rank-r sum), as (W.double() + s * B.double() @ A.double()).to(W.dtype).
    scaling: a float, or a DeviceScalars (common.scalar_args).
    Strides: weight, lora_A, lora_B may have any strides; all are passed to the kernel.
    """
    _check_adapters("lora_merged_weight", weight, lora_A, lora_B)
    (N, K), R = weight.shape, lora_A.shape[0]
    merged = torch.empty((N, K), device=weight.device, dtype=weight.dtype)
    if N == 0 or K == 0:
        return merged
    cfg = merge_config()
    grid = (cdiv(K, cfg["BLOCK_K"]), cdiv(N, cfg["BLOCK_N"]))
    scalars = scalar_args(0.0, 0, scaling)
    (stride_wn, stride_wk), (stride_ar, stride_ak) = weight.stride(), lora_A.stride()
    (stride_bn, stride_br), (stride_yn, stride_yk) = lora_B.stride(), merged.stride()
    launch(wrap_triton(_lora_merge_kernel, weight), grid, dict(
        w_ptr=weight, a_ptr=lora_A, b_ptr=lora_B, y_ptr=merged,
        scaling=scalars["scaling"],
        N=N, K=K, R=R,
        stride_wn=stride_wn, stride_wk=stride_wk,
        stride_ar=stride_ar, stride_ak=stride_ak,
        stride_bn=stride_bn, stride_br=stride_br,
        stride_yn=stride_yn, stride_yk=stride_yk,
        R_PAD=rank_pad(R), SCALARS_IN_MEMORY=scalars["SCALARS_IN_MEMORY"], **cfg, **common_meta(weight.dtype),
    ))
    return merged


def lora_forward_merged(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
) -> torch.Tensor:
    """y = x (W + s·B A)ᵀ + bias, dropout 0 only.  x [M, K], weight [N, K], bias [N] | None,
    lora_A [r, K], lora_B [N, r] -> y [M, N] in x's dtype.

    Two launches: `lora_merged_weight`, then cuBLAS (F.linear) on W′; W′ is dropped
    afterwards. scaling: a float, or a DeviceScalars without dropout.
    Strides: any (W′ is built contiguous; x and bias go to F.linear as they are).
    """
    _check_adapters("lora_forward_merged", weight, lora_A, lora_B)
    N, K = weight.shape
    if x.dim() != 2 or x.shape[1] != K or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(f"lora_forward_merged: shapes do not agree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_forward_merged: weight is {weight.dtype}, x is {x.dtype}; they must match")
    _check_no_dropout("lora_forward_merged", scaling)
    if x.shape[0] == 0:  # nothing to multiply: skip building W′
        return torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.linear(x, lora_merged_weight(weight, lora_A, lora_B, scaling), bias)


def lora_backward_dx_merged(
    dy: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
) -> torch.Tensor:
    """dx = dY (W + s·B A), dropout 0 only.  dy [M, N], weight [N, K], lora_A [r, K],
    lora_B [N, r] -> dx [M, K] in dy's dtype.

    W′ is rebuilt here (not saved by the forward, so memory stays flat), then cuBLAS
    (torch.mm). scaling: a float, or a DeviceScalars without dropout.
    """
    _check_adapters("lora_backward_dx_merged", weight, lora_A, lora_B)
    N, K = weight.shape
    if dy.dim() != 2 or dy.shape[1] != N:
        raise ValueError(f"lora_backward_dx_merged: shapes do not agree: dy {tuple(dy.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != dy.dtype:
        raise ValueError(f"lora_backward_dx_merged: weight is {weight.dtype}, dy is {dy.dtype}; they must match")
    _check_no_dropout("lora_backward_dx_merged", scaling)
    if dy.shape[0] == 0:
        return torch.empty((0, K), device=dy.device, dtype=dy.dtype)
    return dy @ lora_merged_weight(weight, lora_A, lora_B, scaling)
