"""LoraParameter: LoRA on one nn.Parameter of a module (PEFT's ``target_parameters``).

Mixture-of-experts layers keep their experts' weights as one 3-D parameter (transformers
5's Mixtral, Qwen2/3-MoE, gpt-oss: ``gate_up_proj`` [E, 2·I, H], ``down_proj`` [E, H, I])
instead of E nn.Linear modules, so `target_modules` cannot reach them. PEFT's
``target_parameters=["gate_up_proj", "down_proj"]`` wraps the module that owns such a
parameter and gives each expert e its own low-rank delta; this module does the same,
with PEFT's layout, numbers and state-dict keys:

    parameter [E, out, in] (or [E, in, out] when the module sets is_transposed):
        lora_A.<name>.weight [r·E, in]   rows e·r … e·r + r - 1 are expert e's A_e [r, in]
        lora_B.<name>.weight [out, r·E]  columns j·E + e (j < r) are expert e's B_e [out, r]
        ΔW_e = s·B_e A_e
    a 2-D parameter [out, in] (a router's weight): E = 1, ΔW = s·B A as for a linear layer.

(A's rows are expert-major and B's columns rank-major: PEFT's reshapes, kept so that its
files load unchanged.)

Forward, as PEFT: the wrapped module runs with its parameter replaced by W + ΔW (one
adapter on a 3-D parameter: baddbmm(W, B_e, A_e, alpha=s) in W's dtype; otherwise W +
the summed deltas), through `torch.func.functional_call`, so the module's own forward
(its routing, its expert loop) is untouched and autograd reaches A and B through ΔW.
This materialises an [E, out, in] weight per call, as PEFT does: the reference path; a
grouped-GEMM kernel (each expert's rows through x A_eᵀ B_eᵀ, as the SGMV kernels do for
adapters) is the planned fast path (benchmarks/NOTES.md).

Several parameters of one module (gate_up_proj and down_proj) nest, as in PEFT: the
wrapper of the parameter registered first is innermost, and the outer one's ``base_layer``
is the inner wrapper (keys ``….experts.base_layer.lora_A.<name>.weight`` for the inner).

Refused, as by PEFT: lora_dropout > 0 (x cannot be factored out of W + ΔW), fan_in_fan_out,
lora_bias, DoRA; and mixed batches (``adapter_names``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakern import experts
from lorakern.layer import AdapterLayerMixin, init_is_gaussian, adapter_dtype


def innermost(module: nn.Module) -> nn.Module:
    """The module under any LoraParameter wrappers."""
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


class LoraParameter(AdapterLayerMixin, nn.Module):
    """A module whose parameter `parameter_name` carries LoRA adapters (PEFT's ParamWrapper).

    Args:
        base_layer: the module owning the parameter (or another LoraParameter wrapping it).
        parameter_name: the parameter's name on the innermost module (e.g. "gate_up_proj").
        r, lora_alpha, use_rslora, init_lora_weights, adapter_name: as LoraLinear
            (init True: A Kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r); False: both
            Kaiming-uniform); r is per expert.
        lora_dropout, use_dora, lora_bias: must be 0 / False (ValueError), as in PEFT.

    Shapes: whatever the wrapped module takes and returns.

    Example:
        >>> import torch, lorakern
        >>> from lorakern.parameter import LoraParameter
        >>> class Experts(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(4, 6, 8))  # 4 experts, [out, in]
        ...     def forward(self, x, e):
        ...         return x @ self.w[e].t()
        >>> layer = LoraParameter(Experts(), "w", r=2, lora_alpha=4)
        >>> layer(torch.randn(3, 8), 1).shape, tuple(layer.lora_A["default"].weight.shape)
        (torch.Size([3, 6]), (8, 8))
    """

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        use_dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        param = getattr(innermost(base_layer), parameter_name, None)
        if not isinstance(param, nn.Parameter):
            raise TypeError(
                f"{type(innermost(base_layer)).__name__} has no parameter {parameter_name!r} (got {type(param).__name__})"
            )
        if param.dim() not in (2, 3):
            raise ValueError(
                f"LoRA on a parameter needs a 2-D [out, in] or 3-D [experts, ...] parameter; "
                f"{parameter_name!r} has shape {tuple(param.shape)}"
            )
        if not param.is_floating_point():
            raise TypeError(f"parameter {parameter_name!r} is {param.dtype}: LoRA on quantized parameters is not implemented")
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        if param.dim() == 3:
            self.num_experts = param.shape[0]
            # [E, out, in] unless the module says its experts are stored [E, in, out] (PEFT's rule)
            self.transposed = bool(getattr(innermost(base_layer), "is_transposed", False))
            in_f, out_f = (param.shape[1], param.shape[2]) if self.transposed else (param.shape[2], param.shape[1])
        else:
            self.num_experts, self.transposed = 1, False
            out_f, in_f = param.shape
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # always empty (no DoRA): read by code walking every layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}  # always False: read by code that walks every LoRA layer
        self.lora_bias: dict[str, bool] = {}  # always False, likewise
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        param.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias)

    # ---- what code outside reads ----------------------------------------------------------

    def get_param(self) -> nn.Parameter:
        """The wrapped parameter (on the innermost module)."""
        return getattr(innermost(self.base_layer), self.parameter_name)

    def held_adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_A)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter of adapter `adapter_name` (A and B)."""
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def lora_weights(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A [r·E, in], B [out, r·E]) of adapter `adapter_name` (the layout above)."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # the wrapped module's own attributes (act_fn, hidden_dim, ...), as through PEFT's
            # wrapper; never LoRA state (an outer wrapper must not answer with an inner one's)
            if name.startswith(("_", "lora_")) or name == "base_layer":
                raise
            return getattr(innermost(self.base_layer), name)

    # ---- adapters -----------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name` and make it the active one (LoraLinear's
        signature). Checked before anything is registered: a refused call changes nothing."""
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout)
        if lora_dropout != 0.0:
            raise ValueError("LoRA on a parameter (target_parameters) does not work with lora_dropout != 0 (as in PEFT)")
        if use_dora is not False:
            raise ValueError("LoRA on a parameter (target_parameters) does not work with use_dora=True (as in PEFT)")
        if lora_bias is not False:
            raise ValueError("LoRA on a parameter (target_parameters) does not work with lora_bias=True (as in PEFT)")
        gaussian = init_is_gaussian(init_lora_weights)
        w = self.get_param()
        dtype = adapter_dtype(w)
        rank = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=dtype)
        self._record_settings(adapter_name, r, lora_alpha, 0.0, use_rslora)
        with torch.no_grad():
            A, B = self.lora_weights(adapter_name)
            if gaussian:
                nn.init.normal_(A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)
        self.active_adapters = [adapter_name]

    def _adapter_stores(self) -> tuple:
        return self.lora_A, self.lora_B

    # ---- the delta --------------------------------------------------------------------------

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e [E, r, in], B_e [E, out, r]) in the adapter's dtype (PEFT's reshapes)."""
        A, B = self.lora_weights(adapter_name)
        E = self.num_experts
        return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)

    def delta(self, adapter_name: str) -> torch.Tensor:
        """ΔW of adapter `adapter_name` in the parameter's layout and dtype (differentiable):
        s·B A for a 2-D parameter, s·B_e A_e per expert for a 3-D one ([E, in, out] when
        transposed). Computed in the adapter's dtype, cast once, as PEFT."""
        param = self.get_param()
        s = self.scaling[adapter_name]
        if self.num_experts == 1 and param.dim() == 2:
            A, B = self.lora_weights(adapter_name)
            d = (B @ A) * s
        else:
            A_e, B_e = self._factors(adapter_name)
            d = torch.bmm(B_e, A_e) * s  # [E, out, in]
            if self.transposed:
                d = d.transpose(1, 2)
        return d.to(param.dtype)

    def effective_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """W + Σ ΔW over `adapter_names`, as PEFT's forward builds it (differentiable in A, B)."""
        param = self.get_param()
        if len(adapter_names) == 1 and param.dim() == 3 and param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            A_e, B_e = self._factors(adapter_names[0])
            lhs, rhs = (A_e.transpose(1, 2), B_e.transpose(1, 2)) if self.transposed else (B_e, A_e)
            with torch.autocast(param.device.type, enabled=False):  # the parameter keeps its dtype
                return torch.baddbmm(param, lhs.to(param.dtype), rhs.to(param.dtype), alpha=self.scaling[adapter_names[0]])
        total = None
        for name in adapter_names:
            d = self.delta(name)
            total = d if total is None else total + d
        return param + total

    # ---- forward ------------------------------------------------------------------------------

    # Where it applies (a transformers experts module), the LoRA terms run on each expert's
    # rows (lorakern/experts.py) instead of rebuilding W + ΔW; False: PEFT's way, always.
    grouped = True

    def forward(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            raise ValueError("LoRA on a parameter (target_parameters) does not support mixed batches (adapter_names), as in PEFT")
        active = self._running_adapters()  # disabled: unmerged first, so the base runs
        if not active:
            return self.base_layer(*args, **kwargs)
        if self.grouped:
            out = self._grouped_forward(args, kwargs)
            if out is not None:
                return out
        w = self.effective_weight(active)
        # the name of the parameter as seen from base_layer (through inner wrappers)
        path, module = [], self.base_layer
        while isinstance(module, LoraParameter):
            path.append("base_layer")
            module = module.base_layer
        key = ".".join([*path, self.parameter_name])
        return torch.func.functional_call(self.base_layer, {key: w}, args, kwargs, strict=False)

    def _grouped_forward(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The experts block through `lorakern.experts.forward` with the LoRA terms of this
        wrapper and the ones inside it, or None where that path does not apply."""
        chain = [self]
        while isinstance(chain[-1].base_layer, LoraParameter):
            chain.append(chain[-1].base_layer)
        module = chain[-1].base_layer
        if any(w.disable_adapters or w.merged_adapters or w.num_experts == 1 for w in chain):
            return None
        if not experts.supports(module, [w.parameter_name for w in chain]):
            return None
        names = ("hidden_states", "top_k_index", "top_k_weights")
        if len(args) + len(kwargs) != 3 or set(kwargs) - set(names[len(args):]):
            return None
        hidden_states, top_k_index, top_k_weights = (*args, *(kwargs[n] for n in names[len(args):]))
        if hidden_states.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None  # grouped GEMMs take these (fp64: the reference path)
        terms = {
            w.parameter_name: [(*w._factors(n), w.scaling[n]) for n in w.active_adapters if n in w.lora_A]
            for w in chain
        }
        return experts.forward(module, hidden_states, top_k_index, top_k_weights, terms)

    # ---- merge ------------------------------------------------------------------------------

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of `adapter_name` in the parameter's layout and dtype."""
        return self.delta(adapter_name)

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """W plus the deltas of `adapter_names` (each cast to W's dtype, added in order, as
        PEFT merges). Does not change the layer."""
        for name in adapter_names:
            if name not in self.lora_A:
                raise ValueError(f"no adapter named {name!r}; have {self.held_adapters()}")
        total = self.get_param().detach().clone()
        for name in adapter_names:
            total += self.delta(name)
        return total

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W += ΔW for each adapter (default: the active ones). safe_merge: ValueError (layer
        unchanged) if the merged weight is not finite."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return
        new_w = self.merged_weight(names)
        if safe_merge and not torch.isfinite(new_w).all():
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights; nothing was merged")
        self.get_param().copy_(new_w)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W -= ΔW for every merged adapter, last merged first (as PEFT)."""
        param = self.get_param()
        while self.merged_adapters:
            param -= self.delta(self.merged_adapters.pop())

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}" for n in self.lora_A]
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + "; ".join(parts)
