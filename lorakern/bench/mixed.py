"""The suite's mixed-batch rows (`lorakern bench --suite mixed`, issue 14): many adapters in one batch.

One frozen base layer and a store of n LoRA adapters (rank r each, its own A, B and scaling
s_i = alpha_i / r with alpha_i drawn from [0.5·r, 2·r]); every row of x picks one adapter.
Rows are assigned round-robin (row b gets adapter b mod n) and then shuffled with a fixed
seed, so each adapter gets M/n rows (± 1) in no particular order, and min(n, M) distinct
adapters are in the batch (`distinct`). n = 1 is one adapter shared by every row.

Providers, all over the same W, bias and adapters:
- base: F.linear alone (nn.Linear, frozen): the floor every ratio is taken against.
- peft: one PEFT LoRA Linear holding all n adapters (get_peft_model + add_adapter on a
  one-layer model), called as PEFT runs a mixed batch: ``layer(x, adapter_names=[...])``
  (its `_mixed_batch_forward`: base GEMM, then per adapter a row gather, lora_A, lora_B,
  scale and an indexed add). Adapters fp32 as PEFT makes them; names as a Python list.
- lorakern-loop: `lorakern.mixed.lora_linear_looped` (group the rows per adapter, run
  the fused single-adapter op on each group, index_add), row_adapter a Python list (no
  device-to-host read).
- lorakern: `lorakern.lora_linear_mixed` (backend "auto"), row_adapter a device tensor
  as a server would hold it. On CPU it is the same per-adapter loop as lorakern-loop.
  The functional takes the adapters as lists: whatever it derives from them (stacks) is
  built per call.
- lorakern-layer: one `lorakern.LoraLinear` holding all n adapters, called
  ``layer(x, adapter_names=[...])`` like PEFT's layer: the user-facing path, which may
  keep derived adapter state between calls.
lorakern and lorakern-loop share the suite's fp32 A, B tensors; PEFT's and
lorakern-layer's adapters are copies of them.

Modes: `decode` here is the inference forward (torch.inference_mode) at every M, the
serving metric: M <= 256 is called a decode batch, larger M a prefill (`phase`). `fwd` and
`fwd+bwd` (training, dropout 0) run only when asked for with --modes.

Rows carry the dense suite's fields plus `adapters` (n loaded), `distinct`, `phase`,
`tokens_per_s` (M / median time) and `base_ms`: the frozen base is timed beside every
(n, M) group (interleaved with it on CPU) and `ratio_to_base` uses that group's base time;
the base's own row is the first group's. `rel_err` is against fp64 of
``x Wᵀ + bias + s_i·(x A_iᵀ) B_iᵀ`` per row, computed once before timing. Rooflines count
each distinct adapter's A and B read once. The results' `mixed` section has, per
(K, N, M, r, n) and for lorakern and lorakern-layer, the time over base's, over PEFT's and
over the same provider's time with one shared adapter: the quantities of the issue's
targets (targets.py).
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings

import torch
from torch import nn

from lorakern.bench.cost import Cost, linear_cost
from lorakern.bench.progress import Progress
from lorakern.bench.providers import Weights, _Holder, available_providers, frozen_linear
from lorakern.mixed import lora_linear_looped, lora_linear_mixed

BASE, PEFT, LOOP, LK, LAYER = "base", "peft", "lorakern-loop", "lorakern", "lorakern-layer"
MIXED_PROVIDERS = (BASE, PEFT, LOOP, LK, LAYER)
FUSED = (LK, LAYER)  # the providers the targets are evaluated for
ADAPTER_COUNTS = (1, 8, 64)
DECODE_BATCH_MAX_M = 256  # rows of M <= this are "decode" batches, larger ones "prefill"
ALPHA_RANGE = (0.5, 2.0)  # alpha_i / r drawn uniformly from this range


# --- adapters and row assignment --------------------------------------------------------


class AdapterStore:
    """n adapters for one (K, N): A_i [r, K], B_i [N, r] fp32, alpha_i, s_i = alpha_i / r (PEFT's rule)."""

    def __init__(self, K: int, N: int, r: int, n: int, device: torch.device, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.r = r
        self.As = [(torch.randn(r, K, generator=g) / math.sqrt(K)).to(device) for _ in range(n)]
        self.Bs = [(torch.randn(N, r, generator=g) / math.sqrt(r)).to(device) for _ in range(n)]
        lo, hi = ALPHA_RANGE
        self.alphas = [r * (lo + (hi - lo) * u) for u in torch.rand(n, generator=g, dtype=torch.float64).tolist()]
        self.scalings = [a / r for a in self.alphas]

    def __len__(self) -> int:
        return len(self.As)


def assign_rows(M: int, n: int, seed: int) -> list[int]:
    """Adapter index per row: round-robin over n adapters, shuffled with `seed`."""
    rows = torch.arange(M) % n
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    return rows[perm].tolist()


def mixed_reference(x: torch.Tensor, w: Weights, store: AdapterStore, rows: list[int]) -> torch.Tensor:
    """fp64 ``x Wᵀ + bias + s_i·(x A_iᵀ) B_iᵀ`` with i = rows[b] for row b."""
    x64 = x.double()
    y = x64 @ w.weight.double().t()
    if w.bias is not None:
        y = y + w.bias.double()
    idx = torch.tensor(rows, device=x.device)
    for i in sorted(set(rows)):
        sel = (idx == i).nonzero().flatten()
        xs = x64.index_select(0, sel)
        lora = store.scalings[i] * (xs @ store.As[i].double().t()) @ store.Bs[i].double().t()
        y = y.index_add(0, sel, lora)
    return y


# --- providers ----------------------------------------------------------------------------


class PeftMixed(nn.Module):
    """A PEFT LoRA Linear with every adapter of the store, called with adapter_names (PEFT's mixed batch)."""

    def __init__(self, w: Weights, store: AdapterStore, names: list[str]):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        def config(i):
            return LoraConfig(r=store.r, lora_alpha=store.alphas[i], target_modules=["proj"])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(_Holder(frozen_linear(w)), config(0), adapter_name=_name(0))
            for i in range(1, len(store)):
                model.add_adapter(_name(i), config(i))
        self.layer = model.base_model.model.proj
        with torch.no_grad():
            for i in range(len(store)):
                self.layer.lora_A[_name(i)].weight.copy_(store.As[i])
                self.layer.lora_B[_name(i)].weight.copy_(store.Bs[i])
                assert self.layer.scaling[_name(i)] == store.scalings[i]
        for p in self.layer.parameters():  # PEFT trains only the active adapter; the bench trains all
            p.requires_grad_(p is not self.layer.base_layer.weight and p is not self.layer.base_layer.bias)
        self.names = names

    def set_rows(self, rows: list[int]) -> None:
        self.names = [_name(i) for i in rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, adapter_names=self.names)


class LorakernMixed(nn.Module):
    """The store's adapters (shared, fp32, trainable) around a frozen base, through `fn`
    (lora_linear_looped or lora_linear_mixed) with a fixed row assignment."""

    def __init__(self, w: Weights, store: AdapterStore, row_adapter, fn):
        super().__init__()
        self.base_layer = frozen_linear(w)
        self.lora_A = nn.ParameterList([nn.Parameter(A) for A in store.As])
        self.lora_B = nn.ParameterList([nn.Parameter(B) for B in store.Bs])
        self.scalings = list(store.scalings)
        self.row_adapter = row_adapter
        self.fn = fn

    def set_rows(self, rows: list[int]) -> None:
        if isinstance(self.row_adapter, torch.Tensor):
            self.row_adapter = torch.tensor(rows, dtype=torch.long, device=self.row_adapter.device)
        else:
            self.row_adapter = list(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.base_layer.weight, self.base_layer.bias, list(self.lora_A), list(self.lora_B),
                       self.scalings, self.row_adapter, backend="auto")


class LayerMixed(nn.Module):
    """A lorakern.LoraLinear with every adapter of the store (copies), called with adapter_names."""

    def __init__(self, w: Weights, store: AdapterStore, names: list[str]):
        super().__init__()
        from lorakern.layer import LoraLinear

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.layer = LoraLinear(frozen_linear(w), r=store.r, lora_alpha=store.alphas[0], adapter_name=_name(0),
                                    backend="auto")
            for i in range(1, len(store)):
                self.layer.update_layer(_name(i), store.r, store.alphas[i])
        with torch.no_grad():
            for i in range(len(store)):
                self.layer.lora_A[_name(i)].weight.copy_(store.As[i])
                self.layer.lora_B[_name(i)].weight.copy_(store.Bs[i])
                assert self.layer.scaling[_name(i)] == store.scalings[i]
        for n, p in self.layer.named_parameters():
            p.requires_grad_("lora_" in n)
        self.names = names

    def set_rows(self, rows: list[int]) -> None:
        self.names = [_name(i) for i in rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, adapter_names=self.names)


def _name(i: int) -> str:
    return f"adapter{i}"


def build_mixed(name: str, w: Weights, store: AdapterStore, rows: list[int]) -> nn.Module:
    """The mixed-batch provider `name` over w and the first len(store) adapters, rows assigned as `rows`."""
    if name == BASE:
        return frozen_linear(w)
    if name == PEFT:
        return PeftMixed(w, store, [_name(i) for i in rows])
    if name == LOOP:
        return LorakernMixed(w, store, list(rows), lora_linear_looped)
    if name == LK:
        return LorakernMixed(w, store, torch.tensor(rows, dtype=torch.long, device=w.weight.device), lora_linear_mixed)
    if name == LAYER:
        return LayerMixed(w, store, [_name(i) for i in rows])
    raise ValueError(f"unknown mixed-batch provider {name!r}; choose from {MIXED_PROVIDERS}")


class _Subset:
    """The first n adapters of a store (no copies)."""

    def __init__(self, store: AdapterStore, n: int):
        self.r, self.As, self.Bs = store.r, store.As[:n], store.Bs[:n]
        self.alphas, self.scalings = store.alphas[:n], store.scalings[:n]

    def __len__(self) -> int:
        return len(self.As)


def available_mixed_providers(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(runnable, skipped-with-reason) among `names`."""
    return available_providers(names, PEFT)


# --- numbers --------------------------------------------------------------------------------


def mixed_cost(mode: str, M: int, K: int, N: int, r: int, distinct: int, elem: int, bias: bool, lora: bool) -> Cost:
    """linear_cost with `distinct` adapters' A and B read (once each per pass) instead of one's."""
    cost = linear_cost(mode, M, K, N, r, elem, 4, bias, lora)
    if not lora or distinct <= 1:
        return cost
    passes = 3 if mode == "fwd+bwd" else 1  # forward read; backward read + gradient write
    return Cost(cost.flops, cost.bytes + (distinct - 1) * passes * r * (K + N) * 4)


def phase(M: int) -> str:
    return "decode" if M <= DECODE_BATCH_MAX_M else "prefill"


def _count_work(config, providers: list[str]) -> int:
    adapters = [p for p in providers if p != BASE]
    groups = len(config.kn) * len(config.ranks) * len(config.tokens) * len(config.modes)
    return groups * ((BASE in providers) + len(adapters) * len(config.adapters)) + 2  # + ceilings (base ticks once)


def _layer_rows(config, providers: list[str], ceilings: dict, progress: Progress) -> list[dict]:
    from lorakern.bench.suite import AGREE_RTOL, _dtype_name, _Inputs, _rel_error, time_modules

    rows = []
    dev, dtype = config.device, config.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    for r, (K, N) in itertools.product(config.ranks, config.kn):
        torch.manual_seed(config.seed)
        w = Weights.random(K, N, 1, dtype, dev, bias=config.bias)  # its own A, B unused
        store = AdapterStore(K, N, r, max(config.adapters), dev, config.seed + 1)
        for j, n in enumerate(config.adapters):
            sub = _Subset(store, n)
            # built once per n (64 PEFT adapters take seconds to add), the rows set per M. The
            # frozen base is timed in every group (on CPU the timer interleaves the providers, so
            # each group's ratios are taken under one load) but recorded once per M
            modules = {p: build_mixed(p, w, sub, [0]) for p in providers}
            for M in config.tokens:
                assignment = assign_rows(M, n, config.seed + M)
                distinct = len(set(assignment))
                for m in modules.values():
                    if hasattr(m, "set_rows"):
                        m.set_rows(assignment)
                inputs = _Inputs(M, K, N, dtype, dev)
                xs_decode = [x.detach() for x in inputs.xs]
                ref = mixed_reference(xs_decode[0], w, sub, assignment)
                errors = {}
                with torch.no_grad():
                    for p, m in modules.items():
                        if p != BASE:
                            errors[p] = _rel_error(m.eval()(xs_decode[0]), ref)
                del ref
                for mode in config.modes:
                    timings = time_modules(modules, mode, inputs, config, xs_decode)
                    base_ms = timings[BASE].median_ms if BASE in timings else None
                    for p, t in timings.items():
                        if p == BASE and j > 0:
                            continue
                        progress.tick(f"mixed {mode} K={K} N={N} M={M} r={r} n={n} {p}")
                        lora = p != BASE
                        cost = mixed_cost(mode, M, K, N, r, distinct, elem, config.bias, lora)
                        secs = t.median_ms * 1e-3
                        rows.append({
                            "provider": p, "mode": mode, "phase": phase(M), "K": K, "N": N, "M": M, "r": r,
                            "adapters": n if lora else 0, "distinct": distinct if lora else 0,
                            "dtype": _dtype_name(dtype), "dropout": 0.0,
                            "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
                            "tokens_per_s": M / secs,
                            "tflops": cost.flops / secs / 1e12, "gbps": cost.bytes / secs / 1e9,
                            "base_ms": base_ms, "ratio_to_base": t.median_ms / base_ms if base_ms else None,
                            "roofline_frac": cost.roofline_ms(ceilings["matmul_TFLOPs"], ceilings["copy_GBps"]) / t.median_ms,
                            "rel_err": errors.get(p),
                            "agrees": None if p not in errors else errors[p] <= AGREE_RTOL.get(dtype, 1e-5),
                        })
                del inputs, xs_decode
            del modules
        del store
    return rows


def mixed_ratios(rows: list[dict]) -> list[dict]:
    """One dict per (provider in FUSED, mode, K, N, M, r, n) timed: the provider's time and
    tokens/s, base's, PEFT's and lorakern-loop's times, and the provider's time over base's,
    over PEFT's, PEFT's over it, lorakern-loop's over it, and over its own time with n = 1
    (one adapter shared by every row; same mode, shape and M)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["provider"] != BASE:
            by_key.setdefault((r["mode"], r["K"], r["N"], r["M"], r["r"], r["adapters"]), {})[r["provider"]] = r
    out = []
    for provider in FUSED:
        shared = {k[:5]: v[provider]["median_ms"] for k, v in by_key.items() if k[5] == 1 and provider in v}
        for (mode, K, N, M, r, n), got in by_key.items():
            if provider not in got:
                continue
            ms = got[provider]["median_ms"]
            t = {p: got[p]["median_ms"] for p in got}
            b = got[provider]["base_ms"]
            out.append({
                "provider": provider, "mode": mode, "phase": phase(M), "K": K, "N": N, "M": M, "r": r, "adapters": n,
                "distinct": got[provider]["distinct"], "base_ms": b, "peft_ms": t.get(PEFT), "loop_ms": t.get(LOOP),
                "ms": ms, "tokens_per_s": M / (ms * 1e-3),
                "over_base": ms / b if b else None,
                "over_peft": ms / t[PEFT] if PEFT in t else None,
                "peft_over": t[PEFT] / ms if PEFT in t else None,
                "loop_over": t[LOOP] / ms if LOOP in t else None,
                "over_shared": ms / shared[(mode, K, N, M, r)] if (mode, K, N, M, r) in shared else None,
            })
    return out


def _versions() -> dict:
    mod = sys.modules.get("peft")
    return {"peft": getattr(mod, "__version__", None) if mod is not None else None}


def run_mixed_suite(config, progress: bool = True) -> dict:
    """The mixed-batch rows `config` asks for (config.suite == "mixed"); the results dict has
    the dense suite's keys (rows, memory = [], e2e = [], targets, ...) plus `mixed` (the
    adapter counts, the assignment and scaling rules, versions and the per-row ratios)."""
    from lorakern.bench.suite import base_first, run_record, start_run

    unknown = [p for p in config.providers if p not in MIXED_PROVIDERS]
    if unknown:
        raise ValueError(f"--suite mixed providers are {MIXED_PROVIDERS}, got {unknown}")
    bad = [n for n in config.adapters if n < 1]
    if bad:
        raise ValueError(f"adapter counts must be >= 1, got {bad}")
    providers, skipped = available_mixed_providers(list(config.providers))
    providers = base_first(providers, BASE)
    bar, started, ceilings = start_run(config, _count_work(config, providers), progress)
    rows = _layer_rows(config, providers, ceilings, bar)
    bar.close()
    mixed = {
        "adapters": list(config.adapters),
        "assignment": "round-robin (row b -> adapter b mod n), then shuffled with a fixed seed",
        "scaling": f"s_i = alpha_i / r, alpha_i / r uniform in [{ALPHA_RANGE[0]:g}, {ALPHA_RANGE[1]:g}]",
        "row_adapter": {PEFT: "adapter_names, a Python list of str", LOOP: "a Python list of int",
                        LK: "a LongTensor on the device", LAYER: "adapter_names, a Python list of str"},
        "decode_batch_max_M": DECODE_BATCH_MAX_M,
        "versions": _versions(),
        "ratios": mixed_ratios(rows),
    }
    e2e_skipped = "the mixed-batch suite has no end-to-end step" if config.e2e else None
    return run_record(config, started, ceilings, providers, skipped, rows, [], [], None, e2e_skipped, mixed=mixed)
