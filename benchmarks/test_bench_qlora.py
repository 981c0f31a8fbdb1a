"""CI smoke run of the suite's QLoRA rows (`lorakern bench --suite qlora`) on CPU, tiny shapes:
lorakern's reference path against bitsandbytes' CPU path. Checks that every provider runs,
computes what it should and that the numbers are well-formed; no speed is asserted (the GPU
targets are evaluated on a synthetic GPU run instead)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

for _name in ("bitsandbytes", "peft"):
    if importlib.util.find_spec(_name) is None:
        pytest.skip(f"{_name} is not installed", allow_module_level=True)

from lorakern import cli  # noqa: E402
from lorakern.bench import e2e as e2e_mod  # noqa: E402
from lorakern.bench.qlora import BASE, FROZEN, QLORA_PROVIDERS, bnb_available  # noqa: E402
from lorakern.bench.report import to_markdown  # noqa: E402
from lorakern.bench.shapes import LLAMA8B_KN  # noqa: E402
from lorakern.bench.suite import BenchConfig, run_suite  # noqa: E402
from lorakern.bench.targets import CPU_NOTE, evaluate_targets  # noqa: E402

CPU = torch.device("cpu")
_ok, _why = bnb_available(CPU)
if not _ok:
    pytest.skip(_why, allow_module_level=True)


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def tiny_qlora():
    torch.manual_seed(0)
    config = BenchConfig.for_device(CPU, "tiny", suite="qlora", e2e=False, dropouts=(0.0, 0.1))
    return run_suite(config, progress=False)


def test_qlora_rows_every_provider_every_shape(tiny_qlora):
    results = tiny_qlora
    assert results["config"]["suite"] == "qlora" and results["config"]["dtype"] == "bfloat16"
    assert results["providers"] == list(QLORA_PROVIDERS) and not results["skipped_providers"]
    keys = {(r["provider"], r["mode"], r["K"], r["N"], r["M"]) for r in results["rows"]}
    for p in QLORA_PROVIDERS:
        for K, N in ((64, 64), (64, 96)):
            assert {(p, "decode", K, N, 4), (p, "fwd", K, N, 48), (p, "fwd+bwd", K, N, 48)} <= keys, (p, K, N)
    # frozen bases are timed once per mode (dropout 0); the LoRA providers at both dropouts
    assert not any(r["provider"] in FROZEN and r["dropout"] != 0.0 for r in results["rows"])
    assert {r["provider"] for r in results["rows"] if r["dropout"] == 0.1} == {"peft-qlora", "lorakern-qlora"}
    for r in results["rows"]:
        for field in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "ratio_to_base", "roofline_frac"):
            assert _finite_positive(r[field]), (field, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        if r["provider"] == BASE:
            assert r["ratio_to_base"] == 1.0 and r["bits_per_param"] == 16.0
        else:  # NF4 + double quant: 4 bits + an 8-bit absmax per 64 + the nested statistics
            assert 4.125 < r["bits_per_param"] < 4.15, r
        if r["dropout"] == 0.0:  # each provider against fp64 of what it should compute (dense or dequantised W)
            assert r["rel_err"] <= 1e-2 and r["agrees"] is True, r


def test_qlora_memory_and_stored_weights(tiny_qlora):
    results = tiny_qlora
    saved = {(m["provider"], m["N"], m["dropout"]): m["saved_bytes"] for m in results["memory"]}
    for N in (64, 96):
        # lorakern keeps x and S whatever the dropout (and never a dense copy of W)
        assert saved[("lorakern-qlora", N, 0.1)] == saved[("lorakern-qlora", N, 0.0)] >= 48 * 64 * 2
        assert saved[("peft-qlora", N, 0.1)] > saved[("peft-qlora", N, 0.0)]
    assert all(m["peak_bytes"] is None for m in results["memory"])  # CPU: no allocator peak
    weights = {(w["provider"], w["N"]): w for w in results["quant"]["weights"]}
    for N in (64, 96):
        assert weights[(BASE, N)]["weight_bytes"] == 64 * N * 2
        quantized = {weights[(p, N)]["bits_per_param"] for p in QLORA_PROVIDERS if p != BASE}
        assert len(quantized) == 1  # bitsandbytes and lorakern store the same format


def test_qlora_targets_on_cpu_are_information_only(tiny_qlora):
    targets = tiny_qlora["targets"]
    names = {t["target"] for t in targets}
    assert "QLoRA base weights: bits per parameter (NF4, double quant, blocksize 64)" in names
    assert any(n.startswith("lorakern QLoRA fwd+bwd / bf16 base") for n in names)
    assert any(n.startswith("lorakern QLoRA decode / bf16 base") for n in names)
    for t in targets:
        assert t["limit"] is None and t["met"] is None and CPU_NOTE in t["detail"], t
    md = to_markdown(tiny_qlora)
    assert "# lorakern QLoRA benchmark" in md and "## Stored base weights" in md and "| lorakern-qlora |" in md


def test_qlora_e2e_same_model_same_start():
    """lorakern.quantize + inject vs BitsAndBytesConfig 4-bit + PEFT on the micro Llama: same
    dense weights, same A (B = 0), same batch, so their first losses agree."""
    pytest.importorskip("transformers")
    rows = e2e_mod.run_e2e_qlora(CPU, torch.bfloat16, e2e_mod.SIZES["micro"], ["lorakern-qlora", "peft-qlora"])
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"lorakern-qlora", "peft-qlora"}
    lk, pf = by["lorakern-qlora"], by["peft-qlora"]
    assert lk["params"] == pf["params"] and lk["trainable_params"] == pf["trainable_params"] > 0
    assert lk["loss_first"] == pytest.approx(pf["loss_first"], rel=1e-3)
    for r in rows:
        assert _finite_positive(r["tokens_per_s"]) and _finite_positive(r["saved_bytes"])
        assert r["loss_last"] != r["loss_first"], f"{r['provider']}: the adapters did not train"


def test_cli_qlora_suite_arguments(capsys):
    assert cli.main(["bench", "--device", "cpu", "--suite", "qlora", "--shapes", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'suite': 'qlora'" in out and "'dtype': 'bfloat16'" in out and "'lorakern-qlora'" in out
    with pytest.raises(SystemExit):  # a dense-suite provider in the QLoRA suite
        cli.main(["bench", "--device", "cpu", "--suite", "qlora", "--providers", "peft", "--dry-run"])


# ---- the GPU branch of the QLoRA targets, on a synthetic H200 run --------------------------


def _fake_gpu_qlora(decode_ratio: float, e2e_speedup: float) -> dict:
    times = {BASE: 1.0, "bnb-4bit": 1.4, "peft-qlora": 1.6}
    lk = {"fwd": 1.08, "fwd+bwd": 1.12, "decode": decode_ratio}
    rows = []
    for K, N in LLAMA8B_KN:
        for mode, M in (("decode", 1), ("decode", 16), ("fwd", 8192), ("fwd+bwd", 8192), ("fwd+bwd", 512)):
            for provider, ms in {**times, "lorakern-qlora": lk[mode] if M != 512 else 3.0}.items():
                rows.append({
                    "provider": provider, "mode": mode, "K": K, "N": N, "M": M, "r": 16, "dtype": "bfloat16",
                    "dropout": 0.0, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 10, "tflops": 1.0,
                    "gbps": 1.0, "ratio_to_base": ms, "roofline_frac": 0.5, "rel_err": 3e-3, "agrees": True,
                    "bits_per_param": 16.0 if provider == BASE else 4.127,
                })
    e2e = [{"provider": p, "size": "1b", "tokens_per_s": tps, "peak_bytes": peak, "saved_bytes": 10}
           for p, tps, peak in (("peft-qlora", 1000.0, 8 * 2**30), ("lorakern-qlora", 1000.0 * e2e_speedup, 6 * 2**30))]
    return {"machine": {"device": "cuda"}, "config": {"suite": "qlora"}, "rows": rows, "memory": [], "e2e": e2e}


@pytest.mark.parametrize("decode_ratio, e2e_speedup, met", [(0.55, 1.6, True), (0.7, 1.4, False)])
def test_gpu_qlora_targets_on_synthetic_rows(decode_ratio, e2e_speedup, met):
    targets = {t["target"]: t for t in evaluate_targets(_fake_gpu_qlora(decode_ratio, e2e_speedup))}
    bits = targets["QLoRA base weights: bits per parameter (NF4, double quant, blocksize 64)"]
    assert bits["value"] == pytest.approx(4.127) and bits["met"] is True
    fb = targets["lorakern QLoRA fwd+bwd / bf16 base (M=8192, r=16, Llama-3-8B)"]
    assert fb["value"] == pytest.approx(1.12) and fb["met"] is True  # the M=512 rows are not headline
    decode = targets["lorakern QLoRA decode / bf16 base (M=1-16, r=16, Llama-3-8B)"]
    assert decode["value"] == pytest.approx(decode_ratio) and decode["met"] is met
    tps = targets["end-to-end tokens/s: lorakern QLoRA / PEFT + bitsandbytes QLoRA"]
    assert tps["value"] == pytest.approx(e2e_speedup) and tps["met"] is met
    assert targets["end-to-end peak memory: lorakern QLoRA / PEFT QLoRA"]["value"] == pytest.approx(0.75)
    assert not any(CPU_NOTE in t["detail"] for t in targets.values())
