"""Triton kernels of the fused LoRA linear, and their launchers (no autograd here).

Each launcher has the signature and math of the function of the same name in
`lorakern.reference`, which is its oracle; the quantized-weight launchers'
(`dequantize_weight`, `dequant_matmul`) oracle is `lorakern.quant.dequantize_weight`.
"""

from __future__ import annotations

import torch

from .backward import lora_backward_da, lora_backward_dsdb, lora_backward_dx
from .common import DeviceScalars, has_dropout, rank_pad, traced
from .dequant import dequantize_weight
from .dispatch import prefer_fused
from .forward import lora_forward_fused, lora_forward_onepass, lora_forward_unfused, m_bucket
from .qgemm import dequant_matmul
from .shrink import lora_shrink


def lora_forward(x, weight, bias, S, lora_B, scaling) -> torch.Tensor:
    """y = x Wᵀ + s·S Bᵀ + bias [M, N], by the faster of the fused and cuBLAS variants."""
    M, K = x.shape
    args = (x, weight, bias, S, lora_B, scaling)
    if weight is None:  # the LoRA term alone: nothing to fuse it with
        return lora_forward_unfused(*args)
    key = ("fwd", m_bucket(M), weight.shape[0], K, rank_pad(S.shape[1]), x.dtype, x.device)
    if prefer_fused(key, lambda: lora_forward_fused(*args), lambda: lora_forward_unfused(*args), x.device, traced(x)):
        return lora_forward_fused(*args)
    return lora_forward_unfused(*args)


def lora_backward_dx_auto(dy, weight, dS, lora_A, p, seed) -> torch.Tensor:
    """dx = dY W + D(dS A), by the faster of the fused and cuBLAS variants."""
    M, N = dy.shape
    args = (dy, weight, dS, lora_A, p, seed)
    if weight is None:  # the LoRA term alone
        return lora_backward_dx(*args, fused=False)
    # p > 0 in the key: the masked epilogue costs more, so it gets its own measurement.
    key = ("dx", m_bucket(M), N, weight.shape[1], rank_pad(dS.shape[1]), has_dropout(p), dy.dtype, dy.device)
    fused = prefer_fused(
        key, lambda: lora_backward_dx(*args, fused=True), lambda: lora_backward_dx(*args, fused=False), dy.device, traced(dy)
    )
    return lora_backward_dx(*args, fused=fused)


# Up to this many rows the shrink runs inside the kernel that adds the B-projection
# (each column of programs recomputes S from x, which only pays while x is small).
ONEPASS_MAX_M = 64


def _forward_two_pass(x, weight, bias, lora_A, lora_B, scaling, p, seed):
    S = lora_shrink(x, lora_A, p, seed)
    return lora_forward(x, weight, bias, S, lora_B, scaling), S


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed):
    """Whole forward on 2-D x [M, K]: returns (y [M, N], S [M, r] fp32).

    scaling, p, seed: float, float, int; or one DeviceScalars as all three (values the
    host does not read: torch.compile's traced path).

    Small M (decode): one launch (`lora_forward_onepass`, the base GEMM in Triton) or two
    (cuBLAS's GEMM, then one pass computing S and adding s·S Bᵀ), whichever measures
    faster. Larger M, and while torch.compile traces: the shrink kernel, then the GEMM.
    """
    M, K = x.shape
    args = (x, weight, bias, lora_A, lora_B, scaling, p, seed)
    if M <= ONEPASS_MAX_M and weight is not None and not traced(x):
        key = ("fwd1", m_bucket(M), weight.shape[0], K, rank_pad(lora_A.shape[0]), has_dropout(p), x.dtype, x.device)
        fused = prefer_fused(
            key, lambda: lora_forward_onepass(*args), lambda: lora_forward_onepass(*args, cublas_base=True), x.device
        )
        return lora_forward_onepass(*args, cublas_base=not fused)
    return _forward_two_pass(*args)


def qlora_linear_forward(x, qtensors, meta, bias, lora_A, lora_B, scaling, p, seed):
    """Forward over a quantized weight on 2-D x [M, K]: returns (y [M, N], S [M, r] fp32).

    qtensors: (data, absmax, code, offset, nested_absmax, nested_code) as
    `dequantize_weight` takes them; meta: (quant_type, blocksize, nested_blocksize, N, K).
    Small M (decode): the faster, as measured, of (a) `dequant_matmul` reading the
    quantized weight in its K loop, then one pass adding s·S Bᵀ, and (b) the dense
    weight dequantised into a temporary, then the dense forward. Larger M: (b).
    """
    quant_type, blocksize, nested_blocksize, n, k = meta
    M = x.shape[0]

    def dequantised():
        weight = dequantize_weight(*qtensors, quant_type, blocksize, nested_blocksize, (n, k), x.dtype)
        return lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)

    def fused():
        y = dequant_matmul(x, *qtensors, quant_type, blocksize, nested_blocksize, (n, k), bias)
        return lora_forward_onepass(x, None, None, lora_A, lora_B, scaling, p, seed, base=y)

    if M > ONEPASS_MAX_M or traced(x):
        return dequantised()
    key = ("qfwd1", quant_type, m_bucket(M), n, k, rank_pad(lora_A.shape[0]), has_dropout(p), x.dtype, x.device)
    return fused() if prefer_fused(key, fused, dequantised, x.device) else dequantised()


def lora_linear_backward(dy, x, weight, lora_A, lora_B, S, scaling, p, seed, needs):
    """Whole LoRA backward on 2-D tensors; `needs` = (dx, dA, dB) flags -> (dx, dA, dB)."""
    need_x, need_a, need_b = needs
    dS, dB = lora_backward_dsdb(dy, lora_B, S, scaling)
    dx = lora_backward_dx_auto(dy, weight, dS, lora_A, p, seed) if need_x else None
    dA = lora_backward_da(dS, x, lora_A, p, seed) if need_a else None
    return dx, dA, (dB if need_b else None)


__all__ = [
    "lora_shrink",
    "lora_forward",
    "lora_forward_fused",
    "lora_forward_unfused",
    "lora_forward_onepass",
    "lora_backward_dsdb",
    "lora_backward_dx",
    "lora_backward_dx_auto",
    "lora_backward_da",
    "lora_linear_forward",
    "lora_linear_backward",
    "qlora_linear_forward",
    "dequantize_weight",
    "dequant_matmul",
    "DeviceScalars",
]
