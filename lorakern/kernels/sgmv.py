"""Segmented LoRA kernels for mixed batches: each row of x has its own adapter (SGMV).

Adapters are stacked, padded with zeros to the largest rank R: A [n, R, K],
B [n, N, R] (any strides). Rows are grouped on the device, without a host sync
(`lorakern.reference.segments`): `order` [M] lists the row indices sorted by adapter,
adapter a owns order[starts[a] : starts[a] + counts[a]]; rows with no adapter are in
no segment. The grid's second axis is the adapter, its first the row blocks (and
column blocks) of the largest possible segment; a program past its segment's end
returns at once, so the grid never depends on the counts the host does not read.

Three kernels give the whole forward and backward (ops in lorakern/mixed_op.py):
- `sgmv_shrink`: out[m] = scale[a]·D_a(x[m]) W_aᵀ       (S; dS with W = Bᵀ, no dropout)
- `sgmv_expand`: out[m] += scale[a]·D_a(S[m] W_aᵀ)      (y += s·S Bᵀ; dx += D(dS A))
- `sgmv_grad`:   out[a] = scale[a]·Σ_m L[m]ᵀ D_a(R[m])  (dB = s·dYᵀS; dA = dSᵀ D(x))
with m over adapter a's rows. Dropout D_a keeps element (m, k) by the same Philox map as
the single-adapter kernels (`keep_mask`, global row m), with adapter a's probability
(p[a] = -1 keeps everything). Accumulation is fp32; products run in the activations'
dtype, as in the single-adapter kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast, cdiv, check_device, common_meta, drop, interpreting, keep_mask, mma, rank_pad, wrap_triton
from .launch import launch


def _block_m(M: int) -> int:
    # tl.dot needs 16 rows; decode segments are a few rows, prefill ones hundreds.
    if interpreting():
        return 16
    return 16 if M <= 256 else 64


@triton.jit
def _segment(order_ptr, start_ptr, count_ptr, a, m0, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of adapter a's segment: (row indices int64, valid mask)."""
    count = tl.load(count_ptr + a)
    start = tl.load(start_ptr + a)
    offs = m0 + tl.arange(0, BLOCK_M)
    valid = offs < count
    rows = tl.load(order_ptr + start + offs, mask=valid, other=0).to(tl.int64)
    return rows, valid


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, w_ptr, out_ptr, order_ptr, start_ptr, count_ptr, scale_ptr, p_ptr, seed,
    K, R,
    stride_xm, stride_xk,
    stride_wa, stride_wr, stride_wk,
    stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    a = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(count_ptr + a):
        rows, valid = _segment(order_ptr, start_ptr, count_ptr, a, pid_m * BLOCK_M, BLOCK_M)
        rr = tl.arange(0, R_PAD)
        w_base = w_ptr + a.to(tl.int64) * stride_wa
        if HAS_DROPOUT:
            p = tl.load(p_ptr + a)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=valid[:, None] & (rk[None, :] < K), other=0.0,
            )
            if HAS_DROPOUT:
                x = drop(x, keep_mask(seed, rows, k0, K, p, BLOCK_K))
            w_t = tl.load(
                w_base + rr[None, :] * stride_wr + rk[:, None] * stride_wk,
                mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0,
            )
            acc = mma(x, cast(w_t, x.dtype, UPCAST), acc, UPCAST, PRECISION)
        acc = acc * tl.load(scale_ptr + a)
        tl.store(
            out_ptr + rows[:, None] * stride_om + rr[None, :] * stride_or, acc,
            mask=valid[:, None] & (rr[None, :] < R),
        )


@triton.jit
def _sgmv_expand_kernel(
    out_ptr, s_ptr, w_ptr, order_ptr, start_ptr, count_ptr, scale_ptr, p_ptr, seed,
    N, R,
    stride_om, stride_on,
    stride_sm, stride_sr,
    stride_wa, stride_wn, stride_wr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    a = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    if pid_m * BLOCK_M < tl.load(count_ptr + a):
        rows, valid = _segment(order_ptr, start_ptr, count_ptr, a, pid_m * BLOCK_M, BLOCK_M)
        rr = tl.arange(0, R_PAD)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        o_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
        o_mask = valid[:, None] & (rn[None, :] < N)
        out = tl.load(o_ptrs, mask=o_mask, other=0.0)
        S = tl.load(
            s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
            mask=valid[:, None] & (rr[None, :] < R), other=0.0,
        )
        w_t = tl.load(
            w_ptr + a.to(tl.int64) * stride_wa + rr[:, None] * stride_wr + rn[None, :] * stride_wn,
            mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0,
        )
        # S and W enter the dot in the output's dtype, as the single-adapter epilogue does
        acc = mma(cast(S, out.dtype, UPCAST), cast(w_t, out.dtype, UPCAST),
                  tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_DROPOUT:
            acc = drop(acc, keep_mask(seed, rows, pid_n * BLOCK_N, N, tl.load(p_ptr + a), BLOCK_N))
        acc = acc * tl.load(scale_ptr + a)
        tl.store(o_ptrs, cast(out.to(tl.float32) + acc, out.dtype, UPCAST), mask=o_mask)


@triton.jit
def _sgmv_grad_kernel(
    l_ptr, r_ptr, out_ptr, order_ptr, start_ptr, count_ptr, scale_ptr, p_ptr, seed,
    P, Q,
    stride_lm, stride_lp,
    stride_rm, stride_rq,
    stride_oa, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    a = tl.program_id(1)
    q_tiles = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid // q_tiles
    pid_q = pid % q_tiles
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    count = tl.load(count_ptr + a)
    if HAS_DROPOUT:
        p = tl.load(p_ptr + a)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        rows, valid = _segment(order_ptr, start_ptr, count_ptr, a, m0, BLOCK_M)
        left = tl.load(
            l_ptr + rows[:, None] * stride_lm + rp[None, :] * stride_lp,
            mask=valid[:, None] & (rp[None, :] < P), other=0.0,
        )
        right = tl.load(
            r_ptr + rows[:, None] * stride_rm + rq[None, :] * stride_rq,
            mask=valid[:, None] & (rq[None, :] < Q), other=0.0,
        )
        if HAS_DROPOUT:
            right = drop(right, keep_mask(seed, rows, pid_q * BLOCK_Q, Q, p, BLOCK_Q))
        # the fp32 operand (S or dS) is cast to the activations' dtype, as in the reference
        if left.dtype == tl.float32:
            left = cast(left, right.dtype, UPCAST)
        else:
            right = cast(right, left.dtype, UPCAST)
        acc = mma(tl.trans(left), right, acc, UPCAST, PRECISION)
    acc = acc * tl.load(scale_ptr + a)
    tl.store(
        out_ptr + a.to(tl.int64) * stride_oa + rp[:, None] * stride_op + rq[None, :] * stride_oq, acc,
        mask=(rp[:, None] < P) & (rq[None, :] < Q),
    )


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    check_device(name, t)


def _dropout_args(p: torch.Tensor | None, seed: int, scale: torch.Tensor) -> dict:
    # without dropout the p pointer is never read: scale stands in (as the other kernels
    # pass x for an absent bias), so every launch binds the same argument types
    return {"p_ptr": scale if p is None else p, "seed": seed, "HAS_DROPOUT": p is not None}


def sgmv_shrink(x, weights, seg, scale, p=None, seed=0) -> torch.Tensor:
    """out[m] = scale[a]·D_a(x[m]) W_aᵀ for each row m of adapter a; other rows 0.

    x [M, K]; weights [n, R, K] (any strides; x's dtype or fp32, cast to x's dtype);
    seg = (order [M], starts [n], counts [n]) int64 (`reference.segments`);
    scale [n] fp32; p [n] fp32 or None (no dropout), -1 for an adapter without;
    seed: int. Returns out [M, R] float32.
    """
    _check("x", x, 2)
    _check("weights", weights, 3)
    order, starts, counts = seg
    M, K = x.shape
    n, R, K_w = weights.shape
    if K_w != K:
        raise ValueError(f"sgmv_shrink: x {tuple(x.shape)} and weights {tuple(weights.shape)} disagree on K")
    out = torch.zeros((M, R), device=x.device, dtype=torch.float32)
    if M == 0 or n == 0 or R == 0:
        return out
    block_m = _block_m(M)
    cfg = {"BLOCK_M": block_m, "BLOCK_K": 64 if interpreting() or K < 128 else 128, "num_warps": 4}
    launch(wrap_triton(_sgmv_shrink_kernel, x), (cdiv(M, block_m), n), dict(
        x_ptr=x, w_ptr=weights, out_ptr=out, order_ptr=order, start_ptr=starts, count_ptr=counts, scale_ptr=scale,
        K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wa=weights.stride(0), stride_wr=weights.stride(1), stride_wk=weights.stride(2),
        stride_om=out.stride(0), stride_or=out.stride(1),
        R_PAD=rank_pad(R), **_dropout_args(p, seed, scale), **cfg, **common_meta(x.dtype),
    ))
    return out


def sgmv_expand(out, S, weights, seg, scale, p=None, seed=0) -> torch.Tensor:
    """out[m] += scale[a]·D_a(S[m] W_aᵀ) in place, for each row m of adapter a.

    out [M, N] (activations' dtype); S [M, R] fp32; weights [n, N, R] (any strides);
    seg, scale, p, seed as `sgmv_shrink` (the mask is over out's [M, N] elements).
    Returns out.
    """
    _check("out", out, 2)
    _check("S", S, 2)
    _check("weights", weights, 3)
    order, starts, counts = seg
    M, N = out.shape
    n, N_w, R = weights.shape
    if N_w != N or S.shape != (M, R):
        raise ValueError(
            f"sgmv_expand: out {tuple(out.shape)}, S {tuple(S.shape)} and weights {tuple(weights.shape)} disagree"
        )
    if M == 0 or N == 0 or n == 0 or R == 0:
        return out
    block_m = _block_m(M)
    block_n = 32 if interpreting() else 128
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}
    launch(wrap_triton(_sgmv_expand_kernel, out), (cdiv(M, block_m) * cdiv(N, block_n), n), dict(
        out_ptr=out, s_ptr=S, w_ptr=weights, order_ptr=order, start_ptr=starts, count_ptr=counts, scale_ptr=scale,
        N=N, R=R,
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_sm=S.stride(0), stride_sr=S.stride(1),
        stride_wa=weights.stride(0), stride_wn=weights.stride(1), stride_wr=weights.stride(2),
        R_PAD=rank_pad(R), **_dropout_args(p, seed, scale), **cfg, **common_meta(out.dtype),
    ))
    return out


def sgmv_grad(left, right, seg, scale, p=None, seed=0, *, rank_side: str) -> torch.Tensor:
    """out[a] = scale[a]·Σ_m left[m]ᵀ D_a(right[m]) over adapter a's rows m.

    left [M, P], right [M, Q]: one of them fp32 (S or dS; cast to the other's dtype for
    the product), the other the activations. rank_side "right" (dB: left = dY [M, N],
    right = S [M, R]) or "left" (dA: left = dS [M, R], right = x [M, K]) says which
    dimension is the rank (one block, padded). The mask (p, seed as `sgmv_shrink`) is
    over right's [M, Q] elements. Returns out [n, P, Q] float32 (zeros for an adapter
    without rows).
    """
    _check("left", left, 2)
    _check("right", right, 2)
    order, starts, counts = seg
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"sgmv_grad: left {tuple(left.shape)} and right {tuple(right.shape)} disagree on M")
    M, P = left.shape
    Q = right.shape[1]
    n = counts.shape[0]
    out = torch.zeros((n, P, Q), device=left.device, dtype=torch.float32)
    if M == 0 or n == 0 or P == 0 or Q == 0:
        return out
    wide = 32 if interpreting() else 64
    if rank_side == "right":
        block_p, block_q = wide, rank_pad(Q)
    elif rank_side == "left":
        block_p, block_q = rank_pad(P), wide
    else:
        raise ValueError(f"rank_side must be 'left' or 'right', got {rank_side!r}")
    act = right if left.dtype == torch.float32 else left
    cfg = {"BLOCK_M": _block_m(M) if interpreting() else 32, "BLOCK_P": block_p, "BLOCK_Q": block_q, "num_warps": 4}
    launch(wrap_triton(_sgmv_grad_kernel, left), (cdiv(P, block_p) * cdiv(Q, block_q), n), dict(
        l_ptr=left, r_ptr=right, out_ptr=out, order_ptr=order, start_ptr=starts, count_ptr=counts, scale_ptr=scale,
        P=P, Q=Q,
        stride_lm=left.stride(0), stride_lp=left.stride(1),
        stride_rm=right.stride(0), stride_rq=right.stride(1),
        stride_oa=out.stride(0), stride_op=out.stride(1), stride_oq=out.stride(2),
        **_dropout_args(p, seed, scale), **cfg, **common_meta(act.dtype),
    ))
    return out
