"""CI smoke run of the suite's DoRA rows (`lorakern bench --suite dora`) on CPU, tiny shapes:
lorakern's DoRA (reference path) against PEFT's. Checks that every provider runs, computes
what it should (same A, B and magnitude, against fp64 of PEFT's formula) and that the numbers
are well-formed; no speed is asserted."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("peft") is None:
    pytest.skip("peft is not installed", allow_module_level=True)

from lorakern import cli  # noqa: E402
from lorakern.bench.dora import (  # noqa: E402
    BASE, DORA_PROVIDERS, LK_DORA, PEFT_DORA, build_dora, dora_reference, random_magnitude,
)
from lorakern.bench.providers import Weights  # noqa: E402
from lorakern.bench.report import to_markdown  # noqa: E402
from lorakern.bench.suite import BenchConfig, run_suite  # noqa: E402

CPU = torch.device("cpu")


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def tiny_dora():
    torch.manual_seed(0)
    config = BenchConfig.for_device(CPU, "tiny", suite="dora", dropouts=(0.0, 0.1))
    return run_suite(config, progress=False)


def test_dora_rows_every_provider_every_shape(tiny_dora):
    results = tiny_dora
    assert results["config"]["suite"] == "dora" and results["config"]["dtype"] == "float32"
    assert results["providers"] == list(DORA_PROVIDERS) and not results["skipped_providers"]
    assert results["e2e"] == [] and results["config"]["e2e"] is False
    keys = {(r["provider"], r["mode"], r["K"], r["N"], r["M"]) for r in results["rows"]}
    for p in DORA_PROVIDERS:
        for K, N in ((64, 64), (64, 96)):
            assert {(p, "decode", K, N, 4), (p, "fwd", K, N, 48), (p, "fwd+bwd", K, N, 48)} <= keys, (p, K, N)
    assert not any(r["provider"] == BASE and r["dropout"] != 0.0 for r in results["rows"])
    assert {r["provider"] for r in results["rows"] if r["dropout"] == 0.1} == {PEFT_DORA, LK_DORA, "lorakern"}
    for r in results["rows"]:
        for field in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "ratio_to_base", "roofline_frac"):
            assert _finite_positive(r[field]), (field, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        if r["provider"] == BASE:
            assert r["ratio_to_base"] == 1.0 and r["rel_err"] is None
        elif r["dropout"] == 0.0:  # fp32 against fp64 of PEFT's DoRA formula (plain LoRA's for lorakern)
            assert r["rel_err"] <= 1e-5 and r["agrees"] is True, r
    ratios = results["dora"]["ratios"]
    assert len(ratios) == 2 * (1 + 2 * 2)  # per shape: decode at p=0, fwd and fwd+bwd at both dropouts
    for d in ratios:
        assert d["lorakern_dora_over_peft_dora"] == pytest.approx(d["lorakern_dora_ms"] / d["peft_dora_ms"])


def test_dora_memory_and_targets(tiny_dora):
    results = tiny_dora
    saved = {(m["provider"], m["N"], m["dropout"]): m["saved_bytes"] for m in results["memory"]}
    for N in (64, 96):
        # lorakern keeps x, S and z = x Wᵀ + s·S Bᵀ (for m's gradient); PEFT keeps more (its DoRA
        # branch's inputs and intermediate outputs)
        assert 0 < saved[(LK_DORA, N, 0.0)] < saved[(PEFT_DORA, N, 0.0)]
    names = {t["target"]: t for t in results["targets"]}
    for mode in ("fwd", "fwd+bwd", "decode"):
        t = names[f"lorakern DoRA {mode} time / PEFT DoRA's (worst row)"]
        assert _finite_positive(t["value"]) and t["limit"] == 1.0 and t["met"] in (True, False)
    assert any(n.startswith("saved activations: lorakern DoRA / PEFT DoRA") for n in names)
    md = to_markdown(results)
    assert "# lorakern DoRA benchmark" in md and "## lorakern DoRA vs PEFT DoRA" in md and "| lorakern-dora |" in md


def test_dora_providers_agree_in_training_mode():
    """Same A, B, m: PEFT's and lorakern's DoRA give the same output and gradients (dropout 0)."""
    torch.manual_seed(1)
    w = Weights.random(40, 24, 4, torch.float32, CPU, bias=True)
    m = random_magnitude(w)
    x = torch.randn(6, 40)
    ref = dora_reference(x, w, m)
    outs, grads = {}, {}
    for name in (PEFT_DORA, LK_DORA):
        module = build_dora(name, w, 0.0, m)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.square().sum().backward()
        outs[name] = y.detach()
        mag = module.lora_magnitude_vector["default"].weight
        grads[name] = (xi.grad, mag.grad, module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[PEFT_DORA], grads[LK_DORA]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cli_dora_suite_arguments(capsys):
    assert cli.main(["bench", "--device", "cpu", "--suite", "dora", "--shapes", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'suite': 'dora'" in out and "'lorakern-dora'" in out and "'peft-dora'" in out and "'e2e': False" in out
    with pytest.raises(SystemExit):  # a dense-suite provider in the DoRA suite
        cli.main(["bench", "--device", "cpu", "--suite", "dora", "--providers", "peft", "--dry-run"])
