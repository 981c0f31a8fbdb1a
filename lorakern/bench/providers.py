"""The implementations the suite compares, all built around the same weights.

- base: the frozen nn.Linear (the floor: what the layer costs with no adapter).
- eager: unfused LoRA in plain PyTorch, the way PEFT writes it
  (y = base(x) + B(A(dropout(x))) · s), adapters in the compute dtype.
- addmm: cuBLAS + in-place addmm_ with a hand-written backward (Unsloth's approach):
  y = x Wᵀ; y.addmm_(D(x) Aᵀ, Bᵀ, alpha=s), saving x, S and the dropout mask.
- peft: PEFT's own LoRA Linear (peft.get_peft_model), adapters fp32 as PEFT makes them.
- lorakern: lorakern.LoraLinear with backend="auto" (Triton on CUDA, reference on CPU).

Every provider computes x Wᵀ + s·(D(x) Aᵀ) Bᵀ + bias with the same W, bias, A, B.
"""

from __future__ import annotations

import importlib.util

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorakern.layer import LoraLinear

PROVIDERS = ("base", "eager", "addmm", "peft", "lorakern")


@dataclass
class Weights:
    """The shared layer: W [N, K], bias [N] | None (compute dtype), A [r, K], B [N, r] (fp32), s."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @classmethod
    def random(
        cls, K: int, N: int, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False, alpha: float = 32.0
    ) -> Weights:
        """Random non-zero weights (never time zeros), scaled so y stays O(1)."""
        w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
        b = (torch.randn(N, device=device) * 0.1).to(dtype) if bias else None
        A = torch.randn(r, K, device=device) / math.sqrt(K)
        B = torch.randn(N, r, device=device) / math.sqrt(r)
        return cls(w, b, A, B, alpha / r)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """fp64 x Wᵀ + s·(x Aᵀ) Bᵀ + bias (no dropout), for checking providers agree."""
        x64 = x.double()
        y = x64 @ self.weight.double().t() + self.scaling * (x64 @ self.lora_A.double().t()) @ self.lora_B.double().t()
        return y if self.bias is None else y + self.bias.double()


def peft_available() -> tuple[bool, str]:
    """(True, version) when peft imports, else (False, reason).

    peft imports bitsandbytes when it is installed: that goes first through qlora.py's
    importer, which mutes bitsandbytes' import-time warnings (a broken bitsandbytes is
    left to peft's import to report)."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        from lorakern.bench.qlora import import_bitsandbytes  # qlora imports this module

        try:
            import_bitsandbytes()
        except Exception:
            pass
    try:
        import peft
    except Exception as exc:  # ImportError or a broken install
        return False, f"peft does not import: {exc}"
    return True, peft.__version__


def frozen_linear(w: Weights) -> nn.Linear:
    """An nn.Linear sharing w's weight and bias storage, frozen."""
    N, K = w.weight.shape
    lin = nn.Linear(K, N, bias=w.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.weight, requires_grad=False)
    if w.bias is not None:
        lin.bias = nn.Parameter(w.bias, requires_grad=False)
    return lin


class EagerLora(nn.Module):
    """Unfused LoRA as PEFT writes it, adapters in the compute dtype."""

    def __init__(self, w: Weights, dropout: float):
        super().__init__()
        dtype = w.weight.dtype
        self.base_layer = frozen_linear(w)
        self.lora_A = nn.Linear(w.lora_A.shape[1], w.rank, bias=False, device="meta")
        self.lora_B = nn.Linear(w.rank, w.lora_B.shape[0], bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(w.lora_A.to(dtype).clone())
        self.lora_B.weight = nn.Parameter(w.lora_B.to(dtype).clone())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = w.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class _AddmmLoraFunction(torch.autograd.Function):
    """Unsloth-style LoRA: cuBLAS GEMMs with the LoRA term accumulated in place by addmm_.

    Forward: y = x Wᵀ + bias; S = D(x) Aᵀ; y += s·S Bᵀ.
    Backward: dS = s·dY B; dB = s·dYᵀ S; dA = dSᵀ D(x); dx = dY W; dx += D(dS A).
    Saves x, S and (with dropout) the mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, p):
        dtype = x.dtype
        keep = None
        xd = x
        if p > 0:
            keep = torch.rand_like(x, dtype=torch.float32) >= p
            xd = x * keep / (1 - p)
        y = torch.nn.functional.linear(x, weight, bias)
        S = xd @ A.to(dtype).t()
        y.addmm_(S, B.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B, S, keep)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, S, keep = ctx.saved_tensors
        s, p, dtype = ctx.scaling, ctx.p, dy.dtype
        xd = x if keep is None else x * keep / (1 - p)
        dS = (dy @ B.to(dtype)) * s
        dB = (dy.t() @ S).mul_(s).to(B.dtype)
        dA = (dS.t() @ xd).to(A.dtype)
        dx = dy @ weight
        if keep is None:
            dx.addmm_(dS, A.to(dtype))
        else:
            dx.add_((dS @ A.to(dtype)) * keep, alpha=1 / (1 - p))
        return dx, None, None, dA, dB, None, None


class AddmmLora(nn.Module):
    """Module wrapper of `_AddmmLoraFunction`, fp32 adapters (cast to the compute dtype in use)."""

    def __init__(self, w: Weights, dropout: float):
        super().__init__()
        self.base_layer = frozen_linear(w)
        self.lora_A = nn.Parameter(w.lora_A.clone())
        self.lora_B = nn.Parameter(w.lora_B.clone())
        self.scaling, self.p = w.scaling, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        p = self.p if self.training else 0.0
        y = _AddmmLoraFunction.apply(
            x.reshape(-1, x.shape[-1]), self.base_layer.weight, self.base_layer.bias,
            self.lora_A, self.lora_B, self.scaling, p,
        )
        return y.view(*lead, y.shape[-1])


class _Holder(nn.Module):
    """A one-layer model for peft.get_peft_model to wrap."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_peft(w: Weights, dropout: float) -> nn.Module:
    """PEFT's LoRA Linear around the shared base layer, A and B set to w's."""
    import warnings

    from peft import LoraConfig, get_peft_model

    r = w.rank
    config = LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=dropout, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Holder(frozen_linear(w)), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    return layer


def make_lorakern(w: Weights, dropout: float) -> nn.Module:
    """lorakern.LoraLinear(backend="auto") around the shared base layer, A and B set to w's."""
    r = w.rank
    layer = LoraLinear(frozen_linear(w), r=r, lora_alpha=w.scaling * r, lora_dropout=dropout, backend="auto")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    return layer


BUILDERS: dict[str, Callable[[Weights, float], nn.Module]] = {
    "base": lambda w, dropout: frozen_linear(w),
    "eager": EagerLora,
    "addmm": AddmmLora,
    "peft": make_peft,
    "lorakern": make_lorakern,
}


def build(name: str, w: Weights, dropout: float) -> nn.Module:
    """The provider `name` as a module in training mode over w (W and bias frozen)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return BUILDERS[name](w, dropout).train()


def available_providers(names: list[str], peft_provider: str = "peft") -> tuple[list[str], dict[str, str]]:
    """(runnable, skipped-with-reason) among `names`: `peft_provider` (a suite's PEFT row)
    needs peft to import."""
    if peft_provider not in names:
        return list(names), {}
    ok, why = peft_available()
    skipped = {} if ok else {peft_provider: why}
    return [n for n in names if n not in skipped], skipped


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """The parameters that require grad (the adapters)."""
    return [p for p in module.parameters() if p.requires_grad]
