"""The suite's MoE rows (`lorakern bench --suite moe`, issue 13 item 2): LoRA on expert parameters.

One transformers-5 Mixtral experts block (`MixtralExperts`: gate_up_proj [E, 2·I, H] and
down_proj [E, H, I], SiLU-gated, its forward taking (hidden_states, top_k_index,
top_k_weights)), E = 8 experts, top-2 routing, run through transformers' default experts
implementation for a model ("grouped_mm", recorded in the results). K×N in the rows is
hidden H × intermediate I. The router is left out: every provider gets the same routing
(softmax of random logits, top-2, renormalised, as Mixtral's router does), so the rows time
the experts alone.

Providers, all over the same expert weights (the same nn.Parameter objects):
- base: the frozen experts block (the floor every ratio is taken against).
- peft: peft.get_peft_model(..., LoraConfig(target_parameters=["gate_up_proj", "down_proj"]))
  (PEFT's ParamWrapper, nested: one per parameter); its adapter tensors (PEFT's dtype and layout)
  get the values below.
- lorakern: lorakern.inject(..., LoraConfig(target_parameters=[...])) (lorakern/parameter.py),
  its state dict loaded from PEFT's, so both hold the same A_e, B_e.
A and B are random (A ~ N(0, 1/in), B ~ N(0, 1/r), s = alpha / r = 2), never zeros.

PEFT builds W_eff = W + s·B_e A_e ([E, out, in], one baddbmm per parameter) every forward and
runs the experts block on it. Per forward that is, beyond the base's one read of the (hit)
experts' weights W: read W, write W_eff, read W_eff — `extra_bytes` = 2·W; in fwd+bwd the
backward also reads W_eff (dx), writes dW_eff (the weight-gradient GEMM, 2·S·3·H·I more FLOPs,
S = M·top_k) and reads it twice (dA, dB): `extra_bytes` = 5·W. lorakern runs the grouped path
(lorakern/experts.py): the base GEMMs plus, per expert, its rows through x_e A_eᵀ and ·B_eᵀ
(no W_eff, `extra_bytes` 0) — the minimum work the rooflines (`roofline_frac`) count. The
results' `moe` section has, per row, the floors at the run's ceilings (base; planned = the
grouped path, lorakern's; as implemented = W_eff rebuilt, PEFT's) and lorakern / PEFT.

Modes: `decode` = inference forward (torch.inference_mode, eval) at every M; `fwd+bwd` =
training forward and backward (x and the adapters need grad; W frozen). `rel_err` is against
fp64 of the experts' formula with W_eff formed in fp64, computed once before timing; the `moe`
section also has ‖y_lorakern − y_peft‖ / ‖y_peft‖.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings

import torch
from torch import nn

from lorakern.bench.cost import Cost
from lorakern.bench.memory import module_memory
from lorakern.bench.progress import Progress
from lorakern.bench.providers import peft_available

BASE, PEFT, LK = "base", "peft", "lorakern"
MOE_PROVIDERS = (BASE, PEFT, LK)
MOE_MODES = ("decode", "fwd+bwd")
TARGET_PARAMETERS = ["gate_up_proj", "down_proj"]
EXPERTS, TOP_K = 8, 2  # Mixtral-8x7B's
EXPERTS_IMPLEMENTATION = "grouped_mm"  # transformers 5's default for a model
ALPHA_OVER_R = 2.0


def transformers_available() -> tuple[bool, str]:
    """(True, version) when transformers has the Mixtral experts block, else (False, reason)."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: F401
    except Exception as exc:
        return False, f"transformers' MixtralExperts does not import: {exc}"
    return True, transformers.__version__


# --- the block, its weights and its routing -----------------------------------------------


class ExpertWeights:
    """The shared expert weights (frozen nn.Parameters) of one (H, I) shape."""

    def __init__(self, H: int, I: int, dtype: torch.dtype, device: torch.device, seed: int):
        # drawn on the device (GB-sized at the GPU preset's shapes), in dtype: never zeros
        g = torch.Generator(device).manual_seed(seed)
        self.H, self.I = H, I
        gate_up = torch.randn(EXPERTS, 2 * I, H, generator=g, device=device, dtype=dtype).mul_(H ** -0.5)
        down = torch.randn(EXPERTS, H, I, generator=g, device=device, dtype=dtype).mul_(I ** -0.5)
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.gate_up_proj, self.down_proj))


def experts_block(w: ExpertWeights) -> nn.Module:
    """A MixtralExperts over w's parameters (no copy), with the suite's experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=w.H, intermediate_size=w.I, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    cfg._experts_implementation = EXPERTS_IMPLEMENTATION
    with torch.device("meta"):
        block = MixtralExperts(cfg)
    block.gate_up_proj = w.gate_up_proj
    block.down_proj = w.down_proj
    return block


class Routing:
    """Mixtral's routing of M tokens: softmax of random logits, top-k, renormalised."""

    def __init__(self, M: int, dtype: torch.dtype, device: torch.device, seed: int):
        logits = torch.randn(M, EXPERTS, generator=torch.Generator().manual_seed(seed))
        top, idx = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        self.top_k_weights = (top / top.sum(dim=-1, keepdim=True)).to(device=device, dtype=dtype)
        self.top_k_index = idx.to(device)
        self.hit = int(torch.unique(idx).numel())  # experts with at least one token


class Routed(nn.Module):
    """`experts(x, top_k_index, top_k_weights)` with a fixed routing: a module of x alone, as the
    suite's timers call it."""

    def __init__(self, experts: nn.Module, routing: Routing):
        super().__init__()
        self.experts = experts
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.routing.top_k_index, self.routing.top_k_weights)


def _lora_config(cls, r: int):
    return cls(r=r, lora_alpha=ALPHA_OVER_R * r, target_parameters=list(TARGET_PARAMETERS))


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts


def build_providers(w: ExpertWeights, r: int, names: list[str], seed: int) -> dict[str, nn.Module]:
    """{name: experts module} over w: the frozen block, PEFT's and lorakern's LoRA on its parameters
    (random adapters set in PEFT's model and loaded into lorakern's from PEFT's state dict)."""
    import lorakern

    modules: dict[str, nn.Module] = {}
    if BASE in names:
        modules[BASE] = experts_block(w)
    peft_sd = None
    if PEFT in names or LK in names:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(_Holder(experts_block(w)), _lora_config(LoraConfig, r))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(r))
        peft_sd = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if "lora_" in k}
        if PEFT in names:
            modules[PEFT] = pm.base_model.model.experts
    if LK in names:
        model = lorakern.inject(_Holder(experts_block(w)), _lora_config(lorakern.LoraConfig, r))
        missing, unexpected = model.load_state_dict(peft_sd, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"lorakern's MoE adapters do not match PEFT's: missing {missing}, unexpected {unexpected}")
        modules[LK] = model.experts
    for m in modules.values():
        for p in m.parameters():
            if p is w.gate_up_proj or p is w.down_proj:
                p.requires_grad_(False)
    return {n: modules[n] for n in names}


def _lora_factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A_e [E, r, in], B_e [E, out, r], s) of the LoRA on parameter `name` of a PEFT or lorakern
    wrapper chain, unpacked from PEFT's layout (A [r·E, in] expert-major rows, B [out, r·E]
    rank-major columns) here rather than by either library's code."""
    while hasattr(module, "parameter_name"):
        if module.parameter_name == name:
            A = module.lora_A["default"].weight.detach()
            B = module.lora_B["default"].weight.detach()
            A_e = A.reshape(EXPERTS, -1, A.shape[-1])
            B_e = B.reshape(B.shape[0], -1, EXPERTS).permute(2, 0, 1)
            return A_e, B_e, module.scaling["default"]
        module = module.base_layer
    raise ValueError(f"no LoRA on parameter {name!r}")


def moe_reference(x: torch.Tensor, w: ExpertWeights, routing: Routing, lora_module: nn.Module | None) -> torch.Tensor:
    """fp64 of the experts block: per token, Σ_k weight_k · down_e(silu(gate_e(x)) ⊙ up_e(x)),
    e = top_k_index[k], with W_e + s·B_e A_e formed in fp64 when `lora_module` (PEFT's or lorakern's
    LoRA-wrapped block) is given."""
    x64 = x.detach().double()
    out = torch.zeros_like(x64)
    idx, wts = routing.top_k_index, routing.top_k_weights.double()
    factors = {n: _lora_factors(lora_module, n) for n in TARGET_PARAMETERS} if lora_module is not None else {}
    for e in range(EXPERTS):
        tok, k = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        W = {"gate_up_proj": w.gate_up_proj[e].double(), "down_proj": w.down_proj[e].double()}
        for n, (A_e, B_e, s) in factors.items():
            W[n] = W[n] + s * B_e[e].double() @ A_e[e].double()
        gate, up = (x64[tok] @ W["gate_up_proj"].t()).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up) @ W["down_proj"].t()
        out.index_add_(0, tok, h * wts[tok, k, None])
    return out


def available_moe_providers(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(runnable, skipped-with-reason) among `names`; all need transformers, the LoRA ones peft."""
    ok, why = transformers_available()
    if not ok:
        return [], {n: why for n in names}
    skipped = {}
    if PEFT in names or LK in names:
        ok, why = peft_available()
        if not ok:  # lorakern's adapters are copied from PEFT's: both need it
            skipped = {n: why if n == PEFT else f"its adapters are copied from PEFT's: {why}" for n in (PEFT, LK)
                       if n in names}
    return [n for n in names if n not in skipped], skipped


# --- numbers ------------------------------------------------------------------------------


def moe_cost(mode: str, M: int, H: int, I: int, r: int, elem: int, hit: int, lora: bool) -> Cost:
    """Minimum FLOPs and bytes: the hit experts' GEMMs (S = M·top_k rows, 3·H·I weights each) reading
    x, their weights and writing y; fwd+bwd adds dx (W frozen). LoRA adds the planned grouped path:
    per row x_e A_eᵀ, ·B_eᵀ for both parameters (2·S·r·(2H + 3I) FLOPs a pass) and the fp32 adapters."""
    S = M * TOP_K
    base_flops = 2.0 * S * 3 * H * I
    w_b = hit * 3 * H * I * elem
    act_b = 2 * M * H * elem  # x in, y out
    lora_flops = 2.0 * S * r * (2 * H + 3 * I) if lora else 0.0
    ab_b = EXPERTS * r * (2 * H + 3 * I) * 4 if lora else 0
    flops, nbytes = base_flops + lora_flops, w_b + act_b + ab_b
    if mode == "fwd+bwd":
        flops += base_flops + 2 * lora_flops  # dx; dA, dB and the adapters' part of dx
        nbytes += w_b + act_b + 2 * ab_b  # W again, dY in, dx out; dA, dB out
    return Cost(flops, nbytes)


def materialised_extra(mode: str, M: int, H: int, I: int, r: int, elem: int) -> Cost:
    """What building W_eff = W + s·B_e A_e every forward adds to moe_cost's minimum (both LoRA
    providers): bytes 2·W (read W, write W_eff; the GEMMs then read W_eff instead of W) and the
    baddbmm's 2·E·r·3·H·I FLOPs; fwd+bwd: 5·W (also dW_eff written and read twice, for dA and
    dB) and the weight-gradient GEMM (2·S·3·H·I) plus the two bmms into dA, dB."""
    W = EXPERTS * 3 * H * I * elem
    bmm = 2.0 * EXPERTS * r * 3 * H * I
    if mode == "fwd+bwd":
        return Cost(bmm + 2.0 * M * TOP_K * 3 * H * I + 2 * bmm, 5 * W)
    return Cost(bmm, 2 * W)


def floors(mode: str, M: int, H: int, I: int, r: int, elem: int, hit: int, ceilings: dict) -> dict:
    """Roofline times (ms) at `ceilings`: base, LoRA on the grouped path (lorakern's), LoRA with
    W_eff rebuilt every forward (PEFT's, `as_implemented`)."""
    tf, bw = ceilings["matmul_TFLOPs"], ceilings["copy_GBps"]
    base = moe_cost(mode, M, H, I, r, elem, hit, lora=False)
    planned = moe_cost(mode, M, H, I, r, elem, hit, lora=True)
    extra = materialised_extra(mode, M, H, I, r, elem)
    as_impl = Cost(planned.flops + extra.flops, planned.bytes + extra.bytes)
    return {"base_floor_ms": base.roofline_ms(tf, bw), "planned_floor_ms": planned.roofline_ms(tf, bw),
            "as_implemented_floor_ms": as_impl.roofline_ms(tf, bw)}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    num = (out.double() - ref.double()).norm().item()
    den = ref.double().norm().item()
    return num / den if den else num


def _count_work(config, providers: list[str]) -> int:
    modes = [m for m in config.modes if m in ("fwd", "fwd+bwd", "decode")]
    n = len(config.kn) * len(config.ranks) * len(config.tokens) * len(modes) * len(providers)
    if config.memory and "fwd+bwd" in config.modes:
        n += len(config.kn) * len(config.ranks) * len(providers)
    return n + 2  # ceilings


def _check(modules: dict, x: torch.Tensor, w: ExpertWeights, routing: Routing) -> tuple[dict, float | None]:
    """{name: rel err vs fp64 of its formula} and ‖y_lorakern − y_peft‖ / ‖y_peft‖."""
    from lorakern.bench.suite import _rel_error

    outs = {}
    with torch.no_grad():
        for n, m in modules.items():
            outs[n] = Routed(m, routing).eval()(x)
    errors = {}
    if BASE in outs:
        errors[BASE] = _rel_error(outs[BASE], moe_reference(x, w, routing, None))
    lora = modules.get(PEFT, modules.get(LK))
    if lora is not None:  # both hold the same adapters (checked: lorakern vs PEFT below)
        ref = moe_reference(x, w, routing, lora)
        for n in (PEFT, LK):
            if n in outs:
                errors[n] = _rel_error(outs[n], ref)
    vs_peft = _rel(outs[LK], outs[PEFT]) if LK in outs and PEFT in outs else None
    return errors, vs_peft


def _layer_rows(config, providers: list[str], ceilings: dict, progress: Progress) -> tuple[list[dict], list[dict]]:
    from lorakern.bench.suite import AGREE_RTOL, _dtype_name, _Inputs, time_modules

    rows, section = [], []
    dev, dtype = config.device, config.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    modes = [m for m in ("decode", "fwd", "fwd+bwd") if m in config.modes]
    for r, (H, I) in itertools.product(config.ranks, config.kn):
        w = ExpertWeights(H, I, dtype, dev, config.seed)
        modules = build_providers(w, r, providers, config.seed + 1)
        for M in config.tokens:
            routing = Routing(M, dtype, dev, config.seed + 2 + M)
            inputs = _Inputs(M, H, H, dtype, dev)
            errors, vs_peft = _check(modules, inputs.xs[0], w, routing)
            routed = {n: Routed(m, routing) for n, m in modules.items()}
            for mode in modes:
                timings = time_modules(routed, mode, inputs, config)
                base_ms = timings[BASE].median_ms if BASE in timings else None
                for name, t in timings.items():
                    progress.tick(f"moe {mode} H={H} I={I} M={M} r={r} {name}")
                    lora = name != BASE
                    cost = moe_cost(mode, M, H, I, r, elem, routing.hit, lora)
                    secs = t.median_ms * 1e-3
                    rows.append({
                        "provider": name, "mode": mode, "K": H, "N": I, "M": M, "r": r,
                        "dtype": _dtype_name(dtype), "dropout": 0.0, "experts": EXPERTS, "top_k": TOP_K,
                        "hit_experts": routing.hit,
                        "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
                        "tflops": cost.flops / secs / 1e12, "gbps": cost.bytes / secs / 1e9,
                        "ratio_to_base": t.median_ms / base_ms if base_ms else None,
                        "roofline_frac": cost.roofline_ms(ceilings["matmul_TFLOPs"], ceilings["copy_GBps"]) / t.median_ms,
                        "extra_bytes": materialised_extra(mode, M, H, I, r, elem).bytes if name == PEFT else 0,
                        "rel_err": errors.get(name),
                        "agrees": None if name not in errors else errors[name] <= AGREE_RTOL.get(dtype, 1e-5),
                    })
                t_ms = {n: t.median_ms for n, t in timings.items()}
                section.append({
                    "mode": mode, "H": H, "I": I, "M": M, "r": r, "hit_experts": routing.hit,
                    "base_ms": t_ms.get(BASE), "peft_ms": t_ms.get(PEFT), "lorakern_ms": t_ms.get(LK),
                    "lorakern_over_peft": t_ms[LK] / t_ms[PEFT] if LK in t_ms and PEFT in t_ms else None,
                    "lorakern_vs_peft_rel": vs_peft,
                    "weight_bytes": w.nbytes,
                    "extra_bytes": materialised_extra(mode, M, H, I, r, elem).bytes,
                    **floors(mode, M, H, I, r, elem, routing.hit, ceilings),
                })
            del inputs, routed
        del modules, w
    return rows, section


def _memory_rows(config, providers: list[str], progress: Progress) -> list[dict]:
    """Saved activations (and CUDA peak) of fwd+bwd at the largest M, per provider."""
    from lorakern.bench.suite import _dtype_name

    if not config.memory or "fwd+bwd" not in config.modes:
        return []
    M = max(config.tokens)
    rows = []
    dev, dtype = config.device, config.dtype
    for r, (H, I) in itertools.product(config.ranks, config.kn):
        w = ExpertWeights(H, I, dtype, dev, config.seed)
        routing = Routing(M, dtype, dev, config.seed + 2 + M)
        x = torch.randn(M, H, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, H, device=dev, dtype=dtype)
        for name in providers:
            module = Routed(build_providers(w, r, [name], config.seed + 1)[name], routing).train()
            saved, peak = module_memory(module, x, dy, dev)
            progress.tick(f"moe memory H={H} I={I} M={M} {name}")
            rows.append({"provider": name, "K": H, "N": I, "M": M, "r": r, "dtype": _dtype_name(dtype),
                         "dropout": 0.0, "saved_bytes": saved, "peak_bytes": peak, "weight_bytes": w.nbytes})
            del module
    return rows


def _versions() -> dict:
    out = {}
    for name in ("peft", "transformers"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def run_moe_suite(config, progress: bool = True) -> dict:
    """The MoE rows `config` asks for (config.suite == "moe"); the results dict has the dense suite's
    keys (rows, memory, e2e = [], targets, ...) plus `moe` (block, versions, floors and ratios)."""
    from lorakern.bench.suite import base_first, run_record, start_run

    unknown = [p for p in config.providers if p not in MOE_PROVIDERS]
    if unknown:
        raise ValueError(f"--suite moe providers are {MOE_PROVIDERS}, got {unknown}")
    if any(p > 0 for p in config.dropouts):
        raise ValueError("--suite moe runs at dropout 0 only: LoRA on parameters refuses dropout (as PEFT)")
    providers, skipped = available_moe_providers(list(config.providers))
    providers = base_first(providers, BASE)
    bar, started, ceilings = start_run(config, _count_work(config, providers), progress)
    rows, section = _layer_rows(config, providers, ceilings, bar) if providers else ([], [])
    memory = _memory_rows(config, providers, bar) if providers else []
    bar.close()
    moe = {
        "block": f"transformers MixtralExperts, {EXPERTS} experts, top-{TOP_K}, SiLU-gated; "
                 f"experts implementation {EXPERTS_IMPLEMENTATION!r}; K×N = hidden × intermediate",
        "target_parameters": list(TARGET_PARAMETERS),
        "experts": EXPERTS, "top_k": TOP_K, "experts_implementation": EXPERTS_IMPLEMENTATION,
        "scaling": f"alpha = {ALPHA_OVER_R:g}·r (s = {ALPHA_OVER_R:g}); A ~ N(0, 1/in), B ~ N(0, 1/r)",
        "versions": _versions(),
        "ratios": section,
    }
    e2e_skipped = "the MoE suite has no end-to-end step" if config.e2e else None
    return run_record(config, started, ceilings, providers, skipped, rows, memory, [], None, e2e_skipped, moe=moe)
