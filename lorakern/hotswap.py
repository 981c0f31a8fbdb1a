"""Hot-swap an adapter's weights in place, PEFT's semantics, without recompiling.

`hotswap_adapter(model, path, "default")` replaces the weights of an adapter the model
already holds with those of a PEFT-format adapter directory, by copying into the
existing tensors (``param.copy_`` under no_grad): the parameters stay the same objects
with the same storage, so a ``torch.compile``d model, a CUDA graph or an optimizer keeps
pointing at them. Scalings go into the layers' `ScalarDict`s, whose tensor mirrors a
compiled graph reads, so a new r or lora_alpha does not recompile either.

Ranks: the tensors keep their shapes. A file whose rank r is smaller than the rank the
model stores (R) is written into the first r rows of A and the first r columns of B, the
rest zeroed: (B_pad A_pad) = B A exactly, and the scaling is the file's alpha / r (as a
normal load gives), never alpha / R. To swap in adapters of several ranks into a compiled
model, call `prepare_model_for_compiled_hotswap(model, target_rank=max rank)` before
compiling: it zero-pads every adapter to that rank (outputs unchanged). A file of a rank
above R is refused (its tensors would not fit the compiled shapes).

What may differ between the model's adapter and the file: r, lora_alpha, rank_pattern,
alpha_pattern, use_rslora and lora_dropout (the layers take the file's values; PEFT
refuses use_rslora, lora_dropout and alpha_pattern changes, lorakern applies them), and
the weights. What must be the same (refused otherwise): the modules the adapter is in,
use_dora, lora_bias, fan_in_fan_out, bias and modules_to_save.

Everything is read and checked (files, keys, shapes, ranks, dtypes, finite values in the
destination dtype) before the model changes; an error while writing (an interrupt) puts
back the old values. A failed swap leaves the model exactly as it was.

Padded adapters elsewhere in lorakern: `save_adapter` writes each adapter at its own rank
(A[:r], B[:, :r]; exact, the padding stays zero through training) with a config giving
those ranks, loadable by lorakern and PEFT, and refuses padding that is not zero;
`lorakern.hf.save_pretrained(..., state_dict=...)` (the Trainer under ZeRO-3 / FSDP) does
the same from the state dict's tensors; `load_adapter` into a padded adapter of the same
name (same r and alpha) fills its leading rows / columns and zeroes the rest;
`add_weighted_adapter` combines each adapter's own-rank slice. LoraLinear, LoraEmbedding and LoraConv read their scalings as tensor mirrors when
traced, so a changed scaling does not recompile any of them.

Known gaps: `add_weighted_adapter` takes the combined rank from the configs, so after
``prepare_model_for_compiled_hotswap(config=...)`` (r = target_rank) the combined adapter
is larger than on an unpadded model ("cat": the sum of the target ranks, the extra rows
zero; "linear": target_rank, likewise), and "svd" truncates to target_rank (or refuses
it, "svd_rank > min(in, out)", where a layer is narrower). LoraConv's dropout p is a
Python float (F.dropout): in training mode a hot-swap that changes lora_dropout
recompiles. Adapters on parameters (`target_parameters`, LoraParameter) hold one rank-r
block per expert (A [r·E, in]): prepare refuses to pad them, and a hot-swap there needs a
file of the same rank; their scalings are Python floats (a plain dict), so under
torch.compile a hot-swap that changes their scaling recompiles.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from lorakern.adapters import RANK_DIM, AdapterLoadError, _convert, _match, _read, _Slot, _write_values, pad_rank
from lorakern.config import LoraConfig
from lorakern.conv import LoraConv
from lorakern.embedding import LoraEmbedding
from lorakern.layer import LoraLinear
from lorakern.model import adapter_state, lora_layers, merged_layers, resolve_targets, saved_modules

# The file's tensors that belong to a LoRA layer's adapter; A and B carry the rank (RANK_DIM).
_LAYER_WHATS = (*RANK_DIM, "lora_B_bias", "lora_magnitude_vector")
# Config fields a hot-swap cannot change (the structure of the adapter, or what else it saves).
_FIXED = ("use_dora", "lora_bias", "fan_in_fan_out", "bias")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)`` (an OptimizedModule keeps it as _orig_mod)."""
    return getattr(model, "_orig_mod", model)


# ---- hotswap_adapter ----------------------------------------------------------------


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    torch_device: str | torch.device | None = None,
) -> None:
    """Replace adapter `adapter_name`'s weights with the adapter in directory
    `model_name_or_path` (PEFT format), in place: no new parameters, no recompilation.

    PEFT's ``peft.utils.hotswap.hotswap_adapter`` on a lorakern model (which may be the
    ``torch.compile``d wrapper). The result equals loading the file normally
    (`lorakern.load_adapter` into a fresh model): same weights, r, lora_alpha, scaling,
    use_rslora and dropout per layer, and the model's stored config becomes the file's.
    A file of smaller rank than the model stores is zero-padded (see the module
    docstring; `prepare_model_for_compiled_hotswap`); a larger one is refused.

    Args:
        model: a model holding adapter `adapter_name` (or torch.compile's wrapper of it).
        model_name_or_path: a local adapter directory (adapter_config.json +
            adapter_model.safetensors, or a legacy adapter_model.bin); never downloads.
        adapter_name: the adapter to replace; it keeps its name, activity and trainability.
        torch_device: accepted for PEFT's signature; the file is read there first, and
            every value lands on the device (and dtype) of the tensor it replaces.

    Raises (the model unchanged): ValueError if the model has no such adapter or it is
    merged; FileNotFoundError for a missing directory / file; AdapterLoadError (a
    ValueError) when the file does not fit: other modules, another use_dora / lora_bias /
    fan_in_fan_out / bias / modules_to_save, a rank above the stored one, missing or
    unexpected keys, bad shapes, values not finite in the destination dtype.

    Example:
        >>> lorakern.prepare_model_for_compiled_hotswap(model, target_rank=16)   # doctest: +SKIP
        >>> compiled = torch.compile(model)                                        # doctest: +SKIP
        >>> lorakern.hotswap_adapter(compiled, "adapter-2", "default")            # doctest: +SKIP
    """
    model = _unwrap(model)
    state = adapter_state(model)
    if adapter_name not in state.configs:
        raise ValueError(
            f"no adapter named {adapter_name!r} to hot-swap; the model has {list(state.configs)} "
            "(load the first adapter with lorakern.load_adapter)"
        )
    merged = merged_layers(model, adapter_name)
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into {len(merged)} layer(s), e.g. {merged[:3]}; "
            "call lorakern.unmerge(model) before hot-swapping it"
        )
    device = None if torch_device is None else torch.device(torch_device)
    path = Path(model_name_or_path)
    plan = _plan(model, path, adapter_name, state.configs[adapter_name], device)
    stored = replace(plan.config)
    if stored.target_modules is None:  # as inject records it
        stored.target_modules = resolve_targets(model, plan.config)
    _apply(model, adapter_name, plan)
    state.configs[adapter_name] = stored


class _Plan(NamedTuple):
    """A checked hot-swap: the values to write (converted, padded) and where they go."""

    config: LoraConfig
    targets: list  # lorakern.model.Target per LoRA layer
    exp: dict[str, _Slot]  # canonical key -> slot, `current` the tensor it overwrites
    values: dict[str, torch.Tensor]
    found: dict[str, torch.Tensor]  # the file's tensors, as read
    path: Path


def _plan(model: nn.Module, path: Path, adapter_name: str, old: LoraConfig, device) -> _Plan:
    """Read the directory and check it against the model: match → rank → convert → pad.
    Changes nothing."""
    files = _read(path)
    config, tensors = files.config, files.tensors
    if files.mix:
        raise AdapterLoadError(files.mix)
    _check_fixed_fields(path, old, config)
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    # Matched as a fresh load would match it (shapes from the file's own r per module),
    # so keys, shapes and dtypes are checked exactly as load_adapter checks them.
    targets, to_save, exp, found = _match(model, path, config, tensors, adapter_name, existing=False)
    _check_same_modules(model, path, adapter_name, targets, to_save)
    exp = _bind_destinations(model, adapter_name, exp)
    _check_ranks(path, exp, found, _padless(model))
    values = _convert(model, path, exp, found)  # in each destination's dtype, finite there
    values = {ck: pad_rank(v, exp[ck]) for ck, v in values.items()}
    return _Plan(config, targets, exp, values, found, path)


def _check_fixed_fields(path: Path, old: LoraConfig, new: LoraConfig) -> None:
    differ = [f"{k}: {getattr(old, k)!r} in the model, {getattr(new, k)!r} in the file"
              for k in _FIXED if getattr(old, k) != getattr(new, k)]
    if differ:
        raise AdapterLoadError(f"cannot hot-swap the adapter in {str(path)!r}: " + "; ".join(differ)
                               + " (these cannot change in place; load it as a new adapter)")


def _check_same_modules(model: nn.Module, path: Path, adapter_name: str, targets, to_save) -> None:
    """The file's adapter must sit in exactly the modules that hold `adapter_name`
    (LoRA layers, and modules_to_save copies): a new module would need new layers, that
    is a new graph."""
    have = {n for n, layer in lora_layers(model) if adapter_name in layer.held_adapters()}
    want = {t.name for t in targets}
    saved_have = {n for n, w in saved_modules(model) if adapter_name in w.modules_to_save}
    saved_want = {n for n, _ in to_save}
    problems = []
    if have != want:
        problems.append(
            f"LoRA modules only in the model {sorted(have - want)[:5]}, only in the file {sorted(want - have)[:5]}"
        )
    if saved_have != saved_want:
        problems.append(f"modules_to_save only in the model {sorted(saved_have - saved_want)[:5]}, "
                        f"only in the file {sorted(saved_want - saved_have)[:5]}")
    if problems:
        raise AdapterLoadError(
            f"cannot hot-swap adapter {adapter_name!r} with the one in {str(path)!r}: they target different modules ("
            + "; ".join(problems) + "); hot-swapping needs the same modules"
        )


def _destination(model_layers: dict, wrappers: dict, adapter_name: str, ck: str, slot: _Slot) -> torch.Tensor:
    """The tensor of the model that the file's key `ck` overwrites (as _write_values finds it)."""
    if slot.what in ("lora_A", "lora_B", "lora_magnitude_vector"):
        return getattr(model_layers[slot.module], slot.what)[adapter_name].weight
    if slot.what in ("lora_embedding_A", "lora_embedding_B"):
        return getattr(model_layers[slot.module], slot.what)[adapter_name]
    if slot.what == "lora_B_bias":
        return model_layers[slot.module].lora_B[adapter_name].bias
    if slot.what == "modules_to_save":
        copy_sd = wrappers[slot.module].modules_to_save[adapter_name].state_dict(keep_vars=True)
        return copy_sd[ck[len(slot.module) + 1:]]
    return slot.current  # base biases, embedding weights: the model's own tensors


def _bind_destinations(model: nn.Module, adapter_name: str, exp: dict[str, _Slot]) -> dict[str, _Slot]:
    """The slots with `current` set to the tensor each key overwrites, and its dtype and
    device (a fresh load's slots describe tensors it would create)."""
    model_layers, wrappers = dict(lora_layers(model)), dict(saved_modules(model))
    out = {}
    for ck, slot in exp.items():
        dst = _destination(model_layers, wrappers, adapter_name, ck, slot)
        out[ck] = slot._replace(current=dst, dtype=dst.dtype, device=dst.device)
    return out


def _padless(model: nn.Module) -> set[str]:
    """The LoRA layers whose A / B cannot be zero-padded along one dimension: LoraParameter
    (target_parameters) holds one rank-r block per expert (A [r·E, in], rows expert-major)."""
    return {n for n, layer in lora_layers(model) if not isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv))}


def _check_ranks(path: Path, exp: dict[str, _Slot], found: dict[str, torch.Tensor], padless: set[str]) -> None:
    """Every file tensor must fit its destination: equal shapes, except the rank dimension
    of A / B, which may be smaller (zero-padded) but not larger (equal in `padless` modules)."""
    problems = []
    for ck, value in found.items():
        slot = exp[ck]
        dst_shape, shape = tuple(slot.current.shape), tuple(value.shape)
        dim = RANK_DIM.get(slot.what)
        if dim is None or slot.module in padless:
            if shape != dst_shape:  # _match checked shape against the model; kept as a guard
                why = " (an adapter on a parameter is swapped only for one of the same rank)" if dim is not None else ""
                problems.append(f"{ck}: shape {list(shape)} in the file, {list(dst_shape)} in the model{why}")
            continue
        others_equal = len(shape) == len(dst_shape) and all(
            a == b for i, (a, b) in enumerate(zip(shape, dst_shape)) if i != dim
        )
        if not others_equal:
            problems.append(f"{ck}: shape {list(shape)} in the file, {list(dst_shape)} in the model")
        elif shape[dim] > dst_shape[dim]:
            problems.append(
                f"module {slot.module!r}: rank {shape[dim]} in the file, but the model stores rank {dst_shape[dim]}"
            )
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        raise AdapterLoadError(
            f"cannot hot-swap the adapter in {str(path)!r}: " + "; ".join(problems[:6]) + more
            + ". A larger rank needs lorakern.prepare_model_for_compiled_hotswap(model, target_rank=...) "
            "with target_rank >= the largest rank, called before compiling"
        )


def _apply(model: nn.Module, adapter_name: str, plan: _Plan) -> None:
    """Write the plan's values in place and set each layer's r / alpha / scaling / dropout;
    on any error, put everything back."""
    overwritten = {id(plan.exp[ck].current): plan.exp[ck].current for ck in plan.values}  # tied: once
    saved_values = [(t, t.detach().clone()) for t in overwritten.values()]
    model_layers = dict(lora_layers(model))
    layers = [model_layers[t.name] for t in plan.targets]
    saved_fields = [(layer, _layer_fields(layer, adapter_name)) for layer in layers]
    try:
        with torch.no_grad():
            # param.copy_ (not param.data.copy_): it bumps the version counter, which
            # caches keyed on it (mixed batches' stacked adapters) rely on.
            _write_values(model, plan.path, adapter_name, plan.exp, plan.values, plan.found)
        cfg = plan.config
        for t, layer in zip(plan.targets, layers):
            _set_layer_fields(layer, adapter_name, (
                t.r, t.alpha, cfg.use_rslora, float(cfg.lora_dropout),
                t.alpha / (math.sqrt(t.r) if cfg.use_rslora else t.r),
            ))
    except BaseException:  # KeyboardInterrupt included: never leave a half-swapped adapter
        with torch.no_grad():
            for t, old in saved_values:
                t.copy_(old)
        for layer, fields in saved_fields:
            _set_layer_fields(layer, adapter_name, fields)
        raise


def _layer_fields(layer, name: str) -> tuple:
    return (layer.r[name], layer.lora_alpha[name], layer.use_rslora[name], layer.lora_dropout[name], layer.scaling[name])


def _set_layer_fields(layer, name: str, fields: tuple) -> None:
    r, alpha, rslora, dropout, scaling = fields
    layer.r[name] = r
    layer.lora_alpha[name] = alpha
    layer.use_rslora[name] = rslora
    # ScalarDicts: the value's tensor mirror is filled in place (what a compiled graph reads).
    layer.lora_dropout[name] = dropout
    layer.scaling[name] = scaling


# ---- prepare_model_for_compiled_hotswap ---------------------------------------------


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with adapters for hot-swapping after ``torch.compile``, PEFT's
    ``prepare_model_for_compiled_hotswap``: call it after loading the first adapter and
    before compiling.

    target_rank: zero-pad every adapter of every LoRA layer to this rank (A gains zero
        rows, B zero columns: the outputs do not change, and neither do r, lora_alpha or
        the scalings). Later `hotswap_adapter` calls with any rank up to target_rank then
        keep the compiled shapes. The parameters stay the same objects (their storage
        grows; a gradient they hold is padded too). None: no padding. A rank above
        target_rank already stored is refused (ValueError, nothing changed).
    config: a LoraConfig or a dict of them (e.g. ``lorakern.model.adapter_configs(model)``):
        as in PEFT, their r and rank_pattern values are set to target_rank. Only pass it
        to keep other code that reads r from the config consistent with the padded shapes:
        a config with r = target_rank gives scaling alpha / target_rank to whatever loads
        with it. (`save_adapter` still writes each adapter's own ranks, in the tensors and
        in the saved config.)
    check_compiled: the model is already compiled (``torch.compile``'s wrapper, or
        ``model.compile()``): "error" raises ValueError, "warn" warns and prepares the
        module behind it (the compiled graph then recompiles), "ignore" prepares it silently.

    lorakern's LoraLinear, LoraEmbedding and LoraConv2d already pass their scalings to a
    compiled graph as tensors (`ScalarDict` mirrors), so a new scaling never recompiles
    them; PEFT's conversion of scalings to tensors has nothing to do here.

    Raises ValueError when the model has no LoRA layers.

    Example:
        >>> lorakern.prepare_model_for_compiled_hotswap(model, target_rank=64)   # doctest: +SKIP
        >>> model = torch.compile(model)                                          # doctest: +SKIP
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("call prepare_model_for_compiled_hotswap before compiling the model, not after")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called on a model that is already compiled: the padded "
                "shapes will recompile it. Call it before torch.compile.", UserWarning, stacklevel=2,
            )
        model = _unwrap(model)
    if target_rank is not None and (not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1):
        raise ValueError(f"target_rank must be an int >= 1 or None, got {target_rank!r}")
    configs = _configs_arg(config)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(
            "the model has no LoRA layers: call prepare_model_for_compiled_hotswap after loading the first adapter "
            "and before compiling"
        )
    if target_rank is None:
        return
    # A LoraParameter holds one rank-r block per expert (A [r·E, in], expert-major rows):
    # padding its rows as one rank would mix the experts' blocks.
    on_params = [name for name, layer in layers if not isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv))]
    if on_params:
        raise ValueError(
            f"cannot pad adapters on parameters (target_parameters) to target_rank={target_rank}: {on_params[:5]} "
            "(not implemented); hot-swap adapters of one rank and alpha there, without target_rank"
        )
    too_big = [
        f"{name} adapter {a!r}: rank {layer.lora_weights(a)[0].shape[0]}"
        for name, layer in layers for a in layer.held_adapters() if layer.lora_weights(a)[0].shape[0] > target_rank
    ]
    if too_big:
        raise ValueError(f"cannot pad to target_rank={target_rank}: larger ranks are stored ({', '.join(too_big[:5])})")
    for _, layer in layers:
        for a in layer.held_adapters():
            _pad_adapter(layer, a, target_rank)
    for cfg in configs:
        cfg.r = target_rank
        cfg.rank_pattern = {k: target_rank for k in cfg.rank_pattern}


def _configs_arg(config) -> list[LoraConfig]:
    if config is None:
        return []
    configs = list(config.values()) if isinstance(config, dict) else [config]
    bad = [type(c).__name__ for c in configs if not isinstance(c, LoraConfig)]
    if bad:
        raise TypeError(f"config must be a LoraConfig or a dict of them, got {bad[0]}")
    return configs


def _pad_adapter(layer, adapter_name: str, rank: int) -> None:
    """Zero-pad adapter `adapter_name` of `layer` to `rank`, keeping the Parameter objects."""
    A, B = layer.lora_weights(adapter_name)
    _grow(A, 0, rank)
    _grow(B, 1, rank)
    # nn.Linear / nn.Conv2d holders: their feature counts follow (repr, code that reads them).
    holders = [(getattr(layer, d, None), attrs) for d, attrs in
               (("lora_A", ("out_features", "out_channels")), ("lora_B", ("in_features", "in_channels")))]
    for modules, attrs in holders:
        if isinstance(modules, nn.ModuleDict) and adapter_name in modules:
            for attr in attrs:
                if hasattr(modules[adapter_name], attr):
                    setattr(modules[adapter_name], attr, rank)


def _grow(p: nn.Parameter, dim: int, size: int) -> None:
    """p (and its grad) zero-padded along `dim` to `size`, in place of its storage."""
    if p.shape[dim] == size:
        return
    old = p.detach().clone()
    shape = list(old.shape)
    shape[dim] = size
    p.data = old.new_zeros(shape)
    with torch.no_grad():  # an in-place write: bumps the version counter caches key on
        p.narrow(dim, 0, old.shape[dim]).copy_(old)
    if p.grad is not None:
        grad = p.grad.new_zeros(shape)
        grad.narrow(dim, 0, old.shape[dim]).copy_(p.grad)
        p.grad = grad
