"""The merged-weight variant (lorakern/kernels/merge.py, dropout 0): W′ = W + s·B A by one Triton
kernel, then cuBLAS for y = x W′ᵀ + bias and dx = dY W′.

W′ is checked against an fp64 oracle element by element (rounded once: within half an
ulp of the exact value in half precision) and by DESIGN.md §5's bar; y and dx against
the reference path with p = 0 and the fp64 oracle. W′ is rounded to the compute dtype
before the GEMM, so its error differs from the reference's: the bar (within RTOL, no
worse than 2x PyTorch's own error on the same inputs) is measured at K = 256 over
several seeds, where it is meaningful.

On a machine without a GPU the kernel runs in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorakern import reference
from tests.conftest import KERNEL_DEVICE, requires_triton

pytest.importorskip("triton")

from lorakern.kernels.common import dot_precision, interpreting, to_device_scalars  # noqa: E402
from lorakern.kernels.merge import lora_backward_dx_merged, lora_forward_merged, lora_merged_weight  # noqa: E402
from tests.kernel_cases import DTYPE_IDS, check_against_oracle, poisoned, randn  # noqa: E402

pytestmark = requires_triton

params = pytest.mark.parametrize
DEV = KERNEL_DEVICE
SCALING = 0.37  # not a power of two: a dropped or doubled factor shows
# (weight / x dtype, adapter dtype): fp32 adapters with half-precision weights is PEFT's default.
DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
]
dtype_pairs = params("dtypes", DTYPE_PAIRS, ids=lambda p: DTYPE_IDS[p[0]] if p[0] == p[1] else f"{DTYPE_IDS[p[0]]}-A{DTYPE_IDS[p[1]]}")
scalings = params("scalars", ["value", "device"])
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def _scaling(kind: str):
    return SCALING if kind == "value" else to_device_scalars(SCALING, 0.0, 0, DEV)


def _adapters(N: int, K: int, r: int, layout: str, dt, adt):
    """weight [N, K], lora_A [r, K], lora_B [N, r] with the given memory layout."""
    if layout == "transposed":
        return (randn(K, N, dtype=dt, device=DEV).t(), randn(K, r, dtype=adt, device=DEV).t(),
                randn(r, N, dtype=adt, device=DEV).t())
    if layout == "sliced":
        return (randn(N, 2 * K, dtype=dt, device=DEV)[:, 1::2], randn(r, K + 3, dtype=adt, device=DEV)[:, :K],
                randn(N, r + 2, dtype=adt, device=DEV)[:, 2:])
    return randn(N, K, dtype=dt, device=DEV), randn(r, K, dtype=adt, device=DEV), randn(N, r, dtype=adt, device=DEV)


def _torch_merge(W, A, B, s: float):
    """What PyTorch (and PEFT's merge) compute in the input dtypes: delta in the
    adapters' dtype, added to W, the sum rounded to W's dtype."""
    return (W + (B @ A) * s).to(W.dtype)


def _dot_eps(adt) -> float:
    """Relative error of one product in the kernel's B·A: tf32 operands for fp32
    adapters on a GPU unless matmul precision is 'highest'; else exact products with an
    fp32 sum."""
    if adt == torch.float32 and not interpreting() and dot_precision(torch.float32) == "tf32":
        return 2.0**-10
    return 2.0**-22


def _assert_rounded_once(merged, oracle, abs_terms, dt, adt):
    """Each element of W′ within half an ulp (in dt) of the exact W + s·B A, plus the
    fp32 (or tf32) error of computing s·B A: the sum is rounded once, not twice."""
    exact = oracle.cpu()
    e = torch.floor(torch.log2(exact.abs().clamp_min(torch.finfo(dt).tiny)))
    half_ulp = torch.exp2(e - MANTISSA_BITS[dt] - 1)
    slack = _dot_eps(adt) * abs_terms.cpu()
    excess = (merged.double().cpu() - exact).abs() - (half_ulp * (1 + 2.0**-10) + slack)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"W′ not rounded once: element {divmod(worst, exact.shape[1])} is {merged.flatten()[worst].item():.8g}, "
        f"exact {exact.flatten()[worst].item():.8g}, half ulp {half_ulp.flatten()[worst].item():.3g}"
    )


# ----------------------------------------------------------------------------- W′


@dtype_pairs
@params("r", [1, 7, 16, 64], ids=lambda r: f"r{r}")
@params("layout", ["contiguous", "transposed", "sliced"])
@scalings
def test_merged_weight(dtypes, r, layout, scalars):
    dt, adt = dtypes
    N, K = 37, 53  # odd, several tiles each way in the interpreter
    W, A, B = _adapters(N, K, r, layout, dt, adt)
    if layout != "contiguous":  # (A, B of rank 1 stay contiguous: size-1 dimensions)
        assert not W.is_contiguous() and (r == 1 or not (A.is_contiguous() or B.is_contiguous()))
    W_before = W.clone()
    merged = poisoned(lambda: lora_merged_weight(W, A, B, _scaling(scalars)))
    assert merged.shape == (N, K) and merged.dtype == dt
    assert torch.equal(W, W_before), "the base weight was modified"
    oracle = W.double() + SCALING * (B.double() @ A.double())
    abs_terms = W.double().abs() + SCALING * (B.double().abs() @ A.double().abs())
    check_against_oracle(merged, _torch_merge(W, A, B, SCALING), oracle, dt, "W′")
    if dt in MANTISSA_BITS:
        _assert_rounded_once(merged, oracle, abs_terms, dt, adt)


@params("dt", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_merged_weight_scaling_in_memory_matches_by_value_bit_for_bit(dt):
    W, A, B = _adapters(37, 53, 7, "contiguous", dt, torch.float32)
    assert torch.equal(lora_merged_weight(W, A, B, SCALING), lora_merged_weight(W, A, B, _scaling("device")))


def test_merged_weight_edges():
    """No rows or columns: nothing launched, the right empty shape; a rank-0 adapter: W."""
    A, B = randn(4, 0, dtype=torch.float32, device=DEV), randn(5, 4, dtype=torch.float32, device=DEV)
    assert lora_merged_weight(randn(5, 0, dtype=torch.float32, device=DEV), A, B, 1.0).shape == (5, 0)
    A, B = randn(4, 9, dtype=torch.float32, device=DEV), randn(0, 4, dtype=torch.float32, device=DEV)
    assert lora_merged_weight(randn(0, 9, dtype=torch.float32, device=DEV), A, B, 1.0).shape == (0, 9)
    W = randn(5, 9, dtype=torch.bfloat16, device=DEV)
    empty_A, empty_B = randn(0, 9, dtype=torch.bfloat16, device=DEV), randn(5, 0, dtype=torch.bfloat16, device=DEV)
    assert torch.equal(lora_merged_weight(W, empty_A, empty_B, 2.0), W)


# ----------------------------------------------------------------------------- y and dx


M, K, N = 67, 256, 45  # K large enough that the GEMM's rounding, not luck, sets the error
SEEDS = [0, 1, 2]
seeds = params("seed", SEEDS, ids=lambda s: f"seed{s}")


def _inputs(seed: int, dt, adt, r: int = 16, rows: int = M):
    torch.manual_seed(seed)
    x, W, bias = randn(rows, K, dtype=dt, device=DEV), randn(N, K, dtype=dt, device=DEV), randn(N, dtype=dt, device=DEV)
    A, B = randn(r, K, dtype=adt, device=DEV), randn(N, r, dtype=adt, device=DEV)
    dy = randn(rows, N, dtype=dt, device=DEV)
    return x, W, bias, A, B, dy


def _f64(*ts):
    return tuple(None if t is None else t.double() for t in ts)


@dtype_pairs
@seeds
@params("has_bias", [True, False], ids=["bias", "nobias"])
@scalings
def test_forward_merged(dtypes, seed, has_bias, scalars):
    dt, adt = dtypes
    x, W, bias, A, B, _ = _inputs(seed, dt, adt)
    bias = bias if has_bias else None
    y = poisoned(lambda: lora_forward_merged(x, W, bias, A, B, _scaling(scalars)))
    assert y.dtype == dt
    ref, _ = reference.lora_linear_forward(x, W, bias, A, B, SCALING, 0.0, 0)
    oracle, _ = reference.lora_linear_forward(*_f64(x, W, bias, A, B), SCALING, 0.0, 0)
    check_against_oracle(y, ref, oracle, dt, "y")


@dtype_pairs
@seeds
@scalings
def test_backward_dx_merged(dtypes, seed, scalars):
    dt, adt = dtypes
    x, W, _, A, B, dy = _inputs(seed, dt, adt)
    dx = poisoned(lambda: lora_backward_dx_merged(dy, W, A, B, _scaling(scalars)))
    assert dx.dtype == dt
    S = reference.lora_shrink(x, A, 0.0, 0)
    ref = reference.lora_linear_backward(dy, x, W, A, B, S, SCALING, 0.0, 0, (True, False, False))[0]
    x64, W64, A64, B64, dy64 = _f64(x, W, A, B, dy)
    S64 = reference.lora_shrink(x64, A64, 0.0, 0)
    oracle = reference.lora_linear_backward(dy64, x64, W64, A64, B64, S64, SCALING, 0.0, 0, (True, False, False))[0]
    check_against_oracle(dx, ref, oracle, dt, "dx")


@params("rows", [0, 1, 7], ids=lambda m: f"M{m}")
@params("has_bias", [True, False], ids=["bias", "nobias"])
def test_few_rows(rows, has_bias):
    dt, adt = torch.bfloat16, torch.float32
    x, W, bias, A, B, dy = _inputs(0, dt, adt, r=7, rows=rows)
    bias = bias if has_bias else None
    y = poisoned(lambda: lora_forward_merged(x, W, bias, A, B, SCALING))
    dx = poisoned(lambda: lora_backward_dx_merged(dy, W, A, B, SCALING))
    assert y.shape == (rows, N) and dx.shape == (rows, K) and y.dtype == dx.dtype == dt
    if rows == 0:
        return
    y_ref, S = reference.lora_linear_forward(x, W, bias, A, B, SCALING, 0.0, 0)
    y64, S64 = reference.lora_linear_forward(*_f64(x, W, bias, A, B), SCALING, 0.0, 0)
    check_against_oracle(y, y_ref, y64, dt, "y")
    dx_ref = reference.lora_linear_backward(dy, x, W, A, B, S, SCALING, 0.0, 0, (True, False, False))[0]
    dx64 = reference.lora_linear_backward(*_f64(dy, x, W, A, B), S64, SCALING, 0.0, 0, (True, False, False))[0]
    check_against_oracle(dx, dx_ref, dx64, dt, "dx")


# ----------------------------------------------------------------------------- bad inputs


def test_rejects_mismatched_shapes_and_dropout():
    W, A, B = _adapters(37, 53, 7, "contiguous", torch.float32, torch.float32)
    x = randn(4, 53, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match=r"\(37, 53\).*\(7, 52\)"):
        lora_merged_weight(W, A[:, :52], B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B \(37, 6\)"):
        lora_forward_merged(x, W, None, A, B[:, :6], 1.0)
    with pytest.raises(ValueError, match=r"x \(4, 52\)"):
        lora_forward_merged(x[:, :52], W, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"dy \(4, 36\)"):
        lora_backward_dx_merged(randn(4, 36, dtype=torch.float32, device=DEV), W, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout 0"):
        lora_forward_merged(x, W, None, A, B, to_device_scalars(1.0, 0.1, 0, DEV))
    with pytest.raises(ValueError, match="dropout 0"):
        lora_backward_dx_merged(randn(4, 37, dtype=torch.float32, device=DEV), W, A, B, to_device_scalars(1.0, 0.1, 0, DEV))
