"""Model-level LoRA: inject adapters into any nn.Module, switch, combine, merge, unload.

PEFT's semantics, on the model itself (no wrapper class): `inject` swaps the targeted
nn.Linear / transformers Conv1D layers for `LoraLinear`, nn.Embedding layers for
`LoraEmbedding` and nn.Conv1d / Conv2d / Conv3d layers for `LoraConv` in place (one generic walk over
`named_modules()`, parent `setattr`), freezes the base, and wraps `modules_to_save` in
`ModulesToSave` (a trainable copy per adapter, the original kept), and the embeddings of
`trainable_token_indices` in a `TrainableTokensWrapper` (lorakern/trainable_tokens.py). Adapter bookkeeping
(configs, active adapters) lives in `model._lorakern`, an `AdapterState`.

    >>> import torch, lorakern
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> mlp = lorakern.inject(mlp, lorakern.LoraConfig(r=4, target_modules=["0", "2"]))
    >>> lorakern.trainable_parameters(mlp)
    (336, 1012)
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lorakern.config import ALL_LINEAR, DEFAULT_TARGET_MODULES, LoraConfig
from lorakern.conv import CONV_TYPES, LoraConv, conv_unsupported
from lorakern.embedding import LoraEmbedding, embedding_unsupported
from lorakern.layer import UNMERGE_TO_SET_ADAPTER, LoraLinear, is_linear_like
from lorakern.moe_targets import convert_moe_config
from lorakern.parameter import LoraParameter, innermost
from lorakern.quantized import QuantLinear
from lorakern.ops import BACKENDS
from lorakern.trainable_tokens import (
    TrainableTokensWrapper,
    apply_trainable_tokens,
    check_token_adapters,
    delete_token_adapter,
    merge_tokens,
    merged_tokens,
    plan_trainable_tokens,
    set_token_adapters,
    token_layers,
    unload_tokens,
    unmerge_tokens,
)

COMBINATION_TYPES = ("linear", "cat", "svd")
# Every LoRA layer class; all speak one protocol (held_adapters, adapter_parameters,
# lora_weights, set_adapter, delete_adapter, merge, unmerge, merged_weight, ...).
LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv, LoraParameter)
LoraLayer = LoraLinear | LoraEmbedding | LoraConv | LoraParameter


@dataclass
class AdapterState:
    """What `inject` records on a model: configs by adapter name, the active adapters,
    and the adapters loaded for inference only (kept frozen by `set_adapter`)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    inference: set[str] = field(default_factory=set)


class ModulesToSave(nn.Module):
    """A module trained in full with an adapter: `original_module` (frozen) plus one trainable
    copy per adapter in `modules_to_save[name]` (PEFT's ModulesToSaveWrapper layout, so
    state-dict keys match). Forward runs the active adapter's copy, else the original.
    Attributes not found on the wrapper (e.g. `weight`) are read from the module in use."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        for p in module.parameters():
            p.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str, source: nn.Module | None = None) -> None:
        """Add a trainable copy of `source` (default: the original module) for `adapter_name`."""
        new = copy.deepcopy(self.original_module if source is None else source).train(self.training)
        for p in new.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = new

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Own state (and anything private or asked for mid-construction / unpickling)
            # is never forwarded, so lookups cannot recurse.
            own = ("original_module", "modules_to_save", "active_adapter", "disable_adapters")
            if name.startswith("_") or name in own or "active_adapter" not in self.__dict__:
                raise
        return getattr(self.active_module(), name)


# ---- bookkeeping ------------------------------------------------------------------


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's AdapterState; ValueError if no adapter was injected."""
    state = getattr(model, "_lorakern", None)
    if not isinstance(state, AdapterState):
        raise ValueError(f"{type(model).__name__} has no lorakern adapters (call lorakern.inject first)")
    return state


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} for every adapter on the model ({} if none)."""
    state = getattr(model, "_lorakern", None)
    return dict(state.configs) if isinstance(state, AdapterState) else {}


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(adapter_state(model).active)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(dotted name, layer) for every LoRA layer (LoraLinear, LoraEmbedding, LoraConv,
    LoraParameter) in the model; nested LoraParameter wrappers outer first."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def merged_layers(model: nn.Module, adapter_name: str) -> list[str]:
    """Dotted names of the layers whose base weight has adapter `adapter_name` merged in."""
    return [name for name, layer in lora_layers(model) if adapter_name in layer.merged_adapters] + merged_tokens(model, adapter_name)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """(dotted name, wrapper) for every ModulesToSave in the model."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() minus everything inside a LoRA layer or a ModulesToSave wrapper."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (*LORA_LAYERS, ModulesToSave, TrainableTokensWrapper)):
            inside.append(name)
        yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear, quantized linear, Conv1D or LoRA layer; (num_embeddings,
    embedding_dim) of an nn.Embedding; (in_channels, out_channels) of a convolution."""
    if isinstance(module, (*LORA_LAYERS, nn.Linear, QuantLinear)):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, CONV_TYPES):
        return module.in_channels, module.out_channels
    w = module.weight  # Conv1D: [in, out]
    return w.shape[0], w.shape[1]


# ---- planning (no side effects; shared with adapters.load_adapter) ----------------


@dataclass
class Target:
    """One module an adapter goes into: its dotted name, the module, r, alpha, in/out features.

    A parameter target (config.target_parameters) also has `parameter` (its name on the
    owning module) and `owner` (the owning module's path): `name` is then where its
    LoraParameter wrapper sits once injected (owner, or owner.base_layer… when several
    parameters of one module nest), and `module` that wrapper if it exists already, else
    the owning module."""

    name: str
    module: nn.Module
    r: int
    alpha: float
    in_features: int
    out_features: int
    parameter: str | None = None
    owner: str | None = None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """config.target_modules with "all-linear" expanded to full names and None replaced by
    the architecture's default (PEFT's rules)."""
    targets = config.target_modules
    if targets is None and config.target_parameters:
        return []  # as PEFT: target_parameters alone targets no module
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"LoraConfig.target_modules is None and there is no default for model type {model_type!r}; "
                "give target_modules (a list of names, a regex, or 'all-linear')"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            head = get_out()
        return [
            name
            for name, module in outer_modules(model)
            if name and (is_linear_like(module) or isinstance(module, LoraLinear)) and module is not head
            and not (isinstance(head, ModulesToSave) and module is head.original_module)
        ]
    return targets


def plan_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules `config` puts an adapter into, with r/alpha per module. Changes nothing.

    Raises ValueError (listing some module names the model has) when nothing matches or
    the config asks for what an embedding / Conv2d target cannot have (use_dora; lora_bias
    on an embedding), TypeError when a matched module is not nn.Linear / Conv1D /
    nn.Embedding / nn.Conv2d / a LoRA layer (or is a kind of those lorakern refuses: a
    quantized embedding, a grouped or dilated convolution, ...).
    """
    config = convert_moe_config(config, model)  # PEFT's transformers-5 MoE rewrite (no-op elsewhere)
    targets = resolve_targets(model, config)
    found: list[Target] = []
    for name, module in outer_modules(model):
        if not name or not config.matches(name, targets):
            continue
        if isinstance(module, ModulesToSave):
            raise ValueError(f"module {name!r} is in another adapter's modules_to_save; it cannot also get LoRA")
        if isinstance(module, (nn.Embedding, LoraEmbedding)):
            _check_embedding_target(name, module, config)
        elif isinstance(module, (*CONV_TYPES, LoraConv)):
            _check_conv_target(name, module, config)
        elif not (is_linear_like(module) or isinstance(module, LoraLinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; lorakern's LoRA supports "
                "nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv1d / Conv2d / Conv3d"
            )
        found.append(Target(name, module, config.rank_for(name), config.alpha_for(name), *_features(module)))
    if config.target_parameters:
        found += plan_parameter_targets(model, config, {t.name for t in found})
    if not found:
        linear = [n for n, m in outer_modules(model) if n and (is_linear_like(m) or isinstance(m, LoraLinear))]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"its linear modules include {linear[:6]} (leaf names {leaves[:12]})"
        )
    return found


def plan_parameter_targets(model: nn.Module, config: LoraConfig, module_targets: set[str]) -> list[Target]:
    """The parameters `config.target_parameters` names (PEFT's rule: "<module>.<parameter>"
    equal to, or ending in "." + an entry; a module's own parameters, in registration
    order), as Targets. Changes nothing; raises ValueError for what PEFT refuses (dropout,
    DoRA, lora_bias, fan_in_fan_out), for no match, and for a module whose LoRA-wrapped
    parameters differ from this config's (all adapters must target the same parameters)."""
    for flag, bad in (("lora_dropout", config.lora_dropout != 0.0), ("use_dora", config.use_dora),
                      ("lora_bias", config.lora_bias), ("fan_in_fan_out", config.fan_in_fan_out)):
        if bad:
            raise ValueError(f"target_parameters does not work with {flag}={getattr(config, flag)!r} (as in PEFT)")
    wanted = config.target_parameters
    found: list[Target] = []
    for path, module in outer_modules(model):
        if not path:
            continue
        if isinstance(module, LoraParameter):
            chain = _wrapper_chain(module)
            owner = innermost(module)
        elif isinstance(module, (*LORA_LAYERS, ModulesToSave)):
            continue
        else:
            chain, owner = [], module
        names = [n for n, _ in owner.named_parameters(recurse=False)
                 if any(f"{path}.{n}" == w or f"{path}.{n}".endswith("." + w) for w in wanted)]
        if not names:
            continue
        if path in module_targets:
            raise ValueError(f"module {path!r} is both a target module and the owner of target parameters {names}")
        if chain and sorted(names) != sorted(w.parameter_name for w in chain):
            raise ValueError(
                f"module {path!r} has LoRA on parameters {[w.parameter_name for w in chain]}, this config targets "
                f"{names}: all adapters with target_parameters must target the same parameters (as in PEFT)"
            )
        for i, pname in enumerate(names):
            if chain:  # the wrappers exist: where each one is
                depth = next(d for d, w in enumerate(chain) if w.parameter_name == pname)
                where = chain[depth]
            else:  # wrapped in registration order, so the first one ends innermost
                depth, where = len(names) - 1 - i, owner
            key = f"{path}.{pname}"
            r, alpha = config.rank_for(key), config.alpha_for(key)
            probe = getattr(owner, pname)
            if probe.dim() not in (2, 3) or not probe.is_floating_point():
                raise ValueError(f"target parameter {key!r} has shape {tuple(probe.shape)} and dtype {probe.dtype}: "
                                 "LoRA on a parameter needs a floating 2-D or 3-D one")
            in_f, out_f = _param_features(owner, probe)
            found.append(Target(path + ".base_layer" * depth, where, r, alpha, in_f, out_f, parameter=pname, owner=path))
    if not found:
        raise ValueError(f"target_parameters={wanted!r} were set but no parameter of {type(model).__name__} matched")
    return found


def _wrapper_chain(module: LoraParameter) -> list[LoraParameter]:
    """The LoraParameter wrappers from `module` inwards."""
    chain = []
    while isinstance(module, LoraParameter):
        chain.append(module)
        module = module.base_layer
    return chain


def _param_features(owner: nn.Module, param: torch.Tensor) -> tuple[int, int]:
    """(in, out) of a targeted parameter, as LoraParameter reads them (per expert for 3-D)."""
    if param.dim() == 2:
        return param.shape[1], param.shape[0]
    if getattr(owner, "is_transposed", False):
        return param.shape[1], param.shape[2]
    return param.shape[2], param.shape[1]


def _check_embedding_target(name: str, module: nn.Module, config: LoraConfig) -> None:
    """Refuse (before anything changes) what LoRA on an embedding does not support."""
    if config.use_dora:
        raise ValueError(f"target module {name!r} is an embedding: use_dora=True (DoRA) is not implemented for embeddings")
    if config.lora_bias:
        raise ValueError(f"target module {name!r} is an embedding: lora_bias=True is not supported for embeddings (as in PEFT)")
    if isinstance(module, nn.Embedding):
        why = embedding_unsupported(module)
        if why is not None:
            raise TypeError(f"target module {name!r} ({type(module).__name__}): {why}")


def innermost_conv(module: nn.Module) -> nn.Module:
    """The convolution itself (a LoraConv's base layer)."""
    return module.base_layer if isinstance(module, LoraConv) else module


def _check_conv_target(name: str, module: nn.Module, config: LoraConfig) -> None:
    """Refuse (before anything changes) what LoRA on a convolution does not support."""
    if config.use_dora:
        raise ValueError(
            f"target module {name!r} is a {type(innermost_conv(module)).__name__}: use_dora=True (DoRA) is not "
            "implemented for convolutions"
        )
    if isinstance(module, CONV_TYPES):
        why = conv_unsupported(module)
        if why is not None:
            raise TypeError(f"target module {name!r} ({type(module).__name__}): {why}")


def plan_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) for each module `config.modules_to_save` wraps (existing wrappers included)."""
    if not config.modules_to_save:
        return []
    out = []
    for name, module in outer_modules(model):
        if not name or not config.module_to_save(name):
            continue
        if isinstance(module, LORA_LAYERS):
            raise ValueError(f"module {name!r} has LoRA adapters; it cannot also be in modules_to_save")
        if not isinstance(module, ModulesToSave) and any(isinstance(m, (*LORA_LAYERS, ModulesToSave, TrainableTokensWrapper)) for m in module.modules()):
            raise ValueError(f"module {name!r} contains LoRA layers, saved modules or trainable tokens; it cannot be in modules_to_save")
        out.append((name, module))
    return out


# ---- inject / switch / delete -----------------------------------------------------


def inject(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, backend: str = "auto"
) -> nn.Module:
    """Add adapter `adapter_name` to `model` in place and return the model.

    Targeted nn.Linear / Conv1D layers become LoraLinear (a Conv1D keeps its [in, out]
    weight, used through a transposed view), nn.Embedding layers LoraEmbedding, nn.Conv1d /
    Conv2d / Conv3d layers LoraConv; every base parameter is frozen; modules in
    `config.modules_to_save` get a trainable copy (original kept, restorable by `unload`);
    biases become trainable per `config.bias`. As in PEFT, the first adapter becomes
    active; a further adapter (another `inject` call) is added inactive and frozen
    until `set_adapter` selects it.

    Args:
        model: any nn.Module (e.g. a transformers model built from a config).
        config: the LoraConfig.
        adapter_name: a new name (no dots).
        backend: op backend for the new LoraLinear layers.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakern.LoraConfig, got {type(config).__name__}")
    config = convert_moe_config(config, model)  # stored as PEFT stores it: rewritten
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without dots, got {adapter_name!r}")
    state = getattr(model, "_lorakern", None)
    if isinstance(state, AdapterState) and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
    targets = plan_targets(model, config)
    taken = [t.name for t in targets if isinstance(t.module, LORA_LAYERS) and adapter_name in t.module.held_adapters()]
    if taken:
        raise ValueError(f"layers {taken[:4]} already have an adapter named {adapter_name!r}")
    to_save = plan_modules_to_save(model, config)
    tokens = plan_trainable_tokens(model, config, list(outer_modules(model)), {t.name for t in targets}, {n for n, _ in to_save})
    if backend not in BACKENDS:  # before the model changes
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return inject_planned(model, config, adapter_name, targets, to_save, backend=backend, inference=False, tokens=tokens)


def inject_planned(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    targets: list[Target],
    to_save: list[tuple[str, nn.Module]],
    *,
    backend: str = "auto",
    inference: bool = False,
    tokens: list | tuple = (),
) -> nn.Module:
    """`inject` after planning: put adapter `adapter_name` into `targets` (from
    `plan_targets`), wrap `to_save` (from `plan_modules_to_save`) and add the trainable
    tokens `tokens` (from `plan_trainable_tokens`). inference=True adds
    it frozen (and keeps it frozen on `set_adapter`), as `load_adapter(is_trainable=False)`."""
    _check_targets_not_saved(targets, to_save)
    state = getattr(model, "_lorakern", None)
    if not isinstance(state, AdapterState):
        state = AdapterState()
        for p in model.parameters():
            p.requires_grad_(False)
    stored = replace(config)
    if config.target_modules is None and not config.target_parameters:
        stored.target_modules = resolve_targets(model, config)
    for t in targets:
        dropout = config.lora_dropout
        if t.parameter is not None and not isinstance(t.module, LoraParameter):
            # wraps whatever sits at the owner's path now: the owning module, or the wrapper
            # of a parameter registered before this one (PEFT's nesting)
            layer = LoraParameter(
                model.get_submodule(t.owner), t.parameter, t.r, t.alpha, dropout, config.use_rslora,
                config.init_lora_weights, adapter_name,
            )
            layer.active_adapters = []
            layer.train(model.get_submodule(t.owner).training)
            _set_submodule(model, t.owner, layer)
        elif isinstance(t.module, LORA_LAYERS):
            previous = list(t.module.active_adapters)
            t.module.update_layer(
                adapter_name, t.r, t.alpha, dropout, config.use_rslora, config.init_lora_weights, config.use_dora,
                config.lora_bias,
            )
            t.module.active_adapters = previous
        elif isinstance(t.module, (nn.Embedding, *CONV_TYPES)):
            kind = LoraEmbedding if isinstance(t.module, nn.Embedding) else LoraConv
            layer = kind(
                t.module, t.r, t.alpha, dropout, config.use_rslora, config.init_lora_weights, adapter_name,
                lora_bias=config.lora_bias,
            )
            layer.active_adapters = []
            layer.train(t.module.training)
            _set_submodule(model, t.name, layer)
        else:
            layer = LoraLinear(
                t.module, t.r, t.alpha, dropout, config.use_rslora, config.init_lora_weights,
                adapter_name, backend, fan_in_fan_out=config.fan_in_fan_out, use_dora=config.use_dora,
                lora_bias=config.lora_bias,
            )
            layer.active_adapters = []
            layer.train(t.module.training)  # injection never changes train/eval mode
            _set_submodule(model, t.name, layer)
    for name, module in to_save:
        if isinstance(module, ModulesToSave):
            module.update(adapter_name)
        else:
            _set_submodule(model, name, ModulesToSave(module, adapter_name).train(module.training))
    apply_trainable_tokens(model, adapter_name, list(tokens))
    state.configs[adapter_name] = stored
    if inference:
        state.inference.add(adapter_name)
    model._lorakern = state
    if "transformers" in sys.modules:  # a transformers model's save_pretrained writes the adapters (lorakern.hf)
        from lorakern.hf import install_save_pretrained

        install_save_pretrained(model)
    set_adapter(model, state.active or [adapter_name])
    if not inference and adapter_name in state.active:
        _mark_biases(model, config)
    return model


def _check_targets_not_saved(targets: list[Target], to_save: list[tuple[str, nn.Module]]) -> None:
    """Raise ValueError (before anything changes) when a LoRA target is also, or lies inside, a
    modules_to_save module of the same adapter.

    Both plans look at the unmodified model, and the two rules differ: targeting excludes
    whole dotted components of modules_to_save, wrapping matches a plain suffix (both as in
    PEFT). So modules_to_save=["proj"] plans LoRA for `q_proj` and also wraps it; wrapping
    after injecting would copy the pre-LoRA module and drop the LoRA layer. PEFT raises
    here too (its ModulesToSaveWrapper refuses a LoRA layer). A target inside a wrapped
    module is refused as well, as plan_modules_to_save refuses a module holding LoRA layers.
    """
    for t in targets:
        for name, _ in to_save:
            if t.name == name:
                where = "is also in modules_to_save"
            elif t.name.startswith(name + "."):
                where = f"lies inside the modules_to_save module {name!r}"
            else:
                continue
            raise ValueError(
                f"module {t.name!r} is a LoRA target and {where}; it cannot be both "
                "(change target_modules, exclude_modules or modules_to_save)"
            )


def is_bias(name: str) -> bool:
    """PEFT's test for a bias (bias="all"): the parameter is named `bias`. A substring test
    would also take e.g. T5's `relative_attention_bias.weight`, an embedding table."""
    return name == "bias" or name.endswith(".bias")


def bias_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, param) of every bias parameter (`is_bias`) outside LoRA A/B and saved-module
    wrappers (those are saved as the modules' own state dicts): what bias="all" trains and saves."""
    skip = {id(p) for _, w in saved_modules(model) for p in w.parameters()}
    for _, layer in lora_layers(model):
        skip.update(id(p) for n in layer.held_adapters() for p in layer.adapter_parameters(n))
    return [(n, p) for n, p in model.named_parameters() if is_bias(n) and id(p) not in skip]


def _mark_biases(model: nn.Module, config: LoraConfig) -> None:
    if config.bias == "all":
        for _, p in bias_params(model):
            p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:  # an nn.Embedding has none
                layer.base_layer.bias.requires_grad_(True)


def _check_names(state: AdapterState, names: list[str]) -> None:
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {list(state.configs)}")


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Activate one adapter or several (their outputs are summed, each with its own scaling).

    The active adapters' parameters become trainable and the others frozen (adapters loaded
    with is_trainable=False stay frozen). Several active adapters may not each have a copy
    of the same modules_to_save module. As in PEFT, a merged model is unmerged first, with
    a warning (merged layers run their base weight alone, which would ignore the switch);
    `merge` again afterwards if wanted. A refused call changes nothing.
    """
    state = adapter_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name")
    _check_names(state, names)
    for wname, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each have a copy of {wname!r} (modules_to_save); activate only one")
    check_token_adapters(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers) or merged_tokens(model):
        warnings.warn(UNMERGE_TO_SET_ADAPTER, stacklevel=2)  # once, not once per layer
        for layer in layers:
            layer.unmerge()
        unmerge_tokens(model)
    for layer in layers:
        layer.set_adapter(names)
        for n in state.inference & set(layer.held_adapters()):
            for p in layer.adapter_parameters(n):  # A, B (B's bias, DoRA's magnitude)
                p.requires_grad_(False)
    for _, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        wrapper.active_adapter = owners[0] if owners else None
        for n, m in wrapper.modules_to_save.items():
            for p in m.parameters():
                p.requires_grad_(n in owners and n not in state.inference)
    set_token_adapters(model, names, state.inference)
    state.active = names


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere (unmerging it first where merged). Layers or saved modules
    left with no adapter go back to the plain module. If it was active, the remaining active
    adapters stay active, or the first remaining adapter is activated."""
    state = adapter_state(model)
    _check_names(state, [adapter_name])
    for name, layer in reversed(list(lora_layers(model))):  # nested wrappers: innermost first
        if adapter_name in layer.held_adapters():
            layer.delete_adapter(adapter_name)
            if not layer.held_adapters():
                _set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
            if not wrapper.modules_to_save:
                _set_submodule(model, name, wrapper.original_module)
    delete_token_adapter(model, adapter_name)
    del state.configs[adapter_name]
    state.inference.discard(adapter_name)
    active = [a for a in state.active if a != adapter_name]
    if not state.configs:
        del model._lorakern
        return
    set_adapter(model, active or [next(iter(state.configs))])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model runs as the base model (merged adapters are
    unmerged on the first forward, as in PEFT; saved modules use their originals)."""
    adapter_state(model)
    layers = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)] + [m for _, m in token_layers(model)]
    before = [m.disable_adapters for m in layers]
    unmerge_tokens(model)  # a merged row would stay in the base table: put the originals back now
    try:
        for m in layers:
            m.disable_adapters = True
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.disable_adapters = flag


# ---- combine ----------------------------------------------------------------------


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Add adapter `adapter_name` combining `adapters` with `weights`, PEFT's definitions.

    With ΔW_i = s_i·B_i A_i:
    - "linear": all ranks equal r; A = Σ sign(w_i s_i)·sqrt|w_i s_i|·A_i, B = Σ sqrt|w_i s_i|·B_i
      (a rough approximation, not Σ w_i ΔW_i).
    - "cat": r = Σ r_i; A = [w_1 s_1 A_1; …], B = [B_1 | …]: exactly Σ w_i ΔW_i.
    - "svd": truncated SVD of Σ w_i ΔW_i to rank `svd_rank` (default: the largest r_i).
    The new adapter has lora_alpha = r (scaling 1), no rank/alpha patterns and no rsLoRA
    (PEFT keeps use_rslora from the first adapter, which would rescale the result by
    sqrt(r); lorakern does not). It is added inactive and frozen. A single adapter is
    always combined "linear" (as PEFT does). A modules_to_save copy is carried over when
    exactly one of `adapters` has one for that module.
    """
    state = adapter_state(model)
    _check_names(state, list(adapters))
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    cfgs = [state.configs[a] for a in adapters]
    if any(c.use_dora for c in cfgs):
        raise ValueError("adapters with use_dora=True cannot be combined (their magnitudes do not add)")
    if any(c.lora_bias for c in cfgs):
        raise ValueError("adapters with lora_bias=True cannot be combined (not implemented)")
    if any(c.target_parameters for c in cfgs):
        raise ValueError("adapters with target_parameters (LoRA on expert parameters) cannot be combined (not implemented)")
    if any(c.trainable_token_indices for c in cfgs):
        raise ValueError("adapters with trainable_token_indices cannot be combined (not implemented)")
    wrappers = list(saved_modules(model))
    for wname, wrapper in wrappers:
        if sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError(f"adapters {adapters} share the modules_to_save module {wname!r}; they cannot be combined")
    if len(adapters) == 1:
        combination_type = "linear"
    new_r = _combined_rank(combination_type, adapters, [max([c.r, *c.rank_pattern.values()]) for c in cfgs], svd_rank)
    kinds = {type(c.target_modules) for c in cfgs}
    if len(kinds) > 1:
        raise ValueError("cannot combine adapters whose target_modules mix lists and regex strings")
    if isinstance(cfgs[0].target_modules, str):
        new_targets: list[str] | str = "|".join(f"({c.target_modules})" for c in cfgs)
    else:
        new_targets = sorted({t for c in cfgs for t in c.target_modules})
    # The new adapter goes exactly where any of the combined adapters is.
    where = [name for name, layer in lora_layers(model) if any(a in layer.held_adapters() for a in adapters)]
    saved = [(n, w) for n, w in wrappers if any(a in w.modules_to_save for a in adapters)]
    new_cfg = replace(
        cfgs[0], r=new_r, lora_alpha=new_r, target_modules=new_targets, rank_pattern={}, alpha_pattern={},
        use_rslora=False, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
        modules_to_save=sorted(n for n, _ in saved) or None,
    )
    targets = [Target(n, model.get_submodule(n), new_r, new_r, *_features(model.get_submodule(n))) for n in where]
    for n, t in zip(where, targets):
        layer = t.module
        some = next(a for a in adapters if a in layer.held_adapters())
        width = layer.lora_weights(some)[0][0].numel()  # in (in·kh·kw for a Conv2d: ΔW as a matrix)
        if combination_type == "svd" and new_r > min(width, layer.out_features):
            raise ValueError(f"svd_rank {new_r} > min(in, out) = {min(width, layer.out_features)} of {n!r}")
    with torch.random.fork_rng(devices=[]):
        inject_planned(model, new_cfg, adapter_name, targets, [], inference=False)
    for _, wrapper in saved:
        source = next(wrapper.modules_to_save[a] for a in adapters if a in wrapper.modules_to_save)
        wrapper.update(adapter_name, source)
    combine = _COMBINE[combination_type]
    for t in targets:
        layer: LoraLayer = t.module
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.held_adapters()]
        combine(layer, present, *layer.lora_weights(adapter_name))
    # Added frozen and inactive, as in PEFT.
    for t in targets:
        for p in t.module.adapter_parameters(adapter_name):
            p.requires_grad_(False)
    for _, wrapper in saved:
        for p in wrapper.modules_to_save[adapter_name].parameters():
            p.requires_grad_(False)


def _combined_rank(combination_type: str, adapters: list[str], ranks: list[int], svd_rank: int | None) -> int:
    """The rank of the combined adapter: r ("linear", equal ranks), Σ r_i ("cat"), svd_rank or max r_i ("svd")."""
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks, got {dict(zip(adapters, ranks))}")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _held_weights(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A[:r], B[:, :r]): the adapter at its own rank r. prepare_model_for_compiled_hotswap
    zero-pads A's rows and B's columns to its target_rank (r unchanged), so the combinations
    see the same ranks, and the same ΔW, as on an unpadded model."""
    A, B = layer.lora_weights(adapter_name)
    r = layer.r[adapter_name]
    if isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv)) and A.shape[0] > r:
        return A[:r], B[:, :r]
    return A, B


@torch.no_grad()
def _combine_linear(layer: LoraLayer, present: list[tuple[str, float]], A_new: torch.Tensor, B_new: torch.Tensor) -> None:
    """A = Σ sign(w s)·sqrt|w s|·A_i, B = Σ sqrt|w s|·B_i (PEFT's "linear"), summed in fp32."""
    A_sum = torch.zeros_like(A_new, dtype=torch.float32)
    B_sum = torch.zeros_like(B_new, dtype=torch.float32)
    for a, w in present:
        ws = w * layer.scaling[a]
        root = math.sqrt(abs(ws))
        A, B = _held_weights(layer, a)  # rank r_i <= A_new's: the rest stays zero
        A_sum[: A.shape[0]] += (root if ws >= 0 else -root) * A.float()
        B_sum[:, : B.shape[1]] += root * B.float()
    A_new.copy_(A_sum)
    B_new.copy_(B_sum)


@torch.no_grad()
def _combine_cat(layer: LoraLayer, present: list[tuple[str, float]], A_new: torch.Tensor, B_new: torch.Tensor) -> None:
    """A = [w_1 s_1 A_1; …], B = [B_1 | …]: exactly Σ w_i ΔW_i (zero rows / columns pad it)."""
    As = torch.cat([_held_weights(layer, a)[0].float() * (w * layer.scaling[a]) for a, w in present], 0)
    Bs = torch.cat([_held_weights(layer, a)[1].float() for a, _ in present], 1)
    A_new.zero_()
    B_new.zero_()
    A_new[: As.shape[0]] = As.to(A_new.dtype)
    B_new[:, : Bs.shape[1]] = Bs.to(B_new.dtype)


@torch.no_grad()
def _combine_svd(layer: LoraLayer, present: list[tuple[str, float]], A_new: torch.Tensor, B_new: torch.Tensor) -> None:
    """Truncated SVD of Σ w_i ΔW_i to A_new's rank: B = U S, A = Vᴴ (ΔW_i = s_i·B_i A_i [out, in],
    also for an embedding, whose base table is [in, out]; a Conv2d's A [r, in, kh, kw] and
    B [out, r, 1, 1] as matrices [r, in·kh·kw] and [out, r], as PEFT)."""
    r = A_new.shape[0]
    delta = sum(w * _delta_out_in(layer, a) for a, w in present)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B_new.copy_((U[:, :r] * S[:r]).reshape(B_new.shape))
    A_new.copy_(Vh[:r].reshape(A_new.shape))


def _delta_out_in(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """s·B A [out, in] in fp32 (LoraLinear.get_delta_weight's value, for every layer kind;
    a Conv2d's [out, in·kh·kw])."""
    A, B = _held_weights(layer, adapter_name)
    return (B.flatten(1).float() @ A.flatten(1).float()) * layer.scaling[adapter_name]


_COMBINE = {"linear": _combine_linear, "cat": _combine_cat, "svd": _combine_svd}


# ---- merge / unload ---------------------------------------------------------------


@torch.no_grad()
def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Add s·B A into the base weights for `adapter_names` (default: the active adapters).

    Deltas are summed in fp32 and cast to the weight's dtype once. After merging, the
    layers run as plain linears (until `unmerge`, or `set_adapter`, which unmerges first).
    safe_merge: every merged weight is computed and checked to be finite first; if any is
    not, ValueError names the layers and no weight is changed. Saved modules are not
    affected (they already hold their trained copies).

    Precision of a merge/unmerge round trip: fp32 weights come back within 1e-6 relative;
    a bf16 (u = 2⁻⁸) weight element W moves by at most u·|W+ΔW| + u·(|W| + u·|W+ΔW|)
    (one rounding when merging, one when unmerging; ΔW itself stays in fp32).
    """
    state = adapter_state(model)
    names = list(state.active) if adapter_names is None else list(adapter_names)
    _check_names(state, names)
    layers = list(lora_layers(model))
    no_bias = [lname for lname, layer in layers if getattr(layer.base_layer, "bias", None) is None
               and any(layer.lora_bias.get(n, False) and n not in layer.merged_adapters for n in names)]
    if no_bias:  # checked first: nothing is merged
        raise RuntimeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: "
            f"{no_bias[:8]}; nothing was merged"
        )
    merge_tokens(model, names, safe_merge, check_only=True)  # overlapping ids, non-finite rows: nothing merged
    if safe_merge:
        bad = []
        for lname, layer in layers:
            todo = [n for n in names if n in layer.held_adapters() and n not in layer.merged_adapters]
            if todo and not torch.isfinite(layer.merged_weight(todo)).all():
                bad.append(lname)
        if bad:
            raise ValueError(f"safe_merge: merging {names} gives non-finite weights in {bad[:8]}; nothing was merged")
    _warn_tied_embeddings(model, [(n, layer) for n, layer in layers if any(a in layer.held_adapters() for a in names)])
    for _, layer in layers:
        todo = [n for n in names if n in layer.held_adapters()]
        if todo:
            layer.merge(todo)
    merge_tokens(model, names, safe_merge)


def _warn_tied_embeddings(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    """PEFT's warning when a LoRA embedding about to be merged shares its table with another
    module (tied input / output embeddings): the merged delta reaches that module too."""
    tied = []
    for name, layer in layers:
        if not isinstance(layer, LoraEmbedding):
            continue
        w = layer.base_layer.weight
        owners = [m for m in model.modules() if any(p is w for p in m.parameters(recurse=False))]
        if len(owners) > 1:
            tied.append(name)
    if tied:
        warnings.warn(
            f"the LoRA embedding(s) {tied} share their weight with another module (tied word embeddings): "
            "merging changes that module too, so the merged model's outputs differ from the unmerged one's. "
            "Untie the embeddings (e.g. load the model with tie_word_embeddings=False) to merge exactly.",
            UserWarning, stacklevel=4,  # the caller of merge (under its no_grad wrapper)
        )


_merge_fn = merge


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (fp32, cast once)."""
    adapter_state(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
    unmerge_tokens(model)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove lorakern from `model` and return it with plain modules.

    merge=True: the active adapters are merged into the base weights first (PEFT's
    merge_and_unload). merge=False (PEFT's unload): merged adapters are unmerged, so the
    LoRA layers' base layers come back with their original weights (PEFT's unload leaves
    merged deltas in). Either way, as PEFT does, each modules_to_save module is replaced by
    the active adapter's (trained) copy, or by the original module where no active adapter
    has a copy; `disable_adapters` does not change that. Base parameters stay frozen; a kept
    copy keeps its requires_grad flags.
    """
    state = adapter_state(model)
    if merge:
        _merge_fn(model)
    else:
        unmerge(model)
    for name, layer in reversed(list(lora_layers(model))):  # nested wrappers: innermost first
        _set_submodule(model, name, layer.base_layer)
    unload_tokens(model)
    for name, wrapper in list(saved_modules(model)):
        active = wrapper.active_adapter
        keep = wrapper.modules_to_save[active] if active in wrapper.modules_to_save else wrapper.original_module
        _set_submodule(model, name, keep)
    del state
    del model._lorakern
    return model


# ---- counting -----------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once.

    Quantized weights count as the parameters they stand for, as PEFT counts them: a
    bitsandbytes Params4bit packs two per byte of its storage; a QuantLinear's weight is a
    buffer of out × in values."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def trainable_parameters_summary(model: nn.Module) -> str:
    """PEFT's one-line summary: ``trainable params: 9,728 || all params: 108,352 || trainable%: 8.9781``."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable_parameters_summary(model)` (PEFT's method of the same name)."""
    print(trainable_parameters_summary(model))
