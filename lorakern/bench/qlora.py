"""The suite's QLoRA rows (`lorakern bench --suite qlora`): a 4-bit frozen base, with and without LoRA.

Providers, all built around the same weights (`Weights.random` in the compute dtype):
- base-bf16: the frozen dense nn.Linear in the compute dtype (bf16 unless --dtype says
  otherwise; the `dtype` column says which): the floor every ratio is taken against.
- bnb-4bit: bitsandbytes' Linear4bit alone (frozen, no adapter): what the quantized base
  costs by itself in bitsandbytes.
- peft-qlora: PEFT's LoRA over that Linear4bit (peft.tuners.lora.bnb.Linear4bit, built by
  get_peft_model on a one-layer model flagged `is_loaded_in_4bit` as transformers flags a
  4-bit model), adapters fp32 as PEFT makes them.
- lorakern-qlora: lorakern.LoraLinear over lorakern.QuantLinear, backend "auto" (Triton on
  CUDA, the pure-PyTorch reference path on CPU).
The quantized base is NF4 with double quantisation, blocksize 64, compute dtype = the run's
dtype (QLoRA's recipe). Each provider quantizes the dense weight itself (bitsandbytes'
quantizer for the bnb ones, lorakern.quant for lorakern's; the two store the same bytes).

Rows carry the dense suite's fields plus `bits_per_param` (the base weight's stored bits per
element, statistics included: 16 for base-bf16, QuantizedWeight.bits_per_parameter() for the
4-bit ones). `rel_err` is against fp64 of what each provider should compute: the dense weight
for base-bf16, the dequantised 4-bit weight for the others, plus s·(x Aᵀ) Bᵀ for the LoRA ones.
`ratio_to_base` is the time over base-bf16's (same shape and mode). Rooflines count the 4-bit
weight's bytes for the quantized providers.

Modules are built fresh for every (M, dropout) and never read back after timing: on CPU,
bitsandbytes repacks a Linear4bit's weight into a private layout the first time it runs in
eval mode without grad (the decode rows; that is its inference path, and what is timed).
Decode inputs do not require grad (they would keep bitsandbytes off that path).
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lorakern.bench import e2e as e2e_mod
from lorakern.bench.cost import Cost, linear_cost
from lorakern.bench.memory import module_memory
from lorakern.bench.progress import Progress
from lorakern.bench.providers import Weights, _Holder, frozen_linear, peft_available
from lorakern.bench.shapes import modes_for
from lorakern.layer import LoraLinear
from lorakern.quant import dequantize_weight, quantize_weight
from lorakern.quantized import QuantLinear, quantized_weight

BASE = "base-bf16"
QLORA_PROVIDERS = (BASE, "bnb-4bit", "peft-qlora", "lorakern-qlora")
FROZEN = (BASE, "bnb-4bit")  # no adapter: timed once per mode, at dropout 0
NEED_BNB = ("bnb-4bit", "peft-qlora")
QUANT_TYPE, BLOCKSIZE, DOUBLE_QUANT = "nf4", 64, True


# --- bitsandbytes -----------------------------------------------------------------------


def import_bitsandbytes():
    """`import bitsandbytes`, its warning that the Hugging Face `kernels` package is not
    installed (its CPU backend probes for it) muted."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        log.setLevel(level)
    return bitsandbytes


def bnb_available(device: torch.device) -> tuple[bool, str]:
    """(True, version) when bitsandbytes imports and quantizes + runs a Linear4bit on
    `device`, else (False, reason)."""
    try:
        bnb = import_bitsandbytes()
    except Exception as exc:  # ImportError, or a build without this platform's binary
        return False, f"bitsandbytes does not import: {exc}"
    try:
        w = Weights.random(64, 64, 1, torch.float32, device)
        layer = make_bnb_linear4bit(w, torch.float32)
        layer(torch.randn(2, 64, device=device))
    except Exception as exc:
        return False, f"bitsandbytes {bnb.__version__} cannot run a Linear4bit on {device}: {exc}"
    return True, bnb.__version__


def available_qlora_providers(names: list[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(runnable, skipped-with-reason) among `names`."""
    skipped = {}
    if any(n in NEED_BNB for n in names):
        ok, why = bnb_available(device)
        if not ok:
            skipped.update({n: why for n in names if n in NEED_BNB})
    if "peft-qlora" in names and "peft-qlora" not in skipped:
        ok, why = peft_available()
        if not ok:
            skipped["peft-qlora"] = why
    return [n for n in names if n not in skipped], skipped


# --- builders ---------------------------------------------------------------------------


def make_bnb_linear4bit(w: Weights, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes Linear4bit (NF4, double quant, blocksize 64) over w's weight and
    bias, quantized by bitsandbytes on w's device (Params4bit quantizes when moved there)."""
    bnb = import_bitsandbytes()
    N, K = w.weight.shape
    device = w.weight.device
    layer = bnb.nn.Linear4bit(K, N, bias=w.bias is not None, compute_dtype=compute_dtype, quant_type=QUANT_TYPE,
                              compress_statistics=DOUBLE_QUANT, device="meta")
    layer.weight = bnb.nn.Params4bit(w.weight.detach().clone(), requires_grad=False, quant_type=QUANT_TYPE,
                                     compress_statistics=DOUBLE_QUANT, blocksize=BLOCKSIZE)
    if w.bias is not None:
        layer.bias = nn.Parameter(w.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)
    if getattr(layer.weight, "quant_state", None) is None:
        raise RuntimeError("bitsandbytes did not quantize the Linear4bit weight")
    return layer


def make_peft_qlora(w: Weights, dropout: float, compute_dtype: torch.dtype) -> nn.Module:
    """PEFT's LoRA layer for bitsandbytes 4-bit bases around a fresh Linear4bit, A and B set to w's."""
    from peft import LoraConfig, get_peft_model

    holder = _Holder(make_bnb_linear4bit(w, compute_dtype))
    holder.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT picks its bnb layer
    r = w.rank
    config = LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=dropout, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(holder, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    return layer


def make_quant_linear(w: Weights, compute_dtype: torch.dtype) -> QuantLinear:
    return QuantLinear.from_linear(frozen_linear(w), QUANT_TYPE, BLOCKSIZE, double_quant=DOUBLE_QUANT,
                                   compute_dtype=compute_dtype)


def make_lorakern_qlora(w: Weights, dropout: float, compute_dtype: torch.dtype) -> nn.Module:
    """lorakern.LoraLinear(backend="auto") over a QuantLinear of w, A and B set to w's."""
    r = w.rank
    layer = LoraLinear(make_quant_linear(w, compute_dtype), r=r, lora_alpha=w.scaling * r, lora_dropout=dropout,
                       backend="auto")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    return layer


BUILDERS: dict[str, Callable[[Weights, float, torch.dtype], nn.Module]] = {
    BASE: lambda w, dropout, dtype: frozen_linear(w),
    "bnb-4bit": lambda w, dropout, dtype: make_bnb_linear4bit(w, dtype),
    "peft-qlora": make_peft_qlora,
    "lorakern-qlora": make_lorakern_qlora,
}


def build_qlora(name: str, w: Weights, dropout: float, compute_dtype: torch.dtype) -> nn.Module:
    """The QLoRA provider `name` as a module in training mode over w (the base frozen)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown QLoRA provider {name!r}; choose from {QLORA_PROVIDERS}")
    return BUILDERS[name](w, dropout, compute_dtype).train()


def base_module(module: nn.Module) -> nn.Module:
    """The frozen base layer of a provider's module (itself for the frozen providers)."""
    return getattr(module, "base_layer", module)


def bits_per_param(module: nn.Module) -> float:
    """Stored bits per base-weight element: the quantized format's (statistics included) or the dense dtype's."""
    base = base_module(module)
    if type(base) is nn.Linear:
        return 8.0 * base.weight.element_size()
    return quantized_weight(base).bits_per_parameter()


# --- numbers ----------------------------------------------------------------------------


def qlora_cost(mode: str, M: int, K: int, N: int, r: int, elem: int, bias: bool, lora: bool, bits: float) -> Cost:
    """linear_cost with the weight read at `bits` per element (once per forward, again in the backward)."""
    dense = linear_cost(mode, M, K, N, r, elem, 4, bias, lora)
    reads = 2 if mode == "fwd+bwd" else 1
    return Cost(dense.flops, dense.bytes - reads * N * K * elem + reads * N * K * bits / 8)


def _reference(x: torch.Tensor, weight64: torch.Tensor, w: Weights, lora: bool) -> torch.Tensor:
    """fp64 x Wᵀ (+ s·(x Aᵀ) Bᵀ) (+ bias) with the given fp64 weight."""
    x64 = x.double()
    y = x64 @ weight64.t()
    if lora:
        y = y + w.scaling * (x64 @ w.lora_A.double().t()) @ w.lora_B.double().t()
    return y if w.bias is None else y + w.bias.double()


def _count_work(config, providers: list[str]) -> int:
    from lorakern.bench.suite import MEMORY_DROPOUTS, _memory_M

    n = 0
    frozen = [p for p in providers if p in FROZEN]
    lora = [p for p in providers if p not in FROZEN]
    per_shape = len(config.kn) * len(config.ranks)
    for M in config.tokens:
        for mode in modes_for(M, config.modes):
            drops = (0.0,) if mode == "decode" else config.dropouts
            n += per_shape * (len(frozen) + len(lora) * len(drops))
    if config.memory and _memory_M(config) is not None:
        n += per_shape * (len(frozen) + len(lora) * len(MEMORY_DROPOUTS))
    return n + 2  # ceilings


def _layer_rows(config, providers: list[str], ceilings: dict, progress: Progress) -> tuple[list[dict], list[dict]]:
    """(timing rows, one weight-storage row per (K, N, provider))."""
    from lorakern.bench.suite import AGREE_RTOL, _dtype_name, _Inputs, _rel_error, time_modules

    rows, weights = [], []
    dev, dtype = config.device, config.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        torch.manual_seed(config.seed)
        w = Weights.random(K, N, r, dtype, dev, bias=config.bias)
        dense64 = w.weight.double()
        quant64 = dequantize_weight(quantize_weight(w.weight, QUANT_TYPE, BLOCKSIZE, DOUBLE_QUANT), torch.float32).double()
        bits: dict[str, float] = {}
        for M in config.tokens:
            modes = modes_for(M, config.modes)
            if not modes:
                continue
            inputs = _Inputs(M, K, N, dtype, dev)
            xs_decode = [x.detach() for x in inputs.xs]
            base_ms: dict[str, float] = {}
            dropouts = config.dropouts
            if "decode" in modes and 0.0 not in dropouts:
                dropouts = (0.0, *dropouts)
            for dropout in dropouts:
                # the frozen bases have no dropout: built, checked and timed on the first pass only
                names = [n for n in providers if n not in FROZEN or dropout == dropouts[0]]
                modules = {name: build_qlora(name, w, dropout, dtype) for name in names}
                for name, m in modules.items():
                    if name not in bits:
                        bits[name] = bits_per_param(m)
                errors = {}
                if dropout == 0.0:
                    x0 = inputs.xs[0]  # requires grad: bitsandbytes keeps its standard layout here
                    refs: dict[tuple[bool, bool], torch.Tensor] = {}
                    with torch.no_grad():
                        for n, m in modules.items():
                            key = (n == BASE, n not in FROZEN)  # (dense weight, with the LoRA term)
                            if key not in refs:
                                refs[key] = _reference(x0.detach(), dense64 if key[0] else quant64, w, key[1])
                            errors[n] = _rel_error(m.eval()(x0), refs[key])
                    del refs
                    for m in modules.values():
                        m.train()
                for mode in modes:
                    if (mode == "decode" and dropout > 0) or (mode != "decode" and dropout not in config.dropouts):
                        continue
                    timings = time_modules(modules, mode, inputs, config, xs_decode)
                    if BASE in timings:
                        base_ms[mode] = timings[BASE].median_ms
                    for name, t in timings.items():
                        progress.tick(f"qlora {mode} K={K} N={N} M={M} r={r} p={dropout} {name}")
                        lora = name not in FROZEN
                        cost = qlora_cost(mode, M, K, N, r, elem, config.bias, lora, bits[name])
                        secs = t.median_ms * 1e-3
                        rows.append({
                            "provider": name, "mode": mode, "K": K, "N": N, "M": M, "r": r,
                            "dtype": _dtype_name(dtype), "dropout": dropout if lora else 0.0,
                            "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
                            "tflops": cost.flops / secs / 1e12, "gbps": cost.bytes / secs / 1e9,
                            "ratio_to_base": t.median_ms / base_ms[mode] if mode in base_ms else None,
                            "roofline_frac": cost.roofline_ms(ceilings["matmul_TFLOPs"], ceilings["copy_GBps"]) / t.median_ms,
                            "rel_err": errors.get(name),
                            "agrees": None if name not in errors else errors[name] <= AGREE_RTOL.get(dtype, 1e-5),
                            "bits_per_param": bits[name],
                        })
                del modules
            del inputs, xs_decode
        for name in providers:
            if name in bits and r == config.ranks[0]:
                weights.append({"provider": name, "K": K, "N": N, "bits_per_param": bits[name],
                                "weight_bytes": math.ceil(bits[name] * N * K / 8)})
    return rows, weights


def _memory_rows(config, providers: list[str], progress: Progress) -> list[dict]:
    from lorakern.bench.suite import MEMORY_DROPOUTS, _dtype_name, _memory_M

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
            if name in FROZEN and dropout != MEMORY_DROPOUTS[0]:
                continue
            module = build_qlora(name, w, dropout, dtype)
            saved, peak = module_memory(module, x, dy, dev)
            bits = bits_per_param(module)
            progress.tick(f"qlora memory K={K} N={N} M={M} p={dropout} {name}")
            rows.append({
                "provider": name, "K": K, "N": N, "M": M, "r": r, "dtype": _dtype_name(dtype),
                "dropout": dropout, "saved_bytes": saved, "peak_bytes": peak,
                "weight_bytes": math.ceil(bits * N * K / 8),
            })
            del module
    return rows


def _versions() -> dict:
    out = {}
    for name in ("bitsandbytes", "peft", "transformers"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def run_qlora_suite(config, progress: bool = True) -> dict:
    """The QLoRA rows `config` asks for (config.suite == "qlora"); the results dict has the
    dense suite's keys (rows, memory, e2e, targets, ...) plus `quant` (the format and each
    provider's stored bits per parameter)."""
    from lorakern.bench.suite import run_record, start_run

    unknown = [p for p in config.providers if p not in QLORA_PROVIDERS]
    if unknown:
        raise ValueError(f"--suite qlora providers are {QLORA_PROVIDERS}, got {unknown}")
    providers, skipped = available_qlora_providers(list(config.providers), config.device)
    if BASE in providers:
        providers = [BASE] + [p for p in providers if p != BASE]
    e2e_providers = [p for p in ("lorakern-qlora", "peft-qlora") if p in providers]
    size = e2e_mod.size_for(config.device, config.e2e_size) if config.e2e else None
    e2e_skipped = None
    if size is not None and not e2e_mod.transformers_available():
        size, e2e_skipped = None, "transformers is not installed (pip install 'lorakern[bench]')"
    total = _count_work(config, providers) + (e2e_mod.steps_count(size, e2e_providers) if size else 0)
    bar, started, ceilings = start_run(config, total, progress)
    rows, weights = _layer_rows(config, providers, ceilings, bar)
    memory = _memory_rows(config, providers, bar) if config.memory else []
    e2e_rows = []
    if size is not None and e2e_providers:
        e2e_rows = e2e_mod.run_e2e_qlora(config.device, config.dtype, size, e2e_providers, tick=bar.tick,
                                         seed=config.seed)
    bar.close()
    quant = {
        "quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT,
        "compute_dtype": str(config.dtype).removeprefix("torch."), "weights": weights, "versions": _versions(),
    }
    return run_record(config, started, ceilings, providers, skipped, rows, memory, e2e_rows,
                      vars(size) if size is not None else None, e2e_skipped, quant=quant)
