"""Triton kernels of the fused LoRA linear, and their launchers (no autograd here).

Each launcher has the signature and math of the function of the same name in
`lorakern.reference`, which is its oracle; the quantized-weight launchers'
(`dequantize_weight`, `dequant_matmul`) oracle is `lorakern.quant.dequantize_weight`.
This module only re-exports: the kernels live in forward / backward / shrink / merge /
tma / sgmv / dequant / qgemm, the choice between variants and the whole forward / backward in
dispatch.
"""

from __future__ import annotations

from .backward import lora_backward_da, lora_backward_dsdb, lora_backward_dx
from .common import DeviceScalars, has_dropout, rank_pad, traced
from .dequant import dequantize_weight
from .dispatch import (
    DISPATCH, ONEPASS_MAX_M, lora_backward_dx_auto, lora_forward, lora_linear_backward, lora_linear_forward,
    qlora_linear_forward,
)
from .forward import lora_forward_fused, lora_forward_onepass, lora_forward_unfused, m_bucket
from .merge import lora_backward_dx_merged, lora_forward_merged, lora_merged_weight
from .qgemm import dequant_matmul
from .shrink import lora_shrink
from .tma import lora_forward_tma, tma_supported

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
    "lora_merged_weight",
    "lora_forward_merged",
    "lora_backward_dx_merged",
    "lora_forward_tma",
    "tma_supported",
    "lora_linear_forward",
    "lora_linear_backward",
    "qlora_linear_forward",
    "dequantize_weight",
    "dequant_matmul",
    "DeviceScalars",
    "DISPATCH",
    "ONEPASS_MAX_M",
    "has_dropout",
    "rank_pad",
    "traced",
    "m_bucket",
]
