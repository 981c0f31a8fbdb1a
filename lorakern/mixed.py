"""Many adapters in one batch: each batch row picks its own adapter (or none).

    with lorakern.mixed_batch(model, ["a", "__base__", "b", "a"]):
        out = model(input_ids)            # row 0 and 3 through adapter "a", row 2 through "b"
        out = model.generate(input_ids)   # every generated token of a row keeps its adapter

PEFT's mixed batches (``peft_model(..., adapter_names=[...])``), same semantics and same
numbers: one name per row of dim 0, ``"__base__"`` for the base model alone; a name the
model has but a layer lacks runs that layer's base alone; merged adapters refuse.
Unlike PEFT, training mode works too: dropout as on the single-adapter path, and the
gradients reach only the adapters some row used.

Two paths, same numbers. With the Triton backend (eager), the SGMV kernels run every
adapter at once (`lorakern.mixed_ops`: cuBLAS's base GEMM, then one segmented shrink
and one segmented expand over all adapters, rows grouped on the device; a layer keeps
its adapters stacked between calls). Otherwise (CPU, and under torch.compile) rows are
grouped per adapter on the host (index_select / index_add, both differentiable), the
base GEMM runs once for all rows, and each adapter's LoRA term runs through the fused
single-adapter op on its rows alone (``lora_linear_looped``). Dropout masks differ
between the two (one seed per call vs one per adapter), each seeded by torch's generator.

Levels:
- ``lora_linear_mixed(x, weight, bias, lora_As, lora_Bs, scalings, row_adapter)``: the
  functional (row_adapter indexes the lists, -1 = base only);
- ``LoraLinear.forward(x, adapter_names=[...])``: one layer; names must be "__base__" or
  adapters of this layer (there is no model to check them against);
- ``mixed_batch(model, adapter_names)``: a context manager over every LoraLinear (and
  modules_to_save copy) of an injected model; names are checked against the model's
  adapters before anything runs.

With gradient checkpointing, call ``backward()`` inside the ``with`` block: the
recomputed forward reads the adapter names then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakern import quantized, reference
from lorakern.mixed_ops import lora_linear_segmented, scalar_vectors, stack_adapters, token_segments
from lorakern.op_core import check_devices, check_inputs, rows, unrows
from lorakern.ops import lora_linear, resolve_backend
from lorakern.qops import quantized_linear

BASE = "__base__"
MERGED_ERROR = (
    "cannot run a mixed batch (adapter_names) while adapters are merged into the base weights "
    "(layers: {layers}); call lorakern.unmerge(model) first"
)


# ---- row groups --------------------------------------------------------------------


class RowGroups:
    """One adapter name per batch row, grouped: {name: [row indices]} in first-seen order,
    with the index tensors cached per device (every layer of a forward reuses them)."""

    def __init__(self, names: Sequence[str], num_beams: int = 1):
        names = _check_name_list(names)
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        self.names = names
        self.num_beams = num_beams
        self.groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            self.groups.setdefault(name, []).append(i)
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._segments: dict[tuple, tuple] = {}
        self._expanded: RowGroups | None = None

    def __len__(self) -> int:
        return len(self.names)

    def for_rows(self, n_rows: int) -> RowGroups:
        """The groups for a batch of n_rows: these, or with num_beams > 1 and
        n_rows = len · num_beams, each name repeated num_beams times in place (the rows
        generate() expands for beam search: each input's copies are adjacent). An
        encoder-decoder's encoder still sees the original rows."""
        if self.num_beams > 1 and n_rows == len(self.names) * self.num_beams and n_rows != len(self.names):
            if self._expanded is None:
                self._expanded = RowGroups([n for n in self.names for _ in range(self.num_beams)])
            return self._expanded
        return self

    def index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The rows of `name` as a LongTensor on `device`; None when it is every row."""
        rows = self.groups[name]
        if len(rows) == len(self.names):
            return None
        key = (name, device)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return idx

    def segments(self, names: tuple[str, ...], x_shape: torch.Size, device: torch.device) -> tuple:
        """The rows of x's 2-D view grouped by their index in `names` ("__base__" and names
        not there in no group): `mixed_ops.token_segments`, cached, so every layer with the
        same adapters and input shape reuses one (a decode step computes it once)."""
        key = (names, tuple(x_shape[:-1]), device)
        seg = self._segments.get(key)
        if seg is None:
            where = {n: i for i, n in enumerate(names)}
            slots = torch.tensor([where.get(n, -1) for n in self.names], dtype=torch.int64).to(device, non_blocking=True)
            seg = self._segments[key] = token_segments(slots, x_shape, len(names))
        return seg

    def adapters(self) -> list[str]:
        """The adapter names used by some row ("__base__" excluded)."""
        return [n for n in self.groups if n != BASE]


def _check_name_list(names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter_names must be a list of str (one adapter name per batch row, {BASE!r} for none), "
            f"got {type(names).__name__}"
        )
    names = list(names)
    if not names:
        raise ValueError("adapter_names is empty; give one adapter name per batch row")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str only, got {bad[:3]!r}")
    return names


def check_rows(n_names: int, x: torch.Tensor, where: str, min_dim: int = 2) -> None:
    if x.dim() < min_dim:
        raise ValueError(f"{where}: a mixed batch needs x with a row dim (dim 0), got shape {tuple(x.shape)}")
    if x.shape[0] != n_names:
        raise ValueError(
            f"{where}: got {n_names} adapter names for a batch of {x.shape[0]} rows; give one name per row "
            "(dim 0). With beam search, pass generate's num_beams to mixed_batch(..., num_beams=n); with "
            "num_return_sequences=n the batch has n rows per input: repeat each name n times "
            "([a for a in names for _ in range(n)])"
        )


# ---- the functional ------------------------------------------------------------------


def _mixed(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float, float]],
    out_features: int,
    backend: str,
) -> torch.Tensor:
    """x Wᵀ + bias (all rows) + per group (idx, A, B, s, p): s·(D(x[idx]) Aᵀ) Bᵀ into rows idx.
    idx None means every row: then the op runs fused with the base GEMM."""
    if len(groups) == 1 and groups[0][0] is None:
        _, A, B, s, p = groups[0]
        return lora_linear(x, weight, bias, A, B, s, dropout_p=p, backend=backend)
    if weight is not None:
        y = F.linear(x, weight, bias)
    else:
        if bias is not None:
            raise ValueError("bias must be None when weight is None (the LoRA term alone)")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = x.new_zeros((*x.shape[:-1], out_features), dtype=dtype)
    term = _lora_term_inference if _plain_inference(x, groups, backend) else _lora_term
    for idx, A, B, s, p in groups:
        if idx is None:
            y = y + term(x, A, B, s, p, backend).to(y.dtype)
            continue
        out = term(x.index_select(0, idx), A, B, s, p, backend)
        y.index_add_(0, idx, out.to(y.dtype))  # in place: an out-of-place add copies y per adapter
    return y


def _lora_term(x, A, B, s, p, backend):
    return lora_linear(x, None, None, A, B, s, dropout_p=p, backend=backend)


def _lora_term_inference(x, A, B, s, p, backend):
    """`_lora_term` on the reference backend without autograd: the reference functions
    the op calls (same numbers), minus the op's per-call dispatch (~10 µs on a CPU core,
    paid once per adapter in a mixed batch). The op's input checks still run."""
    check_inputs(x, None, None, A, B, s, p)
    y, _ = reference.lora_linear_forward(rows(x), None, None, A, B, s, 0.0, 0)
    return unrows(y, x)


def _plain_inference(x: torch.Tensor, groups, backend: str) -> bool:
    """Whether the LoRA terms may skip the op: reference backend, eager, no autocast, no
    dropout, and nothing that needs a gradient."""
    if torch.compiler.is_compiling() or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return False
    if any(p != 0.0 for *_, p in groups) or resolve_backend(backend, x.device, x.dtype) != "reference":
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(A.requires_grad or B.requires_grad for _, A, B, *_ in groups))


def lora_linear_looped(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    row_adapter: torch.Tensor | Sequence[int],
    *,
    dropout_ps: Sequence[float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`lora_linear_mixed` with one fused single-adapter op call per adapter on its rows
    (index_select / index_add): what "auto" runs on CPU, and the comparison point for
    the fused kernels. Same arguments and numbers; dropout masks differ (each adapter's
    call draws its own seed)."""
    rows, dropout_ps, out_features = _check_mixed(x, weight, lora_As, lora_Bs, scalings, row_adapter, dropout_ps)
    return _looped(x, weight, bias, lora_As, lora_Bs, scalings, rows, dropout_ps, out_features, backend)


def _looped(x, weight, bias, lora_As, lora_Bs, scalings, rows, dropout_ps, out_features, backend):
    groups = []
    for i in sorted(set(rows) - {-1}):
        sel = [b for b, r in enumerate(rows) if r == i]
        idx = None if len(sel) == len(rows) else torch.tensor(sel, dtype=torch.long, device=x.device)
        groups.append((idx, lora_As[i], lora_Bs[i], scalings[i], dropout_ps[i]))
    if not groups:
        if weight is None:
            return _mixed(x, None, None, [], out_features, backend)
        return F.linear(x, weight, bias)
    return _mixed(x, weight, bias, groups, out_features, backend)


def _check_mixed(x, weight, lora_As, lora_Bs, scalings, row_adapter, dropout_ps) -> tuple[list[int], list[float], int]:
    """Validate a mixed call's arguments; returns (row adapter list, dropout ps, N)."""
    n = len(lora_As)
    if len(lora_Bs) != n or len(scalings) != n:
        raise ValueError(f"lora_As, lora_Bs and scalings must have one entry per adapter, got {n}, {len(lora_Bs)}, {len(scalings)}")
    if dropout_ps is None:
        dropout_ps = [0.0] * n
    elif len(dropout_ps) != n:
        raise ValueError(f"dropout_ps must have one entry per adapter ({n}), got {len(dropout_ps)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(row_adapter, torch.Tensor):
        if row_adapter.dtype.is_floating_point or row_adapter.dtype == torch.bool or row_adapter.dim() != 1:
            raise TypeError(f"row_adapter must be a 1-D integer tensor, got {row_adapter.dtype} of shape {tuple(row_adapter.shape)}")
        rows = row_adapter.tolist()
    else:
        rows = list(row_adapter)
        if any(not isinstance(r, int) or isinstance(r, bool) for r in rows):
            raise TypeError("row_adapter must hold ints")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, ..., K] (row = dim 0), got shape {tuple(x.shape)}")
    if len(rows) != x.shape[0]:
        raise ValueError(f"row_adapter has {len(rows)} entries for {x.shape[0]} rows of x (one per row, dim 0)")
    bad = sorted({r for r in rows if not -1 <= r < n})
    if bad:
        raise ValueError(f"row_adapter values must be in [-1, {n}) (-1 = base only), got {bad}")
    if weight is None and n == 0:
        raise ValueError("weight=None needs at least one adapter (its lora_B gives the output size)")
    out_features = weight.shape[0] if weight is not None else lora_Bs[0].shape[0]
    return rows, list(dropout_ps), out_features


def _fused(x: torch.Tensor, backend: str) -> bool:
    """Whether a mixed batch on x runs the SGMV kernels: the Triton backend, eager (under
    torch.compile the per-adapter registered ops keep the graph free of opaque kernels)."""
    if torch.compiler.is_compiling() or not x.is_floating_point():
        return False
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return resolve_backend(backend, x.device, dtype) == "triton"


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    row_adapter: torch.Tensor | Sequence[int],
    *,
    dropout_ps: Sequence[float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A mixed batch: ``y[b] = x[b] Wᵀ + bias + s_i·(D_i(x[b]) A_iᵀ) B_iᵀ`` with i = row_adapter[b].

    Args:
        x: [B, ..., K] (the row is dim 0; [M, K] is M rows).
        weight: [N, K] (any strides) or None for the LoRA term alone; bias: [N] | None.
        lora_As: per adapter [r_i, K]; lora_Bs: per adapter [N, r_i] (ranks may differ),
            each in x's dtype or float32.
        scalings: per adapter s_i (alpha / r, or alpha / sqrt(r) with rsLoRA).
        row_adapter: [B] integer (tensor or list): the adapter index of each row, -1 for
            the base alone. Rows may come in any order: the op groups them.
        dropout_ps: per adapter dropout probability on its rows' LoRA input (None: none).
        backend: "auto", "triton" or "reference". With Triton (eager), the SGMV kernels
            run every adapter at once (`lorakern.mixed_ops`); otherwise one op call per
            adapter (`lora_linear_looped`).
    Returns:
        [B, ..., N] in x's dtype (the autocast dtype under autocast). Differentiable in x,
        weight, bias and every A_i / B_i (an adapter no row uses gets no gradient).

    The adapters used are stacked (copied) on every call; `LoraLinear.forward(x,
    adapter_names=...)` and `mixed_batch` keep the stacks between calls.

    Example:
        >>> import torch, lorakern
        >>> x, W = torch.randn(3, 8), torch.randn(6, 8)
        >>> As, Bs = [torch.randn(2, 8), torch.randn(4, 8)], [torch.randn(6, 2), torch.randn(6, 4)]
        >>> lorakern.lora_linear_mixed(x, W, None, As, Bs, [0.5, 2.0], torch.tensor([1, -1, 0])).shape
        torch.Size([3, 6])
    """
    rows, dropout_ps, out_features = _check_mixed(x, weight, lora_As, lora_Bs, scalings, row_adapter, dropout_ps)
    used = sorted(set(rows) - {-1})
    # one adapter on every row is the single-adapter op (its decode variants, its mask)
    if not used or (len(used) == 1 and -1 not in rows) or not _fused(x, backend):
        return _looped(x, weight, bias, lora_As, lora_Bs, scalings, rows, dropout_ps, out_features, backend)
    for i in used:  # the single-adapter op's checks: shapes, dtypes, devices, values
        check_devices(x, weight, bias, lora_As[i], lora_Bs[i])
        check_inputs(x, weight, bias, lora_As[i], lora_Bs[i], scalings[i], dropout_ps[i])
    if weight is None and bias is not None:
        raise ValueError("bias must be None when weight is None (the LoRA term alone)")
    # only the adapters some row uses are stacked: the others get no gradient
    slot = {a: j for j, a in enumerate(used)}
    A, B = stack_adapters([lora_As[i] for i in used], [lora_Bs[i] for i in used])
    vectors = scalar_vectors([scalings[i] for i in used], [dropout_ps[i] for i in used], x.device)
    row_slots = torch.tensor([slot.get(r, -1) for r in rows], dtype=torch.int64).to(x.device, non_blocking=True)
    seg = token_segments(row_slots, x.shape, len(used))
    return lora_linear_segmented(x, weight, bias, A, B, vectors, seg, backend="triton")


# ---- one layer --------------------------------------------------------------------------


def mixed_rows(layer, x: torch.Tensor, groups: RowGroups, strict: bool, where: str,
               min_dim: int = 2) -> tuple[RowGroups, list[str]]:
    """The checks every LoRA layer runs on a mixed batch, and the adapters it uses here:
    (the groups for x's rows (beam-expanded where num_beams says so), the used adapters this
    layer holds). Raises on a row count that does not match, on merged adapters, and (strict:
    the layer's own ``forward(x, adapter_names=...)``) on names the layer does not hold."""
    if x.dim() >= min_dim:
        groups = groups.for_rows(x.shape[0])
    check_rows(len(groups), x, where, min_dim)
    if layer.merged_adapters:
        raise ValueError(
            f"cannot run a mixed batch (adapter_names) while adapters {layer.merged_adapters} are merged "
            "into this layer; unmerge() first"
        )
    held = layer.held_adapters()
    used = groups.adapters()
    if strict:
        unknown = [n for n in used if n not in held]
        if unknown:
            raise ValueError(f"no adapter named {unknown} in this layer; it has {held} (and {BASE!r} for none)")
    return groups, [n for n in used if n in held]


def layer_forward(layer, x: torch.Tensor, adapter_names: RowGroups, strict: bool) -> torch.Tensor:
    """LoraLinear.forward for a mixed batch.

    strict (``forward(x, adapter_names=...)``): every name must be "__base__" or an adapter
    of this layer. Not strict (inside `mixed_batch`, which checked the names against the
    model): a name this layer lacks runs its base alone, as in PEFT.
    """
    if not strict and torch.compiler.is_compiling():
        y = _traced_forward(layer, x)
        if y is not None:
            return y
    groups, used = mixed_rows(layer, x, adapter_names, strict, "LoraLinear")
    dora = [n for n in used if layer.use_dora.get(n, False)]
    if dora:
        raise NotImplementedError(f"DoRA adapters {dora} in a mixed batch are not implemented; run them alone")
    if layer.disable_adapters or not used:
        return layer._base_forward(x)
    y = _layer_lora_forward(layer, x, groups, used)
    return _add_lora_bias(layer, y, groups, used)


def _traced_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """A `mixed_batch` forward while torch.compile traces, from tensors only, or None when it
    does not apply (then the host-grouped path runs, which guards on the names).

    The host path groups rows by name in Python, so dynamo guards on the name list and a new
    batch composition recompiles. Here the row -> adapter map is the slot tensor
    `mixed_batch` put on the layer (`_mixed_slots`: graph inputs, not constants) and every
    adapter of the layer is stacked in the graph, padded with a zero adapter for "__base__"
    rows: y = x Wᵀ + bias + s_a·(x_b A_aᵀ) B_aᵀ per batch row b, as two batched matmuls over
    the rows' gathered A and B. Same math as the host path (rounding aside). Applies to
    inference of a dense LoraLinear (no autograd, no dropout, no DoRA, no autocast, x in
    the weight's dtype); training, quantized bases and the rest keep the host path.
    """
    slots = layer.__dict__.get("_mixed_slots")  # set on LoraLinear layers only
    if slots is None or x.dim() < 2:
        return None
    names = list(layer.lora_A)
    if (layer.disable_adapters or layer.merged_adapters or layer.quantized or layer.base_forward
            or any(layer.use_dora.get(n, False) for n in names) or torch.is_autocast_enabled(x.device.type)):
        return None
    if layer.training and any(layer.lora_dropout.is_positive(n) for n in names):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for n in names for p in layer.adapter_parameters(n))):
        return None
    w = layer.base_weight()
    if x.dtype != w.dtype:
        return None
    rows = next((t for t in slots if t is not None and t.shape[0] == x.shape[0]), None)
    if rows is None:
        return None  # the host path raises the row-count error
    n = len(names)
    idx = torch.where(rows < 0, n, rows)  # the zero adapter for "__base__" rows
    # the stored ranks (a hot-swap may hold rank r zero-padded to a larger one), not layer.r
    A_all = [layer.lora_A[name].weight for name in names]
    B_all = [layer.lora_B[name].weight for name in names]
    R = max(a.shape[0] for a in A_all)
    pad_a = [F.pad(a, (0, 0, 0, R - a.shape[0])) for a in A_all]
    pad_b = [F.pad(b, (0, R - b.shape[1])) for b in B_all]
    A = torch.stack([*pad_a, torch.zeros_like(pad_a[0])])[idx].to(x.dtype)  # [Bt, R, K]
    B = torch.stack([*pad_b, torch.zeros_like(pad_b[0])])[idx].to(x.dtype)  # [Bt, N, R]
    scale = torch.cat([*(layer.scaling.tensor(name) for name in names), layer.scaling.tensor(names[0]) * 0])
    scale = scale.to(device=x.device, dtype=torch.float32)[idx]
    y = F.linear(x, w, layer.base_layer.bias)
    xs = x.reshape(x.shape[0], -1, x.shape[-1])
    lora = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))  # [Bt, T, N]
    y = y + (lora.float() * scale.view(-1, 1, 1)).to(y.dtype).reshape(y.shape)
    if any(layer.lora_bias.get(name, False) for name in names):  # s·b on each adapter's rows
        zero = y.new_zeros(y.shape[-1], dtype=torch.float32)
        table = torch.stack([
            *(layer.lora_B[name].bias.float() * layer.scaling.tensor(name).to(device=x.device, dtype=torch.float32)
              if layer.lora_bias.get(name, False) else zero for name in names),
            zero,
        ])
        y = y + table[idx].to(y.dtype).view(x.shape[0], *([1] * (y.dim() - 2)), -1)
    return y


def _add_lora_bias(layer, y: torch.Tensor, groups: RowGroups, used: list[str]) -> torch.Tensor:
    """PEFT's lora_bias in a mixed batch: s·b of each adapter added to its rows alone
    (PEFT's lora_B(lora_A(x))·s carries the bias into those rows only). Differentiable in b."""
    for name in used:
        if not layer.lora_bias.get(name, False):
            continue
        sb = (layer.lora_B[name].bias * layer.scaling[name]).to(y.dtype)
        idx = groups.index(name, y.device)
        if idx is None:
            y = y + sb
        else:
            y = y.index_add(0, idx, sb.expand(len(idx), *y.shape[1:]))
    return y


def _layer_lora_forward(layer, x: torch.Tensor, groups: RowGroups, used: list[str]) -> torch.Tensor:
    """`layer_forward` past the checks: base plus each row's adapter term (no lora_bias)."""
    autocast = torch.is_autocast_enabled(x.device.type)

    def adapter_groups(dtype: torch.dtype | None):
        # (idx, A, B, s, p) per used adapter, as LoraLinear._adapter_args gives them.
        args = layer._adapter_args(used, dtype)
        return [(groups.index(n, x.device), *a) for n, a in zip(used, args)]

    if layer.quantized:
        # as LoraLinear._quantized_forward: x in the base's compute dtype (the autocast dtype
        # under autocast), adapters in it or fp32; the answer in x's dtype (autocast: its dtype)
        qw = quantized.quantized_weight(layer.base_layer)
        if autocast:
            dtype = out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = quantized.compute_dtype(layer.base_layer, x) if x.is_floating_point() else x.dtype
            out_dtype = x.dtype
        xc = x.to(dtype)
        y = quantized_linear(xc, qw, layer.base_layer.bias, layer.backend)
        lora = _mixed(xc, None, None, adapter_groups(None if autocast else dtype), layer.out_features, layer.backend)
        return (y + lora.to(y.dtype)).to(out_dtype)
    if layer.base_forward:
        # bitsandbytes 8-bit: base_layer(x) plus the LoRA terms in the adapters' dtype (PEFT's formula)
        y = layer.base_layer(x)
        if autocast:
            lora = _mixed(x, None, None, adapter_groups(None), layer.out_features, layer.backend)
        else:
            dtype = layer.lora_A[used[0]].weight.dtype
            lora = _mixed(x.to(dtype), None, None, adapter_groups(dtype), layer.out_features, layer.backend)
        return y + lora.to(y.dtype)
    w = layer.base_weight()
    bias = layer.base_layer.bias
    mixed_dtype = x.is_floating_point() and x.dtype != w.dtype and not autocast
    if _fused(x, layer.backend) and len(groups.groups) > 1:  # one adapter on every row: the single op
        xc = x.to(w.dtype) if mixed_dtype else x
        y = _fused_layer_forward(layer, xc, w, bias, groups, used, None if autocast else w.dtype)
        return y.to(x.dtype) if mixed_dtype else y
    adapters = adapter_groups(None if autocast else w.dtype)
    if mixed_dtype:
        return _mixed(x.to(w.dtype), w, bias, adapters, layer.out_features, layer.backend).to(x.dtype)
    return _mixed(x, w, bias, adapters, layer.out_features, layer.backend)


def _fused_layer_forward(layer, x, w, bias, groups: RowGroups, used: list[str], dtype) -> torch.Tensor:
    """The SGMV path of `layer_forward`: the layer's adapters stacked once and kept while
    no adapter weight, scaling or dropout changes (`_layer_stacks`); one fused op."""
    A, B, vectors, names = _layer_stacks(layer, used, dtype, x.device)
    seg = groups.segments(names, x.shape, x.device)
    return lora_linear_segmented(x, w, bias, A, B, vectors, seg, backend="triton")


def _layer_stacks(layer, used: list[str], dtype, device):
    """(A [n, R, K], B [n, N, R], scalar vectors, adapter names in stack order).

    Training (autograd recording and an adapter requiring grad): the adapters `used`,
    stacked on this call (differentiable; the others get no gradient). Otherwise every
    adapter of the layer, stacked once and cached on the layer until an adapter's weight
    is replaced or written in place (tensor version counters), or a scaling, dropout
    probability, dtype or device changes: serving many adapters reads the stacks, it
    does not copy them every step.
    """
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    grad = torch.is_grad_enabled() and any(
        a_mods[n]._parameters["weight"].requires_grad or b_mods[n]._parameters["weight"].requires_grad for n in used
    )
    if not grad:
        entry = layer.__dict__.get("_sgmv_stacks")
        if entry is not None and _stacks_current(layer, entry[0], dtype, device):
            return entry[1]
    names = list(used) if grad else list(a_mods)
    params = [(a_mods[n]._parameters["weight"], b_mods[n]._parameters["weight"]) for n in names]
    ps = [layer._dropout_arg(n, False, False) for n in names]
    cast = (lambda t: t) if dtype is None else (lambda t: t if t.dtype in (dtype, torch.float32) else t.to(dtype))
    with torch.no_grad() if not grad else contextlib.nullcontext():
        A, B = stack_adapters([cast(a) for a, _ in params], [cast(b) for _, b in params])
    value = (A, B, scalar_vectors([layer.scaling[n] for n in names], ps, device), tuple(names))
    if not grad:
        state = (
            dtype, device, layer.training, dict(layer.scaling), dict(layer.lora_dropout) if layer.training else None,
            list(a_mods.values()), list(b_mods.values()), [(t, t._version) for pair in params for t in pair],
        )
        layer.__dict__["_sgmv_stacks"] = (state, value)
    return value


def _stacks_current(layer, state, dtype, device) -> bool:
    """Whether the cached stacks still hold the layer's adapters: same dtype, device and
    mode, scalings and dropout, the same adapter modules (Module == is identity) holding
    the same parameters at the same versions. Cheap: a decode step calls it per layer."""
    s_dtype, s_device, training, scaling, dropout, a_list, b_list, tensors = state
    if s_dtype != dtype or s_device != device or training != layer.training or scaling != layer.scaling:
        return False
    if training and dropout != layer.lora_dropout:
        return False
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    if list(a_mods.values()) != a_list or list(b_mods.values()) != b_list:
        return False
    current = (m._parameters["weight"] for pair in zip(a_list, b_list) for m in pair)
    return all(t is c and t._version == v for c, (t, v) in zip(current, tensors))


def _layer_slots(layer, groups: RowGroups) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's index into the layer's adapters (-1: "__base__" or an adapter the layer
    lacks), for the batch's rows and, with num_beams, for the beam-expanded rows."""
    where = {n: i for i, n in enumerate(layer.lora_A)}
    device = layer.base_layer.weight.device

    def slots(g: RowGroups) -> torch.Tensor:
        return torch.tensor([where.get(n, -1) for n in g.names], dtype=torch.int64, device=device)

    expanded = groups.for_rows(len(groups) * groups.num_beams)
    return slots(groups), (slots(expanded) if expanded is not groups else None)


# ---- modules_to_save copies ------------------------------------------------------------


def _saved_module_forward(wrapper, groups: RowGroups):
    """A ModulesToSave forward for a mixed batch: each row through its adapter's copy (the
    original module for "__base__" and for adapters without a copy), as PEFT does."""

    def forward(inp, *args, **kwargs):
        if wrapper.disable_adapters:
            return wrapper.original_module(inp, *args, **kwargs)
        groups_here = groups.for_rows(inp.shape[0]) if inp.dim() >= 2 else groups
        check_rows(len(groups_here), inp, "modules_to_save module")
        by_module: dict[int, tuple[nn.Module, list[int]]] = {}
        for name, members in groups_here.groups.items():
            module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
            by_module.setdefault(id(module), (module, []))[1].extend(members)
        if len(by_module) == 1:
            (module, _), = by_module.values()
            return module(inp, *args, **kwargs)
        out = None
        for module, members in by_module.values():
            idx = torch.tensor(members, dtype=torch.long, device=inp.device)
            part = module(inp.index_select(0, idx), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"mixed batches support modules_to_save modules that return a tensor, got {type(part).__name__}")
            if out is None:
                out = part.new_zeros((len(groups_here), *part.shape[1:]))
            out = out.index_copy(0, idx, part.to(out.dtype))
        return out

    return forward


# ---- the model-level context manager ------------------------------------------------------


def check_model_names(model: nn.Module, names: Sequence[str], num_beams: int = 1) -> RowGroups:
    """Check `names` against the model: known adapters, nothing merged, no DoRA among them.
    Raises before anything runs; returns the row groups."""
    from lorakern.model import adapter_state, lora_layers
    from lorakern.parameter import LoraParameter
    from lorakern.trainable_tokens import token_layers

    state = adapter_state(model)
    groups = RowGroups(names, num_beams)
    unknown = [n for n in groups.adapters() if n not in state.configs]
    if unknown:
        raise ValueError(
            f"no adapter named {unknown}; the model has {list(state.configs)} (and {BASE!r} for the base model alone)"
        )
    layers = list(lora_layers(model))
    merged = [name for name, layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(MERGED_ERROR.format(layers=merged[:4] + (["..."] if len(merged) > 4 else [])))
    used = set(groups.adapters())
    dora = sorted({n for _, layer in layers for n in used if layer.use_dora.get(n, False)})
    if dora:
        raise NotImplementedError(f"DoRA adapters {dora} in a mixed batch are not implemented; run them alone")
    params = sorted({n for _, layer in layers if isinstance(layer, LoraParameter) for n in used & set(layer.held_adapters())})
    if params:
        raise NotImplementedError(
            f"adapters {params} put LoRA on parameters (target_parameters): not in a mixed batch (as in PEFT); run them alone"
        )
    merged_tokens = [name for name, w in token_layers(model) if w.merged_adapters]
    if merged_tokens:
        raise ValueError(MERGED_ERROR.format(layers=merged_tokens[:4]))
    return groups


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], *, num_beams: int = 1) -> Iterator[nn.Module]:
    """Context manager: inside it, row b of every batch runs through adapter ``adapter_names[b]``
    (``"__base__"``: the base model alone), in every LoraLinear and modules_to_save module.

    PEFT's ``peft_model(..., adapter_names=[...])`` for a lorakern model, forward and
    backward, through ``model.generate(...)`` too (each generated token of a row keeps
    its adapter). Beam search: pass generate's ``num_beams`` here too, and give one name
    per input: as PEFT, each is repeated for its beams where the batch was expanded (an
    encoder-decoder's encoder keeps the original rows). For num_return_sequences=n
    without beams, give each name n times (or pass num_beams=n).
    Names are checked first: an unknown name, merged adapters or a DoRA adapter raise
    before anything changes. The active adapters (set_adapter) are ignored inside; on
    exit (also on an exception) the model is as before.

    Example:
        >>> import torch, lorakern
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> model = lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> with lorakern.mixed_batch(model, ["default", "__base__"]):
        ...     y = model(torch.randn(2, 8))
        >>> y.shape
        torch.Size([2, 8])
    """
    from lorakern.layer import LoraLinear
    from lorakern.model import lora_layers, saved_modules
    from lorakern.trainable_tokens import token_layers

    groups = check_model_names(model, adapter_names, num_beams)
    layers = [layer for _, layer in lora_layers(model)] + [w for _, w in token_layers(model)]
    wrappers = [w for _, w in saved_modules(model)]
    before_layers = [(layer.__dict__.get("_mixed_adapter_names"), layer.__dict__.get("_mixed_slots")) for layer in layers]
    before_wrappers = [w.__dict__.get("forward") for w in wrappers]
    try:
        for layer in layers:
            layer.__dict__["_mixed_adapter_names"] = groups
            if isinstance(layer, LoraLinear):  # the traced path's row -> adapter map (`_traced_forward`)
                layer.__dict__["_mixed_slots"] = _layer_slots(layer, groups)
        for w in wrappers:
            w.__dict__["forward"] = _saved_module_forward(w, groups)
        yield model
    finally:
        for layer, olds in zip(layers, before_layers):
            for key, old in zip(("_mixed_adapter_names", "_mixed_slots"), olds):
                if old is None:
                    layer.__dict__.pop(key, None)
                else:
                    layer.__dict__[key] = old
        for w, old in zip(wrappers, before_wrappers):
            if old is None:
                w.__dict__.pop("forward", None)
            else:
                w.__dict__["forward"] = old
