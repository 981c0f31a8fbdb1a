"""LoraEmbedding: LoRA on an nn.Embedding, with PEFT's layout and numbers.

For a base table ``W [num_embeddings, embedding_dim]`` and input ids ``x``:

    y = base_layer(x) + s · E(x, Aᵀ) Bᵀ        A [r, num_embeddings], B [embedding_dim, r]

where ``E(x, T)`` is ``F.embedding(x, T)`` with the base layer's ``padding_idx``,
``max_norm``, ``norm_type`` and ``scale_grad_by_freq``: a row lookup, so the LoRA term
costs r·embedding_dim multiply-adds per id (pure PyTorch, no kernel). The lookup is
always dense: A gets a dense gradient even over a ``sparse=True`` table (where PEFT's
backward fails: a sparse gradient of the view Aᵀ cannot be formed). The
merged table is ``W + s·(B A)ᵀ``. A base layer with an ``embed_scale`` (Gemma's scaled
embeddings multiply their lookup by it) scales the LoRA term too, as PEFT does.

State-dict keys are PEFT's ``lora_embedding_A.<adapter>`` / ``lora_embedding_B.<adapter>``
(nn.ParameterDict entries, no ``.weight``); an adapter file holds them as
``<module path>.lora_embedding_A`` / ``.lora_embedding_B``.

As in PEFT: ``init_lora_weights=True`` (or "gaussian") makes A zero and B standard
normal (so the adapter starts at zero), False leaves both standard normal; lora_dropout
is recorded but never applied (an input id cannot be partly dropped); lora_bias is
refused. Unlike PEFT, DoRA on an embedding is refused (not implemented), and so is a
quantized base table.

The layer speaks the same protocol as LoraLinear, so everything in lorakern.model and
lorakern.adapters that walks the LoRA layers handles it: ``held_adapters()``,
``adapter_parameters(name)``, ``lora_weights(name)`` (A [r, in], B [out, r] with in =
num_embeddings, out = embedding_dim), ``set_adapter``, ``delete_adapter``, ``merge``,
``unmerge``, ``merged_weight``, ``disable_adapters``, and mixed batches
(``forward(x, adapter_names=[...])``, or ``lorakern.mixed_batch``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.layer import AdapterLayerMixin, SummedMergeMixin, init_is_gaussian, _scaled, adapter_dtype
from lorakern.mixed import RowGroups, mixed_rows
from lorakern.op_core import check_dropout_value, check_scaling_value
from lorakern.ops import ScalarDict

# Weight classes of quantized tables (bitsandbytes); their values are not the table.
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def embedding_unsupported(module: nn.Module) -> str | None:
    """Why LoraEmbedding cannot wrap the nn.Embedding `module` (None when it can)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or type(w).__name__ in _QUANTIZED_PARAMS or not w.is_floating_point():
        kind = type(w).__name__ if isinstance(w, torch.Tensor) else repr(w)
        dtype = f" of dtype {w.dtype}" if isinstance(w, torch.Tensor) else ""
        return f"its weight is a {kind}{dtype}: LoRA on quantized embedding tables is not implemented"
    return None


class LoraEmbedding(AdapterLayerMixin, SummedMergeMixin, nn.Module):
    """nn.Embedding plus low-rank adapters: ``y = base_layer(x) + Σ s·E(x, Aᵀ) Bᵀ``.

    Args:
        base_layer: the nn.Embedding (or a subclass, e.g. a scaled embedding) to wrap;
            frozen here, its parameters reused, not copied.
        r: adapter rank (>= 1).
        lora_alpha: scale numerator; scaling = lora_alpha / r (/ sqrt(r) with use_rslora).
        lora_dropout: recorded only: as in PEFT, no dropout on an embedding adapter.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True or "gaussian" (A zero, B ~ N(0, 1)) or False (A, B ~ N(0, 1)).
        adapter_name: name of the first adapter.
        use_dora, lora_bias: must be False (ValueError otherwise).

    Shapes: x [...] integer ids -> [..., embedding_dim].

    Example:
        >>> import torch, lorakern
        >>> layer = lorakern.LoraEmbedding(torch.nn.Embedding(100, 16), r=4, lora_alpha=8)
        >>> layer(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 16])
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
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
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be nn.Embedding, got {type(base_layer).__name__}")
        why = embedding_unsupported(base_layer)
        if why is not None:
            raise TypeError(f"cannot add LoRA to this {type(base_layer).__name__}: {why}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = ScalarDict(check=check_dropout_value)
        self.scaling: dict[str, float] = ScalarDict(check=check_scaling_value)  # traced: read as its tensor mirror
        self._place_scalars()
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}  # always False: read by code that walks every LoRA layer
        self.lora_bias: dict[str, bool] = {}  # always False, likewise
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias)

    # ---- what code outside reads (as on nn.Embedding / LoraLinear) ------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def held_adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_embedding_A)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter of adapter `adapter_name` (A and B)."""
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def lora_weights(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A [r, num_embeddings], B [embedding_dim, r]): LoraLinear's (A [r, in], B [out, r])."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

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
        signature). Everything is checked before anything is registered: a refused call
        leaves the layer unchanged. A merged adapter cannot be replaced (unmerge first)."""
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout)
        if use_dora is not False:
            raise ValueError("use_dora=True (DoRA) is not implemented for embedding layers in lorakern")
        if lora_bias is not False:
            raise ValueError("lora_bias=True is not supported for embedding layers (as in PEFT)")
        init_is_gaussian(init_lora_weights)  # validated: True and "gaussian" initialise alike here
        # PEFT's draws, in its order, on the CPU in fp32 (so a seed gives PEFT's values),
        # then moved to the base's device in the adapter dtype (fp32, fp64 on an fp64 base).
        A = torch.randn(r, self.in_features)
        B = torch.randn(self.out_features, r)
        if init_lora_weights is not False:  # True and "gaussian" alike, as PEFT
            nn.init.zeros_(A)
            nn.init.normal_(B)
        w = self.base_layer.weight
        dtype = adapter_dtype(w)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A.to(device=w.device, dtype=dtype))
        self.lora_embedding_B[adapter_name] = nn.Parameter(B.to(device=w.device, dtype=dtype))
        self._record_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    def _adapter_stores(self) -> tuple:
        return self.lora_embedding_A, self.lora_embedding_B

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """x [...] integer ids -> [..., embedding_dim], in the base layer's output dtype.

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
        scale = self._embed_scale()
        out = result
        for name in active:  # summed in the promoted dtype (fp32 adapters), cast once, as PEFT
            out = out + self._lora_term(x, name, scale)
        return out.to(result.dtype)

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """F.embedding of `table` (Aᵀ) with the base layer's options (padding_idx, max_norm,
        norm_type, scale_grad_by_freq). Never sparse: a sparse gradient of the transposed
        view Aᵀ cannot be formed (PEFT passes the base's sparse=True and fails in backward);
        A gets a dense gradient, the base table keeps its own setting."""
        base = self.base_layer
        return F.embedding(
            x, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=False,
        )

    def _lora_term(self, x: torch.Tensor, name: str, scale: torch.Tensor | None) -> torch.Tensor:
        """s · E(x, Aᵀ) Bᵀ (· embed_scale) in the adapter's dtype (autocast's under autocast).
        Traced, s is the ScalarDict's tensor mirror (on the adapter's device when placed there:
        no CPU input for CUDA graphs): a new scaling (a hot-swap) does not recompile."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        s = self.scaling.tensor(name, A.device) if torch.compiler.is_compiling() else self.scaling[name]
        term = _scaled(self._embed(x, A.T) @ B.T, s)
        if scale is not None:
            term = term * scale.to(term.dtype)
        return term

    def _embed_scale(self) -> torch.Tensor | None:
        """The base layer's `embed_scale` (a number or a one-element tensor) as a tensor, or
        None; any other shape is ignored with a warning, as PEFT does."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        w = self.base_layer.weight
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=w.device, dtype=w.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        warnings.warn(
            f"the base embedding's embed_scale has shape {getattr(scale, 'shape', None)}, not a scalar: "
            "the LoRA term is not scaled by it",
            stacklevel=3,
        )
        return None

    def _mixed_forward(self, x: torch.Tensor, groups: RowGroups, strict: bool) -> torch.Tensor:
        """Row b of x through adapter groups.names[b] ("__base__": the base alone). strict:
        every name must be an adapter of this layer; else (mixed_batch, which checked the
        names against the model) a name this layer lacks runs its base alone."""
        groups, used = mixed_rows(self, x, groups, strict, "LoraEmbedding", min_dim=1)
        result = self.base_layer(x)
        if self.disable_adapters or not used:
            return result
        scale = self._embed_scale()
        out = None
        for name in used:
            idx = groups.index(name, x.device)
            term = self._lora_term(x if idx is None else x.index_select(0, idx), name, scale)
            if out is None:  # the sum in the promoted dtype, cast once, as on the single-adapter path
                out = result.to(torch.promote_types(result.dtype, term.dtype))
            out = out + term.to(out.dtype) if idx is None else out.index_add(0, idx, term.to(out.dtype))
        return out.to(result.dtype)

    # ---- merge ---------------------------------------------------------------------------

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·(B A)ᵀ [num_embeddings, embedding_dim], the base table's layout (as PEFT), in fp32
        (fp64 for fp64 adapters)."""
        A, B = self.lora_weights(adapter_name)
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)).T * self.scaling[adapter_name]

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}" for n in self.lora_embedding_A]
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, " + "; ".join(parts)
