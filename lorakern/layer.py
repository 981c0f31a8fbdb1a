"""LoraLinear: a drop-in replacement for nn.Linear with LoRA adapters, PEFT's layout.

State-dict keys match PEFT's LoRA Linear: ``base_layer.weight``, ``base_layer.bias``,
``lora_A.<adapter>.weight`` [r, in], ``lora_B.<adapter>.weight`` [out, r] (and, with
PEFT's ``lora_bias``, ``lora_B.<adapter>.bias`` [out]: the adapter adds s·b, folded into
the bias the fused op adds).

The base layer may also be a transformers ``Conv1D`` (GPT-2 style, weight stored
[in, out]): with ``fan_in_fan_out=True`` the op gets ``weight.t()``, a view, never a copy.

Several active adapters are summed, each with its own scaling. Adapters without
dropout (all of them in eval mode) run in one fused op call with the base GEMM: their
A's are concatenated along r and their B's (each multiplied by its own scaling) along
r, with scaling 1.0:

    Σ_i s_i·B_i A_i x  =  [s_1 B_1 | s_2 B_2 | …] · [A_1; A_2; …] · x

(autograd flows through the concatenation, so every A_i and B_i gets its own gradient).
Each adapter with dropout makes one more op call on the LoRA term alone (weight=None:
no base GEMM) with its own seed, so its mask is independent of the others' (PEFT has
one nn.Dropout per adapter). No adapter ever takes a different code path than the
fused op.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakern import dora, quant, quantized
from lorakern.mixed import RowGroups, layer_forward as mixed_batch_forward
from lorakern.op_core import check_dropout_value, check_scaling_value, draw_seed, implementation, rows, unrows
from lorakern.ops import BACKENDS, ScalarDict, apply_function, lora_linear, plain_tensors, resolve_backend, scalar_device
from lorakern.qops import QuantizedWeight, lora_linear_quantized, quantized_linear


# PEFT's words, so users find the warning they know.
UNMERGE_TO_SET_ADAPTER = "Adapter cannot be set when the model is merged. Unmerging the model first."


def init_is_gaussian(init_lora_weights) -> bool:
    """Whether init_lora_weights asks for "gaussian"; ValueError unless it is True, False or that."""
    gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
    if not (isinstance(init_lora_weights, bool) or gaussian):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    return gaussian


def _check_adapter_args(r: int, lora_alpha: float, lora_dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")


def conv1d_class() -> type | None:
    """transformers' Conv1D class if transformers is already imported, else None.

    A model can only hold Conv1D modules once transformers has been imported, so this
    never imports it (no import-time cost, no hard dependency).
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers LoraLinear can wrap: nn.Linear, transformers Conv1D, and quantized
    linears (lorakern's QuantLinear, bitsandbytes' Linear4bit — an nn.Linear subclass)."""
    conv1d = conv1d_class()
    return (
        isinstance(module, nn.Linear)
        or (conv1d is not None and isinstance(module, conv1d))
        or quantized.is_quantized_linear(module)
    )


# PEFT's warning for the same operation on its bnb layers, in our words.
LOSSY_QUANT_MERGE = (
    "Merging an adapter into (or out of) a quantized base layer dequantises, adds and quantizes "
    "again: the result is rounded to the quantized grid, so outputs can differ slightly from the "
    "unmerged model's."
)


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype new adapters get, as in PEFT (autocast_adapter_dtype=True): float64 on a
    float64 base, else float32 (fp32 masters for fp16 / bf16 / quantized bases)."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def _scaled(B: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """s·B in B's dtype and device; s a Python number or a one-element tensor (a ScalarDict mirror)."""
    if isinstance(s, torch.Tensor):
        return B * s.to(device=B.device, dtype=B.dtype)
    return B * s


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[torch.Tensor, torch.Tensor, float, float]],
    backend: str = "auto",
) -> torch.Tensor:
    """``x Wᵀ + bias + Σ_i s_i·(D_i(x) A_iᵀ) B_iᵀ`` with as few fused op calls as possible.

    Args:
        x: [..., K]; weight: [N, K] (any strides, e.g. a Conv1D weight's ``.t()``), or a
            lorakern.quant.QuantizedWeight of shape (N, K) (QLoRA); bias: [N] | None.
        adapters: non-empty list of (lora_A [r_i, K], lora_B [N, r_i], scaling s_i, dropout p_i).
            p_i is the Python number 0 for "no dropout" (eval mode too), else a positive
            Python float or a one-element CPU tensor; s_i a Python number or a
            one-element CPU tensor (see ops.ScalarDict).
        backend: op backend.
    Returns:
        [..., N] in x's dtype.

    The adapters without dropout are fused into one call with the base GEMM (A's
    concatenated along r, s_i folded into B_i, scaling 1.0). Each adapter with dropout
    gets a call of its own on the LoRA term alone (no base GEMM) and its own seed, so
    its mask is independent of the others', as with PEFT's one nn.Dropout per adapter.
    Grouping looks only at whether p is zero, never at its value: under torch.compile
    a tensor p can change without recompiling.
    """
    # The first call carries the base GEMM: a quantized weight takes the QLoRA op.
    first_op = lora_linear_quantized if isinstance(weight, QuantizedWeight) else lora_linear
    if len(adapters) == 1:  # s and p may be one-element CPU tensors here: no host read
        A, B, s, p = adapters[0]
        return first_op(x, weight, bias, A, B, s, dropout_p=p, backend=backend)
    plain = [(A, B, s) for A, B, s, p in adapters if _no_dropout(p)]
    dropped = [(A, B, s, p) for A, B, s, p in adapters if not _no_dropout(p)]
    calls = []
    if plain:
        if len(plain) == 1:
            calls.append((*plain[0], 0.0))
        else:
            dtype = plain[0][0].dtype
            if any(A.dtype != dtype or B.dtype != dtype for A, B, _ in plain):
                dtype = torch.float32
            A = torch.cat([A.to(dtype) for A, _, _ in plain], dim=0)
            B = torch.cat([_scaled(B.to(dtype), s) for _, B, s in plain], dim=1)
            calls.append((A, B, 1.0, 0.0))
    calls.extend(dropped)
    (A, B, s, p), rest = calls[0], calls[1:]
    y = first_op(x, weight, bias, A, B, s, dropout_p=p, backend=backend)
    for A, B, s, p in rest:
        y = y + lora_linear(x, None, None, A, B, s, dropout_p=p, backend=backend)
    return y


def _no_dropout(p) -> bool:
    """True for the plain number 0 (a tensor p always counts as dropout: not read here)."""
    return not isinstance(p, torch.Tensor) and p == 0.0


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An adapter weight as the op takes it: in the compute dtype, or an fp32 master."""
    return t if t.dtype in (dtype, torch.float32) else t.to(dtype)


class AdapterLayerMixin:
    """Adapter bookkeeping every LoRA layer does the same way (LoraLinear, LoraEmbedding,
    LoraConv, LoraParameter). A layer provides `held_adapters()`, `adapter_parameters(name)`,
    `merge`, `unmerge`, the per-adapter dicts named in ADAPTER_SETTINGS, and
    `_adapter_stores()`: the ModuleDicts / ParameterDicts holding its adapters' weights."""

    ADAPTER_SETTINGS = ("r", "lora_alpha", "lora_dropout", "scaling", "use_rslora", "use_dora", "lora_bias")

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    # The ScalarDicts' (scaling, lora_dropout) device mirrors follow the base weight: placed
    # at construction, by .to() / .cuda() (_apply) and after deepcopy / unpickling, which
    # rebuild the dicts without them. Layers whose scalings are plain floats skip this.
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._place_scalars()
        return out

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._place_scalars()

    def _place_scalars(self) -> None:
        weight = getattr(getattr(self, "base_layer", None), "weight", None)
        if not isinstance(weight, torch.Tensor):
            return
        for d in (getattr(self, "scaling", None), getattr(self, "lora_dropout", None)):
            if isinstance(d, ScalarDict):
                d.place(weight.device)

    def _record_settings(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                         use_dora: bool = False, lora_bias: bool = False) -> None:
        """The per-adapter settings of a new adapter, its scaling (alpha / r, or / sqrt(r) with
        rsLoRA), and the adapter made the active one."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.active_adapters = [adapter_name]

    def _mixed_groups(self, adapter_names):
        """A mixed batch's (row groups, strict), from `adapter_names` (strict: every name must
        be an adapter of this layer) or from a `mixed_batch` context; None for a plain call."""
        if adapter_names is not None:
            return (adapter_names if isinstance(adapter_names, RowGroups) else RowGroups(adapter_names)), True
        groups = self.__dict__.get("_mixed_adapter_names")  # set by lorakern.mixed_batch
        return None if groups is None else (groups, False)

    def _check_new_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float) -> None:
        """update_layer's first checks: a merged adapter cannot be replaced (unmerge() would then
        subtract the new weights' delta, not the merged one), and r / alpha / dropout are valid."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before replacing it")
        _check_adapter_args(r, lora_alpha, lora_dropout)

    def _running_adapters(self) -> list[str]:
        """The adapters a plain forward adds: none with adapters disabled (a merged layer is
        unmerged first, as PEFT does, so disabling gives the base) or merged into the base;
        else the active adapters this layer holds."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        if self.merged_adapters:
            return []
        held = self.held_adapters()
        return [a for a in self.active_adapters if a in held]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make `adapter_names` the active adapters (those this layer lacks are skipped in forward).

        As in PEFT, the active adapters' parameters become trainable and the others frozen.
        A merged layer is unmerged first, with PEFT's warning: merged, it runs the base weight
        alone, which holds the adapters merged before, not the ones set now.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.merged:
            warnings.warn(UNMERGE_TO_SET_ADAPTER, stacklevel=2)
            self.unmerge()
        for name in self.held_adapters():
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` (if it is merged: unmerge, then merge the others back)."""
        if adapter_name not in self.held_adapters():
            raise ValueError(f"no adapter named {adapter_name!r}; have {self.held_adapters()}")
        remerge = [a for a in self.merged_adapters if a != adapter_name]
        if adapter_name in self.merged_adapters:
            self.unmerge()
            self.merge(remerge)
        for store in self._adapter_stores():
            if adapter_name in store:
                del store[adapter_name]
        for attr in self.ADAPTER_SETTINGS:
            getattr(self, attr).pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]


class SummedMergeMixin:
    """merge / unmerge for a layer whose merged weight is W + Σ s·ΔW summed in fp32 (fp64 for
    an fp64 W) and cast once, and whose lora_bias adapters add s·b to the base bias
    (LoraEmbedding, LoraConv). The layer provides `get_delta_weight(name)` in its base
    weight's layout, `base_layer.weight` (and `.bias`), `lora_bias` and `lora_B[name].bias`."""

    def _bias_delta(self, adapter_names: list[str]) -> torch.Tensor | None:
        """Σ s·b over the lora_bias adapters among `adapter_names` (fp32), or None."""
        total = None
        for name in adapter_names:
            if self.lora_bias.get(name, False):
                b = self.lora_B[name].bias.detach()
                term = b.to(torch.promote_types(b.dtype, torch.float32)) * self.scaling[name]
                total = term if total is None else total + term
        return total

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight plus the deltas of `adapter_names` (get_delta_weight, in the base
        weight's layout), summed in fp32 (fp64 for an fp64 weight) and cast once. Does not
        change the layer."""
        for name in adapter_names:
            if name not in self.held_adapters():
                raise ValueError(f"no adapter named {name!r}; have {self.held_adapters()}")
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        total = w.to(acc)
        for name in adapter_names:
            total = total + self.get_delta_weight(name).to(acc)
        return total.to(w.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W += Σ s·ΔW (and bias += Σ s·b with lora_bias) for each adapter (default: the active
        ones), in fp32, cast once. safe_merge: ValueError (layer unchanged) if the result is
        not finite. lora_bias with no base bias: RuntimeError (PEFT's), layer unchanged."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return
        new_bias = None
        extra = self._bias_delta(names)
        if extra is not None:
            bias = self.base_layer.bias
            if bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            new_bias = (bias.to(extra.dtype) + extra).to(bias.dtype)
        new_w = self.merged_weight(names)
        if safe_merge and not (torch.isfinite(new_w).all() and (new_bias is None or torch.isfinite(new_bias).all())):
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights; nothing was merged")
        self.base_layer.weight.copy_(new_w)
        if new_bias is not None:
            self.base_layer.bias.copy_(new_bias)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W -= Σ s·ΔW (bias -= Σ s·b) over every merged adapter, fp32, cast once."""
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        total = w.to(acc)
        for name in self.merged_adapters:
            total = total - self.get_delta_weight(name).to(acc)
        w.copy_(total.to(w.dtype))
        extra = self._bias_delta(self.merged_adapters)
        if extra is not None:
            bias = self.base_layer.bias
            bias.copy_((bias.to(extra.dtype) - extra).to(bias.dtype))
        self.merged_adapters = []


class LoraLinear(AdapterLayerMixin, nn.Module):
    """nn.Linear plus low-rank adapters: ``y = base_layer(x) + Σ s·B(A(dropout(x)))``.

    Args:
        base_layer: the nn.Linear to wrap (frozen here; its parameters are reused, not copied),
            or a transformers Conv1D (weight [in, out]) with fan_in_fan_out=True.
        r: adapter rank (>= 1).
        lora_alpha: scale numerator; scaling = lora_alpha / r (/ sqrt(r) with use_rslora).
        lora_dropout: dropout probability on the adapter input, applied in training mode only.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r),
            B zero) or False (both random: for tests only, output differs from the base).
        adapter_name: name of the first adapter.
        backend: op backend, "auto" | "triton" | "reference".
        fan_in_fan_out: the base weight is stored [in, out] (transformers Conv1D). As in
            PEFT, it is switched on (with a warning) for a Conv1D and off for an nn.Linear.
        use_dora: DoRA (lorakern/dora.py).
        lora_bias: PEFT's lora_bias: lora_B has a bias b [out] and the adapter adds s·b
            (b zero-initialised, random with init_lora_weights=False). Merging it needs a
            base bias (RuntimeError otherwise, as PEFT). Not with use_dora (as PEFT).

    Shapes: x [..., in_features] -> [..., out_features].

    Example:
        >>> import torch, lorakern
        >>> layer = lorakern.LoraLinear(torch.nn.Linear(16, 32), r=4, lora_alpha=8)
        >>> layer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        backend: str = "auto",
        fan_in_fan_out: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        conv1d = conv1d_class()
        # A quantized base (QuantLinear, bnb Linear4bit): its weight is dequantised inside the op.
        self.quantized = quantized.is_quantized_linear(base_layer)
        # bitsandbytes Linear8bitLt (LLM.int8 quantizes x too): its own forward computes the
        # base, the fused op the LoRA term alone (weight=None), as PEFT adds them.
        self.base_forward = quantized.is_bnb_linear8bit(base_layer)
        if self.quantized or self.base_forward:
            if fan_in_fan_out:
                warnings.warn("a quantized base layer stores [out, in]: setting fan_in_fan_out=False", stacklevel=2)
            fan_in_fan_out = False
            if self.quantized:
                quantized.quantized_weight(base_layer)  # raises now if bnb has not quantized it yet
        elif conv1d is not None and isinstance(base_layer, conv1d):
            if not fan_in_fan_out:
                warnings.warn("base_layer is a Conv1D (weight [in, out]): setting fan_in_fan_out=True", stacklevel=2)
            fan_in_fan_out = True
        elif isinstance(base_layer, nn.Linear):
            if type(base_layer).forward is not nn.Linear.forward:
                # The fused op computes the base GEMM itself and never calls base_layer.forward:
                # a subclass's own forward (quantized, instrumented, ...) would be skipped silently.
                raise TypeError(
                    f"base_layer is a {type(base_layer).__name__}, an nn.Linear subclass with its own forward; "
                    "LoraLinear computes x Wᵀ + bias itself and would skip that forward"
                )
            if fan_in_fan_out:
                warnings.warn("base_layer is nn.Linear (weight [out, in]): setting fan_in_fan_out=False", stacklevel=2)
            fan_in_fan_out = False
        else:
            raise TypeError(f"base_layer must be nn.Linear (or transformers Conv1D), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        w = base_layer.weight
        if self.quantized:
            self.out_features, self.in_features = quantized.quantized_weight(base_layer).shape
        elif self.base_forward:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        # Dicts of floats that also keep [1] tensor mirrors, on the CPU and on the layer's
        # accelerator (see _adapter_args and _apply).
        self.lora_dropout: dict[str, float] = ScalarDict(check=check_dropout_value)
        self.scaling: dict[str, float] = ScalarDict(check=check_scaling_value)
        self._place_scalars()
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}  # PEFT's lora_bias: lora_B[name] has a bias
        # DoRA (lorakern/dora.py): PEFT's names, a magnitude vector per DoRA adapter.
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_merged_norm: dict[str, torch.Tensor] = {}  # ‖W + ΔW‖ at merge time, for unmerge
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.backend = backend
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight [out, in] as a dense tensor: `base_weight()`, or a quantized base
        dequantised (in `dtype`, default the dtype it was quantised from)."""
        if not self.quantized:
            return self.base_weight()
        return quant.dequantize_weight(quantized.quantized_weight(self.base_layer), dtype)

    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in]: a transposed view for Conv1D, never a copy."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

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
        """Add (or replace) adapter `adapter_name` and make it the active one.

        use_dora: DoRA (lorakern/dora.py), its magnitude initialised to the row norms of
        W + s·B A, as PEFT does.
        lora_bias: lora_B gets a bias (PEFT's lora_bias; fp32 like B, zero unless
        init_lora_weights=False). Refused with use_dora, as PEFT; warned (as PEFT) when
        the base layer has no bias: such an adapter cannot be merged.

        A merged adapter cannot be replaced (ValueError, layer unchanged): unmerge() would
        then subtract the new weights' delta instead of the merged one, and the base drift.
        """
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        if not isinstance(lora_bias, bool):
            raise TypeError(f"lora_bias must be a bool, got {lora_bias!r}")
        if lora_bias and use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as in PEFT)")
        if use_dora and self.base_forward:
            raise NotImplementedError("DoRA over a bitsandbytes 8-bit base layer is not implemented yet")
        # Checked before anything is registered, so a bad value leaves the layer unchanged.
        gaussian = init_is_gaussian(init_lora_weights)
        if lora_bias and gaussian:
            raise ValueError("lora_bias=True needs init_lora_weights True or False (as in PEFT), got 'gaussian'")
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(
                f"lora_bias=True but the base layer ({type(self.base_layer).__name__}) has no bias: "
                "this adapter cannot be merged",
                UserWarning, stacklevel=2,
            )
        w = self.base_layer.weight
        dtype = adapter_dtype(w)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, device=w.device, dtype=dtype)
        self._record_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                norm = dora.weight_norm(self.dense_weight(), self.lora_A[adapter_name].weight,
                                        self.lora_B[adapter_name].weight, self.scaling[adapter_name])
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(norm.to(dtype))
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.active_adapters = [adapter_name]

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if init_lora_weights is False:  # lora_B's bias (lora_bias) keeps nn.Linear's random init, as PEFT
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(B)
        if self.lora_B[adapter_name].bias is not None:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _adapter_stores(self) -> tuple[nn.ModuleDict, ...]:
        return self.lora_A, self.lora_B, self.lora_magnitude_vector

    # The protocol every LoRA layer speaks (LoraEmbedding and LoraConv2d too), for code that
    # walks them all (lorakern.model, lorakern.adapters).

    def held_adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_A)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter of adapter `adapter_name`: A, B (and B's bias with lora_bias, the
        magnitude with DoRA)."""
        params = [self.lora_A[adapter_name].weight, *self.lora_B[adapter_name].parameters()]
        if adapter_name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[adapter_name].weight)
        return params

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of adapter `adapter_name`."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features].

        adapter_names: a mixed batch (lorakern/mixed.py): one adapter name per row of x
        (dim 0), "__base__" for none; each must be an adapter of this layer. Inside
        `lorakern.mixed_batch(model, names)` the names come from the context instead.
        """
        if adapter_names is None:
            y = self._single_adapter_forward(x)
            if y is not None:
                return y
        mixed = self._mixed_groups(adapter_names)
        if mixed is not None:
            return mixed_batch_forward(self, x, *mixed)
        active = self._running_adapters()
        if not active:
            return self._base_forward(x)
        if any(self.use_dora.get(a, False) for a in active):
            return self._dora_forward(x, active)
        if self.quantized:
            return self._quantized_forward(x, active)
        if self.base_forward:
            return self._base_forward_plus_lora(x, active)
        w = self.base_layer.weight
        if self.fan_in_fan_out:
            w = w.t()
        # nn.Linear would raise on x / weight dtypes that differ outside autocast: compute
        # in the base weight's dtype (adapters in it or fp32) and answer in x's dtype.
        # (Floating x only: an integer x goes to the op as is, which raises TypeError.)
        autocast = torch.is_autocast_enabled(x.device.type)
        mixed = x.is_floating_point() and x.dtype != w.dtype and not autocast
        adapters = self._adapter_args(active, None if autocast else w.dtype, scalar_device(self.backend, x.device, w.dtype))
        bias = self._bias_arg(active, w.dtype)
        if mixed:
            return lora_linear_multi(x.to(w.dtype), w, bias, adapters, self.backend).to(x.dtype)
        return lora_linear_multi(x, w, bias, adapters, self.backend)

    def _single_adapter_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One plain adapter on a dense base, in eager mode: the op's own eager route called
        directly — `LoraLinearFunction` (through `apply_function`) when something needs a
        gradient, else the backend's forward without autograd — without `lora_linear`'s
        per-call argument handling, which this layer's construction guarantees (shapes,
        devices, scalars). The same numbers and the same dropout seed draw as `lora_linear`.
        The layer's state is read on every call (nothing is cached), through its module and
        parameter dicts: at decode the host time is the call, and each `nn.Module.__getattr__`
        or helper call is a measurable part of it (benchmarks/NOTES.md). None when the general path must run: a mixed batch, adapters
        disabled or merged, not exactly one active adapter held, DoRA, lora_bias, a quantized
        or 8-bit base, a parametrized weight, autocast, torch.compile tracing, a tensor
        subclass, or x not in the weight's dtype / device / width."""
        active = self.active_adapters
        if (len(active) != 1 or self.disable_adapters or self.merged_adapters or self.quantized or self.base_forward
                or self._mixed_groups(None) is not None):
            return None
        name = active[0]
        modules = self._modules
        lora_A, lora_B = modules["lora_A"]._modules.get(name), modules["lora_B"]._modules.get(name)
        if lora_A is None or lora_B is None or self.use_dora.get(name, False) or self.lora_bias.get(name, False):
            return None
        base = modules["base_layer"]._parameters
        A, B, w, bias = lora_A._parameters.get("weight"), lora_B._parameters.get("weight"), base.get("weight"), base.get("bias")
        if A is None or B is None or w is None or not plain_tensors(A, B, w, bias):
            return None  # a parametrized weight (its module computes it) or a tensor subclass (DTensor)
        if self.fan_in_fan_out:
            w = w.t()
        device = x.device
        if (type(x) is not torch.Tensor or x.dtype != w.dtype or x.dim() < 1 or x.shape[-1] != self.in_features
                or torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled() or device != w.device):
            # (any autocast at all takes the general path: one flag read, where asking for x's
            # device type costs ~30 µs with cold caches)
            return None
        backend = resolve_backend(self.backend, device, x.dtype)
        A, B = _in_dtype(A, w.dtype), _in_dtype(B, w.dtype)
        s, p = self.scaling[name], (self.lora_dropout[name] if self.training else 0.0)
        seed = draw_seed() if p > 0.0 else 0  # what lora_linear draws
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or w.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return apply_function(x, w, bias, A, B, s, p, seed, backend)
        y = implementation(backend).lora_linear_forward(rows(x), w, bias, A, B, s, p, seed, need_S=False)[0]
        return unrows(y, x)

    def _lora_bias_sum(self, active: list[str]) -> torch.Tensor | None:
        """Σ s_i·b_i over the active adapters with lora_bias, in fp32 (fp64 adapters: fp64),
        as torch ops: autograd gives each b_i its gradient s_i·Σ_rows dY. None if there is none."""
        as_tensor = torch.compiler.is_compiling()
        total = None
        for name in active:
            if not self.lora_bias.get(name, False):
                continue
            b = self.lora_B[name].bias
            b = b.to(torch.promote_types(b.dtype, torch.float32))
            term = _scaled(b, self.scaling.tensor(name, b.device) if as_tensor else self.scaling[name])
            total = term if total is None else total + term
        return total

    def _bias_arg(self, active: list[str], dtype: torch.dtype) -> torch.Tensor | None:
        """The bias for the fused op: the base bias plus Σ s_i·b_i of the active lora_bias
        adapters, summed in fp32 and cast once to the base bias's dtype (`dtype`, the compute
        dtype, when the base has none). The base bias itself when no adapter has lora_bias."""
        bias = self.base_layer.bias
        extra = self._lora_bias_sum(active)
        if extra is None:
            return bias
        if bias is None:
            return extra.to(dtype)
        return (bias.to(extra.dtype) + extra).to(bias.dtype)

    def _adapter_args(self, active: list[str], dtype: torch.dtype | None, device: torch.device | None = None) -> list:
        """(A, B, s, p) per active adapter as lora_linear_multi takes them; A and B in
        `dtype` or fp32 (None: as stored, autocast casts them).

        Traced, scaling and dropout go to the op as the ScalarDicts' [1] tensor mirrors:
        torch.compile does not recompile when they change (with several adapters only a
        dropout turning 0 or positive does, see _dropout_arg). `device` (ops.scalar_device:
        x's device on the traced Triton route) takes scaling from the mirror there for the
        adapters without dropout, and makes a dropout turning 0 or positive recompile for one
        adapter too: such a call then has no host op, and CUDA graphs can capture it. Eager,
        they go as Python floats (a tensor would only be read back on the host)."""
        as_tensor = torch.compiler.is_compiling()
        single = len(active) == 1 and device is None
        args = []
        for name in active:
            p = self._dropout_arg(name, as_tensor, single)
            args.append((
                self.lora_A[name].weight if dtype is None else _in_dtype(self.lora_A[name].weight, dtype),
                self.lora_B[name].weight if dtype is None else _in_dtype(self.lora_B[name].weight, dtype),
                self.scaling.tensor(name, device if _no_dropout(p) else None) if as_tensor else self.scaling[name],
                p,
            ))
        return args

    def _dora_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """Active adapters with DoRA (lorakern/dora.py), in the base's compute dtype (the
        autocast dtype under autocast); the answer in x's dtype (the autocast dtype under
        autocast).

        One adapter on a dense base: the fused form. Otherwise (several adapters, or a
        quantized base: QDoRA) PEFT's order, adapter after adapter on a running result y
        (starting at the base's x Wᵀ + bias): a plain adapter adds its LoRA term, a DoRA
        adapter adds (g − 1)·(y − bias) + g·s·(D(x) Aᵀ) Bᵀ (with dropout in training,
        (g − 1)·D(x) Wᵀ instead of (g − 1)·(y − bias)), g = m / ‖W + s·B A‖. A quantized W
        is never made dense here: the base GEMM and W Aᵀ (for the norm) read it quantized.
        """
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.quantized:
            qw = quantized.quantized_weight(self.base_layer)
            dtype = quantized.compute_dtype(self.base_layer, x) if x.is_floating_point() else x.dtype
            w = None
            base_gemm = lambda t, b: quantized_linear(t, qw, b, self.backend)  # noqa: E731
        else:
            w = self.base_weight()
            dtype = w.dtype
            base_gemm = lambda t, b: F.linear(t, w.to(t.dtype), b)  # noqa: E731
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
        out_dtype = dtype if autocast else x.dtype
        x = x.to(dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(dtype)
        op = lambda *args, **kwargs: lora_linear(*args, backend=self.backend, **kwargs)  # noqa: E731
        if len(active) == 1 and not self.quantized:
            w = w.to(dtype)
            A, B, s, p, m, norm = self._dora_args(active[0], w, dtype)
            return dora.dora_forward(op, x, w, bias, A, B, s, p, m, norm).to(out_dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = base_gemm(x, bias)
            for name in active:
                if not self.use_dora.get(name, False):
                    A, B = _in_dtype(self.lora_A[name].weight, dtype), _in_dtype(self.lora_B[name].weight, dtype)
                    p = self.lora_dropout[name] if self.training else 0.0
                    y = y + op(x, None, None, A, B, self.scaling[name], dropout_p=p)
                    continue
                A, B, s, p, m, norm = self._dora_args(name, w, dtype)
                x_d = F.dropout(x, p, training=True) if p > 0.0 else x
                g = m / norm.to(m.dtype)
                base = base_gemm(x_d, None) if p > 0.0 else (y if bias is None else y - bias)
                # in fp32 from here on (g is), as PEFT's running result; cast once at the end
                y = y + (g - 1.0) * base + g * op(x_d, None, None, A, B, s)
        return y.to(out_dtype)

    def _dora_args(self, name: str, w: torch.Tensor | None, dtype: torch.dtype) -> tuple:
        """(A, B, s, p, magnitude, ‖W + s·B A‖) of DoRA adapter `name` in `dtype`; w: the dense
        base weight in `dtype`, None for a quantized base (its W Aᵀ through the quantized GEMM)."""
        A, B = _in_dtype(self.lora_A[name].weight, dtype), _in_dtype(self.lora_B[name].weight, dtype)
        s = self.scaling[name]
        if w is None:
            qw = quantized.quantized_weight(self.base_layer)
            wa = quantized_linear(A.to(dtype), qw, None, self.backend).t()  # W Aᵀ [N, r]
            key = ("quantized", dora.weight_key(qw.data), dora.weight_key(qw.absmax), dtype)
            w_sq = dora.cached_row_sq_norms(self, key, lambda: quant.dequantize_weight(qw, dtype))
            norm = dora.weight_norm(None, A, B, s, w_sq, wa)
        else:
            norm = dora.weight_norm(w, A, B, s, dora.cached_row_sq_norms(self, dora.weight_key(w), lambda: w))
        p = self.lora_dropout[name] if self.training else 0.0
        return A, B, s, p, self.lora_magnitude_vector[name].weight, norm

    def _base_forward_plus_lora(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """base_layer(x) + the LoRA term (the op with weight=None), as PEFT's bnb 8-bit layer:
        the LoRA term in the adapters' dtype (x cast to it outside autocast), added in the
        base output's dtype."""
        y = self.base_layer(x)
        if torch.is_autocast_enabled(x.device.type):
            lora = lora_linear_multi(x, None, None, self._adapter_args(active, None), self.backend)
        else:
            dtype = self.lora_A[active[0]].weight.dtype
            lora = lora_linear_multi(x.to(dtype), None, None, self._adapter_args(active, dtype), self.backend)
        extra = self._lora_bias_sum(active)
        if extra is not None:
            lora = lora + extra.to(lora.dtype)
        return y + lora.to(y.dtype)

    def _quantized_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """QLoRA: x (cast to the base's compute dtype, as bitsandbytes does) through the op
        with the quantized weight; the answer in x's dtype."""
        qw = quantized.quantized_weight(self.base_layer)
        if torch.is_autocast_enabled(x.device.type):  # the op casts, and answers in the autocast dtype
            bias = self._bias_arg(active, torch.get_autocast_dtype(x.device.type))
            return lora_linear_multi(x, qw, bias, self._adapter_args(active, None), self.backend)
        dtype = quantized.compute_dtype(self.base_layer, x) if x.is_floating_point() else x.dtype
        adapters = self._adapter_args(active, dtype)
        bias = self._bias_arg(active, dtype)
        return lora_linear_multi(x.to(dtype), qw, bias, adapters, self.backend).to(x.dtype)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone. A quantized one runs through lorakern's dequantisation, not
        its own forward (bitsandbytes' CPU forward repacks the weight in eval mode)."""
        if not self.quantized:
            return self.base_layer(x)
        dtype = quantized.compute_dtype(self.base_layer, x) if x.is_floating_point() else x.dtype
        qw = quantized.quantized_weight(self.base_layer)
        return quantized_linear(x.to(dtype), qw, self.base_layer.bias, self.backend).to(x.dtype)

    def _dropout_arg(self, name: str, as_tensor: bool, single: bool):
        """Adapter `name`'s dropout as lora_linear_multi takes it: 0.0 when off (eval, or
        p == 0), else the float, or under torch.compile the [1] CPU tensor mirror. With
        several adapters only p's zero-ness is read on the host (`is_positive`), so
        dynamo guards on that, not on the value."""
        dropout = self.lora_dropout
        if not self.training:
            return 0.0
        if as_tensor and single:
            return dropout.tensor(name)
        if as_tensor:
            return dropout.tensor(name) if dropout.is_positive(name) else 0.0
        return dropout[name]

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·B A [out, in] in fp32 (also for a Conv1D base, whose weight is [in, out])."""
        A = self.lora_A[adapter_name].weight.float()
        B = self.lora_B[adapter_name].weight.float()
        return (B @ A) * self.scaling[adapter_name]

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight (its own layout and dtype) plus the deltas of `adapter_names`,
        summed in fp32 and cast once. Does not change the layer. For a quantized base: the
        dense [out, in] weight in the dtype it was quantized from."""
        if self.base_forward:
            raise NotImplementedError("merging into a bitsandbytes Linear8bitLt is not implemented")
        for name in adapter_names:
            if name not in self.lora_A:
                raise ValueError(f"no adapter named {name!r}; have {list(self.lora_A)}")
        delta = sum(self.get_delta_weight(name) for name in adapter_names)
        if any(self.use_dora.get(n, False) for n in adapter_names):
            return self._dora_merged_weight(adapter_names, delta)[0]
        if self.quantized:
            qw = quantized.quantized_weight(self.base_layer)
            return (quantized.quant.dequantize_weight(qw, torch.float32) + delta).to(qw.dtype)
        w = self.base_layer.weight
        if self.fan_in_fan_out:
            delta = delta.t()
        return (w.float() + delta).to(w.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W += Σ s·B A for each adapter (default: the active ones), summed in fp32, cast once.

        safe_merge: check the merged weight is finite first; raise ValueError (layer
        unchanged) if it is not. A quantized base is dequantised, added to and quantized
        again in its own format (lossy: warned, as PEFT does).

        lora_bias adapters also add s·b to the base bias (summed in fp32, cast once); with
        no base bias that is impossible: RuntimeError (PEFT's), layer unchanged.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return
        new_bias = None
        extra = self._lora_bias_sum(names)
        if extra is not None:
            bias = self.base_layer.bias
            if bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            new_bias = (bias.to(extra.dtype) + extra).to(bias.dtype)
            if safe_merge and not torch.isfinite(new_bias).all():
                raise ValueError(f"merging adapter(s) {names} gives a non-finite bias; nothing was merged")
        dora_norm = None
        if any(self.use_dora.get(n, False) for n in names):
            new_w, dora_norm = self._dora_merged_weight(names, sum(self.get_delta_weight(n) for n in names))
        else:
            new_w = self.merged_weight(names)
        if safe_merge and not torch.isfinite(new_w).all():
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights; nothing was merged")
        self._store_weight(new_w)
        if new_bias is not None:
            self.base_layer.bias.copy_(new_bias)
        if dora_norm is not None:
            self._dora_merged_norm[names[0]] = dora_norm
        self.merged_adapters.extend(names)

    def _dora_merged_weight(self, names: list[str], delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m/‖W + ΔW‖ · (W + ΔW) in the base's layout and dtype, ‖W + ΔW‖) for one DoRA adapter."""
        if len(names) != 1 or self.merged_adapters:
            raise NotImplementedError("a DoRA adapter merges alone, into an unmerged layer")
        if self.quantized:
            raise NotImplementedError("merging a DoRA adapter into a quantized base is not implemented")
        name = names[0]
        w = self.base_weight()
        norm = dora.weight_norm(w, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        factor = dora.merge_factor(self.lora_magnitude_vector[name].weight, norm)
        new_w = factor * (w.to(factor.dtype) + delta.to(factor.dtype))
        if self.fan_in_fan_out:
            new_w = new_w.t()
        return new_w.to(w.dtype), norm

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W -= Σ s·B A over every merged adapter, in fp32, cast once (and
        bias -= Σ s·b over the merged lora_bias adapters)."""
        if not self.merged_adapters:
            return
        extra = self._lora_bias_sum(self.merged_adapters)
        if extra is not None:
            bias = self.base_layer.bias
            bias.copy_((bias.to(extra.dtype) - extra).to(bias.dtype))
        delta = sum(self.get_delta_weight(name) for name in self.merged_adapters)
        dora_names = [n for n in self.merged_adapters if n in self._dora_merged_norm]
        if dora_names:  # merged alone: W = W' / factor − ΔW
            name = dora_names[0]
            factor = dora.merge_factor(self.lora_magnitude_vector[name].weight, self._dora_merged_norm.pop(name))
            w = self.base_weight()
            old = w.to(factor.dtype) / factor - delta.to(factor.dtype)
            self.base_layer.weight.copy_((old.t() if self.fan_in_fan_out else old).to(w.dtype))
        elif self.quantized:
            qw = quantized.quantized_weight(self.base_layer)
            self._store_weight((quantized.quant.dequantize_weight(qw, torch.float32) - delta).to(qw.dtype))
        else:
            w = self.base_layer.weight
            if self.fan_in_fan_out:
                delta = delta.t()
            w.copy_((w.float() - delta).to(w.dtype))
        self.merged_adapters = []

    def _store_weight(self, new_w: torch.Tensor) -> None:
        """Write a merged base weight: copied in place, or quantized again for a quantized base."""
        if self.base_forward:
            raise NotImplementedError("merging into a bitsandbytes Linear8bitLt is not implemented")
        if not self.quantized:
            self.base_layer.weight.copy_(new_w)
            return
        warnings.warn(LOSSY_QUANT_MERGE, UserWarning, stacklevel=3)
        if not torch.isfinite(new_w).all():
            raise ValueError("the merged weight has inf or NaN entries; a quantized base cannot hold them")
        quantized.store_quantized_weight(self.base_layer, quantized.requantize_like(self.base_layer, new_w))

    def extra_repr(self) -> str:
        parts = [
            f"{name}: r={self.r[name]}, lora_alpha={self.lora_alpha[name]}, lora_dropout={self.lora_dropout[name]}"
            + (", use_dora=True" if self.use_dora.get(name) else "")
            for name in self.lora_A
        ]
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{fifo}, " + "; ".join(parts)
