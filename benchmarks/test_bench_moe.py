"""CI smoke run of the suite's MoE rows (`lorakern bench --suite moe`) on CPU, tiny shapes: LoRA on
a Mixtral experts block's parameters, lorakern (reference path) against PEFT with the same adapters.
Checks that every provider runs, computes what it should (against an fp64 formula of the block
with W + s·B_e A_e formed in fp64) and that the numbers and byte counts are well-formed; no speed
is asserted."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("peft and transformers are needed", allow_module_level=True)

from lorakern import cli  # noqa: E402
from lorakern.bench.moe import (  # noqa: E402
    BASE, EXPERTS, LK, MOE_PROVIDERS, PEFT, TOP_K, ExpertWeights, Routed, Routing, build_providers, floors,
    materialised_extra, moe_reference,
)
from lorakern.bench.report import to_markdown  # noqa: E402
from lorakern.bench.suite import BenchConfig, run_suite  # noqa: E402

CPU = torch.device("cpu")


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def tiny_moe():
    torch.manual_seed(0)
    config = BenchConfig.for_device(CPU, "tiny", suite="moe")
    return run_suite(config, progress=False)


def test_moe_rows_every_provider_shape_and_mode(tiny_moe):
    results = tiny_moe
    assert results["config"]["suite"] == "moe" and results["config"]["dtype"] == "float32"
    assert results["providers"] == list(MOE_PROVIDERS) and not results["skipped_providers"]
    assert results["e2e"] == [] and results["config"]["e2e"] is False
    keys = {(r["provider"], r["mode"], r["K"], r["N"], r["M"]) for r in results["rows"]}
    assert len(keys) == len(results["rows"]) == 3 * 2 * 2 * 2  # providers × modes × shapes × M
    for p in MOE_PROVIDERS:
        for H, I in ((64, 64), (64, 96)):
            for M in (4, 48):
                assert {(p, "decode", H, I, M), (p, "fwd+bwd", H, I, M)} <= keys, (p, H, I, M)
    for r in results["rows"]:
        for field in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "ratio_to_base", "roofline_frac"):
            assert _finite_positive(r[field]), (field, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["experts"] == EXPERTS and r["top_k"] == TOP_K and 1 <= r["hit_experts"] <= EXPERTS
        # fp32 against fp64 of the block (the base's own formula for base, W + s·B_e A_e for the LoRA rows)
        assert r["rel_err"] <= 1e-5 and r["agrees"] is True, r
        W = 3 * EXPERTS * r["K"] * r["N"] * 4
        if r["provider"] == BASE:
            assert r["ratio_to_base"] == 1.0 and r["extra_bytes"] == 0
        elif r["provider"] == PEFT:  # W_eff rebuilt every forward
            assert r["extra_bytes"] == (2 if r["mode"] == "decode" else 5) * W, r
        else:  # lorakern's grouped path forms no W_eff
            assert r["extra_bytes"] == 0, r


def test_moe_section_floors_memory_and_report(tiny_moe):
    results = tiny_moe
    ratios = results["moe"]["ratios"]
    assert len(ratios) == 2 * 2 * 2  # modes × shapes × M
    for d in ratios:
        assert d["lorakern_over_peft"] == pytest.approx(d["lorakern_ms"] / d["peft_ms"])
        assert d["lorakern_vs_peft_rel"] <= 1e-6  # the same adapters (other rounding: no W_eff in lorakern)
        assert 0 < d["base_floor_ms"] < d["planned_floor_ms"] < d["as_implemented_floor_ms"]
        assert d["weight_bytes"] == 3 * EXPERTS * d["H"] * d["I"] * 4
    assert results["moe"]["experts_implementation"] == "grouped_mm"
    saved = {(m["provider"], m["N"]): m for m in results["memory"]}
    for N in (64, 96):
        # PEFT keeps its materialised [E, out, in] weights for the backward; lorakern's grouped
        # path keeps the rows' rank-r intermediates instead
        base = saved[(BASE, N)]["saved_bytes"]
        weight = saved[(PEFT, N)]["weight_bytes"]
        assert saved[(PEFT, N)]["saved_bytes"] >= base + weight, N
        assert saved[(LK, N)]["saved_bytes"] < base + weight, N
    names = {t["target"] for t in results["targets"]}
    assert "MoE lorakern decode time / PEFT's (worst row)" in names
    assert "MoE lorakern fwd+bwd time / PEFT's (worst row)" in names
    md = to_markdown(results)
    assert "# lorakern MoE benchmark" in md and "## LoRA on expert parameters" in md and "| lorakern |" in md


def test_moe_providers_agree_in_training_mode():
    """Same adapters: PEFT's and lorakern's LoRA on the experts' parameters give the fp64 output and
    the same gradients for x and for every adapter tensor."""
    w = ExpertWeights(24, 40, torch.float32, CPU, seed=3)
    routing = Routing(11, torch.float32, CPU, seed=4)
    modules = build_providers(w, 3, [BASE, PEFT, LK], seed=5)
    x = torch.randn(11, 24, generator=torch.Generator().manual_seed(6))
    ref = moe_reference(x, w, routing, modules[LK])
    base_ref = moe_reference(x, w, routing, None)
    assert (ref - base_ref).norm() > 0.05 * ref.norm()  # the adapters change the output: the check is not vacuous
    grads = {}
    for name in (PEFT, LK):
        xi = x.clone().requires_grad_(True)
        y = Routed(modules[name], routing).train()(xi)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        adapters = sorted((n, p.grad) for n, p in modules[name].named_parameters() if p.requires_grad)
        assert len(adapters) == 4 and all(g is not None for _, g in adapters)
        grads[name] = [xi.grad] + [g for _, g in adapters]
    assert w.gate_up_proj.grad is None and w.down_proj.grad is None
    for a, b in zip(grads[PEFT], grads[LK]):
        # the same math, another association (lorakern forms no W_eff): fp32 rounding apart,
        # measured over each whole gradient, the project's relative-error bar
        assert (a.double() - b.double()).norm() <= 1e-5 * b.double().norm()


def test_moe_floors_at_gpu_shapes():
    """The byte counts at the GPU preset's Mixtral-8x7B shapes in bf16: W = 8·3·4096·14336·2 B."""
    W = 8 * 3 * 4096 * 14336 * 2
    assert materialised_extra("decode", 16, 4096, 14336, 16, 2).bytes == 2 * W
    assert materialised_extra("fwd+bwd", 16, 4096, 14336, 16, 2).bytes == 5 * W
    ceilings = {"matmul_TFLOPs": 767.1, "copy_GBps": 4251.7}
    f = floors("decode", 16, 4096, 14336, 16, 2, 8, ceilings)
    assert f["base_floor_ms"] == pytest.approx(W / 4251.7e9 * 1e3, rel=1e-3)  # memory-bound: read W once
    assert f["as_implemented_floor_ms"] == pytest.approx(3 * f["base_floor_ms"], rel=1e-2)


def test_cli_moe_suite_arguments(capsys):
    assert cli.main(["bench", "--device", "cpu", "--suite", "moe", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'suite': 'moe'" in out and "'preset': 'moe-small'" in out and "'e2e': False" in out
    assert "'modes': ['decode', 'fwd+bwd']" in out and "'providers': ['base', 'peft', 'lorakern']" in out
    with pytest.raises(SystemExit):  # a dense-suite provider in the MoE suite
        cli.main(["bench", "--device", "cpu", "--suite", "moe", "--providers", "eager", "--dry-run"])
    with pytest.raises(ValueError, match="dropout"):
        run_suite(BenchConfig.for_device(CPU, "tiny", suite="moe", dropouts=(0.1,)), progress=False)
