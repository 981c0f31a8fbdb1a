"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on the fused op, PEFT's `use_dora` semantics.

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row          (m: a trainable [out] magnitude)
    y  = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias,   g = m / ‖W + s·B A‖_row (the norm detached)

With dropout in training, PEFT applies the dropout to the DoRA part's input as well:
    y = x Wᵀ + bias + (g − 1) ⊙ D(x) Wᵀ + g ⊙ s·(D(x) Aᵀ) Bᵀ.

PEFT materialises W + s·B A (an N×K matrix) every forward to take its row norms. They
need far less: with W fixed,
    ‖W_n + s·(BA)_n‖² = ‖W_n‖² + 2s·(W Aᵀ)_n · B_n + s²·B_n (A Aᵀ) B_nᵀ,
so a step costs one N×r product W Aᵀ (one read of W) plus r-sized work; ‖W_n‖² is cached
per weight version. The norm is a constant for autograd (the paper's §4.3, PEFT's
`.detach()`); m gets its gradient through g.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class DoraMagnitude(nn.Module):
    """One adapter's magnitude vector m [out_features], PEFT's `lora_magnitude_vector.<name>`
    (state-dict key `lora_magnitude_vector.<name>.weight`, file key `…lora_magnitude_vector`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W_n‖² for each row of weight [N, K] (any strides), in fp32 (fp64 for fp64)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=_acc_dtype(weight.dtype)).square()


def weight_key(weight: torch.Tensor) -> tuple:
    """What identifies a tensor's values for a cache: storage, version, dtype, shape."""
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


def cached_row_sq_norms(owner: nn.Module, key: tuple, dense: Callable[[], torch.Tensor]) -> torch.Tensor:
    """row_sq_norms(dense()) of a frozen base weight, kept on `owner` (the layer) and
    recomputed only when `key` changes (`weight_key` of the weight, or of a quantized
    weight's tensors: merge, load, a cast); `dense` runs only then."""
    cached = owner.__dict__.get("_dora_row_sq_norms")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_dora_row_sq_norms"] = (key, row_sq_norms(dense()))
    return cached[1]


@torch.no_grad()
def weight_norm(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                w_sq: torch.Tensor | None = None, wa: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B A‖ per row [N] without forming the N×K sum.

    weight [N, K], lora_A [r, K], lora_B [N, r]; w_sq: row_sq_norms(weight) if known; wa:
    W Aᵀ [N, r] if known (a quantized W gives it through its dequantising GEMM: then weight
    may be None). Computed in fp32 (fp64 for an fp64 weight); detached.
    """
    acc = _acc_dtype(w_sq.dtype if weight is None else weight.dtype)
    if w_sq is None:
        w_sq = row_sq_norms(weight)
    A, B = lora_A.to(acc), lora_B.to(acc)
    if wa is None:
        wa = weight @ lora_A.to(weight.dtype).t()  # [N, r]: the one read of W
    cross = (wa.to(acc) * B).sum(1)
    ba = ((B @ (A @ A.t())) * B).sum(1)
    return (w_sq + 2.0 * scaling * cross + scaling * scaling * ba).clamp_min(0.0).sqrt()


def dora_forward(lora_linear_fn, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                 magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """y [..., N] for one DoRA adapter (module docstring); x [..., K] in the compute dtype.

    lora_linear_fn: lorakern's lora_linear (bound to a backend). The result is computed in
    fp32 (magnitude / norm is fp32, as in PEFT) and returned in x's dtype.
    """
    g = magnitude / norm.to(magnitude.dtype)  # [N], differentiable in m only
    if dropout_p == 0.0:
        z = lora_linear_fn(x, weight, None, lora_A, lora_B, scaling)
        y = z * g if bias is None else torch.addcmul(bias.to(g.dtype), z, g)
        return y.to(x.dtype)
    # Training with dropout: PEFT's form (its dropped input also enters the base part).
    x_d = F.dropout(x, dropout_p, training=True)
    base_d = F.linear(x_d, weight)
    lora = lora_linear_fn(x_d, None, None, lora_A, lora_B, scaling)
    y = F.linear(x, weight, bias) + (g - 1.0) * base_d + g * lora
    return y.to(x.dtype)


@torch.no_grad()
def merge_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖ as a column [N, 1] in fp32 (fp64): W' = factor · (W + ΔW)."""
    acc = _acc_dtype(norm.dtype)
    return (magnitude.to(acc) / norm.to(acc)).view(-1, 1)
