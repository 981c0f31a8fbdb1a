"""Tolerances and the one comparison helper every test uses (DESIGN.md §5)."""

from __future__ import annotations

import torch

from lorakern import selfcheck

# Max ‖out − ref‖ / ‖ref‖ against an fp64 reference, per dtype: lorakern.selfcheck's
# table (the one `lorakern check` uses), plus float64 for reference-only tests.
RTOL = {torch.float64: 1e-12, **selfcheck.RTOL}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (0 when both are empty or both zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "out") -> float:
    """Assert shapes match, NaN/inf agree, and the relative error is <= rtol.

    Reports the relative error, the worst element and its index. Returns the error.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    bad_out, bad_ref = ~torch.isfinite(out64), ~torch.isfinite(ref64)
    if not torch.equal(bad_out, bad_ref):
        idx = (bad_out != bad_ref).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: non-finite mismatch at {idx}: out={out64[tuple(idx)].item()} ref={ref64[tuple(idx)].item()}"
        )
    finite = ~bad_ref
    err = rel_error(out64[finite], ref64[finite])
    if err > rtol:
        diff = (out64 - ref64).abs().masked_fill(~finite, 0)
        idx = tuple(torch.nonzero(diff == diff.max())[0].tolist())
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {idx}: "
            f"out={out64[idx].item():.6g} ref={ref64[idx].item():.6g}"
        )
    return err
