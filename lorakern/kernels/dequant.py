"""Dequantise a QLoRA base weight (lorakern.quant's formats) to a dense [N, K] tensor.

- "nf4" / "fp4": data uint8 [ceil(N·K/2), 1] (flat element 2i in the high nibble of
  byte i), code fp32 [16], absmax fp32 [ceil(N·K/blocksize)] over the flattened weight
  (blocks may straddle rows), or with double quantisation uint8 [blocks] read as
  nested_code[absmax] · nested_absmax[block // nested_blocksize] + offset.
- "int8": data int8 [N, K], absmax fp32 [N]: (q · absmax[row]) · (1/127).

The value is computed in fp32 in the reference's operation order and cast once, so the
result is bit-identical to `lorakern.quant.dequantize_weight` (its oracle). Memory-bound:
one program streams a contiguous chunk; the code books and absmax are tiny gathers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast, cdiv, check_device, interpreting, wrap_triton
from .launch import launch

QUANT_TYPES = ("nf4", "fp4", "int8")
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _config_4bit() -> dict:
    if interpreting():
        return {"BLOCK": 1024, "num_warps": 4}
    # 16 elements a thread: one 8-byte load, two 16-byte bf16 stores.
    return {"BLOCK": 2048, "num_warps": 4}


def _config_int8() -> dict:
    if interpreting():
        return {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}
    return {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4}


@triton.jit
def _lora_dequant_4bit_kernel(
    data_ptr, code_ptr, absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    numel, n_bytes,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    # BLOCK // 2 whole bytes, unpacked as (high, low) pairs: flat elements in order.
    rb = pid.to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    packed = tl.load(data_ptr + rb, mask=rb < n_bytes, other=0)
    q = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK,)).to(tl.int32)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    block = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # (code · nested absmax) + offset as two roundings, like the reference; the launch
        # turns off fp fusion so the GPU does not contract them into one FMA.
        absmax = tl.load(nested_code_ptr + qa, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    w = tl.load(code_ptr + q) * absmax
    tl.store(out_ptr + offs, cast(w, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _lora_dequant_int8_kernel(
    data_ptr, absmax_ptr, out_ptr,
    N, K,
    stride_dn, stride_dk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(data_ptr + rn[:, None] * stride_dn + rk[None, :] * stride_dk, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + rn, mask=rn < N, other=0.0)
    # bitsandbytes' int8_vectorwise_dequant: (q · absmax) · (1/127), that order, in fp32.
    w = (q.to(tl.float32) * absmax[:, None]) * 7.874015718698502e-3
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], cast(w, out_ptr.dtype.element_ty, UPCAST), mask=mask)


def _expect(name: str, t, dtype: torch.dtype, numel: int, device: torch.device, what: str) -> None:
    """t is a contiguous `dtype` tensor of `numel` elements on `device` (1-D unless numel is 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dequantize_weight: {what} needs {name} ({dtype}, {numel} elements), got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"dequantize_weight: {what} expects {name} of dtype {dtype}, got {t.dtype}")
    if t.numel() != numel or t.dim() > 1 or not t.is_contiguous():
        raise ValueError(
            f"dequantize_weight: {what} expects {name} 1-D contiguous with {numel} elements, "
            f"got shape {tuple(t.shape)} stride {t.stride()}"
        )
    if t.device != device:
        raise ValueError(f"dequantize_weight: {name} is on {t.device}, data on {device}")


def dequantize_weight(
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
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight [N, K] in `dtype`, bit-identical to lorakern.quant.dequantize_weight.

    shape = (N, K). Tensors (None where a format has none):
      "nf4" / "fp4": data uint8 [ceil(N·K/2), 1] (or 1-D), code fp32 [16], absmax fp32
        [ceil(N·K/blocksize)]; double quantisation: absmax uint8 [same], offset fp32 (0-d),
        nested_absmax fp32 [ceil(blocks/nested_blocksize)], nested_code fp32 [256].
      "int8": data int8 [N, K] (any strides), absmax fp32 [N]; blocksize is ignored.
    dtype: float32, float16 or bfloat16. out: a contiguous [N, K] tensor of `dtype` on
    data's device to write into (a reusable workspace), else a new one is returned.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"dequantize_weight: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dequantize_weight: dtype must be float32, float16 or bfloat16, got {dtype}")
    if len(shape) != 2 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"dequantize_weight: shape must be (N, K) of non-negative ints, got {shape}")
    check_device("data", data)
    N, K = shape
    numel, device = N * K, data.device
    if quant_type == "int8":
        if data.dtype != torch.int8:
            raise TypeError(f"dequantize_weight: int8 expects data of dtype torch.int8, got {data.dtype}")
        if tuple(data.shape) != (N, K):
            raise ValueError(f"dequantize_weight: int8 expects data [N, K] = {(N, K)}, got {tuple(data.shape)}")
        _expect("absmax", absmax, torch.float32, N, device, "int8")
        if any(t is not None for t in (code, offset, nested_absmax, nested_code)):
            raise ValueError("dequantize_weight: int8 takes no code, offset, nested_absmax or nested_code")
    else:
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"dequantize_weight: blocksize must be a positive int, got {blocksize!r}")
        if data.dtype != torch.uint8:
            raise TypeError(f"dequantize_weight: {quant_type} expects data of dtype torch.uint8, got {data.dtype}")
        n_bytes = cdiv(numel, 2)
        if data.numel() != n_bytes or data.dim() > 2 or not data.is_contiguous():
            raise ValueError(
                f"dequantize_weight: {quant_type} of shape {(N, K)} expects contiguous data "
                f"[{n_bytes}, 1], got shape {tuple(data.shape)} stride {data.stride()}"
            )
        _expect("code", code, torch.float32, 16, device, quant_type)
        blocks = cdiv(numel, blocksize)
        double_quant = nested_absmax is not None or nested_code is not None or offset is not None
        if double_quant:
            if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
                raise ValueError(f"dequantize_weight: nested_blocksize must be a positive int, got {nested_blocksize!r}")
            what = f"{quant_type} with double quantisation"
            _expect("absmax", absmax, torch.uint8, blocks, device, what)
            _expect("nested_code", nested_code, torch.float32, 256, device, what)
            _expect("nested_absmax", nested_absmax, torch.float32, cdiv(blocks, nested_blocksize), device, what)
            _expect("offset", offset, torch.float32, 1, device, what)
        else:
            _expect("absmax", absmax, torch.float32, blocks, device, f"{quant_type} at blocksize {blocksize}")
    if out is None:
        out = torch.empty((N, K), device=device, dtype=dtype)
    elif tuple(out.shape) != (N, K) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"dequantize_weight: out must be a contiguous {dtype} [N, K] = {(N, K)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} stride {out.stride()} on {out.device}"
        )
    if numel == 0:
        return out
    if quant_type == "int8":
        cfg = _config_int8()
        grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(K, cfg["BLOCK_K"]))
        launch(wrap_triton(_lora_dequant_int8_kernel, data), grid, dict(
            data_ptr=data, absmax_ptr=absmax, out_ptr=out,
            N=N, K=K, stride_dn=data.stride(0), stride_dk=data.stride(1),
            UPCAST=interpreting(), **cfg,
        ))
        return out
    cfg = _config_4bit()
    launch(wrap_triton(_lora_dequant_4bit_kernel, data), (cdiv(numel, cfg["BLOCK"]),), dict(
        data_ptr=data, code_ptr=code, absmax_ptr=absmax,
        # Unused without double quantisation: any fp32 pointer will do.
        offset_ptr=offset if double_quant else code,
        nested_absmax_ptr=nested_absmax if double_quant else code,
        nested_code_ptr=nested_code if double_quant else code,
        out_ptr=out, numel=numel, n_bytes=n_bytes,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if double_quant else 1, DOUBLE_QUANT=double_quant,
        UPCAST=interpreting(), enable_fp_fusion=False, **cfg,
    ))
    return out
