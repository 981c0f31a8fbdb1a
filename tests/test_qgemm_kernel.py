"""lorakern/kernels/qgemm.py (fused dequantise-GEMM) against x @ lorakern.quant.dequantize_weight(qw, x.dtype)ᵀ.

The oracle multiplies in fp64 the weight the reference dequantises and rounds to x's
dtype; the kernel must match it within DESIGN.md §5's tolerance and no worse than twice
PyTorch's own error. On a machine without a GPU these run in Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from lorakern.quant import QuantizedWeight, quantize_weight
from lorakern.quant import dequantize_weight as reference_dequantize
from tests.conftest import KERNEL_DEVICE, requires_triton
from tests.kernel_cases import DTYPE_IDS, DTYPES, check_against_oracle, randn
from tests.utils import RTOL, assert_close

pytestmark = requires_triton
pytest.importorskip("triton")

params = pytest.mark.parametrize
# (quant_type, double_quant)
FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)]
FORMAT_IDS = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]
MS = [1, 5, 16, 33]


def _kernel():
    from lorakern.kernels import dequant_matmul

    return dequant_matmul


def _quantized(shape, quant_type, blocksize=64, double_quant=False):
    w = torch.randn(shape) * 3.0
    if w.numel():
        w.view(-1)[0] = 0.0
    return quantize_weight(w, quant_type, blocksize, double_quant).to(KERNEL_DEVICE)


def _args(qw):
    return (qw.data, qw.absmax, qw.code, qw.offset, qw.nested_absmax, qw.nested_code,
            qw.quant_type, qw.blocksize, qw.nested_blocksize, qw.shape)


def _check(qw, x, bias=None, **kwargs):
    """Run the kernel; compare with the fp64 product of the reference's dtype-rounded weight."""
    out = _kernel()(x, *_args(qw), bias, **kwargs)
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == (x.shape[0], qw.shape[0])
    assert not torch.isnan(out).any(), "NaN in the kernel output"
    w = reference_dequantize(qw.to("cpu"), dtype)
    xc, bc = x.cpu(), None if bias is None else bias.cpu()
    oracle = xc.double() @ w.double().t() + (0.0 if bc is None else bc.double())
    in_dtype = xc @ w.t() + (0.0 if bc is None else bc)  # PyTorch's own result in the dtype
    name = f"{qw.quant_type}{'-dq' if qw.double_quant else ''} {DTYPE_IDS[dtype]} x{tuple(x.shape)} W{qw.shape}"
    assert_close(out, oracle, RTOL[dtype], name)
    check_against_oracle(out, in_dtype, oracle, dtype, name)
    return out


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("fmt", FORMATS, ids=FORMAT_IDS)
def test_matches_dequantise_then_matmul(fmt, dtype):
    """K = 72: not a multiple of 16 nor of the blocksize (blocks straddle rows); N odd."""
    quant_type, double_quant = fmt
    qw = _quantized((37, 72), quant_type, 64, double_quant)
    bias = randn(37, dtype=dtype, device=KERNEL_DEVICE)
    for i, m in enumerate(MS):
        x = randn(m, 72, dtype=dtype, device=KERNEL_DEVICE)
        _check(qw, x, bias if i % 2 else None)


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("fmt", FORMATS, ids=FORMAT_IDS)
@params("shape, blocksize", [((37, 72), 64), ((33, 45), 32), ((40, 128), 64), ((24, 128), 32)],
        ids=["straddle", "oddK", "bs>=BK", "bs<BK"])
def test_dequantised_tile_is_exact(shape, blocksize, fmt, dtype):
    """x = I gives y = Wᵀ (one nonzero term per sum): bit for bit the reference's
    dequantised weight, on every absmax path (one block per row and tile, several whole
    blocks per tile, blocks straddling rows) and both nibble paths (even and odd K).
    x = I + (I shifted a column) sums two weights exactly in fp32: equal to the sum of
    the dtype-rounded weights only if each is rounded to x's dtype before the dot."""
    quant_type, double_quant = fmt
    qw = _quantized(shape, quant_type, blocksize, double_quant)
    eye = torch.eye(shape[1], dtype=dtype)
    x = torch.cat([eye, eye + eye.roll(1, dims=1)]).to(KERNEL_DEVICE)
    out = _kernel()(x, *_args(qw)).cpu()
    w = reference_dequantize(qw.to("cpu"), dtype)
    assert torch.equal(out[: shape[1]].t(), w)
    pairs = (w.double() + w.double().roll(-1, dims=1)).to(dtype)  # column i + column i+1
    assert torch.equal(out[shape[1]:].t(), pairs)


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("fmt", FORMATS, ids=FORMAT_IDS)
def test_odd_k_and_row_aligned_blocks(fmt, dtype):
    quant_type, double_quant = fmt
    # odd K; one block per row and tile; whole blocks per tile; blocks larger than the
    # tile, straddling rows and not; more blocks than one nested (double-quant) block holds.
    cases = (((33, 45), 32, 5), ((40, 128), 64, 16), ((24, 128), 32, 33), ((9, 300), 256, 5), ((8, 512), 256, 1),
             ((37, 600), 32, 3))
    for shape, blocksize, m in cases:
        qw = _quantized(shape, quant_type, blocksize, double_quant)
        _check(qw, randn(m, shape[1], dtype=dtype, device=KERNEL_DEVICE),
               randn(shape[0], dtype=dtype, device=KERNEL_DEVICE))


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("fmt", [("nf4", True), ("int8", False)], ids=["nf4-dq", "int8"])
def test_split_k(fmt, dtype):
    """K in 3 ranges of 256 (the last one short): fp32 partials summed, then bias and cast."""
    quant_type, double_quant = fmt
    qw = _quantized((37, 600), quant_type, 64, double_quant)
    bias = randn(37, dtype=dtype, device=KERNEL_DEVICE)
    for m, splits in ((1, 3), (5, 2), (16, 100)):
        _check(qw, randn(m, 600, dtype=dtype, device=KERNEL_DEVICE), bias, splits=splits)


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_contiguous_inputs(dtype):
    dev = KERNEL_DEVICE
    qw = _quantized((37, 72), "nf4", 64, True)
    x_t = randn(72, 5, dtype=dtype, device=dev).t()  # a transposed view
    bias = randn(74, dtype=dtype, device=dev)[::2]  # stride 2
    _check(qw, x_t, bias)
    _check(qw, randn(5, 144, dtype=dtype, device=dev)[:, ::2], None)  # column stride 2
    q8 = _quantized((37, 72), "int8")
    q8_t = QuantizedWeight(q8.data.t().contiguous().t(), "int8", q8.shape, q8.dtype, q8.absmax)  # column-major data
    assert not q8_t.data.is_contiguous()
    _check(q8_t, x_t, bias)


@params("quant_type", ["nf4", "int8"])
def test_empty(quant_type):
    dev = KERNEL_DEVICE
    qw = _quantized((6, 10), quant_type)
    out = _kernel()(torch.empty(0, 10, device=dev), *_args(qw))
    assert out.shape == (0, 6)
    empty_n = _quantized((0, 10), quant_type)
    assert _kernel()(torch.randn(3, 10, device=dev), *_args(empty_n)).shape == (3, 0)
    if quant_type == "int8":  # quantize_weight cannot take an absmax over K = 0
        k0 = QuantizedWeight(torch.zeros(6, 0, dtype=torch.int8), "int8", (6, 0), torch.float32, torch.zeros(6)).to(dev)
    else:
        k0 = _quantized((6, 0), quant_type)
    bias = torch.randn(6, dtype=torch.bfloat16, device=dev)
    x = torch.randn(3, 0, dtype=torch.bfloat16, device=dev)
    assert torch.equal(_kernel()(x, *_args(k0)), torch.zeros(3, 6, dtype=torch.bfloat16, device=dev))
    out = _kernel()(x, *_args(k0), bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, bias.expand(3, 6))


def _bad(qw, x=None, bias=None, **changes):
    args = dict(zip(("data", "absmax", "code", "offset", "nested_absmax", "nested_code",
                     "quant_type", "blocksize", "nested_blocksize", "shape"), _args(qw)))
    args.update(changes)
    x = torch.randn(3, qw.shape[1], device=KERNEL_DEVICE) if x is None else x
    return _kernel()(x, **args, bias=bias)


def test_bad_inputs():
    dev = KERNEL_DEVICE
    q4 = _quantized((6, 10), "nf4", 32)
    dq = _quantized((6, 10), "nf4", 32, double_quant=True)
    i8 = _quantized((6, 10), "int8")
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \[M, K\], got torch.Size\(\[10\]\)"):
        _bad(q4, x=torch.randn(10, device=dev))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.float64"):
        _bad(q4, x=torch.randn(3, 10, dtype=torch.float64, device=dev))
    with pytest.raises(ValueError, match=r"x \(3, 9\) and the weight \(6, 10\) disagree on K"):
        _bad(q4, x=torch.randn(3, 9, device=dev))
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'nf8'"):
        _bad(q4, quant_type="nf8")
    with pytest.raises(ValueError, match=r"shape must be \(N, K\)"):
        _bad(q4, shape=(6, -1))
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[6\] of x's dtype torch.float32 .* got torch.float32 \(5,\)"):
        _bad(q4, bias=torch.randn(5, device=dev))
    with pytest.raises(ValueError, match=r"bias must be .* got torch.float16 \(6,\)"):
        _bad(q4, bias=torch.randn(6, dtype=torch.float16, device=dev))
    with pytest.raises(TypeError, match="nf4 expects data of dtype torch.uint8, got torch.int8"):
        _bad(q4, data=q4.data.to(torch.int8))
    with pytest.raises(ValueError, match=r"nf4 of shape \(6, 10\) expects contiguous data \[30, 1\], got shape \(29, 1\)"):
        _bad(q4, data=q4.data[:29])
    with pytest.raises(ValueError, match=r"nf4 at blocksize 32 expects absmax 1-D contiguous with 2 elements, got shape \(3,\)"):
        _bad(q4, absmax=torch.ones(3, device=dev))
    with pytest.raises(ValueError, match="blocksize must be a power of two .* got 0"):
        _bad(q4, blocksize=0)
    with pytest.raises(ValueError, match="blocksize must be a power of two .* got 48"):
        _bad(q4, blocksize=48)
    with pytest.raises(TypeError, match=r"nf4 needs code \(torch.float32, 16 elements\), got NoneType"):
        _bad(q4, code=None)
    with pytest.raises(TypeError, match="double quantisation needs nested_code"):
        _bad(dq, nested_code=None)
    with pytest.raises(TypeError, match="double quantisation expects absmax of dtype torch.uint8, got torch.float32"):
        _bad(dq, absmax=q4.absmax)
    with pytest.raises(ValueError, match="expects nested_absmax 1-D contiguous with 1 elements, got shape"):
        _bad(dq, nested_absmax=torch.ones(2, device=dev))
    with pytest.raises(TypeError, match="int8 expects data of dtype torch.int8, got torch.uint8"):
        _bad(i8, data=i8.data.to(torch.uint8))
    with pytest.raises(ValueError, match=r"int8 expects data \[N, K\] = \(6, 10\), got \(10, 6\)"):
        _bad(i8, data=i8.data.t())
    with pytest.raises(ValueError, match="int8 expects absmax 1-D contiguous with 6 elements"):
        _bad(i8, absmax=i8.absmax[:5])
    with pytest.raises(ValueError, match="int8 takes no code"):
        _bad(i8, code=q4.code)
    with pytest.raises(ValueError, match="splits must be a positive int, got 0"):
        _kernel()(torch.randn(3, 10, device=dev), *_args(q4), splits=0)
