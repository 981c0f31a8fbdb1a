"""Results to files: results.json, results.csv (+ memory.csv, e2e.csv), results.md and PNG plots.

Timing tables mark a noisy row (p80/p20 above the timer's limit after re-measuring,
timing.py) with `*` after its median, and a roofline fraction the suite blanked because it
was above the measured ceilings (cost.py) with `–†`; a legend under the table says what the
marks mean, only when one is used. The run's warnings head results.md. The ratio plots draw
each provider's p20–p80 band (the row's p20 and p80 over the base row's median) around its
median ratio and mark noisy points with a cross.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

from lorakern.bench.cost import ROOFLINE_TOLERANCE

ROW_COLUMNS = (
    "provider", "mode", "K", "N", "M", "r", "dtype", "dropout", "median_ms", "p20_ms", "p80_ms", "reps",
    "tflops", "gbps", "ratio_to_base", "roofline_frac", "rel_err", "agrees", "bits_per_param", "noisy", "roofline_note",
)
NOTE_COLUMNS = ("noisy", "roofline_note")
MIXED_ROW_COLUMNS = ROW_COLUMNS[:2] + ("phase",) + ROW_COLUMNS[2:6] + ("adapters", "distinct") + ROW_COLUMNS[6:12] + (
    "tokens_per_s", "base_ms") + ROW_COLUMNS[12:18] + NOTE_COLUMNS
MOE_ROW_COLUMNS = (ROW_COLUMNS[:6] + ("experts", "top_k", "hit_experts") + ROW_COLUMNS[6:18] + ("extra_bytes",)
                   + NOTE_COLUMNS)
MEMORY_COLUMNS = ("provider", "K", "N", "M", "r", "dtype", "dropout", "saved_bytes", "peak_bytes", "weight_bytes")
E2E_COLUMNS = (
    "provider", "size", "params", "trainable_params", "tokens_per_step", "step_ms_median", "step_ms_p20",
    "step_ms_p80", "tokens_per_s", "peak_bytes", "saved_bytes", "loss_first", "loss_last", "compiled",
    "first_step_ms", "noisy",
)
PROVIDER_STYLE = {
    "base": ("black", "--"), "eager": ("tab:orange", "-"), "addmm": ("tab:green", "-"),
    "peft": ("tab:red", "-"), "lorakern": ("tab:blue", "-"),
    "base-bf16": ("black", "--"), "bnb-4bit": ("tab:gray", "--"), "peft-qlora": ("tab:red", "-"),
    "lorakern-qlora": ("tab:blue", "-"),
    "peft-dora": ("tab:red", "-"), "lorakern-dora": ("tab:blue", "-"),
    "lorakern-loop": ("tab:purple", ":"),
}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def machine_line(results: dict) -> str:
    m = results["machine"]
    parts = [f"**{m['card']}** ({m['device']})"]
    if m.get("driver"):
        parts.append(f"driver {m['driver']}")
    parts.append(f"torch {m['torch']}")
    parts.append(f"Triton {m['triton'] or 'absent'}")
    parts.append(f"lorakern {m['lorakern']} @ {(m['commit'] or 'unknown commit')[:12]}")
    parts.append(f"auto backend: {m['auto_backend']}")
    return ", ".join(parts)


def _err_cell(row: dict) -> str:
    if row["rel_err"] is None:
        return "–"
    cell = f"{row['rel_err']:.1e}"
    return cell if row["agrees"] is not False else f"**{cell} MISMATCH**"


NOISY_MARK, ABOVE_CEILING_MARK = "*", "–†"


def _median_cell(row: dict) -> str:
    return _fmt(row["median_ms"]) + (NOISY_MARK if row.get("noisy") else "")


def _roofline_cell(row: dict) -> str:
    return ABOVE_CEILING_MARK if row.get("roofline_note") else _fmt(row.get("roofline_frac"), 2)


def marks_legend(results: dict, rows: list[dict], remeasured: bool = True) -> str:
    """The lines under a timing table that explain its marks ("" when it has none);
    `remeasured`: the table's rows were re-measured when noisy (the end-to-end steps are not)."""
    lines = []
    if any(r.get("noisy") for r in rows):
        noise = results.get("noise") or {}
        limit = f" above {noise['spread_limit']:g}" if noise.get("spread_limit") else " above the timer's limit"
        again = f" after up to {noise['remeasures']} re-measurements" if remeasured and noise.get("remeasures") else ""
        lines.append(f"`{NOISY_MARK}` noisy: p80/p20{limit}{again}; kept, but left out of the target verdicts.")
    notes = sorted({r["roofline_note"] for r in rows if r.get("roofline_note")})
    if notes:
        lines.append(f"`{ABOVE_CEILING_MARK}` roofline fraction not shown ({'; '.join(notes)}): the row ran faster "
                     "than the ceilings measured at the start allow, so a ceiling, not the row, is wrong.")
    return "\n\n".join(lines)


def _with_legend(table: str, results: dict, rows: list[dict], remeasured: bool = True) -> str:
    legend = marks_legend(results, rows, remeasured)
    return table + ("\n\n" + legend if legend else "")


def timing_table(results: dict) -> str:
    """Markdown: one row per measurement, grouped by shape and mode; the marks' legend under it."""
    if results.get("config", {}).get("suite") == "mixed":
        return mixed_timing_table(results)
    header = ["mode", "K×N", "M", "r", "p", "provider", "median ms", "p20–p80 ms", "TFLOP/s", "GB/s",
              "× base", "roofline", "rel err"]
    order = {name: i for i, name in enumerate(results.get("providers", []))}
    rows = sorted(results["rows"], key=lambda r: (("decode", "fwd", "fwd+bwd").index(r["mode"]), r["K"], r["N"],
                                                   r["r"], r["M"], r["dropout"], order.get(r["provider"], 99)))
    body = [[
        r["mode"], f"{r['K']}×{r['N']}", str(r["M"]), str(r["r"]), _fmt(r["dropout"], 2), r["provider"],
        _median_cell(r), f"{_fmt(r['p20_ms'])}–{_fmt(r['p80_ms'])}", _fmt(r["tflops"]), _fmt(r["gbps"], 2),
        _fmt(r["ratio_to_base"]), _roofline_cell(r), _err_cell(r),
    ] for r in rows]
    return _with_legend(_table(header, body), results, rows)


def memory_table(results: dict) -> str:
    header = ["K×N", "M", "r", "provider", "saved MiB (p=0)", "saved MiB (p=0.1)", "peak MiB (p=0)", "peak MiB (p=0.1)"]
    cells: dict[tuple, dict] = {}
    for m in results["memory"]:
        key = (m["K"], m["N"], m["M"], m["r"], m["provider"])
        cells.setdefault(key, {})[m["dropout"]] = m
    order = {name: i for i, name in enumerate(results.get("providers", []))}
    body = []
    for key in sorted(cells, key=lambda k: (k[:4], order.get(k[4], 99))):
        c = cells[key]
        g = lambda p, f: c[p][f] if p in c else None  # noqa: E731
        body.append([f"{key[0]}×{key[1]}", str(key[2]), str(key[3]), key[4], _mib(g(0.0, "saved_bytes")),
                     _mib(g(0.1, "saved_bytes")), _mib(g(0.0, "peak_bytes")), _mib(g(0.1, "peak_bytes"))])
    return _table(header, body)


def e2e_table(results: dict) -> str:
    header = ["provider", "model", "params", "tokens/step", "step ms (median)", "p20–p80 ms", "tokens/s",
              "peak MiB", "saved MiB", "first loss", "first step ms"]
    body = [[e["provider"], e["size"], f"{e['params'] / 1e6:.1f}M", str(e["tokens_per_step"]),
             _fmt(e["step_ms_median"]) + (NOISY_MARK if e.get("noisy") else ""),
             f"{_fmt(e['step_ms_p20'])}–{_fmt(e['step_ms_p80'])}", _fmt(e["tokens_per_s"], 4), _mib(e["peak_bytes"]),
             _mib(e["saved_bytes"]), _fmt(e["loss_first"], 5), _fmt(e.get("first_step_ms"))]
            for e in results["e2e"]]
    return _with_legend(_table(header, body), results, results["e2e"], remeasured=False)


def quant_table(results: dict) -> str:
    """Markdown: the stored size of each provider's base weight per shape (QLoRA runs)."""
    header = ["K×N", "provider", "bits / parameter", "weight MiB"]
    order = {name: i for i, name in enumerate(results.get("providers", []))}
    body = [[f"{w['K']}×{w['N']}", w["provider"], f"{w['bits_per_param']:.4f}", _mib(w["weight_bytes"])]
            for w in sorted(results["quant"]["weights"], key=lambda w: (w["K"], w["N"], order.get(w["provider"], 99)))]
    return _table(header, body)


def dora_table(results: dict) -> str:
    """Markdown: per DoRA row, base / plain lorakern / PEFT DoRA / lorakern DoRA times and lorakern-dora / peft-dora."""
    header = ["mode", "K×N", "M", "r", "p", "base ms", "lorakern (LoRA) ms", "peft-dora ms", "lorakern-dora ms",
              "lorakern-dora / peft-dora"]
    modes = ("decode", "fwd", "fwd+bwd")
    ratios = sorted(results["dora"]["ratios"], key=lambda d: (modes.index(d["mode"]), d["K"], d["N"], d["r"], d["M"],
                                                               d["dropout"]))
    body = [[d["mode"], f"{d['K']}×{d['N']}", str(d["M"]), str(d["r"]), _fmt(d["dropout"], 2), _fmt(d["base_ms"]),
             _fmt(d["lorakern_ms"]), _fmt(d["peft_dora_ms"]), _fmt(d["lorakern_dora_ms"]),
             _fmt(d["lorakern_dora_over_peft_dora"])] for d in ratios]
    return _table(header, body)


def thin_table(results: dict) -> str:
    """Markdown: per thin kernel row, its time, ideal bytes, GB/s and fraction of the copy ceiling."""
    header = ["kernel", "K×N", "M", "r", "p", "median ms", "MiB", "GB/s", "of copy"]
    body = [[d["kernel"], f"{d['K']}×{d['N']}", str(d["M"]), str(d["r"]), _fmt(d["dropout"], 2),
             _fmt(d["median_ms"]) + ("*" if d.get("noisy") else ""), _mib(d["bytes"]), _fmt(d["gbps"], 1),
             _fmt(d["copy_frac"], 2)] for d in results["thin_kernels"]]
    return _table(header, body)


def graphs_table(results: dict) -> str:
    """Markdown: per decode-graph row (graphs.py), the replay's time, its ratio to the graphed base's
    and its error against fp64, or why the capture failed."""
    header = ["K×N", "M", "r", "provider", "median ms", "p20–p80 ms", "× graphed base", "rel err", "error"]
    rows = sorted(results["decode_graphs"], key=lambda d: (d["K"], d["N"], d["r"], d["M"]))
    body = [[f"{d['K']}×{d['N']}", str(d["M"]), str(d["r"]), d["provider"], _median_cell(d),
             "–" if d["p20_ms"] is None else f"{_fmt(d['p20_ms'])}–{_fmt(d['p80_ms'])}", _fmt(d["ratio_to_base"]),
             _err_cell(d),
             "" if not d.get("error") else f"{d.get('error_stage') or 'capture'}: {d['error']}".replace("|", "\\|")]
            for d in rows]
    return _with_legend(_table(header, body), results, rows, remeasured=False)


def moe_table(results: dict) -> str:
    """Markdown (MoE runs): per (mode, H×I, M, r), the three providers' times, lorakern / PEFT, the bytes
    W_eff adds per call and the floors at the run's ceilings (base, planned grouped GEMM, as implemented)."""
    header = ["mode", "H×I", "M", "r", "hit", "base ms", "peft ms", "lorakern ms", "lorakern / peft",
              "‖y_lk − y_peft‖/‖y_peft‖", "W MiB", "extra MiB / call", "floor: base", "planned", "as implemented"]
    modes = ("decode", "fwd", "fwd+bwd")
    ratios = sorted(results["moe"]["ratios"], key=lambda d: (modes.index(d["mode"]), d["H"], d["I"], d["r"], d["M"]))
    body = [[d["mode"], f"{d['H']}×{d['I']}", str(d["M"]), str(d["r"]), str(d["hit_experts"]), _fmt(d["base_ms"]),
             _fmt(d["peft_ms"]), _fmt(d["lorakern_ms"]), _fmt(d["lorakern_over_peft"]),
             "–" if d["lorakern_vs_peft_rel"] is None else f"{d['lorakern_vs_peft_rel']:.1e}",
             _mib(d["weight_bytes"]), _mib(d["extra_bytes"]), _fmt(d["base_floor_ms"]), _fmt(d["planned_floor_ms"]),
             _fmt(d["as_implemented_floor_ms"])] for d in ratios]
    return _table(header, body)


def mixed_timing_table(results: dict) -> str:
    """Markdown (mixed-batch runs): one row per measurement, with the adapter counts and tokens/s."""
    header = ["mode", "phase", "K×N", "M", "r", "adapters", "distinct", "provider", "median ms", "p20–p80 ms",
              "tokens/s", "× base", "GB/s", "roofline", "rel err"]
    order = {name: i for i, name in enumerate(results.get("providers", []))}
    rows = sorted(results["rows"], key=lambda r: (("decode", "fwd", "fwd+bwd").index(r["mode"]), r["K"], r["N"],
                                                   r["r"], r["M"], r["adapters"], order.get(r["provider"], 99)))
    body = [[
        r["mode"], r["phase"], f"{r['K']}×{r['N']}", str(r["M"]), str(r["r"]), str(r["adapters"] or "–"),
        str(r["distinct"] or "–"), r["provider"], _median_cell(r), f"{_fmt(r['p20_ms'])}–{_fmt(r['p80_ms'])}",
        _fmt(r["tokens_per_s"], 4), _fmt(r["ratio_to_base"]), _fmt(r["gbps"], 2), _roofline_cell(r),
        _err_cell(r),
    ] for r in rows]
    return _with_legend(_table(header, body), results, rows)


def mixed_table(results: dict) -> str:
    """Markdown: per (mode, shape, M, adapters) and lorakern provider, the times and the issue's ratios."""
    header = ["mode", "phase", "K×N", "M", "adapters", "distinct", "provider", "ms", "tokens/s", "× base",
              "peft ms", "peft / provider", "lorakern-loop / provider", "provider / 1 shared"]
    modes = ("decode", "fwd", "fwd+bwd")
    ratios = sorted(results["mixed"]["ratios"], key=lambda d: (modes.index(d["mode"]), d["K"], d["N"], d["r"], d["M"],
                                                                d["adapters"], d["provider"]))
    body = [[d["mode"], d["phase"], f"{d['K']}×{d['N']}", str(d["M"]), str(d["adapters"]), str(d["distinct"]),
             d["provider"], _fmt(d["ms"]), _fmt(d["tokens_per_s"], 4), _fmt(d["over_base"]), _fmt(d["peft_ms"]),
             _fmt(d["peft_over"]), _fmt(d["loop_over"]), _fmt(d["over_shared"])] for d in ratios]
    return _table(header, body)


def targets_table(results: dict) -> str:
    header = ["target", "measured", "limit", "met", "detail"]
    body = [[t["target"], _fmt(t["value"]), "–" if t["limit"] is None else f"{t['op']} {t['limit']}",
             {True: "yes", False: "**no**", None: "–"}[t["met"]], t["detail"]] for t in results["targets"]]
    return _table(header, body)


def _ceilings_text(c: dict) -> str:
    """The ceilings line: bandwidth (and the copy and read streams it is the best of) and matmul rate."""
    bandwidth = f"memory bandwidth {c['copy_GBps']:.1f} GB/s"
    if c.get("read_stream_GBps") is not None:
        bandwidth += (f" (the better of a copy, {c['copy_stream_GBps']:.1f} GB/s, and a read, "
                      f"{c['read_stream_GBps']:.1f} GB/s)")
    matmul = f"{c['dtype']} matmul {c['matmul_TFLOPs']:.3f} TFLOP/s (n={c['matmul_n']}"
    if c.get("matmul_sizes") and len(c["matmul_sizes"]) > 1:
        matmul += f", the faster of n = {', '.join(str(n) for n in c['matmul_sizes'])}"
    matmul += ")"
    how = []
    if c.get("repeats"):
        how.append(f"best of {c['repeats']} measurements each")
    if c.get("threads") is not None:
        how.append(f"{c['threads']} CPU thread{'s' if c['threads'] != 1 else ''}")
    return f"{bandwidth}, {matmul}" + (f"; {', '.join(how)}" if how else "")


def to_markdown(results: dict) -> str:
    """The whole run as a Markdown report."""
    c = results["ceilings"]
    cfg = results["config"]
    quant = results.get("quant")
    dora = results.get("dora")
    mixed = results.get("mixed")
    moe = results.get("moe")
    kind = "QLoRA " if quant else "DoRA " if dora else "mixed-batch " if mixed else "MoE " if moe else ""
    parts = [
        f"# lorakern {kind}benchmark — {results['machine']['card']}",
        "",
        machine_line(results) + ".",
        "",
        f"Run {results['started_utc']} → {results['finished_utc']}; preset `{cfg['preset']}`, dtype {cfg['dtype']}, "
        f"providers {', '.join(results['providers'])}"
        + (f" (skipped: {results['skipped_providers']})" if results["skipped_providers"] else "") + ".",
        "",
        f"Timer: {results['timer']}.",
        "",
        f"Ceilings measured at the start: {_ceilings_text(c)}. `roofline` = ideal time at these ceilings / measured "
        f"time (`{ABOVE_CEILING_MARK}` where that is above {ROOFLINE_TOLERANCE:g}: the ceiling was under-measured); "
        f"`× base` = median / the frozen {'experts block' if moe else 'nn.Linear'}'s median (same shape, mode); "
        f"`{NOISY_MARK}` after a median = noisy row, left out of the targets; "
        "`rel err` = ‖y − y_fp64‖/‖y_fp64‖.",
        "",
        "Modes: `fwd` = training forward (autograd recording, W frozen); `fwd+bwd` = forward + backward; "
        "`decode` = inference forward (torch.inference_mode) at M ≤ 16"
        + (" (mixed-batch and MoE rows: at every M)." if mixed or moe else "."),
    ]
    if results.get("warnings"):
        parts[4:4] = ["**Warnings**", "", *[f"- {w}" for w in results["warnings"]], ""]
    if quant:
        v = quant.get("versions", {})
        parts += ["", f"QLoRA rows: base weights {quant['quant_type'].upper()}, blocksize {quant['blocksize']}"
                  + (", double quantisation" if quant["double_quant"] else "") + f", compute dtype {quant['compute_dtype']}; "
                  "`base-bf16` = the frozen dense nn.Linear in the compute dtype, `bnb-4bit` = bitsandbytes' Linear4bit "
                  "alone, `peft-qlora` = PEFT's LoRA over it, `lorakern-qlora` = LoraLinear over QuantLinear; "
                  "`rel err` against fp64 of the dense weight (base-bf16) or of the dequantised weight (the others). "
                  f"bitsandbytes {v.get('bitsandbytes') or 'absent'}, peft {v.get('peft') or 'absent'}, "
                  f"transformers {v.get('transformers') or 'absent'}."]
    if dora:
        parts += ["", "DoRA rows: `base` = the frozen nn.Linear, `peft-dora` = PEFT's LoRA Linear with use_dora=True "
                  "(W + s·B A formed every forward for the row norms; its eval-only DoRA cache off, PEFT's default), "
                  "`lorakern-dora` = LoraLinear(use_dora=True) (row norms from W Aᵀ), `lorakern` = plain LoRA on the "
                  f"same A, B. Both DoRA providers get the same A, B and magnitude ({dora['magnitude']}); `rel err` "
                  "against fp64 of PEFT's formula g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias, g = m / ‖W + s·B A‖_row "
                  f"(plain LoRA's for `lorakern`). peft {dora['versions'].get('peft') or 'absent'}."]
    if mixed:
        parts += ["", "Mixed-batch rows: one LoRA adapter per batch row, chosen among `adapters` (n) adapters of rank r "
                  f"({mixed['assignment']}; `distinct` = adapters in the batch, min(n, M)); {mixed['scaling']}. "
                  "`base` = F.linear alone; `peft` = one PEFT LoRA Linear holding all n adapters, called "
                  "`layer(x, adapter_names=[...])` (PEFT's mixed batch); `lorakern-loop` = "
                  "lorakern.mixed.lora_linear_looped (the fused single-adapter op per adapter group); `lorakern` = "
                  "lorakern.lora_linear_mixed (backend auto; on CPU the same loop); `lorakern-layer` = one LoraLinear holding "
                  "all n adapters, called `layer(x, adapter_names=[...])`. Mode `decode` = inference "
                  f"forward (torch.inference_mode) at every M; phase `decode` for M ≤ {mixed['decode_batch_max_M']}, "
                  "`prefill` above. `rel err` against fp64 of x Wᵀ + s_i·(x A_iᵀ) B_iᵀ per row. "
                  f"peft {mixed['versions'].get('peft') or 'absent'}."]
    if moe:
        parts += ["", f"MoE rows: one {moe['block']}. `base` = the frozen block, `peft` = PEFT's LoRA on its "
                  f"parameters {moe['target_parameters']} (get_peft_model with target_parameters), `lorakern` = "
                  "lorakern.inject with the same config, its adapters loaded from PEFT's state dict; "
                  f"{moe['scaling']}. Both LoRA providers form W + s·B_e A_e ([E, out, in]) every forward: "
                  "`extra MiB / call` = the bytes that adds (2·W forward, 5·W fwd+bwd); floors at this run's ceilings: "
                  "`base`, `planned` (grouped GEMM: base + per-expert x_e A_eᵀ B_eᵀ, no W_eff; what `roofline` "
                  "counts) and `as implemented`. `rel err` against fp64 of the block's formula (W_eff formed in fp64). "
                  f"peft {moe['versions'].get('peft') or 'absent'}, transformers "
                  f"{moe['versions'].get('transformers') or 'absent'}."]
    if results["targets"]:
        parts += ["", "## Targets", "", targets_table(results)]
    if moe and moe.get("ratios"):
        parts += ["", "## LoRA on expert parameters: providers, bytes and floors (median ms)", "", moe_table(results)]
    if mixed and mixed.get("ratios"):
        parts += ["", "## Mixed batches: providers and ratios (median ms)", "", mixed_table(results)]
    if dora and dora.get("ratios"):
        parts += ["", "## lorakern DoRA vs PEFT DoRA (median ms)", "", dora_table(results)]
    if quant and quant.get("weights"):
        parts += ["", "## Stored base weights", "", quant_table(results)]
    parts += ["", "## Layer timings", "", timing_table(results)]
    if results.get("thin_kernels"):
        parts += ["", "## Thin LoRA kernels alone (ideal bytes / median time; `of copy` = fraction of the measured "
                  "copy GB/s; lorakern/bench/thin.py lists what each moves)", "", thin_table(results)]
    if results.get("decode_graphs"):
        parts += ["", "## Decode under CUDA graphs (each provider's decode step captured once with torch.cuda.graph "
                  "after warm-up calls on a side stream, its replay timed; `× graphed base` = median / the graphed frozen "
                  "nn.Linear's median; lorakern/bench/graphs.py)", "", graphs_table(results)]
    if results["memory"]:
        parts += ["", "## Memory of fwd+bwd (saved activations exclude parameters; peak is CUDA only)", "",
                  memory_table(results)]
    if results.get("e2e_skipped"):
        parts += ["", f"End-to-end step skipped: {results['e2e_skipped']}."]
    if results["e2e"]:
        s = results["e2e_size"]
        base = (f", base {quant['quant_type'].upper()}" + (" + double quant" if quant["double_quant"] else "")
                + f" (lorakern.quantize vs transformers' BitsAndBytesConfig), compute {quant['compute_dtype']}") if quant else ""
        parts += ["", f"## End-to-end training step (Llama, hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, "
                  f"batch {s['batch']}×{s['seq_len']}, LoRA r=16 on all linear layers, dropout 0.05, AdamW{base})", "",
                  e2e_table(results)]
    return "\n".join(parts) + "\n"


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _band(row: dict) -> tuple[float, float]:
    """The row's p20 and p80 over the base row's median: ratio_to_base · p20/median and · p80/median."""
    ratio, median = row["ratio_to_base"], row["median_ms"]
    if not median or row.get("p20_ms") is None or row.get("p80_ms") is None:
        return ratio, ratio
    return ratio * row["p20_ms"] / median, ratio * row["p80_ms"] / median


def plot_ratios(results: dict, mode: str, path: Path) -> bool:
    """Ratio to base vs tokens, one panel per (K, N, r), one line per provider, its p20–p80 band
    (the row's p20 and p80 over the base row's median) shaded; noisy rows marked with a cross.
    False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [r for r in results["rows"] if r["mode"] == mode and r["ratio_to_base"] is not None and r["dropout"] == 0.0]
    panels = sorted({(r["K"], r["N"], r["r"]) for r in rows})
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows + 0.8), squeeze=False)
    any_noisy = False
    for ax, (K, N, r) in zip(axes.flat, panels):
        for provider in results["providers"]:
            mine = [row for row in rows if (row["K"], row["N"], row["r"], row["provider"]) == (K, N, r, provider)]
            mine.sort(key=lambda row: row["M"])
            if not mine:
                continue
            color, style = PROVIDER_STYLE.get(provider, ("gray", "-"))
            Ms = [row["M"] for row in mine]
            ax.plot(Ms, [row["ratio_to_base"] for row in mine], style, marker="o", ms=4, color=color, label=provider)
            lo, hi = zip(*(_band(row) for row in mine))
            ax.fill_between(Ms, lo, hi, color=color, alpha=0.15, lw=0)
            noisy = [row for row in mine if row.get("noisy")]
            if noisy:
                any_noisy = True
                ax.plot([row["M"] for row in noisy], [row["ratio_to_base"] for row in noisy], "x", ms=9, mew=2,
                        color=color)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={K} N={N} r={r}", fontsize=10)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("time / base")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles.append(Patch(color="gray", alpha=0.3, lw=0))
    labels.append("p20–p80 / base median")
    if any_noisy:
        handles.append(Line2D([], [], marker="x", ls="none", color="gray", ms=8, mew=2))
        labels.append("noisy row")
    height = fig.get_figheight()  # title (2 lines) above the panels, legend below them
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    m = results["machine"]
    fig.suptitle(f"{mode}: time relative to frozen nn.Linear (lower is better), dropout 0 — {m['card']} "
                 f"({m['device']}), {results['config']['dtype']}\nshaded band: each row's p20–p80 over the base "
                 "row's median" + ("; × = noisy row (p80/p20 above the timer's limit)" if any_noisy else ""),
                 fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(results: dict, path: Path) -> bool:
    """Bars: saved-activation MiB per provider at dropout 0 and 0.1, one panel per shape; plus e2e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = results["memory"]
    shapes = sorted({(m["K"], m["N"], m["M"], m["r"]) for m in memory})
    e2e = results["e2e"]
    n = len(shapes) + (1 if e2e else 0)
    if n == 0:
        return False
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    providers = [p for p in results["providers"]]
    width = 0.38
    for ax, (K, N, M, r) in zip(axes.flat, shapes):
        for j, dropout in enumerate((0.0, 0.1)):
            vals = []
            for p in providers:
                hit = [m for m in memory if (m["K"], m["N"], m["M"], m["r"], m["provider"], m["dropout"]) == (K, N, M, r, p, dropout)]
                vals.append(hit[0]["saved_bytes"] / 2**20 if hit else 0.0)
            xs = [i + (j - 0.5) * width for i in range(len(providers))]
            bars = ax.bar(xs, vals, width, label=f"dropout {dropout}", color=("tab:blue", "tab:orange")[j])
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.set_xticks(range(len(providers)), providers, fontsize=8)
        ax.set_title(f"K={K} N={N} M={M} r={r}", fontsize=10)
        ax.set_ylabel("saved activations, MiB")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if e2e:
        ax = list(axes.flat)[len(shapes)]
        names = [e["provider"] for e in e2e]
        key = "peak_bytes" if all(e["peak_bytes"] for e in e2e) else "saved_bytes"
        bars = ax.bar(names, [e[key] / 2**20 for e in e2e], color=[PROVIDER_STYLE.get(n.removesuffix("+compile"), ("gray",))[0] for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(f"end-to-end step ({e2e[0]['size']} Llama, dropout 0.05)", fontsize=10)
        ax.set_ylabel(("peak memory" if key == "peak_bytes" else "saved activations") + ", MiB")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Memory of one fwd+bwd — {results['machine']['card']} ({results['machine']['device']}), "
                 f"{results['config']['dtype']}",
                 fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_mixed(results: dict, mode: str, path: Path) -> bool:
    """Mixed-batch runs: time / base vs tokens M, one panel per (K, N, adapters), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["mode"] == mode and r["ratio_to_base"] is not None and r["provider"] != "base"]
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    counts = sorted({r["adapters"] for r in rows})
    if not rows:
        return False
    fig, axes = plt.subplots(len(shapes), len(counts), figsize=(4.2 * len(counts), 3.4 * len(shapes)), squeeze=False)
    for (i, (K, N)), (j, n) in itertools.product(enumerate(shapes), enumerate(counts)):
        ax = axes[i][j]
        for provider in results["providers"]:
            pts = sorted((r["M"], r["ratio_to_base"]) for r in rows
                         if (r["K"], r["N"], r["adapters"], r["provider"]) == (K, N, n, provider))
            if pts:
                color, style = PROVIDER_STYLE.get(provider, ("gray", "-"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, color=color, label=provider)
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"K={K} N={N}, {n} adapter{'s' if n > 1 else ''}", fontsize=10)
        ax.set_xlabel("tokens M (one adapter per row)")
        ax.set_ylabel("time / base")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"mixed batches, {mode}: time relative to the frozen base (lower is better) — {m['card']} "
                 f"({m['device']}), {results['config']['dtype']}", fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_results(results: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """Write every output file into `out` (created); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    written.append(path)
    row_columns = MIXED_ROW_COLUMNS if results.get("mixed") else MOE_ROW_COLUMNS if results.get("moe") else ROW_COLUMNS
    for name, columns, rows in (("results.csv", row_columns, results["rows"]),
                                ("memory.csv", MEMORY_COLUMNS, results["memory"]),
                                ("e2e.csv", E2E_COLUMNS, results["e2e"])):
        if rows or name == "results.csv":
            _write_csv(out / name, columns, rows)
            written.append(out / name)
    path = out / "results.md"
    path.write_text(to_markdown(results))
    written.append(path)
    if plots and not _matplotlib_available():
        print("plots skipped: matplotlib is not installed (pip install 'lorakern[bench]')")
        plots = False
    if plots and results.get("mixed"):
        for mode in ("fwd", "fwd+bwd", "decode"):
            path = out / f"mixed_{mode.replace('+', '_')}.png"
            if plot_mixed(results, mode, path):
                written.append(path)
        plots = False
    if plots:
        for mode in ("fwd", "fwd+bwd", "decode"):
            path = out / f"ratio_{mode.replace('+', '_')}.png"
            if plot_ratios(results, mode, path):
                written.append(path)
        if plot_memory(results, out / "memory.png"):
            written.append(out / "memory.png")
    return written
