"""The persistent TMA-descriptor forward GEMM (kernels/tma.py) against the reference and an fp64 oracle.

On a machine without a GPU these run in Triton's interpreter (tests/conftest.py), with
32x32x32 tiles and 4 persistent programs, so every shape below spans several tiles, has
partial tiles in M, N and K, and has programs that walk more than one tile.
"""

from __future__ import annotations

import pytest
import torch

from lorakern import reference
from tests.conftest import HAS_CUDA, KERNEL_DEVICE, requires_triton
from tests.kernel_cases import DTYPE_IDS, check_against_oracle, poisoned, randn

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lorakern.kernels import tma  # noqa: E402
from lorakern.kernels.common import to_device_scalars  # noqa: E402

# K and N multiples of 8 (16-byte rows in fp16/bf16) but not of the tile.
K, N = 72, 40
MS = [1, 7, 130]
RANKS = [1, 7, 16, 64]
SCALING = 0.5
DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _hopper() -> bool:
    return not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9


pytestmark = [requires_triton, pytest.mark.skipif(not _hopper(), reason="TMA descriptors need sm_90 or newer")]


def _pair_id(pair):
    x_dt, b_dt = pair
    return DTYPE_IDS[x_dt] if x_dt == b_dt else f"{DTYPE_IDS[x_dt]}-B{DTYPE_IDS[b_dt]}"


def _inputs(M, r, dt, bdt, has_bias, n=N, k=K):
    x = randn(M, k, dtype=dt, device=KERNEL_DEVICE)
    W = randn(n, k, dtype=dt, device=KERNEL_DEVICE)
    bias = randn(n, dtype=dt, device=KERNEL_DEVICE) if has_bias else None
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    B = randn(n, r, dtype=bdt, device=KERNEL_DEVICE)
    return x, W, bias, S, B


def _check(out, x, W, bias, S, B, scaling=SCALING):
    assert out.dtype == x.dtype and out.shape == (x.shape[0], W.shape[0])
    ref = reference.lora_forward(x, W, bias, S, B, scaling)
    b64 = None if bias is None else bias.double()
    oracle = reference.lora_forward(x.double(), W.double(), b64, S.double(), B.double(), scaling)
    check_against_oracle(out, ref, oracle, x.dtype, "y")


params = pytest.mark.parametrize


@params("dtypes", DTYPE_PAIRS, ids=_pair_id)
@params("M", MS, ids=lambda m: f"M{m}")
@params("r", RANKS, ids=lambda r: f"r{r}")
@params("has_bias", [True, False], ids=["bias", "nobias"])
def test_forward_tma(dtypes, M, r, has_bias):
    dt, bdt = dtypes
    x, W, bias, S, B = _inputs(M, r, dt, bdt, has_bias)
    out = poisoned(lambda: tma.lora_forward_tma(x, W, bias, S, B, SCALING))
    _check(out, x, W, bias, S, B)


def test_strided_operands():
    """x and W as row slices of wider buffers (aligned row strides), S and B transposed views."""
    M, r, dt = 130, 7, torch.bfloat16
    x = randn(M, K + 16, dtype=dt, device=KERNEL_DEVICE)[:, :K]
    W = randn(N, K + 8, dtype=dt, device=KERNEL_DEVICE)[:, 8:]
    S = randn(r, M, dtype=torch.float32, device=KERNEL_DEVICE).t()
    B = randn(r, N, dtype=torch.float32, device=KERNEL_DEVICE).t()
    bias = randn(2 * N, dtype=dt, device=KERNEL_DEVICE)[::2]
    out = poisoned(lambda: tma.lora_forward_tma(x, W, bias, S, B, SCALING))
    _check(out, x, W, bias, S, B)


def test_scaling_in_device_memory():
    x, W, bias, S, B = _inputs(130, 16, torch.float16, torch.float16, True)
    scalars = to_device_scalars(SCALING, 0.0, 0, x.device)
    out = poisoned(lambda: tma.lora_forward_tma(x, W, bias, S, B, scalars))
    _check(out, x, W, bias, S, B)


def test_empty_rows():
    x, W, bias, S, B = _inputs(0, 7, torch.float16, torch.float16, True)
    out = tma.lora_forward_tma(x, W, bias, S, B, SCALING)
    assert out.shape == (0, N) and out.dtype == torch.float16


def test_tma_supported_accepts_aligned():
    x, W, *_ = _inputs(7, 7, torch.bfloat16, torch.bfloat16, False)
    assert tma.tma_supported(x, W) == (True, "")


@params("case", ["x_transposed", "x_misaligned_base", "x_row_stride", "w_transposed", "n_unaligned", "fp32"])
def test_tma_supported_reasons(case):
    dt = torch.float16
    x = randn(7, K, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    expect = "x"
    if case == "x_transposed":
        x = randn(K, 7, dtype=dt, device=KERNEL_DEVICE).t()
    elif case == "x_misaligned_base":
        x = randn(7 * K + 1, dtype=dt, device=KERNEL_DEVICE)[1:].view(7, K)
    elif case == "x_row_stride":
        x = randn(7, K + 4, dtype=dt, device=KERNEL_DEVICE)[:, :K]  # 152-byte rows
    elif case == "w_transposed":
        W, expect = randn(K, N, dtype=dt, device=KERNEL_DEVICE).t(), "weight"
    elif case == "n_unaligned":
        W, expect = randn(N - 4, K, dtype=dt, device=KERNEL_DEVICE), "y"
    elif case == "fp32":
        x, W, expect = x.float(), W.float(), "float32"
    ok, reason = tma.tma_supported(x, W)
    assert not ok and expect in reason, reason


def test_tma_supported_without_descriptors(monkeypatch):
    monkeypatch.delattr(tl, "make_tensor_descriptor")
    x, W, *_ = _inputs(7, 7, torch.float16, torch.float16, False)
    ok, reason = tma.tma_supported(x, W)
    assert not ok and "make_tensor_descriptor" in reason


def test_non_contiguous_x_raises():
    _, W, bias, S, B = _inputs(7, 7, torch.float16, torch.float16, True)
    x = randn(K, 7, dtype=torch.float16, device=KERNEL_DEVICE).t()
    with pytest.raises(ValueError, match=r"x \(7, 72\)"):
        tma.lora_forward_tma(x, W, bias, S, B, SCALING)


def test_shape_mismatch_raises():
    x, W, bias, S, B = _inputs(7, 7, torch.float16, torch.float16, True)
    with pytest.raises(ValueError, match="shapes do not agree"):
        tma.lora_forward_tma(x, W, bias, S[:, :5], B, SCALING)


@pytest.mark.skipif(HAS_CUDA, reason="swaps the interpreter's tile")
@params("tile", [(32, 32, 32, 4, 1, False), (16, 64, 16, 4, 1, True)], ids=["whole_epilogue", "16x64x16"])
def test_other_interpreter_tiles(monkeypatch, tile):
    """The unsplit epilogue store (EPILOGUE_SUBTILE=False) and a tile taller in N than M."""
    monkeypatch.setattr(tma, "INTERPRET_TILE", tile)
    x, W, bias, S, B = _inputs(130, 7, torch.bfloat16, torch.float32, True)
    out = poisoned(lambda: tma.lora_forward_tma(x, W, bias, S, B, SCALING))
    _check(out, x, W, bias, S, B)


def test_zero_k():
    """K = 0: y = s·S Bᵀ + bias (no descriptor of a zero-width x)."""
    x, W, bias, S, B = _inputs(7, 7, torch.float16, torch.float16, True, k=0)
    out = poisoned(lambda: tma.lora_forward_tma(x, W, bias, S, B, SCALING))
    _check(out, x, W, bias, S, B)
