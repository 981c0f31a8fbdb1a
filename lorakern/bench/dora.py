"""The suite's DoRA rows (`lorakern bench --suite dora`, issue 13): PEFT's DoRA against lorakern's.

Providers, all built around the same weights (`Weights.random` plus one magnitude vector):
- base: the frozen nn.Linear (the floor every ratio is taken against).
- peft-dora: PEFT's LoRA Linear with use_dora=True (peft.get_peft_model on a one-layer model),
  adapters and magnitude fp32 as PEFT makes them. Every forward it materialises W + s·B A
  (N×K) for the row norms. PEFT's DoRA cache (peft.tuners.lora.dora.ENABLE_DORA_CACHING,
  eval only) is left at its default, off.
- lorakern-dora: lorakern.LoraLinear(use_dora=True, backend="auto"): the row norms from
  W Aᵀ (N×r) and the cached ‖W_n‖² (lorakern/dora.py), the LoRA product on the fused op.
- lorakern: plain LoRA LoraLinear over the same A, B (no magnitude), for reference: what DoRA
  costs on top of LoRA.
A, B and the magnitude m are copied into both DoRA providers. m is not the initial one
(‖W + s·B A‖_row, which makes the DoRA scale g = 1) but that times a random factor in
[0.5, 1.5], so g ≠ 1 and every term of the formula counts.

Rows carry the dense suite's fields. `rel_err` is against fp64 of PEFT's formula
    y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias,   g = m / ‖W + s·B A‖_row  (N×K formed in fp64)
for the DoRA providers, and of plain LoRA for `lorakern`. `ratio_to_base` is the time over
base's (same shape and mode); the results' `dora.ratios` and the report's DoRA table give
lorakern-dora / peft-dora per row. Rooflines count DoRA's minimum extra work: the N×r
product W Aᵀ (one more read of W, 2·N·K·r FLOPs) for the row norms.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lorakern.bench.cost import Cost, linear_cost
from lorakern.bench.memory import module_memory
from lorakern.bench.progress import Progress
from lorakern.bench.providers import Weights, _Holder, available_providers, frozen_linear, make_lorakern
from lorakern.bench.shapes import modes_for
from lorakern.layer import LoraLinear

BASE, PEFT_DORA, LK_DORA = "base", "peft-dora", "lorakern-dora"
DORA_PROVIDERS = (BASE, PEFT_DORA, LK_DORA, "lorakern")
DORA = (PEFT_DORA, LK_DORA)
MAGNITUDE_SPREAD = 0.5  # m = ‖W + s·B A‖_row · U[1 - spread, 1 + spread]


# --- weights and builders ---------------------------------------------------------------


def dora_norm64(w: Weights) -> torch.Tensor:
    """‖W + s·B A‖ per row in fp64, the N×K sum formed (PEFT's way)."""
    return (w.weight.double() + w.scaling * w.lora_B.double() @ w.lora_A.double()).norm(dim=1)


def random_magnitude(w: Weights, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 [N]: the row norms of W + s·B A times a random factor in [1 - spread, 1 + spread]."""
    N = w.weight.shape[0]
    u = torch.rand(N, generator=generator, dtype=torch.float64)
    factor = 1.0 + MAGNITUDE_SPREAD * (2.0 * u - 1.0)
    return (dora_norm64(w).cpu() * factor).float().to(w.weight.device)


def dora_reference(x: torch.Tensor, w: Weights, magnitude: torch.Tensor) -> torch.Tensor:
    """fp64 of PEFT's DoRA formula (no dropout): g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias."""
    x64 = x.double()
    z = x64 @ w.weight.double().t() + w.scaling * (x64 @ w.lora_A.double().t()) @ w.lora_B.double().t()
    y = (magnitude.double() / dora_norm64(w)) * z
    return y if w.bias is None else y + w.bias.double()


def _set_adapter(layer: nn.Module, w: Weights, magnitude: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
        if magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer


def make_peft_dora(w: Weights, dropout: float, magnitude: torch.Tensor) -> nn.Module:
    """PEFT's LoRA Linear with use_dora=True around the shared base layer, A, B and m set to w's."""
    from peft import LoraConfig, get_peft_model

    r = w.rank
    config = LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=dropout, target_modules=["proj"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Holder(frozen_linear(w)), config)
    return _set_adapter(model.base_model.model.proj, w, magnitude)


def make_lorakern_dora(w: Weights, dropout: float, magnitude: torch.Tensor) -> nn.Module:
    """lorakern.LoraLinear(use_dora=True, backend="auto") around the shared base layer, A, B and m set to w's."""
    r = w.rank
    layer = LoraLinear(frozen_linear(w), r=r, lora_alpha=w.scaling * r, lora_dropout=dropout, backend="auto",
                       use_dora=True)
    return _set_adapter(layer, w, magnitude)


BUILDERS: dict[str, Callable[[Weights, float, torch.Tensor], nn.Module]] = {
    BASE: lambda w, dropout, m: frozen_linear(w),
    PEFT_DORA: make_peft_dora,
    LK_DORA: make_lorakern_dora,
    "lorakern": lambda w, dropout, m: make_lorakern(w, dropout),
}


def build_dora(name: str, w: Weights, dropout: float, magnitude: torch.Tensor) -> nn.Module:
    """The DoRA-suite provider `name` as a module in training mode over w (W and bias frozen)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown DoRA provider {name!r}; choose from {DORA_PROVIDERS}")
    return BUILDERS[name](w, dropout, magnitude).train()


def available_dora_providers(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(runnable, skipped-with-reason) among `names`."""
    return available_providers(names, PEFT_DORA)


# --- numbers ----------------------------------------------------------------------------


def dora_cost(mode: str, M: int, K: int, N: int, r: int, elem: int, bias: bool, name: str) -> Cost:
    """linear_cost, plus for DoRA the row norms' minimum: W Aᵀ (2·N·K·r FLOPs, one more read of W)."""
    cost = linear_cost(mode, M, K, N, r, elem, 4, bias, lora=name != BASE)
    if name in DORA:
        return Cost(cost.flops + 2.0 * N * K * r, cost.bytes + N * K * elem)
    return cost


def _count_work(config, providers: list[str]) -> int:
    from lorakern.bench.suite import MEMORY_DROPOUTS, _memory_M

    n = 0
    adapters = [p for p in providers if p != BASE]
    per_shape = len(config.kn) * len(config.ranks)
    for M in config.tokens:
        for mode in modes_for(M, config.modes):
            drops = (0.0,) if mode == "decode" else config.dropouts
            n += per_shape * ((BASE in providers) + len(adapters) * len(drops))
    if config.memory and _memory_M(config) is not None:
        n += per_shape * ((BASE in providers) + len(adapters) * len(MEMORY_DROPOUTS))
    return n + 2  # ceilings


def _weights(config, r: int, K: int, N: int) -> tuple[Weights, torch.Tensor]:
    torch.manual_seed(config.seed)
    w = Weights.random(K, N, r, config.dtype, config.device, bias=config.bias)
    return w, random_magnitude(w, torch.Generator().manual_seed(config.seed + 1))


def _layer_rows(config, providers: list[str], ceilings: dict, progress: Progress) -> list[dict]:
    from lorakern.bench.suite import AGREE_RTOL, _dtype_name, _Inputs, _rel_error, time_modules

    rows = []
    dev, dtype = config.device, config.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        w, magnitude = _weights(config, r, K, N)
        for M in config.tokens:
            modes = modes_for(M, config.modes)
            if not modes:
                continue
            inputs = _Inputs(M, K, N, dtype, dev)
            base_ms: dict[str, float] = {}
            dropouts = config.dropouts
            if "decode" in modes and 0.0 not in dropouts:
                dropouts = (0.0, *dropouts)
            for dropout in dropouts:
                # the frozen base has no dropout: built, checked and timed on the first pass only
                names = [n for n in providers if n != BASE or dropout == dropouts[0]]
                modules = {name: build_dora(name, w, dropout, magnitude) for name in names}
                errors = {}
                if dropout == 0.0:
                    x0 = inputs.xs[0].detach()
                    refs = {}
                    with torch.no_grad():
                        for n, m in modules.items():
                            if n == BASE:
                                continue
                            kind = "dora" if n in DORA else "lora"
                            if kind not in refs:
                                refs[kind] = dora_reference(x0, w, magnitude) if kind == "dora" else w.reference(x0)
                            errors[n] = _rel_error(m.eval()(inputs.xs[0]), refs[kind])
                    del refs
                    for m in modules.values():
                        m.train()
                for mode in modes:
                    if (mode == "decode" and dropout > 0) or (mode != "decode" and dropout not in config.dropouts):
                        continue
                    timings = time_modules(modules, mode, inputs, config)
                    if BASE in timings:
                        base_ms[mode] = timings[BASE].median_ms
                    for name, t in timings.items():
                        progress.tick(f"dora {mode} K={K} N={N} M={M} r={r} p={dropout} {name}")
                        cost = dora_cost(mode, M, K, N, r, elem, config.bias, name)
                        secs = t.median_ms * 1e-3
                        rows.append({
                            "provider": name, "mode": mode, "K": K, "N": N, "M": M, "r": r,
                            "dtype": _dtype_name(dtype), "dropout": dropout if name != BASE else 0.0,
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


def _memory_rows(config, providers: list[str], progress: Progress) -> list[dict]:
    from lorakern.bench.suite import MEMORY_DROPOUTS, _dtype_name, _memory_M

    M = _memory_M(config)
    if M is None:
        return []
    rows = []
    dev, dtype = config.device, config.dtype
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        w, magnitude = _weights(config, r, K, N)
        x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        for dropout, name in itertools.product(MEMORY_DROPOUTS, providers):
            if name == BASE and dropout != MEMORY_DROPOUTS[0]:
                continue
            module = build_dora(name, w, dropout, magnitude)
            saved, peak = module_memory(module, x, dy, dev)
            progress.tick(f"dora memory K={K} N={N} M={M} p={dropout} {name}")
            rows.append({
                "provider": name, "K": K, "N": N, "M": M, "r": r, "dtype": _dtype_name(dtype),
                "dropout": dropout, "saved_bytes": saved, "peak_bytes": peak,
            })
            del module
    return rows


def dora_ratios(rows: list[dict]) -> list[dict]:
    """One dict per (mode, K, N, M, r, dropout) timed for both DoRA providers: their times,
    base's and plain lorakern's when timed, and lorakern-dora / peft-dora."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["mode"], r["K"], r["N"], r["M"], r["r"], r["dropout"]), {})[r["provider"]] = r["median_ms"]
    base = {(r["mode"], r["K"], r["N"], r["M"], r["r"]): r["median_ms"] for r in rows if r["provider"] == BASE}
    out = []
    for (mode, K, N, M, r, p), t in by_key.items():
        if PEFT_DORA in t and LK_DORA in t:
            out.append({
                "mode": mode, "K": K, "N": N, "M": M, "r": r, "dropout": p,
                "base_ms": base.get((mode, K, N, M, r)), "lorakern_ms": t.get("lorakern"),
                "peft_dora_ms": t[PEFT_DORA], "lorakern_dora_ms": t[LK_DORA],
                "lorakern_dora_over_peft_dora": t[LK_DORA] / t[PEFT_DORA],
            })
    return out


def _versions() -> dict:
    mod = sys.modules.get("peft")
    return {"peft": getattr(mod, "__version__", None) if mod is not None else None}


def run_dora_suite(config, progress: bool = True) -> dict:
    """The DoRA rows `config` asks for (config.suite == "dora"); the results dict has the dense
    suite's keys (rows, memory, e2e = [], targets, ...) plus `dora` (versions, the magnitude
    rule, lorakern-dora / peft-dora per row)."""
    from lorakern.bench.suite import base_first, run_record, start_run

    unknown = [p for p in config.providers if p not in DORA_PROVIDERS]
    if unknown:
        raise ValueError(f"--suite dora providers are {DORA_PROVIDERS}, got {unknown}")
    providers, skipped = available_dora_providers(list(config.providers))
    providers = base_first(providers, BASE)
    bar, started, ceilings = start_run(config, _count_work(config, providers), progress)
    rows = _layer_rows(config, providers, ceilings, bar)
    memory = _memory_rows(config, providers, bar) if config.memory else []
    bar.close()
    dora = {
        "magnitude": f"row norms of W + s·B A times U[{1 - MAGNITUDE_SPREAD:g}, {1 + MAGNITUDE_SPREAD:g}]",
        "versions": _versions(),
        "ratios": dora_ratios(rows),
    }
    e2e_skipped = "the DoRA suite has no end-to-end step" if config.e2e else None
    return run_record(config, started, ceilings, providers, skipped, rows, memory, [], None, e2e_skipped, dora=dora)
