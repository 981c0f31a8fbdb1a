"""The suite's defences against its own bad numbers (issue 11), on synthetic rows and fake
timers so nothing here waits on the machine: noisy rows are re-measured, flagged and left out
of every suite's target verdicts; a roofline fraction above the measured ceilings is blanked
with a note; the ratio plots draw the p20–p80 band."""

from __future__ import annotations

import csv
import itertools

import pytest
import torch

from lorakern.bench import timing
from lorakern.bench.cost import ROOFLINE_NOTE, mark_impossible_rooflines
from lorakern.bench.report import plot_ratios, timing_table, to_markdown, write_results
from lorakern.bench.suite import check_rows
from lorakern.bench.targets import evaluate_targets
from lorakern.bench.timing import CPU_NOISY_SPREAD, CUDA_NOISY_SPREAD, NOISY_REMEASURES, Timing, TimerSpec

CPU = torch.device("cpu")
KN = ((512, 512), (512, 1792))


def _row(provider: str, mode: str, K: int, N: int, M: int, ms: float, base_ms: float | None, *,
         noisy: bool = False, dropout: float = 0.0, r: int = 16, dtype: str = "float32", **extra) -> dict:
    """One timing row as the suites write it; a noisy one has p80 = 3.2 × p20 (the issue's row)."""
    p20, p80 = (ms * 0.6, ms * 1.92) if noisy else (ms * 0.98, ms * 1.02)
    return {
        "provider": provider, "mode": mode, "K": K, "N": N, "M": M, "r": r, "dtype": dtype, "dropout": dropout,
        "median_ms": ms, "p20_ms": p20, "p80_ms": p80, "reps": 20, "tflops": 0.05, "gbps": 1.0,
        "ratio_to_base": ms / base_ms if base_ms else None, "roofline_frac": 0.5, "rel_err": None, "agrees": None,
        "noisy": noisy, **extra,
    }


def _results(rows: list[dict], device: str = "cpu", suite: str = "lora", e2e: list | None = None, **extra) -> dict:
    return {
        "machine": {"device": device, "card": "test card", "driver": None, "torch": "2", "triton": None,
                    "lorakern": "0", "commit": None, "auto_backend": "reference", "card_slug": "test"},
        "config": {"dtype": rows[0]["dtype"] if rows else "float32", "preset": "small", "suite": suite},
        "started_utc": "2026-12-01T00:00:00+00:00", "finished_utc": "2026-12-01T00:01:00+00:00",
        "timer": "fake", "ceilings": {"copy_GBps": 20.0, "matmul_TFLOPs": 0.1, "dtype": "float32", "matmul_n": 1024},
        "providers": sorted({r["provider"] for r in rows}, key=lambda p: p != "base"), "skipped_providers": {},
        "rows": rows, "memory": [], "e2e": e2e or [], "e2e_size": None, "e2e_skipped": None,
        "noise": {"spread_limit": CPU_NOISY_SPREAD, "remeasures": NOISY_REMEASURES}, **extra,
    }


def _cpu_rows(noisy_worst: bool, all_noisy: bool = False) -> list[dict]:
    """fwd+bwd rows of base / peft / lorakern on 2 shapes x 3 M; the worst lorakern / PEFT ratio
    (1.565, K=512 N=1792 M=1024) on a row that is noisy when `noisy_worst`."""
    rows = []
    for (K, N), M in itertools.product(KN, (64, 256, 1024)):
        worst = (K, N, M) == (512, 1792, 1024)
        lk = 1.565 if worst else 1.01
        rows.append(_row("base", "fwd+bwd", K, N, M, 1.0, 1.0, noisy=all_noisy))
        rows.append(_row("peft", "fwd+bwd", K, N, M, 1.0, 1.0, noisy=all_noisy))
        rows.append(_row("lorakern", "fwd+bwd", K, N, M, lk, 1.0, noisy=all_noisy or (worst and noisy_worst)))
    return rows


# ---- (a), (b): verdicts leave noisy rows out ------------------------------------------------


def test_cpu_target_excludes_the_noisy_worst_row():
    [clean] = [t for t in evaluate_targets(_results(_cpu_rows(noisy_worst=False))) if t["target"].startswith("CPU:")]
    assert clean["value"] == pytest.approx(1.565) and clean["met"] is False  # the verdict, from clean data
    assert clean["detail"].startswith("6 rows, median")
    [t] = [t for t in evaluate_targets(_results(_cpu_rows(noisy_worst=True))) if t["target"].startswith("CPU:")]
    assert t["value"] == pytest.approx(1.01) and t["met"] is True
    assert "5 rows (1 noisy row excluded)" in t["detail"], t["detail"]


def test_all_noisy_rows_give_no_verdict():
    [t] = [t for t in evaluate_targets(_results(_cpu_rows(noisy_worst=True, all_noisy=True)))
           if t["target"].startswith("CPU:")]
    assert t["value"] is None and t["met"] is None
    assert "all 6 rows noisy" in t["detail"] and "no verdict" in t["detail"], t["detail"]


def _gpu_rows(noisy_base_decode: bool) -> list[dict]:
    from lorakern.bench.shapes import LLAMA8B_KN

    rows = []
    for K, N in LLAMA8B_KN:
        for mode, M in (("decode", 16), ("fwd", 8192), ("fwd+bwd", 8192)):
            worst = (K, N, mode) == (4096, 4096, "decode")
            rows.append(_row("base", mode, K, N, M, 1.0, 1.0, dtype="bfloat16", noisy=worst and noisy_base_decode))
            rows.append(_row("peft", mode, K, N, M, 1.3, 1.0, dtype="bfloat16"))
            rows.append(_row("lorakern", mode, K, N, M, 1.2 if worst else 1.04, 1.0, dtype="bfloat16"))
    return rows


def test_gpu_ratio_to_base_excluded_when_its_base_row_is_noisy():
    name = "lorakern decode / base (bf16, r=16, Llama-3-8B)"
    t = {t["target"]: t for t in evaluate_targets(_results(_gpu_rows(False), device="cuda"))}[name]
    assert t["value"] == pytest.approx(1.2) and t["met"] is False and t["detail"].startswith("worst of 4 rows:")
    t = {t["target"]: t for t in evaluate_targets(_results(_gpu_rows(True), device="cuda"))}[name]
    assert t["value"] == pytest.approx(1.04) and t["met"] is True
    assert t["detail"].startswith("worst of 3 rows (1 noisy row excluded): "), t["detail"]


def test_noisy_end_to_end_step_gives_no_verdict():
    e2e = [{"provider": p, "size": "tiny", "params": 1, "trainable_params": 1, "tokens_per_step": 256,
            "step_ms_median": ms, "step_ms_p20": ms * 0.5, "step_ms_p80": ms * 2.0, "tokens_per_s": 256 / ms * 1e3,
            "peak_bytes": None, "saved_bytes": 100, "loss_first": 1.0, "loss_last": 0.9, "noisy": p == "peft"}
           for p, ms in (("peft", 10.0), ("lorakern", 8.0))]
    t = {t["target"]: t for t in evaluate_targets(_results(_gpu_rows(False), device="cuda", e2e=e2e))}
    speed = t["end-to-end tokens/s: lorakern / PEFT"]
    assert speed["value"] is None and speed["met"] is None and "peft step times noisy" in speed["detail"]
    assert t["end-to-end saved activations: lorakern / PEFT"]["value"] == 1.0  # memory is not a timing


def test_dora_qlora_moe_mixed_verdicts_leave_noisy_rows_out():
    # DoRA: the worst lorakern-dora / peft-dora pair is noisy
    rows = []
    for K, N in KN:
        noisy = K == 512 and N == 1792
        rows += [_row("base", "fwd", K, N, 256, 1.0, 1.0), _row("peft-dora", "fwd", K, N, 256, 2.0, 1.0),
                 _row("lorakern-dora", "fwd", K, N, 256, 2.5 if noisy else 1.5, 1.0, noisy=noisy),
                 _row("lorakern", "fwd", K, N, 256, 1.1, 1.0)]
    t = {t["target"]: t for t in evaluate_targets(_results(rows, suite="dora"))}
    d = t["lorakern DoRA fwd time / PEFT DoRA's (worst row)"]
    assert d["value"] == pytest.approx(0.75) and d["met"] is True and "(1 noisy row excluded)" in d["detail"]
    b = t["lorakern DoRA fwd / base (M=256)"]
    assert b["value"] == pytest.approx(1.5) and "worst of 1 row (1 noisy row excluded)" in b["detail"]
    # QLoRA on CPU: every lorakern-qlora decode row noisy -> no value, said so
    rows = [_row("base-bf16", "decode", 512, 512, 1, 1.0, 1.0, dtype="bfloat16"),
            _row("peft-qlora", "decode", 512, 512, 1, 2.0, 1.0, dtype="bfloat16"),
            _row("lorakern-qlora", "decode", 512, 512, 1, 0.5, 1.0, dtype="bfloat16", noisy=True)]
    t = {t["target"]: t for t in evaluate_targets(_results(rows, suite="qlora"))}
    q = t["lorakern QLoRA decode / bf16 base (M=1-16)"]
    assert q["value"] is None and q["met"] is None and "all 1 row noisy" in q["detail"]
    assert "all 1 row noisy" in t["lorakern QLoRA / PEFT QLoRA time (worst headline row)"]["detail"]
    # MoE: the lorakern / PEFT pair at the larger M is noisy
    rows, ratios = [], []
    for M in (64, 256):
        noisy = M == 256
        rows += [_row("base", "decode", 256, 512, M, 1.0, 1.0), _row("peft", "decode", 256, 512, M, 2.0, 1.0),
                 _row("lorakern", "decode", 256, 512, M, 3.0 if noisy else 1.8, 1.0, noisy=noisy)]
        lk = 3.0 if noisy else 1.8
        ratios.append({"mode": "decode", "H": 256, "I": 512, "M": M, "r": 16, "base_ms": 1.0, "peft_ms": 2.0,
                       "lorakern_ms": lk, "lorakern_over_peft": lk / 2.0, "planned_floor_ms": 0.5,
                       "as_implemented_floor_ms": 1.0})
    t = {t["target"]: t for t in evaluate_targets(_results(rows, suite="moe", moe={"ratios": ratios}))}
    m = t["MoE lorakern decode time / PEFT's (worst row)"]
    assert m["value"] == pytest.approx(0.9) and "1 row (1 noisy row excluded)" in m["detail"]
    assert t["MoE lorakern decode / base (M=256, H=256 I=512)"]["value"] is None
    # mixed (CPU): the worst lorakern / PEFT row is noisy
    rows, ratios = [], []
    for M in (16, 64):
        noisy = M == 64
        ms = 3.0 if noisy else 1.5
        rows += [_row("base", "decode", 512, 512, M, 1.0, 1.0, adapters=0),
                 _row("peft", "decode", 512, 512, M, 2.0, 1.0, adapters=8),
                 _row("lorakern", "decode", 512, 512, M, ms, 1.0, noisy=noisy, adapters=8)]
        ratios.append({"provider": "lorakern", "mode": "decode", "phase": "decode", "K": 512, "N": 512, "M": M,
                       "r": 16, "adapters": 8, "distinct": 8, "over_base": ms, "over_peft": ms / 2.0,
                       "peft_over": 2.0 / ms, "loop_over": None, "over_shared": None})
    t = {t["target"]: t for t in evaluate_targets(_results(rows, suite="mixed", mixed={"ratios": ratios}))}
    x = t["CPU: lorakern / PEFT mixed-batch forward time (worst row)"]
    assert x["value"] == pytest.approx(0.75) and x["met"] is True and "(1 noisy row excluded)" in x["detail"]


# ---- (c): re-measuring -----------------------------------------------------------------------


def _fake_timings(*spreads_per_call: dict[str, float]):
    """A stand-in for time_cpu_interleaved: call i returns, per name, a Timing of median 1 + i
    and the given spread; records which names each call measured."""
    calls = []

    def fake(fns, spec, grad_to_none):
        i = len(calls)
        calls.append(sorted(fns))
        spreads = spreads_per_call[min(i, len(spreads_per_call) - 1)]
        return {n: Timing(1.0 + i, 1.0, spreads[n], reps=5) for n in fns}

    return fake, calls


def test_noisy_group_is_remeasured_together_and_the_second_result_kept(monkeypatch):
    fake, calls = _fake_timings({"base": 1.1, "lorakern": 3.2}, {"base": 1.1, "lorakern": 1.2})
    monkeypatch.setattr(timing, "time_cpu_interleaved", fake)
    fns = {"base": lambda: None, "lorakern": lambda: None}
    out = timing.time_many(fns, CPU, TimerSpec(), {})
    assert calls == [["base", "lorakern"], ["base", "lorakern"]]  # the group again, not just the noisy one
    for t in out.values():
        assert t.median_ms == 2.0 and t.measurements == 2 and t.noisy is False
    assert out["lorakern"].p80_ms == 1.2


def test_still_noisy_after_the_remeasures_is_flagged(monkeypatch):
    fake, calls = _fake_timings({"base": 1.1, "lorakern": 3.2})
    monkeypatch.setattr(timing, "time_cpu_interleaved", fake)
    out = timing.time_many({"base": lambda: None, "lorakern": lambda: None}, CPU, TimerSpec(), {})
    assert len(calls) == 1 + NOISY_REMEASURES
    assert out["lorakern"].noisy is True and out["base"].noisy is False
    assert out["lorakern"].median_ms == 1.0 + NOISY_REMEASURES  # the last measurement


def test_cuda_remeasures_only_the_noisy_function():
    calls = []

    def measure(names):
        calls.append(list(names))
        return {n: Timing(1.0, 1.0, 1.5 if n == "b" and len(calls) == 1 else 1.01, reps=5) for n in names}

    out = timing.remeasure_noisy(measure, ["a", "b"], CUDA_NOISY_SPREAD, together=False)
    assert calls == [["a", "b"], ["b"]]
    assert out["a"].measurements == 1 and out["b"].measurements == 2 and not out["b"].noisy


def test_flag_noisy_uses_the_device_limit():
    rows = [{"p20_ms": 1.0, "p80_ms": 1.4}, {"p20_ms": 1.0, "p80_ms": 1.6}, {"median_ms": 1.0}]
    assert timing.flag_noisy(rows, "cpu") == 1 and [r.get("noisy") for r in rows] == [False, True, None]
    assert timing.flag_noisy(rows, "cuda") == 2 and rows[0]["noisy"] is True


def test_ceilings_keep_the_best_of_the_repeats(monkeypatch):
    p20s = itertools.cycle((3.0, 1.0, 2.0))  # the second of every three measurements is the fastest
    monkeypatch.setattr(timing, "time_fn", lambda fn, device, spec: Timing(1.0, next(p20s), 1.0, reps=5))
    c = timing.measure_ceilings(CPU, torch.float32, TimerSpec())  # time_fn is fake: nothing is timed
    assert c["copy_stream_GBps"] == pytest.approx(2 * c["copy_bytes"] / 1e-3 / 1e9)
    assert c["read_stream_GBps"] == pytest.approx(c["copy_bytes"] / 1e-3 / 1e9)
    assert c["copy_GBps"] == max(c["copy_stream_GBps"], c["read_stream_GBps"])
    assert c["matmul_sizes"] == [1024, 2048] and c["matmul_n"] == 2048  # equal p20s: the larger n has the rate
    assert c["matmul_TFLOPs"] == pytest.approx(2 * 2048**3 / 1e-3 / 1e12)
    assert c["threads"] == torch.get_num_threads() and c["repeats"] == 3
    smoke = timing.measure_ceilings(CPU, torch.float32, TimerSpec(rep_ms=timing.SMOKE_REP_MS / 2))
    assert smoke["matmul_sizes"] == [1024] and smoke["matmul_n"] == 1024


# ---- (d): roofline above the ceilings ----------------------------------------------------------


def test_roofline_above_one_becomes_null_with_a_note(capsys):
    rows = _cpu_rows(noisy_worst=True)
    rows[0]["roofline_frac"], rows[1]["roofline_frac"] = 2.18, 1.02
    assert mark_impossible_rooflines([dict(r) for r in rows]) == 1
    noise, warnings = check_rows("cpu", {"threads": torch.get_num_threads()}, rows, [])
    assert rows[0]["roofline_frac"] is None and rows[0]["roofline_note"] == ROOFLINE_NOTE
    assert rows[0]["roofline_frac_measured"] == 2.18
    assert rows[1]["roofline_frac"] == 1.02 and "roofline_note" not in rows[1]  # within the tolerance
    assert noise["roofline_above_ceiling"] == 1 and noise["noisy_rows"] == 1
    assert len(warnings) == 2 and "under-measured" in warnings[1] and "stayed noisy" in warnings[0]
    results = _results(rows, warnings=warnings, noise=noise)
    results["targets"] = evaluate_targets(results)
    table = timing_table(results)
    assert "2.18" not in table and "| –† |" in table and "1.565* |" in table
    assert "`*` noisy: p80/p20 above 1.5 after up to 2 re-measurements" in table
    assert f"`–†` roofline fraction not shown ({ROOFLINE_NOTE})" in table
    md = to_markdown(results)
    assert "**Warnings**" in md and md.count("under-measured") >= 2


def test_report_files_carry_the_flags(tmp_path):
    rows = _cpu_rows(noisy_worst=True)
    rows[0]["roofline_frac"] = 1.7
    noise, warnings = check_rows("cpu", {}, rows, [])
    results = _results(rows, warnings=warnings, noise=noise)
    results["targets"] = evaluate_targets(results)
    write_results(results, tmp_path, plots=False)
    with (tmp_path / "results.csv").open() as f:
        got = list(csv.DictReader(f))
    assert got[0]["roofline_frac"] == "" and got[0]["roofline_note"] == ROOFLINE_NOTE
    assert sum(r["noisy"] == "True" for r in got) == 1


# ---- (e): the plots' spread band ---------------------------------------------------------------


def test_plot_ratios_draws_the_spread(tmp_path):
    pytest.importorskip("matplotlib")
    results = _results(_cpu_rows(noisy_worst=True))
    path = tmp_path / "ratio_fwd_bwd.png"
    assert plot_ratios(results, "fwd+bwd", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert not plot_ratios(results, "decode", tmp_path / "none.png")
