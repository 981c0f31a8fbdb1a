"""Quantized base layers: lorakern's QuantLinear, bitsandbytes' Linear4bit, `quantize(model)`.

`QuantLinear` is a frozen linear layer whose weight is stored in one of lorakern.quant's
bitsandbytes-compatible formats (NF4 / FP4, optional double quantisation, int8
weight-only). `quantize(model, "nf4")` swaps a model's nn.Linear layers for it in place.
`quantized_weight(module)` reads the QuantizedWeight of either kind of quantized layer
(ours, or a `bitsandbytes.nn.Linear4bit` found in a model) without copying, which is
how LoraLinear and patch_peft run a quantized base through the fused QLoRA op.

Statistics (absmax, offsets, code books) are float32 but stored as int32 views: a
`model.to(torch.bfloat16)` or `model.half()` converts floating buffers, and a rounded
absmax would silently change every weight of its block.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakern import quant
from lorakern.qops import QuantizedWeight, quantized_linear

_STATS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """A statistic as a buffer holds it: float32 as an int32 view, integers as they are."""
    return t.to(torch.float32).view(torch.int32) if t.is_floating_point() else t


class QuantLinear(nn.Module):
    """A frozen linear layer with a quantized weight: ``y = x dequant(W)ᵀ + bias``.

    Build one with `QuantLinear.from_linear(linear, "nf4")` (or `lorakern.quantize(model)`).

    Args:
        qweight: the quantized weight [out_features, in_features].
        bias: [out_features] or None (kept as a frozen parameter).
        compute_dtype: the dtype x and the dequantised weight meet in (bitsandbytes'
            `compute_dtype`); None: x's dtype.

    Buffers: ``weight`` (the packed uint8 / int8 data, bitsandbytes' layout) and the
    statistics of lorakern.quant.QuantizedWeight as int32 views.

    Example:
        >>> import torch
        >>> from lorakern.quantized import QuantLinear
        >>> layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), "nf4", double_quant=True)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.quant_type = qweight.quant_type
        self.blocksize = qweight.blocksize
        self.nested_blocksize = qweight.nested_blocksize
        self.weight_dtype = qweight.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", qweight.data)
        # float32 statistics kept as int32 views (see the module docstring); a double-
        # quantised absmax is uint8 already.
        self._float_stats = {n for n in _STATS if getattr(qweight, n) is not None and getattr(qweight, n).is_floating_point()}
        for name in _STATS:
            t = getattr(qweight, name)
            self.register_buffer(name, None if t is None else _as_stored(t))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize an nn.Linear's weight; its bias is kept (in compute_dtype when given)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"QuantLinear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        qw = quant.quantize_weight(linear.weight.detach(), quant_type, blocksize, double_quant)
        bias = linear.bias
        if bias is not None and compute_dtype is not None:
            bias = bias.to(compute_dtype)
        return cls(qw, bias, compute_dtype)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a QuantizedWeight (views of the buffers, no copy)."""
        stats = {n: getattr(self, n) for n in _STATS}
        stats.update({n: stats[n].view(torch.float32) for n in self._float_stats})
        return QuantizedWeight(
            self.weight, self.quant_type, (self.out_features, self.in_features), self.weight_dtype,
            blocksize=self.blocksize, nested_blocksize=self.nested_blocksize, **stats,
        )

    @torch.no_grad()
    def store(self, qweight: QuantizedWeight) -> None:
        """Overwrite the stored weight in place (same format and shape: merge / unmerge)."""
        if qweight.shape != (self.out_features, self.in_features) or qweight.quant_type != self.quant_type:
            raise ValueError("store() needs a weight of the layer's own shape and format")
        self.weight.copy_(qweight.data)
        for name in _STATS:
            t = getattr(qweight, name)
            if t is not None:
                getattr(self, name).copy_(_as_stored(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        dtype = self.compute_dtype or x.dtype
        return quantized_linear(x.to(dtype), self.quantized_weight(), self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant=True" if self.nested_absmax is not None else ""
        block = f", blocksize={self.blocksize}" if self.quant_type != "int8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}{block}{dq}, compute_dtype={self.compute_dtype}")


# --- bitsandbytes' layers (never imported here: only recognised once the user has) ------


def _bnb_class(name: str) -> type | None:
    mod = sys.modules.get("bitsandbytes.nn")
    return getattr(mod, name, None) if mod is not None else None


def is_bnb_linear4bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_bnb_linear8bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def is_quantized_linear(module: nn.Module) -> bool:
    """A base layer whose weight lorakern dequantises itself (QuantLinear, bnb Linear4bit)."""
    return isinstance(module, QuantLinear) or is_bnb_linear4bit(module)


def _canonical_bnb_state(module: nn.Module):
    """(packed data, QuantState) of a bnb Linear4bit in bitsandbytes' standard layout.

    On CPU, bitsandbytes repacks a Linear4bit's weight into a private layout the first
    time it runs in eval mode without grad (`packing_format_for_cpu`); that is undone here
    with bitsandbytes' own inverse, once, in place (its inverse re-derives a double-quantised
    absmax, so the numbers can move by rounding, as they did when bnb repacked).
    """
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} has no quant_state: its weight is not quantized yet "
            "(bitsandbytes quantizes when the layer is moved to a device)"
        )
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if not state.nested:  # the inverse leaves a plain absmax as the repack stored it: bf16 [K/bs, N]
            state.absmax = state.absmax.t().reshape(-1).float()
        weight.quant_state = state
    return weight.data, state


def _from_bnb(module: nn.Module) -> QuantizedWeight:
    data, state = _canonical_bnb_state(module)
    if len(state.shape) != 2:
        raise ValueError(f"bitsandbytes weight of shape {tuple(state.shape)}: lorakern expects [out, in]")
    nested = state.state2 if state.nested else None
    return QuantizedWeight(
        data.view(torch.uint8), state.quant_type, (int(state.shape[0]), int(state.shape[1])), state.dtype,
        state.absmax, state.blocksize, state.code,
        offset=state.offset if nested is not None else None,
        nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code,
        nested_blocksize=quant.NESTED_BLOCKSIZE if nested is None else nested.blocksize,
    )


def quantized_weight(module: nn.Module) -> QuantizedWeight:
    """The QuantizedWeight of a QuantLinear or bitsandbytes Linear4bit (views, no copy)."""
    if isinstance(module, QuantLinear):
        return module.quantized_weight()
    if is_bnb_linear4bit(module):
        return _from_bnb(module)
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer lorakern can read")


@torch.no_grad()
def store_quantized_weight(module: nn.Module, qweight: QuantizedWeight) -> None:
    """Write `qweight` (same shape and format) into a QuantLinear / bnb Linear4bit in place."""
    if isinstance(module, QuantLinear):
        module.store(qweight)
        return
    data, state = _canonical_bnb_state(module)
    data.view(torch.uint8).copy_(qweight.data)
    if state.nested:
        state.absmax.copy_(qweight.absmax)
        state.offset.copy_(qweight.offset)
        state.state2.absmax.copy_(qweight.nested_absmax)
    else:
        state.absmax.copy_(qweight.absmax)


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized base computes in: its compute_dtype when set, else x's."""
    return getattr(module, "compute_dtype", None) or x.dtype


def requantize_like(module: nn.Module, dense: torch.Tensor) -> QuantizedWeight:
    """`dense` [N, K] quantized in the format of `module`'s current weight."""
    qw = quantized_weight(module)
    return quant.quantize_weight(dense.to(qw.dtype), qw.quant_type, qw.blocksize or 64, qw.double_quant)


# --- quantize(model) -----------------------------------------------------------------


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    skip_modules: list[str] | None = None,
) -> nn.Module:
    """Quantize `model`'s nn.Linear layers in place (QLoRA's base); returns the model.

    Args:
        quant_type: "nf4", "fp4" or "int8" (weight-only, per output row).
        blocksize: elements per absmax block (4-bit); double_quant: 8-bit absmaxes (4-bit).
        compute_dtype: dtype of the matmul (bitsandbytes' bnb_4bit_compute_dtype); None: x's dtype.
        skip_modules: module names (or their last component) left in full precision; by
            default the output head (`get_output_embeddings()`), as transformers'
            BitsAndBytesConfig does.
    Call it before `inject` (a model that already has LoRA layers is refused).

    Example:
        >>> import torch, lorakern
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> _ = lorakern.quantize(model, "nf4", skip_modules=["2"])
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('QuantLinear', 'Linear')
    """
    from lorakern.layer import LoraLinear  # layer.py imports this module

    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("quantize() the model before inject(): it already has LoRA layers")
    if quant_type not in quant.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {quant.QUANT_TYPES}, got {quant_type!r}")
    skip = set(skip_modules or [])
    head = None
    if skip_modules is None:
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head
        and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]
    # Quantize everything first, then swap: a bad weight (inf / NaN) leaves the model unchanged.
    new = [
        (name, QuantLinear.from_linear(m, quant_type, blocksize, double_quant and quant_type != "int8", compute_dtype))
        for name, m in targets
    ]
    for name, layer in new:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model
