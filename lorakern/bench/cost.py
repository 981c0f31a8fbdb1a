"""Ideal FLOPs and bytes of a (LoRA) linear, and its roofline time (DESIGN.md §1, §6).

The counts are the minimum work of the math, the same for every provider, so TFLOP/s,
GB/s and roofline fractions compare how close each implementation gets to one limit.
Elementwise work (scaling, dropout, bias) is not counted as FLOPs.

Bytes are DRAM traffic with the caches cold at the start of each call (the timers flush
them): every operand read once per pass that needs it and every result written once.
decode (inference, M <= 16) is a single pass: x, W, A, B, bias read and y written; the
rank-r intermediate x Aᵀ is M·r values that stay on chip and is not counted, so decode's
bytes are no more than any implementation must move. fwd+bwd counts W (and x for the LoRA
dA) twice, once per pass; when W fits in the last-level cache the backward's read may hit
it, so a memory-bound fwd+bwd row on a small shape could beat this count; the suites'
fwd+bwd rows (M > 16 on the presets' shapes) are compute-bound, where bytes do not count.
A/B are counted at `adapter_elem` bytes for every LoRA provider (the suites pass 4, PEFT's
fp32 adapters): in bf16 runs at most r·(K + N)·2 bytes more than a provider with bf16
adapters moves, under 2 % of W's bytes at r = 16 on the Llama-3-8B shapes.

A measured time below the roofline time (`roofline_frac` above 1) is impossible: it means a
ceiling was under-measured. `mark_impossible_rooflines` blanks such fractions (above
ROOFLINE_TOLERANCE, which leaves room for timer jitter) and notes why.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "fwd+bwd", "decode")
# A roofline fraction up to this is kept (timer jitter on a row at the ceiling); above it the
# ceiling, not the row, is wrong.
ROOFLINE_TOLERANCE = 1.05
ROOFLINE_NOTE = "above ceiling: ceiling under-measured"


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


def mark_impossible_rooflines(rows: list[dict], tolerance: float = ROOFLINE_TOLERANCE) -> int:
    """Rows whose `roofline_frac` is above `tolerance` get `roofline_frac` None and
    `roofline_note` ROOFLINE_NOTE (the measured fraction kept as `roofline_frac_measured`);
    returns how many."""
    n = 0
    for row in rows:
        frac = row.get("roofline_frac")
        if frac is not None and frac > tolerance:
            row["roofline_frac_measured"] = frac
            row["roofline_frac"] = None
            row["roofline_note"] = ROOFLINE_NOTE
            n += 1
    return n
