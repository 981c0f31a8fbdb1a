"""Fused dequantise-GEMM for small M (decode): y = x · dequant(W)ᵀ (+ bias), W never dense.

x [M, K] (fp32 / fp16 / bf16, any strides), a quantized weight in lorakern.quant's
formats (kernels/dequant.py's docstring spells them out), bias [N] -> y [M, N] in x's
dtype. Each [BLOCK_N, BLOCK_K] weight tile is dequantised in registers exactly as
`lorakern.quant.dequantize_weight(qw, x.dtype)` does (code[q] · absmax in fp32, rounded
to x's dtype), then multiplied on tensor cores with fp32 accumulation, so the result is
"dequantise, then matmul" up to the order of accumulation.

Why: at M <= 16 a GEMM is bound by reading W; 4-bit W is a quarter of bf16's bytes.
At large M the dequantisation is recomputed for every 16 rows and the kernel loses to
dequantise-once + cuBLAS (DESIGN.md §7), so callers use it for M <= 64.
Few output tiles at decode (N / BLOCK_N programs) would leave most SMs idle, so K may be
split: each split writes fp32 partials, summed (+ bias, cast) by PyTorch afterwards.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import settings
from .common import cast, cdiv, check_device, common_meta, interpreting, mma, wrap_triton
from .launch import launch

QUANT_TYPES = ("nf4", "fp4", "int8")
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_M = 16  # decode: an M = 16 call wastes no rows; larger M takes more row tiles
# (BLOCK_N, BLOCK_K, warps, stages); the first is the one used with LORAKERN_AUTOTUNE=0.
QGEMM_TILES = [(64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4), (32, 256, 4, 3)]
# Each split's K range is a multiple of this, so of every BLOCK_K: only the last split
# reaches past K (masked).
K_SPLIT_ALIGN = 256
MIN_K_PER_SPLIT = 1024
MAX_SPLIT_K = 16


def qgemm_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    tiles = QGEMM_TILES if settings.autotune else QGEMM_TILES[:1]
    return [triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in tiles]


@triton.jit
def _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of the (flat) blocks `block`; double-quantised: code · nested + offset,
    two roundings as in the reference (the launch turns fp fusion off)."""
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + qa, mask=mask, other=0.0) * nested + offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _lookup(table, index, ROWS: tl.constexpr, COLS: tl.constexpr):
    """table[index] for a 1-D register tensor `table` and index [ROWS, COLS]: a gather
    through shared memory on the GPU, not a global load that the software pipeliner
    would stage into shared memory element by element."""
    return tl.reshape(tl.gather(table, tl.reshape(index.to(tl.int32), (ROWS * COLS,)), 0), (ROWS, COLS))


@triton.jit
def _dequant_4bit_tile(
    data_ptr, code, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    rn, n_ok, k0, K, K_BYTES,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
):
    """fp32 values [BLOCK_N, BLOCK_K] of rows rn, columns k0 + [0, BLOCK_K) (rn int64; out
    of range elements hold finite garbage, the caller masks them). code: the fp32 [16]
    code book in registers."""
    rk = k0 + tl.arange(0, BLOCK_K)
    row_start = rn * K  # flat index of (n, 0)
    if EVEN_K:
        # Rows start on a byte: load BLOCK_K / 2 contiguous bytes per row (K_BYTES = K / 2
        # a row; a separate argument so the JIT's divisibility hints vectorise the load),
        # unpack (high, low).
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(data_ptr + rn[:, None] * K_BYTES + rb[None, :], mask=n_ok[:, None] & (rb < K_BYTES)[None, :], other=0)
        q = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K))
    else:
        # Odd K: element (n, k) is nibble (n·K + k) % 2 of byte (n·K + k) // 2.
        flat = row_start[:, None] + rk[None, :]
        packed = tl.load(data_ptr + flat // 2, mask=n_ok[:, None] & (rk < K)[None, :], other=0)
        q = tl.where((flat % 2) == 0, packed >> 4, packed & 0xF)
    value = _lookup(code, q, BLOCK_N, BLOCK_K)
    if ROW_ALIGNED and BLOCKSIZE % BLOCK_K == 0:
        # The tile's columns lie in one absmax block per row.
        block = (row_start + k0) // BLOCKSIZE
        absmax = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, n_ok,
                               NESTED_BLOCKSIZE, DOUBLE_QUANT)
        w = value * absmax[:, None]
    elif ROW_ALIGNED and BLOCK_K % BLOCKSIZE == 0:
        # BLOCK_K / BLOCKSIZE whole blocks per row.
        G: tl.constexpr = BLOCK_K // BLOCKSIZE
        g = tl.arange(0, G)
        block = (row_start[:, None] + k0) // BLOCKSIZE + g[None, :]
        mask = n_ok[:, None] & (k0 + g * BLOCKSIZE < K)[None, :]
        absmax = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                               NESTED_BLOCKSIZE, DOUBLE_QUANT)
        w = tl.reshape(tl.reshape(value, (BLOCK_N, G, BLOCKSIZE)) * absmax[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        # Blocks straddle rows. A row's BLOCK_K columns lie in at most SPAN consecutive
        # blocks (a power of two: BLOCKSIZE is one): load those, pick each element's.
        SPAN: tl.constexpr = 2 * ((BLOCK_K + BLOCKSIZE - 1) // BLOCKSIZE)
        start = row_start + k0
        block = (start // BLOCKSIZE)[:, None] + tl.arange(0, SPAN)[None, :]
        mask = n_ok[:, None] & (block * BLOCKSIZE < (row_start + K)[:, None])  # blocks of row n only
        absmax = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                               NESTED_BLOCKSIZE, DOUBLE_QUANT)
        pick = tl.arange(0, BLOCK_N)[:, None] * SPAN + ((start % BLOCKSIZE)[:, None] + tl.arange(0, BLOCK_K)[None, :]) // BLOCKSIZE
        w = value * _lookup(tl.reshape(absmax, (BLOCK_N * SPAN,)), pick, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _lora_qgemm_kernel(
    x_ptr, data_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, bias_ptr, y_ptr,
    M, N, K, K_BYTES, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_dn, stride_dk,
    stride_ys, stride_ym, stride_yn,
    stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INT8: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Axis 0: output tiles, columns fastest (programs in flight share the x rows);
    # axis 1: K splits. PARTIAL: y is the fp32 [splits, M, N] partial buffer (no bias).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    k_lo = tl.program_id(1) * K_PER_SPLIT
    k_hi = min(K, k_lo + K_PER_SPLIT)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    offset = 0.0
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)
    if not INT8:
        code = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        if INT8:
            q = tl.load(data_ptr + rn[:, None] * stride_dn + rk[None, :] * stride_dk, mask=w_ok, other=0)
            scale = tl.load(absmax_ptr + rn, mask=n_ok, other=0.0)
            # bitsandbytes' int8_vectorwise_dequant: (q · absmax) · (1/127), that order.
            w = (q.to(tl.float32) * scale[:, None]) * 7.874015718698502e-3
        else:
            w = _dequant_4bit_tile(
                data_ptr, code, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, n_ok, k0, K, K_BYTES,
                BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ROW_ALIGNED,
            )
        w = cast(tl.where(w_ok, w, 0.0), x.dtype, UPCAST)  # the reference's rounding to x's dtype
        acc = mma(x, tl.trans(w), acc, UPCAST, PRECISION)
    y_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + tl.program_id(1).to(tl.int64) * stride_ys + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    if PARTIAL:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=y_mask)


# Timing candidates is harmless: every variant overwrites its output.
_lora_qgemm_kernel_tuned = triton.autotune(configs=qgemm_configs(), key=["N", "K", "K_PER_SPLIT"])(_lora_qgemm_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Splits of K so that about two programs run per SM (1 in the interpreter / on CPU).
    A guess until measured: K is split only in ranges of at least MIN_K_PER_SPLIT."""
    if device.type != "cuda":
        return 1
    tiles = cdiv(N, 128) * cdiv(M, BLOCK_M)
    want = cdiv(2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), tiles)
    return max(1, min(want, K // MIN_K_PER_SPLIT, MAX_SPLIT_K))


def _expect(name: str, t, dtype: torch.dtype, numel: int, device: torch.device, what: str) -> None:
    """t is a contiguous `dtype` tensor of `numel` elements on `device` (1-D unless numel is 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dequant_matmul: {what} needs {name} ({dtype}, {numel} elements), got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"dequant_matmul: {what} expects {name} of dtype {dtype}, got {t.dtype}")
    if t.numel() != numel or t.dim() > 1 or not t.is_contiguous():
        raise ValueError(f"dequant_matmul: {what} expects {name} 1-D contiguous with {numel} elements, "
                         f"got shape {tuple(t.shape)} stride {t.stride()}")
    if t.device != device:
        raise ValueError(f"dequant_matmul: {name} is on {t.device}, x on {device}")


def _check_inputs(x, data, absmax, code, offset, nested_absmax, nested_code, quant_type, blocksize,
                  nested_blocksize, shape, bias) -> bool:
    """Raise on anything the kernel cannot read; returns whether absmax is double-quantised."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"dequant_matmul: x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"dequant_matmul: x must be float32, float16 or bfloat16, got {x.dtype}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"dequant_matmul: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if len(shape) != 2 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"dequant_matmul: shape must be (N, K) of non-negative ints, got {shape}")
    N, K = shape
    if x.shape[1] != K:
        raise ValueError(f"dequant_matmul: x {tuple(x.shape)} and the weight {(N, K)} disagree on K")
    check_device("x", x)
    device = x.device
    if not isinstance(data, torch.Tensor) or data.device != device:
        raise ValueError(f"dequant_matmul: data must be a tensor on x's device {device}, got "
                         f"{getattr(data, 'device', type(data).__name__)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype or bias.device != device):
        raise ValueError(f"dequant_matmul: bias must be [N] = [{N}] of x's dtype {x.dtype} on {device}, "
                         f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if quant_type == "int8":
        if data.dtype != torch.int8:
            raise TypeError(f"dequant_matmul: int8 expects data of dtype torch.int8, got {data.dtype}")
        if tuple(data.shape) != (N, K):
            raise ValueError(f"dequant_matmul: int8 expects data [N, K] = {(N, K)}, got {tuple(data.shape)}")
        _expect("absmax", absmax, torch.float32, N, device, "int8")
        if any(t is not None for t in (code, offset, nested_absmax, nested_code)):
            raise ValueError("dequant_matmul: int8 takes no code, offset, nested_absmax or nested_code")
        return False
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"dequant_matmul: blocksize must be a power of two (as bitsandbytes' are), got {blocksize!r}")
    if data.dtype != torch.uint8:
        raise TypeError(f"dequant_matmul: {quant_type} expects data of dtype torch.uint8, got {data.dtype}")
    n_bytes = cdiv(N * K, 2)
    if data.numel() != n_bytes or data.dim() > 2 or not data.is_contiguous():
        raise ValueError(f"dequant_matmul: {quant_type} of shape {(N, K)} expects contiguous data [{n_bytes}, 1], "
                         f"got shape {tuple(data.shape)} stride {data.stride()}")
    _expect("code", code, torch.float32, 16, device, quant_type)
    blocks = cdiv(N * K, blocksize)
    double_quant = any(t is not None for t in (offset, nested_absmax, nested_code))
    if double_quant:
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise ValueError(f"dequant_matmul: nested_blocksize must be a positive int, got {nested_blocksize!r}")
        what = f"{quant_type} with double quantisation"
        _expect("absmax", absmax, torch.uint8, blocks, device, what)
        _expect("nested_code", nested_code, torch.float32, 256, device, what)
        _expect("nested_absmax", nested_absmax, torch.float32, cdiv(blocks, nested_blocksize), device, what)
        _expect("offset", offset, torch.float32, 1, device, what)
    else:
        _expect("absmax", absmax, torch.float32, blocks, device, f"{quant_type} at blocksize {blocksize}")
    return double_quant


def dequant_matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """y = x · dequant(W)ᵀ (+ bias) [M, N] in x's dtype, W read in its quantized form.

    x: [M, K] float32 / float16 / bfloat16, any strides. shape = (N, K). The weight
    tensors as kernels.dequant.dequantize_weight takes them (None where a format has
    none): "nf4" / "fp4": data uint8 [ceil(N·K/2), 1], code fp32 [16], absmax fp32
    [ceil(N·K/blocksize)], or uint8 with offset fp32 (0-d), nested_absmax fp32
    [ceil(blocks/nested_blocksize)], nested_code fp32 [256] (double quantisation);
    "int8": data int8 [N, K] (any strides), absmax fp32 [N]. bias: [N] in x's dtype.
    splits: how many K ranges run in parallel (None: `split_k`'s guess).

    Equal to `x @ lorakern.quant.dequantize_weight(qw, x.dtype).T (+ bias)` up to the
    order of fp32 accumulation. Meant for decode (M <= 64); any M is computed.

    Example (on CPU tensors with TRITON_INTERPRET=1, or CUDA ones):
        >>> from lorakern.quant import quantize_weight
        >>> qw = quantize_weight(torch.randn(64, 128), "nf4", blocksize=64)
        >>> x = torch.randn(4, 128)
        >>> dequant_matmul(x, qw.data, qw.absmax, qw.code, None, None, None, "nf4", 64, 256, qw.shape).shape
        torch.Size([4, 64])
    """
    double_quant = _check_inputs(x, data, absmax, code, offset, nested_absmax, nested_code, quant_type, blocksize,
                                 nested_blocksize, shape, bias)
    M, (N, K) = x.shape[0], shape
    if M == 0 or N == 0:
        return torch.empty((M, N), device=x.device, dtype=x.dtype)
    if K == 0:
        y = torch.zeros((M, N), device=x.device, dtype=x.dtype)
        return y + bias if bias is not None else y
    if splits is None:
        splits = split_k(M, N, K, x.device)
    elif not isinstance(splits, int) or splits <= 0:
        raise ValueError(f"dequant_matmul: splits must be a positive int, got {splits!r}")
    k_per_split = cdiv(cdiv(K, splits), K_SPLIT_ALIGN) * K_SPLIT_ALIGN if splits > 1 else K
    splits = cdiv(K, k_per_split)
    if splits > 1:
        y = torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
        stride_ys, stride_ym, stride_yn = y.stride()
    else:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        stride_ys, (stride_ym, stride_yn) = 0, y.stride()
    int8 = quant_type == "int8"

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)

    launch(wrap_triton(_lora_qgemm_kernel_tuned, x), grid, dict(
        x_ptr=x, data_ptr=data, absmax_ptr=absmax, bias_ptr=bias if bias is not None else x, y_ptr=y,
        # Unused where the format has none: any fp32 pointer will do.
        code_ptr=absmax if int8 else code,
        offset_ptr=offset if double_quant else absmax,
        nested_absmax_ptr=nested_absmax if double_quant else absmax,
        nested_code_ptr=nested_code if double_quant else absmax,
        M=M, N=N, K=K, K_BYTES=K // 2, K_PER_SPLIT=k_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_dn=data.stride(0) if int8 else 0, stride_dk=data.stride(1) if int8 else 0,
        stride_ys=stride_ys, stride_ym=stride_ym, stride_yn=stride_yn,
        stride_bias=bias.stride(0) if bias is not None else 0,
        INT8=int8, BLOCKSIZE=1 if int8 else blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1,
        DOUBLE_QUANT=double_quant, EVEN_K=K % 2 == 0, ROW_ALIGNED=not int8 and K % blocksize == 0,
        HAS_BIAS=bias is not None, PARTIAL=splits > 1, enable_fp_fusion=False, **common_meta(x.dtype),
    ))
    if splits == 1:
        return y
    out = y.sum(0)
    if bias is not None:
        out += bias
    return out.to(x.dtype)
