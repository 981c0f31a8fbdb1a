"""The fused mixed-batch op: every row through its own adapter in three launches.

    y[m] = x[m] Wᵀ + bias + s_a·(D_a(x[m]) A_aᵀ) B_aᵀ,   a = row_adapter[m] (-1: none)

Adapters come stacked and zero-padded to the largest rank (A [n, R, K], B [n, N, R]);
zero rows of A and zero columns of B add exact zeros, so ranks may differ. The base
GEMM is cuBLAS's (F.linear); `sgmv_shrink` computes S = D(x) Aᵀ per row, and
`sgmv_expand` adds s·S Bᵀ into the GEMM's output in place. The rows are grouped on the
device (`reference.segments`): nothing is read back on the host, whatever the batch.

Backward (dY = ∂L/∂y), all segmented the same way:
    dS = s·dY B    dB_a = s_a·Σ dY[m]ᵀ S[m]    dA_a = Σ dS[m]ᵀ D_a(x[m])
    dx = dY W + D(dS A)   (dW, dbias as in the single-adapter op)
The gradient of A / B is [n, ...] with zeros for an adapter no row used: callers that
stack differentiable per-adapter parameters pass only the adapters some row uses.

Dropout: one seed per call; row m, column k of x is kept by the single-adapter mask of
the whole [M, K] input with the row's adapter's p (`reference.sgmv_shrink`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakern import reference
from lorakern.op_core import SECOND_ORDER_ERROR, autocast_inputs, autocast_off, base_grads, draw_seed, rows, unrows


def _implementation(backend: str):
    from lorakern.kernels import sgmv

    return sgmv if backend == "triton" else reference


class MixedLoraFunction(torch.autograd.Function):
    """``apply(x, weight, bias, A, B, scale, inv_keep, p, seg, seed, backend)``.

    x [M, K] (2-D), weight [N, K] | None, bias [N] | None, A [n, R, K], B [n, N, R],
    scale [n] fp32 (s_a), inv_keep [n] fp32 (1/(1-p_a)), p [n] fp32 (-1 for no dropout)
    or None, seg = `reference.segments` of the rows' adapters (on x's device), seed int,
    backend "triton" | "reference". Returns y [M, N] in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, inv_keep, p, seg, seed, backend):
        impl = _implementation(backend)
        S = impl.sgmv_shrink(x, A, seg, inv_keep, p, seed)
        if weight is None:
            y = x.new_zeros((x.shape[0], B.shape[1]))
        else:
            y = F.linear(x, weight, bias)
        impl.sgmv_expand(y, S, B, seg, scale)
        ctx.save_for_backward(x, weight, A, B, S, scale, inv_keep, p, *seg)
        ctx.seed, ctx.backend = seed, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the gradients are not differentiable
            raise RuntimeError(SECOND_ORDER_ERROR)
        x, weight, A, B, S, scale, inv_keep, p, *seg = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        impl = _implementation(ctx.backend)
        dx = dW = dbias = dA = dB = None
        if need_x or need_a:
            dS = impl.sgmv_shrink(dy, B.transpose(1, 2), seg, scale)
        if need_b:
            dB = impl.sgmv_grad(dy, S, seg, scale, rank_side="right").to(B.dtype)
        if need_a:
            dA = impl.sgmv_grad(dS, x, seg, inv_keep, p, ctx.seed, rank_side="left").to(A.dtype)
        if need_x:
            dx = dy @ weight if weight is not None else dy.new_zeros(x.shape)
            impl.sgmv_expand(dx, dS, A.transpose(1, 2), seg, inv_keep, p, ctx.seed)
        if need_w or need_bias:
            dW, dbias = base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_bias)
        return dx, dW, dbias, dA, dB, None, None, None, None, None, None


def stack_adapters(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter A_i [r_i, K], B_i [N, r_i] -> A [n, R, K], B [n, N, R], zero-padded to
    R = max r_i, in the adapters' promoted dtype. Differentiable (the gradient of each
    A_i / B_i is its slice)."""
    R = max(a.shape[0] for a in lora_As)
    dtype = lora_As[0].dtype
    for t in (*lora_As, *lora_Bs):
        dtype = torch.promote_types(dtype, t.dtype)
    A = torch.stack([F.pad(a.to(dtype), (0, 0, 0, R - a.shape[0])) for a in lora_As])
    B = torch.stack([F.pad(b.to(dtype), (0, R - b.shape[1])) for b in lora_Bs])
    return A, B


def scalar_vectors(scalings: Sequence[float], dropout_ps: Sequence[float], device) -> tuple:
    """(scale, inv_keep, p | None) as the op takes them, on `device` (fp32, as the
    single-adapter kernels take scalars by value). p is None when no adapter drops."""
    ps = [float(q) for q in dropout_ps]
    scale = torch.tensor([float(s) for s in scalings], dtype=torch.float32)
    inv_keep = torch.tensor([1.0 / (1.0 - q) for q in ps], dtype=torch.float32)
    p = torch.tensor([q if q > 0.0 else -1.0 for q in ps], dtype=torch.float32) if any(q > 0.0 for q in ps) else None
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return move(scale), move(inv_keep), move(p)


def token_segments(row_adapter: torch.Tensor, x_shape: torch.Size, n: int) -> tuple:
    """`reference.segments` of the rows of x's 2-D view [Bt·T, K] (T = the product of x's
    middle dims), each taking its batch row's adapter: row_adapter [Bt] int64 in [-1, n)."""
    tokens = math.prod(x_shape[1:-1])
    per_row = row_adapter if tokens == 1 else row_adapter.repeat_interleave(tokens)
    return reference.segments(per_row, n)


def lora_linear_segmented(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    vectors: tuple,
    seg: tuple,
    *,
    backend: str,
    seed: int | None = None,
) -> torch.Tensor:
    """The fused mixed batch on x [Bt, ..., K] (row = dim 0): each row of x's 2-D view
    through its adapter of the stacks A [n, R, K], B [n, N, R] (none: base alone).

    vectors: `scalar_vectors(...)` on x's device; seg: `token_segments(...)` (adapter
    indices checked by the caller). Under autocast x, weight and bias are cast as F.linear
    casts them, the stacks keep fp32 or are cast. Returns [Bt, ..., N].
    """
    scale, inv_keep, p = vectors
    if seed is None:
        seed = draw_seed() if p is not None else 0
    x, weight, bias, A, B = autocast_inputs(x, weight, bias, A, B)
    with autocast_off(x):
        y = MixedLoraFunction.apply(rows(x), weight, bias, A, B, scale, inv_keep, p, seg, seed, backend)
    return unrows(y, x)


__all__ = ["MixedLoraFunction", "lora_linear_segmented", "scalar_vectors", "stack_adapters", "token_segments"]
