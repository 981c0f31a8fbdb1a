"""The benchmark suite: every provider on every shape and mode, same inputs, same process.

`run_suite(config)` returns one JSON-serialisable dict:
  machine   card, driver, versions, commit, backend "auto" picks (machine.py)
  timer     which clock measured the numbers
  ceilings  copy GB/s and matmul TFLOP/s measured at the start of the run
  rows      one per (provider, mode, K, N, M, r, dropout): median/p20/p80 ms, TFLOP/s,
            GB/s, ratio to base, fraction of roofline, relative error vs fp64
  memory    saved-activation bytes (and CUDA peak) of fwd+bwd, dropout 0 and 0.1
  e2e       Llama training step, lorakern vs PEFT
  thin_kernels  (CUDA) each thin LoRA kernel alone at the largest M: ms, ideal bytes, GB/s, fraction of copy (thin.py)
  decode_graphs (CUDA, decode mode) each provider's decode step captured once in a CUDA graph, its
            replay timed: ms, ratio to the graphed base, rel err, or the capture's error (graphs.py)
  targets   the issue's measured targets, evaluated on these rows (targets.py)
  noise     the spread limit (p80/p20) above which rows are noisy, re-measurements, counts
  warnings  what a reader must know before trusting the numbers (also printed once, stderr)
Every timed row (and e2e row) carries `noisy`: its p80/p20 stayed above the timer's limit
after re-measuring (timing.py); noisy rows are kept but left out of target verdicts. A row
whose roofline fraction is above cost.ROOFLINE_TOLERANCE gets `roofline_frac` None and a
`roofline_note` (the ceiling was under-measured, cost.py).
With suite="qlora" the rows, memory and e2e entries are the QLoRA ones instead (qlora.py:
bf16 base vs bitsandbytes 4-bit base vs PEFT QLoRA vs lorakern QLoRA), plus `quant`.
With suite="dora" they are the DoRA ones (dora.py: base vs PEFT's DoRA vs lorakern's DoRA
vs plain lorakern LoRA, no end-to-end step), plus `dora`.
With suite="mixed" they are the mixed-batch ones (mixed.py: base vs PEFT's mixed batch vs
lorakern's per-adapter loop vs lorakern.lora_linear_mixed, 1/8/64 adapters across the batch;
inference forward at every M, no memory rows or end-to-end step), plus `mixed`.
With suite="moe" they are the MoE ones (moe.py: a Mixtral experts block, frozen vs PEFT's vs
lorakern's LoRA on its gate_up_proj / down_proj parameters; inference forward and fwd+bwd at
every M, no end-to-end step), plus `moe`.
Modes: fwd = training forward (autograd records; W frozen, x and adapters need grad);
fwd+bwd = that forward plus backward; decode = inference forward (torch.inference_mode,
eval mode) at M <= 16.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from lorakern.bench import e2e as e2e_mod
from lorakern.bench import graphs, thin
from lorakern.bench.cost import MODES, ROOFLINE_NOTE, ROOFLINE_TOLERANCE, linear_cost, mark_impossible_rooflines
from lorakern.bench.machine import machine_info
from lorakern.bench.memory import module_memory
from lorakern.bench.progress import Progress
from lorakern.bench.providers import PROVIDERS, Weights, available_providers, build, trainable
from lorakern.bench.shapes import DECODE_MAX_M, PRESETS, modes_for
from lorakern.bench.targets import evaluate_targets
from lorakern.bench.timing import (
    NOISY_REMEASURES,
    TimerSpec,
    flag_noisy,
    measure_ceilings,
    noisy_spread,
    time_many,
    timer_description,
)

# Max relative error vs fp64 for the providers to count as computing the same thing (DESIGN.md §5).
AGREE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MEMORY_DROPOUTS = (0.0, 0.1)
SUITES = ("lora", "qlora", "dora", "mixed", "moe")
# Inputs are rotated through a pool at least this many times the last-level cache.
ROTATE_FACTOR = 2
ROTATE_MAX_BYTES = 1 << 30


@dataclass
class BenchConfig:
    """What to run. `for_device` fills in the defaults for a machine."""

    device: torch.device
    dtype: torch.dtype
    preset: str
    kn: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    modes: tuple[str, ...] = MODES
    providers: tuple[str, ...] = PROVIDERS
    dropouts: tuple[float, ...] = (0.0,)
    bias: bool = False
    memory: bool = True
    e2e: bool = True
    e2e_size: str = "auto"
    e2e_compile: bool = False
    timer: TimerSpec = field(default_factory=TimerSpec)
    seed: int = 0
    suite: str = "lora"
    adapters: tuple[int, ...] = (1, 8, 64)  # --suite mixed: adapters across the batch

    @classmethod
    def for_device(cls, device: torch.device, preset: str | None = None, suite: str = "lora", **overrides) -> BenchConfig:
        """Defaults: GPU -> llama8b shapes, bf16, all providers; CPU -> small shapes, fp32,
        base/eager/peft/lorakern, a wall-clock budget of 0.3 s per measurement.
        suite="qlora": the QLoRA providers (qlora.py), bf16 on both devices (QLoRA's compute dtype).
        suite="dora": the DoRA providers (dora.py), the dense suite's dtypes, no end-to-end step.
        suite="mixed": the mixed-batch providers (mixed.py), presets "mixed" (GPU) / "mixed-small"
        (CPU), inference forward only (mode "decode" at every M), no memory rows, no end-to-end step.
        suite="moe": LoRA on expert parameters (moe.py), presets "moe" (GPU) / "moe-small" (CPU),
        modes decode (inference forward) and fwd+bwd at every M, no end-to-end step; on CPU 1 s of
        calls per measurement."""
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {SUITES}")
        gpu = device.type == "cuda"
        if suite == "mixed":
            preset = preset or ("mixed" if gpu else "mixed-small")
        if suite == "moe":
            preset = preset or ("moe" if gpu else "moe-small")
        preset = preset or ("llama8b" if gpu else "small")
        if preset not in PRESETS:
            raise ValueError(f"unknown shape preset {preset!r}; choose from {sorted(PRESETS)} or custom")
        p = PRESETS[preset]
        config = cls(
            device=device,
            dtype=torch.bfloat16 if gpu else torch.float32,
            preset=preset,
            kn=p.kn,
            tokens=p.tokens,
            ranks=p.ranks,
            providers=PROVIDERS if gpu else ("base", "eager", "peft", "lorakern"),
            timer=TimerSpec() if gpu else TimerSpec(warmup_ms=50, rep_ms=300, min_reps=5),
        )
        if preset == "tiny":
            config = replace(config, timer=TimerSpec(warmup_ms=5, rep_ms=20, min_reps=3), e2e_size="micro")
        if suite == "qlora":
            from lorakern.bench.qlora import QLORA_PROVIDERS

            config = replace(config, suite=suite, dtype=torch.bfloat16, providers=QLORA_PROVIDERS)
        if suite == "dora":
            from lorakern.bench.dora import DORA_PROVIDERS

            config = replace(config, suite=suite, providers=DORA_PROVIDERS, e2e=False)
        if suite == "mixed":
            from lorakern.bench.mixed import MIXED_PROVIDERS

            config = replace(config, suite=suite, providers=MIXED_PROVIDERS, modes=("decode",), memory=False, e2e=False)
        if suite == "moe":
            from lorakern.bench.moe import MOE_MODES, MOE_PROVIDERS

            config = replace(config, suite=suite, providers=MOE_PROVIDERS, modes=MOE_MODES, e2e=False)
            if not gpu and preset != "tiny":  # few rows, each tens of ms: a longer budget steadies the medians
                config = replace(config, timer=TimerSpec(warmup_ms=100, rep_ms=1000, min_reps=10))
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "preset": self.preset,
            "kn": [list(kn) for kn in self.kn],
            "tokens": list(self.tokens),
            "ranks": list(self.ranks),
            "modes": list(self.modes),
            "providers": list(self.providers),
            "dropouts": list(self.dropouts),
            "bias": self.bias,
            "memory": self.memory,
            "e2e": self.e2e,
            "e2e_size": self.e2e_size,
            "e2e_compile": self.e2e_compile,
            "timer": vars(self.timer),
            "seed": self.seed,
            "suite": self.suite,
            "adapters": list(self.adapters),
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    num = (out.double() - ref).norm().item()
    den = ref.norm().item()
    return num / den if den else num


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    return 32 << 20


class _Inputs:
    """A pool of (x, dY) pairs, rotated so successive calls do not find x in cache."""

    def __init__(self, M: int, K: int, N: int, dtype: torch.dtype, device: torch.device):
        per = M * (K + N) * torch.empty((), dtype=dtype).element_size()
        n = max(1, min(8, math.ceil(ROTATE_FACTOR * _cache_bytes(device) / per), ROTATE_MAX_BYTES // per))
        self.xs = [torch.randn(M, K, device=device, dtype=dtype).requires_grad_(True) for _ in range(n)]
        self.dys = [torch.randn(M, N, device=device, dtype=dtype) for _ in range(n)]
        self._next = itertools.cycle(range(n))

    def next(self) -> int:
        return next(self._next)


def _step_fn(module: torch.nn.Module, mode: str, inputs: _Inputs, xs_decode=None) -> Callable[[], object]:
    """One timed call of `module` in `mode`; decode reads `xs_decode` (default: inputs.xs)."""
    xs_decode = inputs.xs if xs_decode is None else xs_decode
    if mode == "fwd":
        return lambda: module(inputs.xs[inputs.next()])
    if mode == "fwd+bwd":

        def fwd_bwd():
            i = inputs.next()
            module(inputs.xs[i]).backward(inputs.dys[i])

        return fwd_bwd

    def decode():
        with torch.inference_mode():
            return module(xs_decode[inputs.next()])

    return decode


def time_modules(modules: dict, mode: str, inputs: _Inputs, config, xs_decode=None) -> dict:
    """{name: timing} of every module in `mode` (train mode except decode), interleaved by
    time_many; fwd+bwd hands the inputs and trainable parameters over for grad resets."""
    fns, grads = {}, {}
    for name, module in modules.items():
        module.train(mode != "decode")
        fns[name] = _step_fn(module, mode, inputs, xs_decode)
        grads[name] = inputs.xs + trainable(module) if mode == "fwd+bwd" else []
    return time_many(fns, config.device, config.timer, grads)


def _count_work(config: BenchConfig, providers: list[str]) -> int:
    n = 0
    lora = [p for p in providers if p != "base"]
    for M in config.tokens:
        for mode in modes_for(M, config.modes):
            drops = (0.0,) if mode == "decode" else config.dropouts
            n += len(config.kn) * len(config.ranks) * ("base" in providers) + len(config.kn) * len(config.ranks) * len(drops) * len(lora)
    if config.memory and _memory_M(config) is not None:
        n += len(config.kn) * len(config.ranks) * len(providers) * len(MEMORY_DROPOUTS)
    return n + 2  # ceilings


def _memory_M(config: BenchConfig) -> int | None:
    train = [M for M in config.tokens if M > DECODE_MAX_M]
    return max(train) if train and "fwd+bwd" in config.modes else None


def _layer_rows(config: BenchConfig, providers: list[str], ceilings: dict, progress: Progress) -> list[dict]:
    rows = []
    dev, dtype = config.device, config.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        torch.manual_seed(config.seed)
        w = Weights.random(K, N, r, dtype, dev, bias=config.bias)
        for M in config.tokens:
            modes = modes_for(M, config.modes)
            if not modes:
                continue
            inputs = _Inputs(M, K, N, dtype, dev)
            base_ms: dict[str, float] = {}
            # Decode is inference (dropout off): it runs at p = 0 even when --dropout omits 0.
            dropouts = config.dropouts
            if "decode" in modes and 0.0 not in dropouts:
                dropouts = (0.0, *dropouts)
            for dropout in dropouts:
                modules = {name: build(name, w, dropout) for name in providers}
                errors = {}
                if dropout == 0.0:
                    ref = w.reference(inputs.xs[0].detach())
                    with torch.no_grad():
                        errors = {n: _rel_error(m.eval()(inputs.xs[0]), ref) for n, m in modules.items() if n != "base"}
                    for m in modules.values():
                        m.train()
                for mode in modes:
                    if (mode == "decode" and dropout > 0) or (mode != "decode" and dropout not in config.dropouts):
                        continue
                    timed = {n: m for n, m in modules.items() if not (n == "base" and mode in base_ms)}
                    timings = time_modules(timed, mode, inputs, config)
                    if "base" in timings:
                        base_ms[mode] = timings["base"].median_ms
                    for name, t in timings.items():
                        progress.tick(f"{mode} K={K} N={N} M={M} r={r} p={dropout} {name}")
                        cost = linear_cost(mode, M, K, N, r, elem, 4, config.bias, lora=name != "base")
                        secs = t.median_ms * 1e-3
                        rows.append({
                            "provider": name, "mode": mode, "K": K, "N": N, "M": M, "r": r,
                            "dtype": _dtype_name(dtype), "dropout": dropout if name != "base" else 0.0,
                            "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
                            "tflops": cost.flops / secs / 1e12, "gbps": cost.bytes / secs / 1e9,
                            "ratio_to_base": t.median_ms / base_ms[mode] if mode in base_ms else None,
                            "roofline_frac": cost.roofline_ms(ceilings["matmul_TFLOPs"], ceilings["copy_GBps"]) / t.median_ms,
                            "rel_err": errors.get(name),
                            "agrees": None if name not in errors else errors[name] <= AGREE_RTOL.get(dtype, 1e-5),
                        })
                del modules
            del inputs
    return rows


def _memory_rows(config: BenchConfig, providers: list[str], progress: Progress) -> list[dict]:
    M = _memory_M(config)
    if M is None:
        return []
    rows = []
    dev, dtype = config.device, config.dtype
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        torch.manual_seed(config.seed)
        w = Weights.random(K, N, r, dtype, dev, bias=config.bias)
        x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        for dropout, name in itertools.product(MEMORY_DROPOUTS, providers):
            module = build(name, w, dropout)
            saved, peak = module_memory(module, x, dy, dev)
            progress.tick(f"memory K={K} N={N} M={M} p={dropout} {name}")
            rows.append({
                "provider": name, "K": K, "N": N, "M": M, "r": r, "dtype": _dtype_name(dtype),
                "dropout": dropout, "saved_bytes": saved, "peak_bytes": peak,
            })
            del module
    return rows


def run_suite(config: BenchConfig, progress: bool = True) -> dict:
    """Run everything `config` asks for; returns the results dict (see the module docstring)."""
    if config.suite == "qlora":
        from lorakern.bench.qlora import run_qlora_suite

        return run_qlora_suite(config, progress)
    if config.suite == "dora":
        from lorakern.bench.dora import run_dora_suite

        return run_dora_suite(config, progress)
    if config.suite == "mixed":
        from lorakern.bench.mixed import run_mixed_suite

        return run_mixed_suite(config, progress)
    if config.suite == "moe":
        from lorakern.bench.moe import run_moe_suite

        return run_moe_suite(config, progress)
    providers, skipped = available_providers(list(config.providers))
    if providers and providers[0] != "base" and "base" in providers:
        providers = ["base"] + [p for p in providers if p != "base"]
    e2e_providers = [p for p in ("lorakern", "peft") if p in providers]
    size = e2e_mod.size_for(config.device, config.e2e_size) if config.e2e else None
    e2e_skipped = None
    if size is not None and not e2e_mod.transformers_available():
        size, e2e_skipped = None, "transformers is not installed (pip install 'lorakern[bench]')"
    # The thin kernels alone (GB/s vs the copy ceiling): CUDA only, where they are what runs.
    thin_on = config.device.type == "cuda" and "lorakern" in providers and any(m != "decode" for m in config.modes)
    thin_M = max(config.tokens)
    # Decode with each provider's step captured in a CUDA graph (host overhead gone): CUDA only.
    graph_Ms = graphs.decode_tokens(config.tokens, config.modes) if graphs.wanted(config.device, config.modes) else []
    total = _count_work(config, providers) + (e2e_mod.steps_count(size, e2e_providers, config.e2e_compile) if size else 0)
    total += thin.count(config.kn, config.ranks, config.dropouts) if thin_on else 0
    total += graphs.count(config.kn, graph_Ms, config.ranks, providers)
    bar, started, ceilings = start_run(config, total, progress)
    rows = _layer_rows(config, providers, ceilings, bar)
    thin_rows = thin.thin_rows(config.kn, thin_M, config.ranks, config.dropouts, config.dtype, config.device,
                               config.timer, ceilings["copy_GBps"], bar.tick) if thin_on else []
    graph_rows, graph_warnings = [], []
    if graph_Ms:
        graph_rows, graph_warnings = graphs.graph_rows(config.kn, graph_Ms, config.ranks, providers, config.dtype,
                                                       config.device, config.timer, bar.tick, config.seed, config.bias,
                                                       AGREE_RTOL.get(config.dtype, 1e-5))
    memory = _memory_rows(config, providers, bar) if config.memory else []
    e2e_rows = []
    if size is not None and e2e_providers:
        e2e_rows = e2e_mod.run_e2e(config.device, config.dtype, size, e2e_providers, tick=bar.tick, seed=config.seed,
                                    compile=config.e2e_compile)
    bar.close()
    return run_record(config, started, ceilings, providers, skipped, rows, memory, e2e_rows,
                      vars(size) if size is not None else None, e2e_skipped, thin_kernels=thin_rows,
                      decode_graphs=graph_rows, extra_warnings=graph_warnings)


def start_run(config, total: int, progress: bool):
    """Every suite's start: (progress bar over `total` steps, start time, ceilings measured at
    the run's device, dtype and timer — their two steps ticked)."""
    bar = Progress(total, enabled=progress)
    started = _dt.datetime.now(_dt.timezone.utc)
    ceilings = measure_ceilings(config.device, config.dtype, config.timer)
    bar.tick("ceilings: copy bandwidth")
    bar.tick("ceilings: matmul rate")
    return bar, started, ceilings


def base_first(providers: list[str], base: str = "base") -> list[str]:
    """`providers` with the base row first (the others' ratios are taken against it)."""
    return [base] + [p for p in providers if p != base] if base in providers else list(providers)


def run_record(config, started, ceilings, providers, skipped, rows, memory, e2e_rows, e2e_size, e2e_skipped,
               extra_warnings: Sequence[str] = (), **extra) -> dict:
    """One run's results.json dict (every suite's: the dense, QLoRA, DoRA, mixed and MoE ones), targets
    evaluated; `extra` adds suite-specific sections. Rows are checked first (`check_rows`: noisy
    flags, impossible rooflines) and its warnings, then `extra_warnings` (a section's own), printed
    once, to stderr."""
    noise, warnings = check_rows(config.device.type, ceilings, rows, e2e_rows)
    warnings.extend(extra_warnings)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    results = {
        "machine": machine_info(config.device, config.dtype),
        "config": config.as_dict(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timer": timer_description(config.device, config.timer),
        "ceilings": ceilings,
        "providers": providers,
        "skipped_providers": skipped,
        "rows": rows,
        "memory": memory,
        "e2e": e2e_rows,
        "e2e_size": e2e_size,
        "e2e_skipped": e2e_skipped,
        "dispatch": _dispatch_choices(),
        "noise": noise,
        "warnings": warnings,
        **extra,
    }
    results["targets"] = evaluate_targets(results)
    return results


def check_rows(device_type: str, ceilings: dict, rows: list[dict], e2e_rows: list[dict]) -> tuple[dict, list[str]]:
    """Flag noisy rows and e2e rows (`noisy`), blank impossible roofline fractions; returns the
    results' `noise` section and the run's warnings (one line each)."""
    limit = noisy_spread(device_type)
    n_noisy = flag_noisy(rows, device_type)
    n_noisy_e2e = flag_noisy(e2e_rows, device_type, "step_ms_p20", "step_ms_p80")
    n_above = mark_impossible_rooflines(rows)
    warnings = []
    if n_noisy:
        warnings.append(f"{n_noisy} of {len(rows)} timed rows stayed noisy (p80/p20 > {limit:g}) after up to "
                        f"{NOISY_REMEASURES} re-measurements: marked * and left out of the target verdicts "
                        "(is the machine shared or busy?)")
    if n_noisy_e2e:
        warnings.append(f"{n_noisy_e2e} of {len(e2e_rows)} end-to-end rows have noisy step times "
                        f"(p80/p20 > {limit:g}): marked * and left out of the target verdicts")
    if n_above:
        warnings.append(f"{n_above} row(s) ran faster than the measured ceilings allow (roofline fraction > "
                        f"{ROOFLINE_TOLERANCE:g}): the ceilings were under-measured; those fractions are not shown "
                        f"({ROOFLINE_NOTE})")
    threads = ceilings.get("threads")
    if device_type != "cuda" and threads is not None and threads != torch.get_num_threads():
        warnings.append(f"ceilings were measured with {threads} CPU threads, the rows with {torch.get_num_threads()}: "
                        "roofline fractions compare different machines")
    noise = {"spread_limit": limit, "remeasures": NOISY_REMEASURES, "noisy_rows": n_noisy,
             "noisy_e2e_rows": n_noisy_e2e, "roofline_above_ceiling": n_above}
    return noise, warnings


def _dispatch_choices() -> list[dict]:
    """Which variant lorakern's measured dispatch picked per shape bucket, with every
    candidate's time (CUDA runs only: elsewhere nothing is measured)."""
    import sys

    dispatch = sys.modules.get("lorakern.kernels.dispatch")
    if dispatch is None:
        return []
    choices = dispatch.DISPATCH.choices()
    return [
        {"key": [str(k) for k in key], "chosen": choices[key], "ms": times}
        for key, times in dispatch.DISPATCH.times().items()
    ]
