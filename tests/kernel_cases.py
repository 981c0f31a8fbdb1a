"""Inputs and the fp64 oracle chain shared by the kernel tests.

Each check runs the same computation three ways — fp64 reference (the oracle),
reference path in the test dtype (what PyTorch itself gets), Triton kernel — and
asserts the kernel's error against the oracle is within the dtype's RTOL and no
worse than twice PyTorch's own error (floored at a few ulp, so a PyTorch result that
happens to be exact does not demand an exact kernel): `lorakern.selfcheck.error_bound`,
the same bar `lorakern check` applies.
"""

from __future__ import annotations

import torch

from lorakern.selfcheck import error_bound, rtol_for
from tests.utils import rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (x dtype, adapter dtype): adapters fp32 with half-precision x is PEFT's default.
DTYPE_PAIRS = [(dt, dt) for dt in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def pair_id(pair) -> str:
    """Test id of an (x dtype, adapter dtype) pair: "bf16", or "bf16-Afp32" when they differ."""
    x_dt, a_dt = pair
    return DTYPE_IDS[x_dt] if x_dt == a_dt else f"{DTYPE_IDS[x_dt]}-A{DTYPE_IDS[a_dt]}"


def randn(*shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def poisoned(fn):
    """Run fn with torch.empty patched to NaN-fill, so unwritten output elements show."""
    original = torch.empty

    def nan_empty(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = nan_empty
    try:
        return fn()
    finally:
        torch.empty = original


def check_against_oracle(out, ours_in_dtype, oracle, dtype, name, cond=1.0):
    """Assert `out` (kernel) is close to the fp64 `oracle`, within RTOL and 2x PyTorch's error.

    `cond` (>= 1) is the result's condition number ‖Σ|terms|‖ / ‖Σ terms‖ where the caller
    knows it (`condition_number`); it scales the few-ulp floor of the 2x-PyTorch part.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel output"
    if oracle.numel() == 0:
        return 0.0
    err = rel_error(out.cpu(), oracle.cpu())
    torch_err = rel_error(ours_in_dtype.cpu(), oracle.cpu())
    bound = error_bound(dtype, torch_err, cond)
    assert err <= bound, (
        f"{name}: relative error {err:.3e} > bound {bound:.3e} "
        f"(dtype {dtype}, RTOL {rtol_for(dtype):.1e}, PyTorch's own error {torch_err:.3e}, condition {cond:.3g})"
    )
    return err


def condition_number(abs_oracle: torch.Tensor, oracle: torch.Tensor) -> float:
    """‖Σ|terms|‖ / ‖Σ terms‖ of a result whose fp64 oracle is `oracle` and whose oracle
    on the absolute values of every input is `abs_oracle` (the op is multilinear in its
    inputs with positive scale and dropout factors, so that run sums |terms|)."""
    den = oracle.double().norm().item()
    return abs_oracle.double().norm().item() / den if den else 1.0
