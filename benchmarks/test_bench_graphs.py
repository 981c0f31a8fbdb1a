"""The decode-under-CUDA-graphs section of the suite (lorakern/bench/graphs.py), on CPU: the
capture is replaced by the eager call (`graphs.capture` monkeypatched), so the row bookkeeping,
the error rows, the suite's wiring, the target and the report table run without a GPU. The
capture itself only runs on CUDA."""

from __future__ import annotations

import pytest
import torch

from lorakern.bench import graphs
from lorakern.bench.providers import EagerLora, available_providers
from lorakern.bench.report import graphs_table, to_markdown
from lorakern.bench.suite import BenchConfig, run_suite
from lorakern.bench.targets import _graph_target
from lorakern.bench.timing import CPU_NOISY_SPREAD, TimerSpec
from lorakern.layer import LoraLinear

CPU = torch.device("cpu")
SPEC = TimerSpec(warmup_ms=1, rep_ms=3, min_reps=3, cpu_flush_bytes=0)
KN = ((32, 24), (24, 40))


def _eager_capture(calls: list | None = None):
    """A stand-in for `graphs.capture`: the eager call (recorded in `calls`), checking that
    the rows run it as decode does: eval mode, under torch.inference_mode."""
    def capture(module, x):
        assert torch.is_inference_mode_enabled() and not module.training
        if calls is not None:
            calls.append(tuple(x.shape))
        return lambda: module(x)

    return capture


def _providers() -> list[str]:
    return available_providers(["base", "eager", "addmm", "peft", "lorakern"])[0]


def test_graph_rows_one_per_provider_shape_and_M(monkeypatch):
    calls = []
    monkeypatch.setattr(graphs, "capture", _eager_capture(calls))
    providers = _providers()
    rows, warnings = graphs.graph_rows(KN, (1, 4), (4,), providers, torch.float32, CPU, SPEC, agree_rtol=1e-5)
    assert len(rows) == len(calls) == graphs.count(KN, (1, 4), (4,), providers) == 4 * len(providers)
    assert sorted(calls) == sorted((M, K) for (K, _) in KN for M in (1, 4) for _ in providers)
    assert {(d["provider"], d["K"], d["N"], d["M"]) for d in rows} == {
        (p, K, N, M) for p in providers for (K, N) in KN for M in (1, 4)}
    base = {(d["K"], d["N"], d["M"]): d["median_ms"] for d in rows if d["provider"] == "base"}
    for d in rows:
        assert d["error"] is None and d["error_stage"] is None and d["median_ms"] > 0 and d["r"] == 4
        assert d["dtype"] == "float32" and d["p20_ms"] <= d["median_ms"] <= d["p80_ms"]
        assert d["ratio_to_base"] == pytest.approx(d["median_ms"] / base[(d["K"], d["N"], d["M"])])
        assert d["noisy"] == (d["p80_ms"] / d["p20_ms"] > CPU_NOISY_SPREAD)
        if d["provider"] != "base":  # the "replayed" output is the layer's
            assert d["rel_err"] < 1e-5 and d["agrees"] is True, d
    assert all(d["ratio_to_base"] == 1.0 and d["rel_err"] is None for d in rows if d["provider"] == "base")
    assert not [w for w in warnings if "failed" in w]


def test_a_failed_capture_is_an_error_row_and_a_warning(monkeypatch):
    eager = _eager_capture()

    def capture(module, x):
        if isinstance(module, LoraLinear):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")
        return eager(module, x)

    monkeypatch.setattr(graphs, "capture", capture)
    rows, warnings = graphs.graph_rows(KN[:1], (2,), (4,), ["base", "eager", "lorakern"], torch.float32, CPU, SPEC)
    by = {d["provider"]: d for d in rows}
    lk = by["lorakern"]
    assert lk["median_ms"] is None and lk["ratio_to_base"] is None and lk["noisy"] is False
    assert lk["error"] == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert lk["error_stage"] == "capture" and lk["rel_err"] is None and lk["agrees"] is None
    assert by["base"]["median_ms"] > 0 and by["eager"]["ratio_to_base"] is not None
    (warning,) = [w for w in warnings if "failed" in w]
    assert "lorakern" in warning and "capture failed" in warning and lk["error"] in warning
    table = graphs_table({"decode_graphs": rows, "noise": {}})
    assert "capture: RuntimeError" in table and table.count("\n") >= 4


def test_no_base_time_leaves_every_ratio_empty(monkeypatch):
    eager = _eager_capture()

    def capture(module, x):
        if type(module) is torch.nn.Linear:
            raise ValueError("boom")
        return eager(module, x)

    monkeypatch.setattr(graphs, "capture", capture)
    rows, _ = graphs.graph_rows(KN[:1], (1,), (4,), ["base", "eager"], torch.float32, CPU, SPEC)
    assert [d["ratio_to_base"] for d in rows] == [None, None] and rows[1]["median_ms"] > 0


def test_error_description_names_the_hidden_cause():
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")
    except RuntimeError as exc:
        text = graphs.describe_error(exc)
    assert text == ("RuntimeError: CUDA error: operation failed due to a previous error during capture "
                    "(after RuntimeError: operation not permitted when stream is capturing)")
    assert graphs.describe_error(KeyError()) == "KeyError"


def test_only_cuda_runs_with_decode_get_graph_rows():
    assert graphs.wanted(torch.device("cuda"), ("fwd", "decode"))
    assert not graphs.wanted(torch.device("cuda"), ("fwd", "fwd+bwd"))
    assert not graphs.wanted(CPU, ("decode",))
    assert graphs.decode_tokens((1, 16, 512), ("decode", "fwd")) == [1, 16]
    assert graphs.decode_tokens((1, 16, 512), ("fwd",)) == []


def test_suite_on_cpu_has_no_graph_rows():
    config = BenchConfig.for_device(CPU, "tiny", e2e=False, memory=False)
    results = run_suite(config, progress=False)
    assert results["decode_graphs"] == [] and results["rows"]
    assert not [w for w in results["warnings"] if "CUDA graphs" in w]
    assert "Decode under CUDA graphs" not in to_markdown(results)


def test_suite_wires_graph_rows_into_results(monkeypatch):
    """With the CUDA check and the capture replaced, the CPU suite carries the section through:
    rows under `decode_graphs`, a failed provider's warning in the run's warnings, the table."""
    eager = _eager_capture()

    def capture(module, x):
        if isinstance(module, EagerLora):
            raise RuntimeError("capture broke")
        return eager(module, x)

    monkeypatch.setattr(graphs, "wanted", lambda device, modes: True)
    monkeypatch.setattr(graphs, "capture", capture)
    config = BenchConfig.for_device(CPU, "tiny", e2e=False, memory=False, providers=("base", "eager", "lorakern"))
    results = run_suite(config, progress=False)
    decode_M = graphs.decode_tokens(config.tokens, config.modes)
    assert decode_M == [4]
    rows = results["decode_graphs"]
    assert len(rows) == graphs.count(config.kn, decode_M, config.ranks, results["providers"]) == 6
    assert {d["provider"] for d in rows if d["error"]} == {"eager"}
    assert all(d["agrees"] for d in rows if d["provider"] != "base" and not d["error"])  # the suite's fp32 tolerance
    assert sum("eager's capture failed" in w for w in results["warnings"]) == 2
    md = to_markdown(results)
    assert "## Decode under CUDA graphs" in md and "capture: RuntimeError: capture broke" in md


def _row(provider, ms, *, base_ms=1.0, noisy=False, error=None, M=1, K=4096, N=4096, r=16, dtype="bfloat16"):
    timed = error is None
    return {"provider": provider, "K": K, "N": N, "M": M, "r": r, "dtype": dtype,
            "median_ms": ms if timed else None, "p20_ms": ms if timed else None, "p80_ms": ms if timed else None,
            "reps": 10 if timed else None, "rel_err": 1e-3 if timed else None, "agrees": True if timed else None,
            "error": error, "error_stage": None if timed else "capture",
            "ratio_to_base": ms / base_ms if timed and base_ms else None, "noisy": noisy}


def _target(rows):
    (target,) = _graph_target({"decode_graphs": rows})
    assert target["limit"] == 1.10 and target["op"] == "<="
    assert target["target"] == "lorakern decode under CUDA graphs / graphed base (bf16, r=16, Llama-3-8B)"
    return target


def test_graph_target_met_and_missed():
    rows = [_row("base", 1.0), _row("lorakern", 1.05), _row("base", 1.0, M=16), _row("lorakern", 1.08, M=16)]
    target = _target(rows)
    assert target["met"] is True and target["value"] == pytest.approx(1.08) and "M=16" in target["detail"]
    target = _target(rows + [_row("base", 1.0, K=14336), _row("lorakern", 1.3, K=14336)])
    assert target["met"] is False and target["value"] == pytest.approx(1.3) and "K=14336" in target["detail"]


def test_graph_target_leaves_out_noisy_rows_and_noisy_bases():
    rows = [_row("base", 1.0), _row("lorakern", 1.05), _row("lorakern", 2.0, M=4, noisy=True),
            _row("base", 1.0, M=16, noisy=True), _row("lorakern", 1.9, M=16)]
    target = _target(rows)
    assert target["met"] is True and target["value"] == pytest.approx(1.05)
    assert "2 noisy rows excluded" in target["detail"]
    target = _target([_row("base", 1.0), _row("lorakern", 2.0, noisy=True)])
    assert target["met"] is None and target["value"] is None and "noisy" in target["detail"]


def test_graph_target_is_missed_when_a_lorakern_capture_failed_and_says_why():
    rows = [_row("base", 1.0), _row("lorakern", 1.02), _row("base", 1.0, M=16),
            _row("lorakern", None, M=16, error="RuntimeError: operation not permitted when stream is capturing")]
    target = _target(rows)
    assert target["met"] is False and target["value"] == pytest.approx(1.02)
    assert "1 row left out as failed" in target["detail"] and "M=16, capture failed" in target["detail"]
    assert "operation not permitted" in target["detail"]
    target = _target([_row("base", 1.0), _row("lorakern", None, error="RuntimeError: x")])
    assert target["met"] is False and target["value"] is None and "capture failed" in target["detail"]
    target = _target([_row("base", None, error="RuntimeError: x"), _row("lorakern", 1.0, base_ms=None)])
    assert target["met"] is None and "no graphed base time" in target["detail"]


def test_graph_target_reads_only_the_headline_rows():
    assert _graph_target({}) == [] and _graph_target({"decode_graphs": []}) == []
    assert _graph_target({"decode_graphs": [_row("base", 1.0, dtype="float32"),
                                            _row("lorakern", 3.0, dtype="float32")]}) == []
    assert _graph_target({"decode_graphs": [_row("lorakern", 3.0, K=512, N=512)]}) == []
