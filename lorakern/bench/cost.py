"""Ideal FLOPs and bytes of a (LoRA) linear, and its roofline time (DESIGN.md §1, §6).

The counts are the minimum work of the math, the same for every provider, so TFLOP/s,
GB/s and roofline fractions compare how close each implementation gets to one limit.
Elementwise work (scaling, dropout, bias) is not counted as FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "fwd+bwd", "decode")


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def roofline_ms(self, tflops: float, gbps: float) -> float:
        """The time the card's ceilings allow: max(compute time, memory time), in ms."""
        return max(self.flops / (tflops * 1e12), self.bytes / (gbps * 1e9)) * 1e3


def linear_cost(
    mode: str, M: int, K: int, N: int, r: int, elem: int, adapter_elem: int, bias: bool, lora: bool
) -> Cost:
    """FLOPs and bytes of x [M, K] -> y [M, N] with W [N, K] frozen, plus a rank-r adapter if `lora`.

    fwd / decode: y = x Wᵀ (+ s·(x Aᵀ) Bᵀ) (+ bias).
    fwd+bwd: the forward, then dx = dY W (+ dS A), and for LoRA dS, dB, dA (W frozen).
    elem: bytes per activation/weight element; adapter_elem: bytes per A/B element.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base_flops = 2.0 * M * N * K
    lora_flops = 2.0 * M * r * (K + N)  # shrink (M·r·K) + expand (M·N·r)
    x_b, y_b, w_b = M * K * elem, M * N * elem, N * K * elem
    ab_b = r * (K + N) * adapter_elem if lora else 0
    bias_b = N * elem if bias else 0
    s_b = M * r * 4 if lora else 0  # fp32 S, written forward and read backward
    flops = base_flops + (lora_flops if lora else 0)
    nbytes = x_b + w_b + y_b + ab_b + bias_b
    if mode == "fwd+bwd":
        # dx = dY W: read dY, W, write dx. LoRA: dS, dB from dY and S; dA from dS and x.
        flops += base_flops + (2 * lora_flops if lora else 0)
        nbytes += y_b + w_b + x_b  # dY, W, dx
        if lora:
            nbytes += x_b + 2 * s_b + 2 * ab_b  # x again for dA; S out and in; dA, dB out + A, B in
    return Cost(flops, nbytes)
