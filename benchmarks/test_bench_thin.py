"""The thin-kernel section of the suite (lorakern/bench/thin.py): every thin kernel timed alone,
its GB/s against the copy ceiling, and the target that reads them. The kernels run in Triton's
interpreter here, at tiny shapes: the plumbing and the byte counts, not speed."""

from __future__ import annotations

import pytest
import torch

from lorakern import settings
from lorakern.bench import thin
from lorakern.bench.targets import _thin_target
from lorakern.bench.timing import TimerSpec

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or settings.interpret),
                                reason="needs a GPU or TRITON_INTERPRET=1")


def test_thin_rows_time_every_kernel_and_count_its_bytes():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    M, K, N, r = 64, 48, 40, 16
    spec = TimerSpec(warmup_ms=1, rep_ms=2, min_reps=2, cpu_flush_bytes=0)
    rows = thin.thin_rows(((K, N),), M, (r,), (0.0, 0.1), torch.float32, device, spec, copy_gbps=10.0)
    assert len(rows) == thin.count(((K, N),), (r,), (0.0, 0.1)) == 10
    names = {(d["kernel"], d["dropout"]) for d in rows}
    assert names == {(k, 0.0) for k in ("shrink", "dA", "dx pass", "dS+dB", "dS+dB split", "fwd pass", "merge W′")} | {
        (k, 0.1) for k in ("shrink", "dA", "dx pass")}
    by = {(d["kernel"], d["dropout"]): d for d in rows}
    assert by[("shrink", 0.0)]["bytes"] == M * K * 4 + r * K * 4 + M * r * 4
    assert by[("merge W′", 0.0)]["bytes"] == 2 * N * K * 4 + r * K * 4 + N * r * 4
    for d in rows:
        assert d["median_ms"] > 0 and d["gbps"] == pytest.approx(d["bytes"] / (d["median_ms"] * 1e-3) / 1e9)
        assert d["copy_frac"] == pytest.approx(d["gbps"] / 10.0)


def test_each_thin_case_computes_what_its_launcher_promises():
    """The cases call the launchers on consistent inputs: the merge row's W′ equals W + s·B A."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = {name: fn for name, _, fn in thin.thin_cases(32, 24, 20, 4, torch.float32, 0.0, device)}
    out = cases["merge W′"]()
    assert out.shape == (20, 24) and torch.isfinite(out).all()
    assert cases["shrink"]().shape == (32, 4)


def _thin_row(kernel, frac, noisy=False, M=8192):
    return {"kernel": kernel, "K": 4096, "N": 4096, "M": M, "r": 16, "dropout": 0.0, "dtype": "bfloat16",
            "median_ms": 0.1, "p20_ms": 0.1, "p80_ms": 0.1, "bytes": 1, "gbps": frac * 4000, "copy_frac": frac,
            "noisy": noisy}


def test_thin_target_takes_the_slowest_clean_kernel_at_8192():
    rows = [_thin_row("shrink", 0.8), _thin_row("dA", 0.4, noisy=True), _thin_row("dS+dB", 0.6),
            _thin_row("fwd pass", 0.1, M=2048)]
    (target,) = _thin_target({"thin_kernels": rows})
    assert target["value"] == 0.6 and target["met"] is False and target["limit"] == thin.TARGET_COPY_FRACTION
    assert "dS+dB" in target["detail"] and "1 noisy" in target["detail"]
    (target,) = _thin_target({"thin_kernels": [_thin_row("dA", 0.4, noisy=True)]})
    assert target["met"] is None and target["value"] is None
    assert _thin_target({"thin_kernels": []}) == [] and _thin_target({}) == []


def test_thin_table_in_results_markdown():
    from lorakern.bench.report import thin_table

    table = thin_table({"thin_kernels": [_thin_row("merge W′", 0.9), _thin_row("shrink", 0.5, noisy=True)]})
    assert "merge W′" in table and "0.90" in table and "0.100*" in table


def test_thin_target_takes_the_better_dsdb_grid():
    """dS+dB is timed on both grids and the backward runs the faster: the target reads the
    better clean one of the pair; with both noisy, the pair counts as noisy."""
    rows = [_thin_row("shrink", 0.8), _thin_row("dS+dB", 0.5), _thin_row("dS+dB split", 0.7)]
    (target,) = _thin_target({"thin_kernels": rows})
    assert target["value"] == 0.7 and "dS+dB split" in target["detail"]
    rows = [_thin_row("shrink", 0.8), _thin_row("dS+dB", 0.5), _thin_row("dS+dB split", 0.9, noisy=True)]
    (target,) = _thin_target({"thin_kernels": rows})
    assert target["value"] == 0.5 and "dS+dB K=" in target["detail"]
    rows = [_thin_row("shrink", 0.8), _thin_row("dS+dB", 0.5, noisy=True), _thin_row("dS+dB split", 0.6, noisy=True)]
    (target,) = _thin_target({"thin_kernels": rows})
    assert target["value"] == 0.8 and "1 noisy" in target["detail"]

