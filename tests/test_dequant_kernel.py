"""lorakern/kernels/dequant.py against lorakern.quant.dequantize_weight, bit for bit.

On a machine without a GPU these run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorakern.quant import dequantize_weight as reference_dequantize
from lorakern.quant import QuantizedWeight, quantize_weight
from tests.conftest import KERNEL_DEVICE, requires_triton
from tests.kernel_cases import DTYPE_IDS, DTYPES, poisoned

pytestmark = requires_triton
pytest.importorskip("triton")

params = pytest.mark.parametrize
# Odd numels, numels not a multiple of any blocksize, blocks straddling rows.
SHAPES = [(1, 1), (3, 5), (7, 33), (33, 129), (64, 96)]
BLOCKSIZES = [32, 64, 256, 4096]  # 4096 > N·K here: one short block


def _kernel():
    from lorakern.kernels import dequantize_weight

    return dequantize_weight


def _args(qw):
    """The launcher's positional arguments for a QuantizedWeight."""
    return (qw.data, qw.absmax, qw.code, qw.offset, qw.nested_absmax, qw.nested_code,
            qw.quant_type, qw.blocksize, qw.nested_blocksize, qw.shape)


def _quantized(shape, quant_type, blocksize=64, double_quant=False):
    w = torch.randn(shape) * 3.0
    if w.numel():
        w.view(-1)[0] = 0.0  # an exact zero, and a block whose absmax differs from the rest
    return quantize_weight(w, quant_type, blocksize, double_quant).to(KERNEL_DEVICE)


def _check(qw, dtype, **kwargs):
    out = poisoned(lambda: _kernel()(*_args(qw), dtype, **kwargs))
    ref = reference_dequantize(qw.to("cpu"), dtype)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out.cpu(), ref), (out.cpu().float() - ref.float()).abs().max()
    return out


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("blocksize", BLOCKSIZES, ids=lambda b: f"bs{b}")
@params("double_quant", [False, True], ids=["plain", "dq"])
@params("quant_type", ["nf4", "fp4"])
def test_4bit_matches_reference(quant_type, double_quant, blocksize, dtype):
    for shape in SHAPES:
        _check(_quantized(shape, quant_type, blocksize, double_quant), dtype)


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_int8_matches_reference(dtype):
    for shape in SHAPES + [(130, 70)]:  # 130 x 70: several row and column tiles
        _check(_quantized(shape, "int8"), dtype)


def test_int8_strided_data():
    qw = _quantized((9, 40), "int8")
    qw.data = qw.data.t().contiguous().t()  # column-major storage, same values
    _check(qw, torch.bfloat16)


@params("quant_type", ["nf4", "fp4"])
def test_many_nested_blocks(quant_type):
    """130·128 / 32 = 520 absmax blocks: three double-quantisation blocks of 256."""
    qw = _quantized((130, 128), quant_type, 32, double_quant=True)
    assert qw.nested_absmax.numel() == 3
    _check(qw, torch.float32)
    _check(qw, torch.bfloat16)


def test_out_workspace_is_written_and_returned():
    qw = _quantized((7, 33), "nf4", 32, double_quant=True)
    out = torch.full((7, 33), float("nan"), dtype=torch.float16, device=KERNEL_DEVICE)
    got = _check(qw, torch.float16, out=out)
    assert got is out
    qw2 = _quantized((7, 33), "int8")  # reused for another weight
    assert _check(qw2, torch.float16, out=out) is out


@params("quant_type", ["nf4", "int8"])
@params("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty(quant_type, shape):
    if quant_type == "int8" and shape[1] == 0:  # quantize_weight cannot take an absmax over K = 0
        qw = QuantizedWeight(torch.zeros(shape, dtype=torch.int8), "int8", shape, torch.float32,
                             torch.zeros(shape[0])).to(KERNEL_DEVICE)
    else:
        qw = _quantized(shape, quant_type)
    out = _kernel()(*_args(qw), torch.bfloat16)
    assert out.shape == shape and out.dtype == torch.bfloat16


def _bad(qw, dtype=torch.float32, **changes):
    args = dict(zip(("data", "absmax", "code", "offset", "nested_absmax", "nested_code",
                     "quant_type", "blocksize", "nested_blocksize", "shape"), _args(qw)))
    args.update(changes)
    return _kernel()(**args, dtype=dtype)


def test_bad_inputs():
    q4 = _quantized((6, 10), "nf4", 32)
    dq = _quantized((6, 10), "nf4", 32, double_quant=True)
    i8 = _quantized((6, 10), "int8")
    dev = KERNEL_DEVICE
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'nf8'"):
        _bad(q4, quant_type="nf8")
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.float64"):
        _bad(q4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape must be \(N, K\)"):
        _bad(q4, shape=(6, -1))
    with pytest.raises(TypeError, match="nf4 expects data of dtype torch.uint8, got torch.int8"):
        _bad(q4, data=q4.data.to(torch.int8))
    with pytest.raises(ValueError, match=r"nf4 of shape \(6, 10\) expects contiguous data \[30, 1\], got shape \(29, 1\)"):
        _bad(q4, data=q4.data[:29])
    with pytest.raises(ValueError, match=r"nf4 at blocksize 32 expects absmax 1-D contiguous with 2 elements, got shape \(3,\)"):
        _bad(q4, absmax=torch.ones(3, device=dev))
    with pytest.raises(ValueError, match="expects absmax 1-D contiguous with 4 elements"):
        _bad(q4, blocksize=16)  # the absmax no longer matches the blocksize
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        _bad(q4, blocksize=0)
    with pytest.raises(TypeError, match="expects absmax of dtype torch.float32, got torch.uint8"):
        _bad(q4, absmax=dq.absmax)  # uint8 absmax without the nested tensors
    with pytest.raises(TypeError, match=r"nf4 needs code \(torch.float32, 16 elements\), got NoneType"):
        _bad(q4, code=None)
    with pytest.raises(ValueError, match="expects code 1-D contiguous with 16 elements"):
        _bad(q4, code=torch.zeros(8, device=dev))
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
    for out in (torch.empty(6, 9, device=dev), torch.empty(6, 10, dtype=torch.float16, device=dev),
                torch.empty(10, 6, device=dev).t()):
        with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 \[N, K\] = \(6, 10\)"):
            _bad(q4, out=out)

