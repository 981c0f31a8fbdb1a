"""Run an existing PEFT model's LoRA math through lorakern's fused op.

`patch_peft(peft_model)` gives every PEFT LoRA `Linear` (nn.Linear or Conv1D base) and
every PEFT QLoRA `Linear4bit` (a bitsandbytes Linear4bit base) an
instance-level `forward` that calls `lorakern.layer.lora_linear_multi` on PEFT's own
parameters — `base_layer.weight` (a transposed view for fan_in_fan_out), its bias,
`lora_A[name].weight`, `lora_B[name].weight`, `scaling[name]` and the dropout
probability — so nothing is copied: training, optimisers, `save_pretrained` and
merging all stay PEFT's. `unpatch_peft` removes the instance attribute again.

PEFT's mixed batches (`peft_model(..., adapter_names=[...])`, which PEFT hands to every
LoRA layer as `forward(x, adapter_names=[...])`) go through `lorakern.lora_linear_mixed`
on the same parameters, with PEFT's semantics: one name per row of dim 0, `"__base__"`
rows get the base layer alone, so do rows whose adapter this layer lacks, and each
adapter's dropout applies to its own rows in training mode (lorakern's seeded dropout,
as on the single-adapter path; PEFT's model-level call refuses training mode, a layer
called directly does not).

One active DoRA adapter on a dense nn.Linear / Conv1D base runs through lorakern's DoRA
(lorakern/dora.py: the fused op, the row norms from W Aᵀ, no N×K W + s·B A), on PEFT's
own lora_A / lora_B / lora_magnitude_vector.

Calls the fused op cannot reproduce exactly fall back to PEFT's own forward, per call:
adapters disabled or merged, DoRA with several active adapters or over a Linear4bit
base, other LoRA variants, lora_bias, extra forward
arguments, a base layer other than nn.Linear / Conv1D / bitsandbytes Linear4bit, a
dropout module that is not nn.Dropout, or dtypes the op does not take; for mixed
batches also a bitsandbytes Linear4bit base and `adapter_names` PEFT itself refuses (a
length other than the batch's rows, DoRA among the names used): PEFT raises its own
error then. A Linear4bit base computes as PEFT's does: x in the layer's compute dtype,
the weight dequantised (bit-identical to bitsandbytes' dequantisation), the answer in
x's dtype.

    >>> from peft import get_peft_model, LoraConfig            # doctest: +SKIP
    >>> model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> lorakern.patch_peft(model)                              # doctest: +SKIP
    >>> model(input_ids, adapter_names=["default", "__base__"])  # doctest: +SKIP
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lorakern import dora, quantized
from lorakern.layer import is_linear_like, lora_linear_multi
from lorakern.mixed import BASE, lora_linear_mixed
from lorakern.ops import SUPPORTED_DTYPES, lora_linear

_PATCHED = "_lorakern_patched"


def _peft_lora_linear_classes() -> tuple[type, ...]:
    """PEFT's LoRA Linear, and its bitsandbytes Linear4bit (defined when bitsandbytes imports)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("patch_peft needs the `peft` package (pip install peft)") from exc
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return (Linear,)
    return (Linear, Linear4bit)


def _dropout_p(module: nn.Module, name: str) -> float | None:
    """The dropout probability of adapter `name` in training mode, or None if not plain dropout."""
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Identity):
        return 0.0
    if type(drop) is nn.Dropout:
        return float(drop.p)
    return None


def _base_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the op computes the base in, or None if this base or x's dtype must go to PEFT."""
    base = module.get_base_layer()
    if x.dtype not in SUPPORTED_DTYPES:
        return None
    if quantized.is_quantized_linear(base):
        return quantized.compute_dtype(base, x)  # bitsandbytes casts x (and the bias) to it
    if not is_linear_like(base) or base.weight.dtype != x.dtype:
        return None
    if base.bias is not None and base.bias.dtype != x.dtype:
        return None
    return x.dtype


def _adapter(module: nn.Module, name: str, x_dtype: torch.dtype):
    """(A, B, scaling, p) of adapter `name` as the op takes them, or None if PEFT's forward
    must run it (DoRA or another variant, lora_bias, not nn.Linear, other dtypes or dropout)."""
    if module.use_dora.get(name, False) or getattr(module, "lora_variant", {}).get(name) is not None:
        return None
    A, B = module.lora_A[name], module.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or B.bias is not None or A.bias is not None:
        return None
    if A.weight.dtype not in (x_dtype, torch.float32) or B.weight.dtype not in (x_dtype, torch.float32):
        return None
    p = _dropout_p(module, name)
    if p is None:
        return None
    return A.weight, B.weight, float(module.scaling[name]), p if module.training else 0.0


def _fusable_adapters(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """[(A, B, scaling, p)] for the active adapters, or None if this call must go to PEFT."""
    if args or any(v is not None for v in kwargs.values()):
        return None
    if module.disable_adapters or module.merged:
        return None
    x_dtype = _base_dtype(module, x)
    if x_dtype is None:
        return None
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        adapter = _adapter(module, name, x_dtype)
        if adapter is None:
            return None
        adapters.append(adapter)
    return adapters or None


def _mixed_adapters(module: nn.Module, x: torch.Tensor, adapter_names, args: tuple, kwargs: dict):
    """(adapters [(A, B, s, p)], row_adapter [int per row, -1 = base]) for a mixed batch, or
    None if PEFT's forward must run it (and raise its own error where it refuses the call)."""
    if args or any(v is not None for v in kwargs.values()):
        return None
    if module.disable_adapters or module.merged:
        return None
    if not isinstance(adapter_names, (list, tuple)) or any(not isinstance(n, str) for n in adapter_names):
        return None
    if x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return None
    if quantized.is_quantized_linear(module.get_base_layer()):
        return None
    x_dtype = _base_dtype(module, x)
    if x_dtype is None:
        return None
    index: dict[str, int] = {}
    adapters = []
    rows = []
    for name in adapter_names:
        i = index.get(name)
        if i is None:
            if name == BASE or name not in module.lora_A:
                i = -1  # PEFT: "__base__" and adapters this layer lacks run the base alone
            else:
                adapter = _adapter(module, name, x_dtype)
                if adapter is None:
                    return None
                i = len(adapters)
                adapters.append(adapter)
            index[name] = i
        rows.append(i)
    return adapters, rows


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is not None:
        rest = {k: v for k, v in kwargs.items() if k != "adapter_names"}
        mixed = _mixed_adapters(self, x, adapter_names, args, rest)
        if mixed is None:
            return type(self).forward(self, x, *args, **kwargs)
        adapters, rows = mixed
        base = self.get_base_layer()
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        As, Bs, scalings, ps = (list(t) for t in zip(*adapters)) if adapters else ([], [], [], [])
        return lora_linear_mixed(x, weight, base.bias, As, Bs, scalings, rows, dropout_ps=ps,
                                 backend=getattr(self, _PATCHED))
    adapters = _fusable_adapters(self, x, args, kwargs)
    if adapters is None:
        y = _dora_forward(self, x, args, kwargs)
        return type(self).forward(self, x, *args, **kwargs) if y is None else y
    base = self.get_base_layer()
    backend = getattr(self, _PATCHED)
    if quantized.is_quantized_linear(base):
        dtype = quantized.compute_dtype(base, x)
        qweight = quantized.quantized_weight(base)
        return lora_linear_multi(x.to(dtype), qweight, base.bias, adapters, backend).to(x.dtype)
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    return lora_linear_multi(x, weight, base.bias, adapters, backend)


def _dora_forward(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """One active DoRA adapter on a dense nn.Linear / Conv1D base through lorakern's DoRA
    (lorakern/dora.py: the fused op, the row norms from W Aᵀ instead of PEFT's N×K W + s·B A),
    on PEFT's own parameters; None if PEFT's forward must run the call."""
    if args or any(v is not None for v in kwargs.values()) or module.disable_adapters or module.merged:
        return None
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1 or not module.use_dora.get(active[0], False):
        return None
    name = active[0]
    base = module.get_base_layer()
    if quantized.is_quantized_linear(base) or _base_dtype(module, x) is None:
        return None
    A, B = module.lora_A[name], module.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return None
    if A.weight.dtype not in (x.dtype, torch.float32) or B.weight.dtype not in (x.dtype, torch.float32):
        return None
    p = _dropout_p(module, name)
    if p is None:
        return None
    magnitude = module.lora_magnitude_vector[name].weight
    w = base.weight.t() if module.fan_in_fan_out else base.weight
    s = float(module.scaling[name])
    norm = dora.weight_norm(w, A.weight, B.weight, s, dora.cached_row_sq_norms(module, dora.weight_key(w), lambda: w))
    backend = getattr(module, _PATCHED)
    op = lambda *a, **k: lora_linear(*a, backend=backend, **k)  # noqa: E731
    return dora.dora_forward(op, x, w, base.bias, A.weight, B.weight, s, p if module.training else 0.0, magnitude, norm)


def patch_peft(peft_model: nn.Module, backend: str = "auto") -> int:
    """Route the forward (and so the backward) of every PEFT LoRA Linear in `peft_model`
    through lorakern's fused op, sharing PEFT's parameters. Returns the number of layers
    patched; ValueError if there are none. Idempotent; undo with `unpatch_peft`."""
    linear_cls = _peft_lora_linear_classes()
    count = 0
    for module in peft_model.modules():
        if isinstance(module, linear_cls):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _PATCHED, backend)
            count += 1
    if count == 0:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA Linear layers to patch")
    return count


def unpatch_peft(peft_model: nn.Module) -> int:
    """Restore PEFT's own forward on every layer `patch_peft` patched. Returns how many."""
    count = 0
    for module in peft_model.modules():
        if hasattr(module, _PATCHED):
            del module.forward
            delattr(module, _PATCHED)
            count += 1
    return count
