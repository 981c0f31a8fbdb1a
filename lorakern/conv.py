"""LoraConv: LoRA on an nn.Conv1d / nn.Conv2d / nn.Conv3d, with PEFT's layout and numbers
(``LoraConv2d`` is the same class).

For a base convolution with weight ``W [out, in, *kernel]`` (e.g. [out, in, kh, kw]):

    y = base_layer(x) + s · B(A(dropout(x)))

where ``A`` is a convolution of the base's kind ``in -> r`` with the base's kernel size,
stride and padding (no bias) and ``B`` a kernel-1 one ``r -> out`` (a bias with
``lora_bias``), as PEFT builds them (its Conv1d / Conv2d / Conv3d); pure PyTorch (cuDNN /
the CPU convolutions, no kernel of ours). The merged
weight is ``W + s·ΔW`` with ``ΔW[o, i, :, :] = Σ_r B[o, r] A[r, i, :, :]``, exact for
any stride and padding, and ``bias + s·b`` with ``lora_bias``.

State-dict and file keys are PEFT's (2-D shown): ``lora_A.<adapter>.weight`` [r, in, kh, kw],
``lora_B.<adapter>.weight`` [out, r, 1, 1] (``lora_B.<adapter>.bias`` [out]); files drop
the adapter name. Init as PEFT: True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0,
1/r)), False (both convolutions' own init). Dropout: one torch dropout per adapter on
its input, in training mode, as PEFT's nn.Dropout.

Refused: grouped convolutions (groups > 1; PEFT runs them but cannot merge them),
dilation other than 1 and padding_mode other than "zeros" (PEFT builds lora_A without
them, so its LoRA term does not follow the base convolution), and DoRA.

The layer speaks LoraLinear's protocol (``held_adapters``, ``adapter_parameters``,
``lora_weights``, ``set_adapter``, ``delete_adapter``, ``merge``, ``unmerge``,
``merged_weight``, ``disable_adapters``, mixed batches), so lorakern.model and
lorakern.adapters handle it with the other LoRA layers.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.layer import AdapterLayerMixin, SummedMergeMixin, init_is_gaussian, _scaled, adapter_dtype
from lorakern.mixed import RowGroups, mixed_rows
from lorakern.op_core import check_dropout_value, check_scaling_value
from lorakern.ops import ScalarDict


# The convolutions LoraConv wraps (PEFT's lora.Conv1d / Conv2d / Conv3d).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_unsupported(module: nn.Module) -> str | None:
    """Why LoraConv cannot wrap the convolution `module` (None when it can)."""
    if module.groups != 1:
        return f"groups={module.groups}: LoRA on grouped convolutions is not implemented"
    if any(d != 1 for d in module.dilation):
        return f"dilation={module.dilation}: LoRA on dilated convolutions is not implemented"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: only 'zeros' is supported"
    if not module.weight.is_floating_point():
        return f"its weight has dtype {module.weight.dtype}: quantized convolutions are not supported"
    return None


class LoraConv(AdapterLayerMixin, SummedMergeMixin, nn.Module):
    """A convolution plus low-rank adapters: ``y = base_layer(x) + Σ s·B(A(dropout(x)))``.

    Args:
        base_layer: the nn.Conv1d / nn.Conv2d / nn.Conv3d to wrap (frozen here; its
            parameters reused, not copied).
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name: as LoraLinear.
        use_dora: must be False (ValueError otherwise).
        lora_bias: B has a bias b and the adapter adds s·b (PEFT's lora_bias).

    Shapes: x [B, in, *spatial] (or [in, *spatial]) -> base_layer's output shape.

    Example:
        >>> import torch, lorakern
        >>> layer = lorakern.LoraConv2d(torch.nn.Conv2d(3, 8, 3, padding=1), r=4, lora_alpha=8)
        >>> layer(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
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
        if not isinstance(base_layer, CONV_TYPES):
            raise TypeError(f"base_layer must be nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}")
        why = conv_unsupported(base_layer)
        if why is not None:
            raise TypeError(f"cannot add LoRA to this {type(base_layer).__name__}: {why}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # always empty (no DoRA); PEFT's layers have it
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = ScalarDict(check=check_dropout_value)
        self.scaling: dict[str, float] = ScalarDict(check=check_scaling_value)  # traced: read as its tensor mirror
        self._place_scalars()
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}  # always False
        self.lora_bias: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.base_layer.kernel_size

    def held_adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_A)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter of adapter `adapter_name`: A, B (and B's bias with lora_bias)."""
        return [self.lora_A[adapter_name].weight, *self.lora_B[adapter_name].parameters()]

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in, *kernel], B [out, r, 1, ...]) of adapter `adapter_name`."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    # ---- adapters ---------------------------------------------------------------------

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
        signature). A refused call leaves the layer unchanged; a merged adapter cannot be
        replaced (unmerge first)."""
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout)
        if use_dora is not False:
            raise ValueError("use_dora=True (DoRA) is not implemented for convolution layers in lorakern")
        if not isinstance(lora_bias, bool):
            raise TypeError(f"lora_bias must be a bool, got {lora_bias!r}")
        gaussian = init_is_gaussian(init_lora_weights)
        if lora_bias and gaussian:
            raise ValueError("lora_bias=True needs init_lora_weights True or False (as in PEFT), got 'gaussian'")
        if lora_bias and self.base_layer.bias is None:
            warnings.warn(
                f"lora_bias=True but the base {type(self.base_layer).__name__} has no bias: this adapter cannot be merged",
                UserWarning, stacklevel=2,
            )
        base = self.base_layer
        # Built as PEFT builds them (on the CPU in fp32, so a seed gives PEFT's values), then
        # moved to the base's device in the adapter dtype (fp32, fp64 on an fp64 base).
        conv, ones = type(base), (1,) * len(base.kernel_size)
        A = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        B = conv(r, self.out_features, ones, ones, bias=lora_bias)
        with torch.no_grad():
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            elif gaussian:
                nn.init.normal_(A.weight, std=1.0 / r)
            if init_lora_weights is not False:
                nn.init.zeros_(B.weight)
                if B.bias is not None:
                    nn.init.zeros_(B.bias)
        w = base.weight
        dtype = adapter_dtype(w)
        self.lora_A[adapter_name] = A.to(device=w.device, dtype=dtype)
        self.lora_B[adapter_name] = B.to(device=w.device, dtype=dtype)
        self._record_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_bias=lora_bias)

    def _adapter_stores(self) -> tuple:
        return self.lora_A, self.lora_B

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """x [B, in, H, W] -> the base layer's output, in its dtype.

        adapter_names: a mixed batch: one adapter name per row of x (dim 0), "__base__"
        for none; each must be an adapter of this layer. Inside
        `lorakern.mixed_batch(model, names)` the names come from the context instead.
        """
        mixed = self._mixed_groups(adapter_names)
        if mixed is not None:
            return self._mixed_forward(x, *mixed)
        active = self._running_adapters()
        result = self.base_layer(x)
        if not active:
            return result
        out = result
        for name in active:  # summed in the promoted dtype (fp32 adapters), cast once, as PEFT
            out = out + self._lora_term(x, name)
        return out.to(result.dtype)

    def _lora_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B(A(dropout(x))), x cast to the adapter's dtype (as PEFT). Traced, s is the
        ScalarDict's tensor mirror (on the adapter's device when placed there: no CPU input
        for CUDA graphs): a new scaling (a hot-swap) does not recompile; dropout's p is read
        only in training mode (F.dropout takes a Python float)."""
        A, B = self.lora_A[name], self.lora_B[name]
        x = x.to(A.weight.dtype)
        if self.training and self.lora_dropout[name] > 0:
            x = F.dropout(x, self.lora_dropout[name], training=True)
        s = self.scaling.tensor(name, A.weight.device) if torch.compiler.is_compiling() else self.scaling[name]
        return _scaled(B(A(x)), s)

    def _mixed_forward(self, x: torch.Tensor, groups: RowGroups, strict: bool) -> torch.Tensor:
        """Row b of x through adapter groups.names[b] ("__base__": the base alone). strict:
        every name must be an adapter of this layer; else (mixed_batch, which checked the
        names against the model) a name this layer lacks runs its base alone."""
        groups, used = mixed_rows(self, x, groups, strict, "LoraConv")
        result = self.base_layer(x)
        if self.disable_adapters or not used:
            return result
        out = result
        for name in used:  # each term cast to the output dtype before it is added, as PEFT
            idx = groups.index(name, x.device)
            if idx is None:
                out = out + self._lora_term(x, name).to(out.dtype)
            else:
                out = out.index_add(0, idx, self._lora_term(x.index_select(0, idx), name).to(out.dtype))
        return out

    # ---- merge ---------------------------------------------------------------------------

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·ΔW [out, in, *kernel], ΔW[o, i] = Σ_r B[o, r] A[r, i], in fp32 (fp64 adapters: fp64)."""
        A, B = self.lora_weights(adapter_name)
        dtype = torch.promote_types(A.dtype, torch.float32)
        delta = B.flatten(1).to(dtype) @ A.flatten(1).to(dtype)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling[adapter_name]

    def extra_repr(self) -> str:
        parts = [
            f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}, lora_dropout={self.lora_dropout[n]}"
            for n in self.lora_A
        ]
        return f"in_channels={self.in_features}, out_channels={self.out_features}, " + "; ".join(parts)


LoraConv2d = LoraConv  # the name the class had when it wrapped nn.Conv2d only
