"""Trainable tokens: PEFT's ``LoraConfig(trainable_token_indices=...)`` for lorakern.

Only the listed rows of an embedding table are trained. For each adapter a
`TrainableTokensWrapper`, put where the embedding was, holds new values for its rows,
``trainable_tokens_delta[adapter]`` [n, embedding_dim] (PEFT's name; they are the rows
themselves, not a difference), copied from the table when the adapter is added; the table
itself is not touched until `merge`. The forward uses the table with those rows replaced,

    W' = W.index_copy(0, idx, delta)
    nn.Embedding:  y = F.embedding(x, W') (· embed_scale)
    nn.Linear:     y = F.linear(x, W', bias)          (an output head tied to the embedding)

so only ``delta`` gets gradients. The layout is PEFT's, so state-dict and file keys match:
``<name>.token_adapter.base_layer`` is the embedding, ``<name>.token_adapter.
trainable_tokens_delta.<adapter>`` the rows, saved as ``<name>.token_adapter.trainable_tokens_delta``.

Which modules (PEFT's rules, `plan_trainable_tokens`): a list of ids goes to the input
embedding (transformers' ``get_input_embeddings()``; a model without one: modules whose name
ends in ``embed_tokens``); a dict ``{name: ids}`` to every module whose dotted name ends with
``name``. Tied embeddings: a module that uses the input embedding's weight itself (an output
head tied to it) gets the same rows, shared: one parameter, trained by both, saved once under
the embedding's key; a dict that gives that module other ids trains them on their own instead
(they still write into the one shared table when merged: `merge` warns).

Merging writes the rows into the table, remembering what it overwrote; unmerging puts that
back, last merge first, so tables shared by several wrappers come back exactly. At most one
adapter with trainable tokens can be active on a module (PEFT's rule), and the ids merged into
one module must not overlap. In a mixed batch (`lorakern.mixed_batch`) each row goes through
its adapter's rows, as PEFT's mixed-batch forward.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.embedding import embedding_unsupported
from lorakern.layer import adapter_dtype
from lorakern.mixed import check_rows

DELTA_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's file key, after the module's name
BASE_PREFIX = "token_adapter.base_layer."  # where the wrapped module's own tensors sit
_MERGE_ORDER = itertools.count()  # merges across all wrappers, so unmerge can go last-first


class TokenAdapter(nn.Module):
    """Holds the wrapped module (`base_layer`) and the rows (`trainable_tokens_delta`), giving
    PEFT's state-dict layout under ``token_adapter``. No forward: the wrapper computes."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()


class TrainableTokensWrapper(nn.Module):
    """An nn.Embedding (or an nn.Linear output head tied to one) whose listed rows are trained
    per adapter. See the module docstring for the math.

    Attributes: `token_indices[adapter]` the row ids; `tied_adapters[adapter]` the name of
    the module whose rows this adapter's are (the same Parameter), for rows shared with a tied
    input embedding; `active_adapters`, `merged_adapters`, `disable_adapters` as on LoRA layers.
    Attributes the wrapper lacks are read from the wrapped module (`weight` is the table the
    forward uses, as in PEFT).

    Shapes: an embedding's x [...] integer ids -> [..., embedding_dim]; a head's x [..., in] -> [..., out].

    Example:
        >>> import torch
        >>> from lorakern.trainable_tokens import TrainableTokensWrapper
        >>> emb = TrainableTokensWrapper(torch.nn.Embedding(10, 4))
        >>> emb.add_adapter("default", [2, 7]); emb.active_adapters = ["default"]
        >>> emb.trainable_tokens_delta["default"].shape
        torch.Size([2, 4])
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer)
        self.token_indices: dict[str, list[int]] = {}
        self.tied_adapters: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._merged_rows: dict[str, tuple[int, torch.Tensor]] = {}  # adapter -> (merge order, rows it overwrote)
        self._index_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ---- what the wrapper holds --------------------------------------------------

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def held_adapters(self) -> list[str]:
        return list(self.token_indices)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.trainable_tokens_delta[adapter_name]]

    def add_adapter(self, adapter_name: str, indices: list[int], tied: tuple[str, nn.Parameter] | None = None) -> None:
        """Add `adapter_name` for rows `indices`: new rows copied from the table (PEFT's init,
        in fp32, fp64 on an fp64 table, as PEFT's autocast_adapter_dtype), or with `tied`
        (source module name, its Parameter) the source's rows themselves."""
        if adapter_name in self.token_indices:
            raise ValueError(f"trainable tokens already hold an adapter named {adapter_name!r}")
        weight = self.base_layer.weight
        if tied is not None:
            source, param = tied
            if tuple(param.shape) != (len(indices), weight.shape[1]):
                raise ValueError(f"tied rows of shape {tuple(param.shape)} do not fit a table of shape {tuple(weight.shape)}")
            self.tied_adapters[adapter_name] = source
        else:
            idx = torch.as_tensor(indices, dtype=torch.long, device=weight.device)
            rows = weight.detach().index_select(0, idx).to(adapter_dtype(weight))
            param = nn.Parameter(rows.clone(), requires_grad=True)
        self.trainable_tokens_delta[adapter_name] = param
        self.token_indices[adapter_name] = list(indices)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` (unmerge it first: see `unmerge_adapter`)."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the table; unmerge it before deleting it")
        del self.trainable_tokens_delta[adapter_name]
        del self.token_indices[adapter_name]
        self.tied_adapters.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self._index_cache = {k: v for k, v in self._index_cache.items() if k[0] != adapter_name}

    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        key = (adapter_name, device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = torch.as_tensor(self.token_indices[adapter_name], dtype=torch.long, device=device)
        return idx

    # ---- forward -------------------------------------------------------------------

    def weight_with(self, adapter_names: Iterable[str]) -> torch.Tensor:
        """The table with the rows of `adapter_names` replaced (a new tensor; gradients reach the rows)."""
        W = self.base_layer.weight
        for name in adapter_names:
            W = W.index_copy(0, self._index(name, W.device), self.trainable_tokens_delta[name].to(W.dtype))
        return W

    def _running(self) -> list[str]:
        if self.disable_adapters or self.merged_adapters:
            return []
        return [a for a in self.active_adapters if a in self.token_indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.__dict__.get("_mixed_adapter_names")  # set by lorakern.mixed_batch
        if groups is not None and not self.disable_adapters:
            return self._mixed_forward(x, groups)
        running = self._running()
        base = self.base_layer
        if not running:  # disabled, merged (the table holds the rows) or no adapter here
            return base(x)
        return self._lookup(x, self.weight_with(running))

    def _mixed_forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        """A mixed batch (lorakern.mixed_batch): row b through the table with the rows of
        adapter groups.names[b] ("__base__", or an adapter without rows here: the table
        alone), as PEFT's mixed-batch forward of its trainable-tokens wrapper."""
        if self.merged_adapters:
            raise ValueError(
                f"cannot run a mixed batch while trainable tokens of {self.merged_adapters} are merged; unmerge() first"
            )
        if x.dim() >= 1:
            groups = groups.for_rows(x.shape[0])
        check_rows(len(groups), x, "trainable tokens", min_dim=1)
        by_table: dict[str, list[int]] = {}
        for name, members in groups.groups.items():
            by_table.setdefault(name if name in self.token_indices else "", []).extend(members)
        out = None
        for name, members in by_table.items():
            W = self.weight_with([name] if name else [])
            if len(by_table) == 1:
                return self._lookup(x, W)
            idx = torch.tensor(members, dtype=torch.long, device=x.device)
            part = self._lookup(x.index_select(0, idx), W)
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, idx, part)
        return out

    def _lookup(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The wrapped module's output with table W in place of its weight."""
        base = self.base_layer
        if isinstance(base, nn.Linear):  # an output head tied to the embedding
            return F.linear(x, W, base.bias)
        # Not sparse: the gradient goes to the rows through index_copy (PEFT passes the base's flag).
        out = F.embedding(x, W, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, False)
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their own forward
        if isinstance(scale, (int, float)):
            out = out * scale
        elif isinstance(scale, torch.Tensor):
            out = out * scale.to(out.dtype)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "token_adapter" not in self.__dict__.get("_modules", {}):
                raise
        if name == "weight":  # the table the forward uses (PEFT's wrapper does the same)
            return self.weight_with(self._running())
        return getattr(self.base_layer, name)

    # ---- merge ---------------------------------------------------------------------

    @torch.no_grad()
    def merge_adapter(self, adapter_name: str) -> None:
        """Write the adapter's rows into the table, keeping the rows it overwrites."""
        W = self.base_layer.weight
        idx = self._index(adapter_name, W.device)
        self._merged_rows[adapter_name] = (next(_MERGE_ORDER), W.index_select(0, idx).clone())
        W.index_copy_(0, idx, self.trainable_tokens_delta[adapter_name].to(W.dtype))
        self.merged_adapters.append(adapter_name)

    @torch.no_grad()
    def unmerge_adapter(self, adapter_name: str) -> None:
        """Put back the rows that merging `adapter_name` overwrote."""
        W = self.base_layer.weight
        _, rows = self._merged_rows.pop(adapter_name)
        W.index_copy_(0, self._index(adapter_name, W.device), rows.to(device=W.device, dtype=W.dtype))
        self.merged_adapters.remove(adapter_name)

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: {len(i)} rows" + (f" (tied to {self.tied_adapters[a]})" if a in self.tied_adapters else "")
                         for a, i in self.token_indices.items())


# ---- the model ---------------------------------------------------------------------


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokensWrapper]]:
    """(dotted name, wrapper) for every TrainableTokensWrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokensWrapper):
            yield name, module


@dataclass
class TokenTarget:
    """One module an adapter trains rows of: where it sits, the module there now (a plain
    nn.Embedding / nn.Linear, or a TrainableTokensWrapper of another adapter), the row ids,
    and `tied_to`: the input embedding's name when these are its rows (shared), else None."""

    name: str
    module: nn.Module
    indices: list[int]
    tied_to: str | None = None

    @property
    def base(self) -> nn.Module:
        return self.module.base_layer if isinstance(self.module, TrainableTokensWrapper) else self.module


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module under lorakern's wrappers (registered `token_adapter.base_layer`, `base_layer`
    or `original_module` children), read without attribute forwarding."""
    while True:
        if isinstance(module, TrainableTokensWrapper):
            module = module.base_layer
            continue
        inner = module._modules.get("base_layer") or module._modules.get("original_module")
        if inner is None:
            return module
        module = inner


def _table(module: nn.Module) -> torch.Tensor | None:
    weight = _unwrapped(module)._parameters.get("weight")
    return weight if isinstance(weight, torch.Tensor) else None


def _input_embedding(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> str | None:
    """The name of transformers' get_input_embeddings() among `modules`, or None."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        layer = getter()
    except (NotImplementedError, AttributeError):
        return None
    return next((n for n, m in modules if n and m is layer), None)


def _wrapper_kind(module: nn.Module) -> str | None:
    """'LoRA' or 'modules_to_save' for lorakern's other wrappers, else None."""
    if "original_module" in module._modules:
        return "modules_to_save"
    if "base_layer" in module._modules:
        return "LoRA"
    return None


def plan_trainable_tokens(
    model: nn.Module, config, modules: list[tuple[str, nn.Module]], lora_targets: set[str], saved: set[str]
) -> list[TokenTarget]:
    """The modules `config.trainable_token_indices` trains rows of, and which of them are tied
    to the input embedding. Changes nothing.

    `modules`: the model's (name, module) outside lorakern's wrappers (model.outer_modules);
    `lora_targets` / `saved`: the names this adapter puts LoRA into / wraps for modules_to_save.
    Raises ValueError for a key that matches nothing, an id out of range, two keys giving one
    module different ids, and a module that is also a LoRA target or in modules_to_save (of any
    adapter; PEFT refuses these or cannot run them); TypeError for a module that is not an
    nn.Embedding (nor an nn.Linear, for a head), or a quantized one.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return []
    embed = _input_embedding(model, modules)
    wanted = dict(spec) if isinstance(spec, dict) else {embed if embed is not None else "embed_tokens": list(spec)}
    found: dict[str, TokenTarget] = {}
    for key, ids in wanted.items():
        hits = [(n, m) for n, m in modules if n and n.endswith(key)]  # PEFT's rule: a plain suffix
        if not hits:
            tables = [n for n, m in modules if n and isinstance(_unwrapped(m), nn.Embedding)]
            raise ValueError(
                f"trainable_token_indices: {key!r} matches no module of {type(model).__name__} "
                f"(a module matches when its dotted name ends with it; embeddings: {tables[:6]})"
            )
        for n, m in hits:
            if n in found and found[n].indices != list(ids):
                raise ValueError(f"trainable_token_indices gives module {n!r} two lists of ids: {found[n].indices} and {list(ids)}")
            found[n] = TokenTarget(n, m, list(ids))
    if embed is not None and embed in found and _table(found[embed].module) is not None:
        table = _table(found[embed].module)
        for n, m in modules:
            if not n or n == embed or _table(m) is not table:
                continue
            own = found.get(n)
            if own is not None and own.indices != found[embed].indices:
                continue  # its own ids: trained on their own (PEFT: not tied)
            found[n] = TokenTarget(n, m, found[embed].indices, tied_to=embed)
    for t in found.values():
        _check_target(t, lora_targets, saved)
    return sorted(found.values(), key=lambda t: t.tied_to is not None)  # sources first


def _check_target(t: TokenTarget, lora_targets: set[str], saved: set[str]) -> None:
    why = f" (it shares its weight with the input embedding {t.tied_to!r}, whose rows it must use)" if t.tied_to else ""
    if t.name in lora_targets or any(t.name.startswith(s + ".") or t.name == s for s in saved) or _wrapper_kind(t.module):
        kind = _wrapper_kind(t.module) or ("LoRA" if t.name in lora_targets else "modules_to_save")
        raise ValueError(
            f"module {t.name!r} gets trainable tokens{why} but also has {kind} "
            f"({'a LoRA target' if kind == 'LoRA' else 'trained in full by modules_to_save'}): it cannot have both "
            "(PEFT refuses or cannot run this); drop it from one of target_modules / modules_to_save / "
            "trainable_token_indices" + (", or untie the embeddings" if t.tied_to else "")
        )
    base = t.base
    plain_linear = isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
    if not (isinstance(base, nn.Embedding) or plain_linear):
        raise TypeError(
            f"module {t.name!r} is a {type(base).__name__}{why}: trainable_token_indices trains rows of an "
            "nn.Embedding (or of an nn.Linear output head)"
        )
    bad = embedding_unsupported(base)
    if bad is not None:
        raise TypeError(f"module {t.name!r} ({type(base).__name__}): {bad.replace('LoRA on', 'trainable tokens on')}")
    rows = base.weight.shape[0]
    out = [i for i in t.indices if i >= rows]
    if out:
        raise ValueError(f"trainable_token_indices for {t.name!r}: ids {out[:8]} are out of range for its {rows} rows")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_trainable_tokens(model: nn.Module, adapter_name: str, plan: list[TokenTarget]) -> None:
    """Add `adapter_name`'s rows to the planned modules (wrapping plain ones), sources before the
    modules tied to them. Inactive until set_adapter."""
    for t in plan:
        module = model.get_submodule(t.name)
        if not isinstance(module, TrainableTokensWrapper):
            wrapper = TrainableTokensWrapper(module).train(module.training)
            _set_submodule(model, t.name, wrapper)
            module = wrapper
        tied = None
        if t.tied_to is not None:
            tied = (t.tied_to, model.get_submodule(t.tied_to).trainable_tokens_delta[adapter_name])
        module.add_adapter(adapter_name, t.indices, tied)


def check_token_adapters(model: nn.Module, names: list[str]) -> None:
    """PEFT's rule: at most one of `names` may have trainable tokens on any one module."""
    for wname, w in token_layers(model):
        owners = [n for n in names if n in w.token_indices]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each have trainable tokens on {wname!r}; activate only one of them")


def set_token_adapters(model: nn.Module, names: list[str], frozen: set[str]) -> None:
    """Activate `names` on every wrapper (check_token_adapters first); their rows become trainable,
    every other adapter's (and those in `frozen`: loaded for inference) frozen."""
    for _, w in token_layers(model):
        w.active_adapters = [n for n in names if n in w.token_indices]
    for _, w in token_layers(model):  # after all: a tied parameter belongs to two wrappers
        for n, p in w.trainable_tokens_delta.items():
            p.requires_grad_(n in names and n not in frozen)


def merged_tokens(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Names of the wrappers with `adapter_name` (any adapter, if None) merged."""
    return [n for n, w in token_layers(model) if (adapter_name in w.merged_adapters if adapter_name else w.merged)]


def merge_tokens(model: nn.Module, names: list[str], safe_merge: bool = False, *, check_only: bool = False) -> None:
    """Write the rows of `names` into the tables (skipping what is merged already).

    Refused before anything changes (ValueError): ids of two adapters that overlap within one
    module (merged ones included; PEFT's rule) and, with safe_merge, non-finite rows. Warns when
    rows that are not shared are written into a table that another module also uses (tied
    embeddings with ids of their own): the merged model then differs from the unmerged one.
    check_only: only the checks.
    """
    todo = [(wname, w, [n for n in names if n in w.token_indices and n not in w.merged_adapters])
            for wname, w in token_layers(model)]
    todo = [(wname, w, ns) for wname, w, ns in todo if ns]
    for wname, w, ns in todo:
        seen: dict[int, str] = {}
        for n in dict.fromkeys(w.merged_adapters + ns):
            clash = sorted({i for i in w.token_indices[n] if seen.get(i, n) != n})
            if clash:
                raise ValueError(
                    f"trainable tokens of adapter {n!r} on {wname!r} overlap ids {clash[:8]} of adapter "
                    f"{seen[clash[0]]!r}; merging them is undefined (as in PEFT, only disjoint ids); nothing was merged"
                )
            seen.update(dict.fromkeys(w.token_indices[n], n))
        if safe_merge:
            bad = [n for n in ns if not torch.isfinite(w.trainable_tokens_delta[n]).all()]
            if bad:
                raise ValueError(f"safe_merge: trainable tokens of {bad} on {wname!r} are not finite; nothing was merged")
    if check_only or not todo:
        return
    _warn_shared_tables(model, todo)
    for _, w, ns in todo:
        for n in ns:
            w.merge_adapter(n)


def _warn_shared_tables(model: nn.Module, todo) -> None:
    """Warn (as `merge` does for tied LoRA embeddings) when rows are about to be written into a
    table that another module uses without sharing those very rows."""
    wrapper_of = {id(w.base_layer): w for _, w in token_layers(model)}
    users: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), []).append(m)
    lonely = []
    for wname, w, ns in todo:
        others = [m for m in users.get(id(w.base_layer.weight), []) if m is not w.base_layer]
        for n in ns:
            rows = w.trainable_tokens_delta[n]
            if any(id(m) not in wrapper_of or wrapper_of[id(m)].trainable_tokens_delta.get(n) is not rows for m in others):
                lonely.append(wname)
                break
    if lonely:
        warnings.warn(
            f"trainable tokens on {lonely} are merged into a table that another module shares (tied embeddings) "
            "without sharing these rows: after merging, that module uses them too, so the merged model's outputs "
            "differ from the unmerged one's. Give the tied modules the same ids (or one list) to merge exactly.",
            UserWarning, stacklevel=5,  # the caller of merge (under its no_grad wrapper)
        )


def unmerge_tokens(model: nn.Module, adapter_name: str | None = None) -> None:
    """Put back the rows merges overwrote (of `adapter_name` only, if given), last merge first."""
    merges = [(w._merged_rows[n][0], w, n) for _, w in token_layers(model) for n in w.merged_adapters
              if adapter_name is None or n == adapter_name]
    for _, w, n in sorted(merges, key=lambda m: -m[0]):
        w.unmerge_adapter(n)


def delete_token_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name`'s rows everywhere (unmerged first); a wrapper left with no adapter
    gives way to the module it wraps."""
    unmerge_tokens(model, adapter_name)
    for name, w in reversed(list(token_layers(model))):
        if adapter_name in w.token_indices:
            w.delete_adapter(adapter_name)
            if not w.token_indices:
                _set_submodule(model, name, w.base_layer)


def unload_tokens(model: nn.Module) -> None:
    """Replace every wrapper by the module it wraps (merge or unmerge first)."""
    for name, w in reversed(list(token_layers(model))):
        _set_submodule(model, name, w.base_layer)


__all__ = [
    "TrainableTokensWrapper", "TokenAdapter", "TokenTarget", "token_layers", "plan_trainable_tokens",
    "apply_trainable_tokens", "check_token_adapters", "set_token_adapters", "merge_tokens", "merged_tokens",
    "unmerge_tokens", "delete_token_adapter", "unload_tokens",
]
