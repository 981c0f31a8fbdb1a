"""Persistent, TMA-descriptor fused forward GEMM (a Hopper candidate): y = x Wᵀ + s·S Bᵀ + bias.

x [M, K], weight [N, K] (nn.Linear layout), bias [N] (x's dtype), S [M, r] fp32,
lora_B [N, r] (x's dtype or fp32) -> y [M, N] in x's dtype (fp16 / bf16).

Same math and argument conventions as forward._lora_fwd_kernel, laid out the way
Hopper wants it:
- x, W and y are read / written through device-side tensor descriptors
  (`tl.make_tensor_descriptor`): TMA copies (`cp.async.bulk.tensor`) on sm_90, which
  zero-fill out-of-bounds rows and columns on load and clip them on store, so the
  K loop carries no masks. Descriptors need a contiguous last dimension and 16-byte
  aligned base and row strides (`tma_supported`), and a global scratch buffer per
  program, which Triton's launcher takes from `triton.set_allocator`.
- persistent grid: one program per SM, each walking output tiles
  start, start + NUM_SMS, ... in GROUP_M-row bands (L2 reuse of W's column tiles).
- the rank-r term seeds the accumulator (acc = s · S Bᵀ, one tl.dot with the rank
  padded to R_PAD in registers), then the K loop adds x Wᵀ, then bias; y is cast
  once and stored through its descriptor (in two column halves with EPILOGUE_SUBTILE,
  halving the epilogue's shared-memory staging buffer).
S, B and bias are small and read with masked pointer loads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import cast, check_device, common_meta, interpreting, load_scaling, mma, rank_pad, scalar_args, traced, wrap_triton
from .forward import grouped_tile
from .launch import launch

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, EPILOGUE_SUBTILE): the Hopper tile of the
# persistent tutorial's bf16 GEMM. The interpreter gets small tiles so test shapes span
# several tiles and every program walks more than one.
HOPPER_TILE = (128, 256, 64, 8, 3, True)
INTERPRET_TILE = (32, 32, 32, 4, 1, True)
INTERPRET_NUM_SMS = 4
GROUP_M = 8
_TMA_ALIGN = 16  # bytes: descriptor base address and every stride but the last
_DTYPES = (torch.float16, torch.bfloat16)


def tile_config() -> dict:
    bm, bn, bk, warps, stages, subtile = INTERPRET_TILE if interpreting() else HOPPER_TILE
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "EPILOGUE_SUBTILE": subtile,
            "num_warps": warps, "num_stages": stages}


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Programs of the persistent grid: the SM count on CUDA, a few under the interpreter."""
    if device.type != "cuda":
        return INTERPRET_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def _lora_fwd_tma_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    scaling,
    M, N, K, R,
    stride_xm, stride_wn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    dtype = y_ptr.dtype.element_ty
    scaling = load_scaling(scaling, SCALARS_IN_MEMORY)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if EPILOGUE_SUBTILE:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
    else:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    for tile_id in range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        rn = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        # Seed: acc = s · S Bᵀ (S and B rounded to x's dtype in registers, as the
        # pointer-based kernel does; rank padding masked to zero).
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=(rm < M)[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br, mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc = mma(cast(s, dtype, UPCAST), cast(b_t, dtype, UPCAST), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        acc = acc * scaling
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            x = x_desc.load([off_m, off_k])
            w = w_desc.load([off_n, off_k])
            acc = mma(x, w.T, acc, UPCAST, PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            y_desc.store([off_m, off_n], cast(left, dtype, UPCAST))
            y_desc.store([off_m, off_n + BLOCK_N // 2], cast(right, dtype, UPCAST))
        else:
            y_desc.store([off_m, off_n], cast(acc, dtype, UPCAST))


def _triton_has_descriptors() -> bool:
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def _layout_problem(name: str, t: torch.Tensor) -> str | None:
    """Why a 2-D tensor cannot back a TMA descriptor, or None when it can."""
    esize = t.element_size()
    if t.stride(1) != 1:
        return f"{name} {tuple(t.shape)} has strides {t.stride()}: TMA needs a contiguous last dimension"
    if (t.stride(0) * esize) % _TMA_ALIGN:
        return f"{name} {tuple(t.shape)} row stride {t.stride(0)} x {esize} B is not a multiple of {_TMA_ALIGN} bytes"
    if not traced(t) and t.data_ptr() % _TMA_ALIGN:
        return f"{name} base address is not {_TMA_ALIGN}-byte aligned"
    return None


def tma_supported(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """(True, "") when lora_forward_tma can take x [M, K] and weight [N, K], else (False, reason):
    Triton without tensor descriptors, a CUDA device below sm_90, a dtype other than
    fp16/bf16, or a layout TMA cannot describe (last dim not contiguous, base or row
    stride not 16-byte aligned; y [M, N] is allocated contiguous, so N · 2 bytes must
    be 16-byte aligned too)."""
    if not _triton_has_descriptors():
        return False, f"Triton {triton.__version__} lacks tl.make_tensor_descriptor / triton.set_allocator"
    if x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 9:
            return False, f"TMA needs compute capability >= 9.0, {x.device} is {major}.{minor}"
    elif not interpreting():
        return False, f"x is on {x.device}: needs CUDA (or the Triton interpreter)"
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return False, f"x {x.dtype} / weight {weight.dtype}: needs both float16 or both bfloat16"
    if x.dim() != 2 or weight.dim() != 2:
        return False, f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be 2-D"
    for name, t in (("x", x), ("weight", weight)):
        problem = _layout_problem(name, t)
        if problem:
            return False, problem
    N = weight.shape[0]
    if (N * x.element_size()) % _TMA_ALIGN:
        return False, f"y [M, {N}] row stride {N} x {x.element_size()} B is not a multiple of {_TMA_ALIGN} bytes"
    return True, ""


def _alloc_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # The descriptors' global scratch (128 B per descriptor per program), allocated by
    # Triton's launcher on the current device at each launch.
    return torch.empty(size, device="cuda", dtype=torch.int8)


def lora_forward_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
) -> torch.Tensor:
    """y = x Wᵀ + s·S Bᵀ + bias by the persistent TMA kernel.  x [M, K], weight [N, K],
    bias [N] | None, S [M, r] fp32, lora_B [N, r] -> y [M, N] in x's dtype.

    x and weight: fp16 or bf16 (the same), last dim contiguous, base and row stride
    16-byte aligned, and N · 2 bytes a multiple of 16 (y's row); `tma_supported` says
    whether a pair fits, and this raises ValueError naming the tensor otherwise, so a
    caller can skip the candidate. S, lora_B, bias: any strides. scaling: a float, or a
    DeviceScalars (common.scalar_args).

    >>> y = lora_forward_tma(x, W, None, S, B, 2.0)  # doctest: +SKIP
    """
    if x.dim() != 2 or weight.dim() != 2 or S.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_forward_tma: x {tuple(x.shape)}, weight {tuple(weight.shape)}, S {tuple(S.shape)}, "
                         f"lora_B {tuple(lora_B.shape)} must be 2-D")
    M, K = x.shape
    N, R = lora_B.shape
    if weight.shape != (N, K) or S.shape != (M, R) or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"lora_forward_tma: shapes do not agree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"S {tuple(S.shape)}, lora_B {tuple(lora_B.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        )
    check_device("x", x)
    if K == 0:  # no descriptor of a zero-width tensor: the base term is 0
        x, weight = x.new_zeros((M, 8)), weight.new_zeros((N, 8))
        K = 8
    ok, reason = tma_supported(x, weight)
    if not ok:
        raise ValueError(f"lora_forward_tma: {reason}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if x.is_cuda:
        triton.set_allocator(_alloc_scratch)  # a ContextVar in newer Triton: set on each launching thread
    cfg = tile_config()
    sms = num_sms(x.device)
    tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    grid = (min(sms, tiles),)
    scalars = scalar_args(0.0, 0, scaling)
    kernel = _lora_fwd_tma_kernel
    launch(wrap_triton(kernel, x), grid, dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, s_ptr=S, b_ptr=lora_B, y_ptr=y,
        scaling=scalars["scaling"],
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_wn=weight.stride(0),
        stride_sm=S.stride(0), stride_sr=S.stride(1),
        stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        NUM_SMS=sms, R_PAD=rank_pad(R), HAS_BIAS=bias is not None, SCALARS_IN_MEMORY=scalars["SCALARS_IN_MEMORY"],
        **cfg, **common_meta(x.dtype),
    ))
    return y
