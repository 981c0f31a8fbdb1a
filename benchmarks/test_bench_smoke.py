"""CI smoke benchmark (pytest-benchmark, CPU, tiny shapes): the suite runs and its numbers
are positive and finite. Not a performance assertion: CPU timings on CI runners mean little.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorakern.bench.cost import ROOFLINE_NOTE, ROOFLINE_TOLERANCE
from lorakern.bench.providers import PROVIDERS, Weights, build, peft_available
from lorakern.bench.suite import BenchConfig, run_suite
from lorakern.bench.timing import CPU_NOISY_SPREAD

CPU = torch.device("cpu")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_fwd_bwd(benchmark, provider):
    if provider == "peft" and not peft_available()[0]:
        pytest.skip("peft not installed")
    torch.manual_seed(0)
    w = Weights.random(64, 96, 4, torch.float32, CPU)
    module = build(provider, w, dropout=0.1)
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 96)

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        y = module(x)
        y.backward(dy)
        return y

    y = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert y.shape == (32, 96) and torch.isfinite(y).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in module.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
    if benchmark.stats is not None:  # None under --benchmark-disable
        assert benchmark.stats.stats.min > 0


def test_suite_tiny(benchmark):
    config = BenchConfig.for_device(CPU, "tiny", e2e=False)
    results = benchmark.pedantic(run_suite, args=(config,), kwargs={"progress": False}, rounds=1, iterations=1)
    assert results["rows"] and results["memory"]
    for row in results["rows"]:
        for field in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "ratio_to_base"):
            assert math.isfinite(row[field]) and row[field] > 0, (field, row)
        if row["roofline_frac"] is None:  # blanked: above the measured ceilings
            assert row["roofline_note"] == ROOFLINE_NOTE and row["roofline_frac_measured"] > ROOFLINE_TOLERANCE
        else:
            assert 0 < row["roofline_frac"] <= ROOFLINE_TOLERANCE, row
        assert row["noisy"] == (row["p80_ms"] / row["p20_ms"] > CPU_NOISY_SPREAD), row
    assert results["noise"]["noisy_rows"] == sum(r["noisy"] for r in results["rows"])
    c = results["ceilings"]
    assert c["copy_GBps"] == max(c["copy_stream_GBps"], c["read_stream_GBps"]) > 0
    assert c["threads"] == torch.get_num_threads() and c["matmul_n"] in c["matmul_sizes"]
    for m in results["memory"]:
        assert m["saved_bytes"] >= 0
    assert {r["provider"] for r in results["rows"]} == set(results["providers"])
