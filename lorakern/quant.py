"""Quantized base weights for QLoRA, in bitsandbytes' storage formats (pure PyTorch).

Formats (each bit-compatible with bitsandbytes 0.50, checked in tests/test_quant.py):

- "nf4" / "fp4": blockwise 4-bit. The flattened [N, K] weight is cut into blocks of
  `blocksize` elements (the last one may be short); each block stores its absmax (fp32)
  and each element the index of the nearest value of a 16-entry code book (NormalFloat4
  from the QLoRA paper, or bitsandbytes' FP4) applied to x / absmax. Two indices per
  byte, element 2i in the high nibble: `data` is uint8 [ceil(N·K / 2), 1], bitsandbytes'
  `Params4bit` layout.
- double quantisation (`bnb_4bit_use_double_quant`): the absmax vector itself is stored
  as 8 bits per block: absmax - offset (offset = its mean) quantised blockwise (256 per
  block) with the signed dynamic code book (Dettmers 2015), whose fp32 absmaxes are kept.
  4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight at blocksize 64.
- "int8": weight-only, per output row: data int8 [N, K] = round(W · 127 / absmax_row),
  absmax fp32 [N] (LLM.int8's storage, `Int8Params.CB` / `SCB`, without its outlier
  decomposition; lorakern multiplies x by the dequantised weight, it never quantises x).

Dequantisation computes code[q] · absmax in fp32 and casts once to the compute dtype,
as bitsandbytes does, so both give the same bits. `dequantize` here is the reference
(the CPU path and the oracle of lorakern/kernels/dequant.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantised absmax

# NormalFloat4 (QLoRA paper, appendix E): quantiles of N(0, 1) scaled to [-1, 1], an
# exact zero; the values bitsandbytes stores, as float32.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, normalised to max 1), in its
# index order (bit 3 is the sign): the values of its QuantState.code and CUDA kernels.
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25)
_FP4 = _FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES)


def code_book(quant_type: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit index stands for (times the block's absmax)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(_FP4, dtype=torch.float32)
    raise ValueError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dynamic_code_book() -> torch.Tensor:
    """The signed 8-bit dynamic code book [256] (float32, sorted) used for double quantisation.

    Dynamic tree quantisation (Dettmers, "8-Bit Approximations for Parallelism in Deep
    Learning", 2015): for exponent e = 0..6 the decade 10^(e-6) holds 2^e fraction
    steps, the midpoints of a linspace(0.1, 1) grid; both signs, plus 0 and 1.
    """
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight: the tensors bitsandbytes stores, and how to read them.

    data: uint8 [ceil(N·K/2), 1] packed 4-bit indices, or int8 [N, K] ("int8").
    absmax: float32 [blocks] (4-bit), uint8 [blocks] when double-quantised, float32 [N] (int8).
    offset / nested_absmax / nested_code: the double quantisation's mean (float32, 0-d),
        per-`nested_blocksize` absmaxes (float32) and 8-bit code book [256]; None without it.
    code: the 4-bit code book [16] (None for int8).
    shape: (N, K); dtype: the dtype the weight was quantised from (the default compute dtype).
    """

    data: torch.Tensor
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype
    absmax: torch.Tensor
    blocksize: int = 0
    code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def bits_per_parameter(self) -> float:
        """Stored bits per weight element, statistics included."""
        tensors = (self.data, self.absmax, self.offset, self.nested_absmax)
        stored = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return 8.0 * stored / math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (for buffers and state dicts), None ones left out."""
        names = ("data", "absmax", "code", "offset", "nested_absmax", "nested_code")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return replace(self, **{n: t.to(device) for n, t in self.tensors().items()})


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize supports float32, float16 and bfloat16 weights, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize: the weight has inf or NaN entries")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [ceil(n / blocksize)]: max |x| per block (the last block may be short)."""
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, pad))
    return padded.view(-1, blocksize).amax(dim=1)


def _nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the value nearest each element (ties go to the smaller value,
    as bitsandbytes' bucketize over midpoints)."""
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def _scaled_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """flat / absmax(block), as x · (1 / absmax) clamped to [-1, 1] (a zero block stays 0)."""
    n = flat.numel()
    inv = 1.0 / absmax.clamp(min=1e-38)
    per_element = inv.repeat_interleave(blocksize)[:n]
    return torch.clamp(flat * per_element, -1.0, 1.0)


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """values float32 [n] -> (uint8 [n] indices into dynamic_code_book(), float32 absmax [blocks])."""
    flat = values.reshape(-1).float()
    code = dynamic_code_book().to(flat.device)
    absmax = _blockwise_absmax(flat, blocksize)
    q = _nearest_index(_scaled_blocks(flat, absmax, blocksize), code)
    # bitsandbytes stores index 0 for a block whose absmax is 0 (its values all dequantise to 0).
    zero_block = (absmax == 0).repeat_interleave(blocksize)[: flat.numel()]
    return q.masked_fill(zero_block, 0).to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [n] -> float32 [n]: code[q] · absmax(block)."""
    n = q.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return code.index_select(0, q.reshape(-1).long()) * scale


def quantize_weight(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantize a weight [N, K] to `quant_type` ("nf4", "fp4" or "int8").

    Args:
        weight: [N, K] float32 / float16 / bfloat16, finite.
        blocksize: elements per absmax block (4-bit only; one of BLOCKSIZES).
        double_quant: also quantize the absmax vector to 8 bits (4-bit only).
    Returns:
        A QuantizedWeight on weight's device whose dequantize() equals bitsandbytes'.

    Example:
        >>> import torch
        >>> from lorakern.quant import quantize_weight, dequantize_weight
        >>> qw = quantize_weight(torch.randn(8, 64), "nf4")
        >>> dequantize_weight(qw).shape, qw.data.shape
        (torch.Size([8, 64]), torch.Size([256, 1]))
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_weight(weight)
    shape = (weight.shape[0], weight.shape[1])
    if quant_type == "int8":
        if double_quant:
            raise ValueError("double_quant applies to 4-bit formats only, not int8")
        w = weight.float()
        absmax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])  # amax refuses K == 0
        data = torch.round(w * (127.0 / absmax.unsqueeze(1))).nan_to_num(0.0).to(torch.int8)
        return QuantizedWeight(data, "int8", shape, weight.dtype, absmax)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    flat = weight.reshape(-1).float()
    code = code_book(quant_type).to(weight.device)
    absmax = _blockwise_absmax(flat, blocksize)
    scaled = _scaled_blocks(flat, absmax, blocksize)
    if scaled.numel() % 2:  # the pad nibble holds the index of 0.0, as in bitsandbytes
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest_index(scaled, code).to(torch.uint8)
    data = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    qw = QuantizedWeight(data, quant_type, shape, weight.dtype, absmax, blocksize, code)
    if double_quant:
        offset = absmax.mean()
        q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        qw = replace(
            qw, absmax=q_absmax, offset=offset, nested_absmax=nested_absmax,
            nested_code=dynamic_code_book().to(weight.device),
        )
    return qw


def block_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 absmax per block (double quantisation undone, as bitsandbytes does)."""
    if not qw.double_quant:
        return qw.absmax.float()
    values = dequantize_blockwise_8bit(qw.absmax, qw.nested_absmax, qw.nested_code, qw.nested_blocksize)
    return values + qw.offset


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] in `dtype` (default qw.dtype): code[q] · absmax in fp32, cast once.

    The reference implementation (plain PyTorch): what runs on CPU and the oracle of the
    Triton kernel in lorakern/kernels/dequant.py.
    """
    dtype = qw.dtype if dtype is None else dtype
    n, k = qw.shape
    if qw.quant_type == "int8":
        # bitsandbytes' int8_vectorwise_dequant: (q · absmax) · (1/127) in fp32.
        return ((qw.data.float() * qw.absmax.view(-1, 1)) * 7.874015718698502e-3).to(dtype)
    # One gather per byte: a [256, 2] table holds the (high, low) nibbles' code values.
    pairs = qw.code[torch.arange(256, device=qw.device).view(-1, 1) >> torch.tensor([4, 0], device=qw.device) & 0xF]
    values = pairs.index_select(0, qw.data.reshape(-1).long()).view(-1)[: n * k]  # 3x faster than pairs[...] on CPU
    absmax = block_absmax(qw)
    full = (n * k) // qw.blocksize * qw.blocksize
    out = torch.empty(n * k, dtype=torch.float32, device=qw.device)
    torch.mul(values[:full].view(-1, qw.blocksize), absmax[: full // qw.blocksize, None], out=out[:full].view(-1, qw.blocksize))
    if full < n * k:  # the short last block
        torch.mul(values[full:], absmax[-1], out=out[full:])
    return out.view(n, k).to(dtype)
