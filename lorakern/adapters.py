"""Save and load adapters in PEFT's on-disk format, atomically and validated.

A directory holds:
- ``adapter_model.safetensors``: keys ``base_model.model.<module path>.lora_A.weight``
  [r, in] and ``….lora_B.weight`` [out, r] (no adapter name; with ``lora_bias`` also
  ``….lora_B.bias`` [out]); for an nn.Embedding target ``….lora_embedding_A``
  [r, num_embeddings] and ``….lora_embedding_B`` [embedding_dim, r] (no ``.weight``);
  for an nn.Conv2d target ``….lora_A.weight`` [r, in, kh, kw], ``….lora_B.weight``
  [out, r, 1, 1]; plus, as PEFT writes them,
  the trainable biases (``bias="all"``: every parameter named ``bias``, PEFT's rule;
  ``"lora_only"``: ``<lora layer>.base_layer.bias``) and each modules_to_save module's
  own state dict under its path; metadata ``{"format": "pt"}`` and ``"lorakern_config"``:
  the config saved beside them, as JSON (PEFT ignores metadata). With
  ``save_embedding_layers`` (PEFT's option and rule, see `save_adapter`) also the base
  model's input / output embedding weights, keyed as PEFT keys them:
  ``<embedding>.weight`` (``model.embed_tokens.weight``, ``lm_head.weight``,
  ``bert.embeddings.word_embeddings.weight``, ...), ``lm_head.base_layer.weight`` for a
  LoRA-targeted head, ``<module>.original_module.weight`` for a modules_to_save one.
  Trainable tokens: ``<module>.token_adapter.trainable_tokens_delta`` [n, embedding_dim] (PEFT's
  key; none for a head tied to the embedding: its rows are the embedding's).
- ``adapter_config.json``: PEFT's LoRA keys, sorted, indented, ``"peft_type": "LORA"``.
  Scaling is never stored; it is recomputed from r / lora_alpha / the patterns.

Saving holds a lock on the directory (POSIX flock on ``.lorakern-save.lock``), writes
both files to fsynced temporary files there (with the mode a plain open() would give) and
renames them over the old ones, weights first, config last, so an error while writing
leaves the previous adapter intact and concurrent saves leave one complete pair. New
weights beside another save's config (a save stopped between its two renames) are refused
on load as a mix, since the weights record the config they were saved with.
Loading checks everything (keys, shapes, ranks and alphas, that the files are one save's
pair, peft_type), converts every value to the dtype of the parameter it loads into and
checks it is finite there, all before it touches the model, and undoes its changes if
anything fails after that, so a failed load leaves the model exactly as it was.
Embedding weights in the file load into the base model's embedding parameters, as in
PEFT (they are optional keys: a file without them loads as before).
A legacy ``adapter_model.bin`` is read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lorakern.config import ALL_LINEAR, LoraConfig
from lorakern.distributed import gather_full_tensors
from lorakern.conv import CONV_TYPES, LoraConv
from lorakern.embedding import LoraEmbedding
from lorakern.moe_targets import convert_v4_tensors
from lorakern.parameter import LoraParameter
from lorakern.layer import LoraLinear, adapter_dtype
from lorakern.trainable_tokens import BASE_PREFIX, DELTA_KEY, TrainableTokensWrapper, plan_trainable_tokens, token_layers
from lorakern.model import (
    LORA_LAYERS,
    AdapterState,
    ModulesToSave,
    inject_planned,
    adapter_configs,
    adapter_state,
    bias_params,
    is_bias,
    lora_layers,
    merged_layers,
    outer_modules,
    plan_modules_to_save,
    plan_targets,
    saved_modules,
    set_adapter,
)

try:
    import fcntl
except ImportError:  # not POSIX (Windows): saves take no lock
    fcntl = None

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
LOCK_NAME = ".lorakern-save.lock"
RECORD_KEY = "lorakern_config"  # weights metadata: the config saved beside them, as JSON
PREFIX = "base_model.model."
# PEFT's EMBEDDING_LAYER_NAMES: with save_embedding_layers="auto", targeting a module of
# one of these names (list entry, or a regex matching a module ending in one) saves the
# targeted embedding layers' base weights.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded into this model (the model is unchanged)."""


# ---- save -------------------------------------------------------------------------


def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter_name`, keyed as in adapter_model.safetensors
    (`save_embedding_layers`: as in `save_adapter`)."""
    _check_save_embedding_layers(save_embedding_layers)
    state = adapter_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {list(state.configs)}")
    cfg = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.held_adapters()]
    for name, layer in layers:
        if isinstance(layer, LoraEmbedding):  # PEFT's keys for an embedding: no ".weight"
            A, B = _held_rank(name, layer, adapter_name)
            out[f"{PREFIX}{name}.lora_embedding_A"], out[f"{PREFIX}{name}.lora_embedding_B"] = A, B
            continue
        A, B = _held_rank(name, layer, adapter_name)
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = A, B
        if layer.lora_bias.get(adapter_name, False):  # PEFT's lora_bias
            out[f"{PREFIX}{name}.lora_B.bias"] = layer.lora_B[adapter_name].bias
        if adapter_name in layer.lora_magnitude_vector:  # DoRA; PEFT's key has no ".weight"
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    if cfg.bias == "all":
        for name, p in bias_params(model):
            out[PREFIX + name] = p
    elif cfg.bias == "lora_only":
        for name, layer in layers:
            if getattr(layer.base_layer, "bias", None) is not None:  # an nn.Embedding has none
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{k}"] = v
    for name, w in token_layers(model):  # trainable tokens; a head tied to the embedding shares its rows (not saved)
        if adapter_name in w.token_indices and adapter_name not in w.tied_adapters:
            out[f"{PREFIX}{name}.{DELTA_KEY}"] = w.trainable_tokens_delta[adapter_name]
    out.update(_embedding_state(model, adapter_name, cfg, save_embedding_layers))
    return out


def _held_rank(name: str, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (A, B) cut to the adapter's own rank r: A[:r] and B[:, :r] (rank along
    A's dim 0 and B's dim 1 for LoraLinear, LoraEmbedding and LoraConv alike).
    `prepare_model_for_compiled_hotswap` zero-pads them to its target_rank while r stays
    the adapter's; the padding stays zero through training (its gradients are zero), so the
    cut is exact. Padding that is not zero (written into) is refused: dropping it would
    save another adapter than the model runs."""
    A, B = layer.lora_weights(adapter_name)
    r = layer.r[adapter_name]
    if not isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv)) or A.shape[0] == r:
        return A, B
    if A[r:].any() or B[:, r:].any():
        raise ValueError(
            f"cannot save adapter {adapter_name!r}: module {name!r} holds rank {r} zero-padded to {A.shape[0]} "
            f"(prepare_model_for_compiled_hotswap), but its padding (lora_A rows {r}: or lora_B columns {r}:) is "
            "not zero, so the file (rank r) would not be the adapter the model runs; zero the padding or save "
            "the model's state_dict instead"
        )
    return A[:r], B[:, :r]


def _config_as_held(model: nn.Module, adapter_name: str, cfg: LoraConfig) -> LoraConfig:
    """`cfg`, with r and rank_pattern rewritten when they do not give the ranks the layers
    hold: `prepare_model_for_compiled_hotswap(config=...)` sets them to its target_rank (as
    PEFT does) while each layer keeps the adapter's own r, which the saved tensors have.
    Then r becomes the most common held rank and rank_pattern names every other module."""
    held = {}  # the name rank_pattern matches -> r
    for name, layer in lora_layers(model):
        if adapter_name in layer.held_adapters():
            key = name
            if isinstance(layer, LoraParameter):  # its owner's path and parameter, as plan_targets keys it
                while key.endswith(".base_layer"):
                    key = key[: -len(".base_layer")]
                key = f"{key}.{layer.parameter_name}"
            held[key] = layer.r[adapter_name]
    if all(cfg.rank_for(k) == r for k, r in held.items()):
        return cfg
    ranks = list(held.values())
    r = max(set(ranks), key=ranks.count)
    # Longest names first: a pattern matches a module's name or a suffix after a ".".
    pattern = {k: v for k, v in sorted(held.items(), key=lambda kv: -len(kv[0])) if v != r}
    fixed = replace(cfg, r=r, rank_pattern=pattern)
    wrong = [k for k, v in held.items() if fixed.rank_for(k) != v]
    if wrong:
        raise ValueError(f"cannot save adapter {adapter_name!r}: no rank_pattern describes the ranks of {wrong[:5]}")
    return fixed


# ---- embedding layers -------------------------------------------------------------


def _check_save_embedding_layers(value) -> None:
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {value!r}")


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """(name, module) of the model's input and output embedding layers, as transformers'
    get_input_embeddings() / get_output_embeddings() give them (a model without a head
    has only the first; a module is listed once), named by where they sit in the model.
    None for a model without get_input_embeddings (not a transformers model)."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        return None
    layers: list[nn.Module] = []
    for getter in (get_in, getattr(model, "get_output_embeddings", None)):
        if not callable(getter):
            continue
        try:
            layer = getter()
        except (NotImplementedError, AttributeError):  # transformers' base class raises for models without one
            continue
        if isinstance(layer, nn.Module) and all(layer is not m for m in layers):
            layers.append(layer)
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return [(names[id(m)], m) for m in layers if names.get(id(m))]


def _base_of(module: nn.Module) -> nn.Module:
    """The base-model module behind a lorakern wrapper (the module itself when unwrapped)."""
    if isinstance(module, LORA_LAYERS):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    if isinstance(module, TrainableTokensWrapper):
        return module.base_layer
    return module


def _embedding_targeted(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's test for save_embedding_layers="auto": target_modules as a list names one of
    EMBEDDING_LAYER_NAMES literally; as a regex (not "all-linear", which never takes the
    output head) it fullmatches a module whose name ends in one. exclude_modules is not
    consulted (PEFT does not)."""
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return False
        ends = re.compile(r"(.*\.)?(" + "|".join(EMBEDDING_LAYER_NAMES) + r")$")
        return any(re.fullmatch(targets, n) for n, _ in model.named_modules() if ends.match(n))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _base_config_dir(model_id: str, revision: str | None) -> str | None:
    """A directory on this machine holding the base model's config.json: `model_id` itself
    when it is one, else the Hugging Face cache's snapshot of that repo (at `revision`, the
    commit the model was loaded from, when known). Never downloads."""
    if os.path.isfile(os.path.join(model_id, "config.json")):
        return model_id
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # no huggingface_hub, or not a valid repo id (a local path that is gone)
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _vocab_resized(model: nn.Module) -> bool:
    """save_embedding_layers="auto"'s second rule (PEFT's): the model's config.vocab_size
    differs from the vocab_size in the config of the model it was loaded from."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    model_id = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not vocab or not model_id or not isinstance(model_id, (str, os.PathLike)):
        return False  # e.g. a model built from a config: nothing to compare with (PEFT: not saved)
    model_id = os.fspath(model_id)
    where = _base_config_dir(model_id, getattr(config, "_commit_hash", None))
    base_vocab = None
    if where is not None and callable(getattr(type(config), "from_pretrained", None)):
        try:
            base_vocab = getattr(type(config).from_pretrained(where, local_files_only=True), "vocab_size", None)
        except Exception:  # an unreadable config: treated as not found
            where = None
    if where is None:
        warnings.warn(
            f"save_embedding_layers='auto': found no config.json of the base model {model_id!r} on this machine "
            "(lorakern never downloads) - will assume that the vocabulary was not modified; pass "
            "save_embedding_layers=True to save the embedding layers",
            stacklevel=5,
        )
        return False
    if base_vocab is not None and base_vocab != vocab:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
            stacklevel=5,
        )
        return True
    return False


def _embedding_state(model: nn.Module, adapter_name: str, config: LoraConfig, save_embedding_layers) -> dict[str, torch.Tensor]:
    """The embedding tensors PEFT's get_peft_model_state_dict adds for `save_embedding_layers`.

    PEFT's rule: "auto" means True when an embedding layer is targeted (see
    `_embedding_targeted`) or the vocabulary was resized (`_vocab_resized`), each with
    PEFT's warning. When saving: if an embedding layer is targeted, only the input / output
    embeddings that are LoRA layers over an nn.Linear / nn.Embedding are saved, as
    `<layer>.base_layer.<k>`; otherwise both embeddings are saved with everything under
    their name: `<layer>.<k>` for a plain module, `<layer>.base_layer.<k>` (and its LoRA
    weights, saved anyway) for a LoRA layer, `<layer>.original_module.<k>` and
    `<layer>.modules_to_save.<k>` (this adapter's copy) for a modules_to_save one.
    Floating-point tensors only (a quantized base's packed weights are not embeddings).
    """
    if save_embedding_layers == "auto":
        targeted = _embedding_targeted(model, config)
        if targeted and config.trainable_token_indices is None:  # PEFT: trainable tokens save space, not tables
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=4)
            save = True
        else:
            save = _vocab_resized(model)
    else:
        save = bool(save_embedding_layers)
        targeted = save and _embedding_targeted(model, config)
    if not save:
        return {}
    layers = _embedding_modules(model)
    if layers is None:
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.", stacklevel=4)
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        entries: list[tuple[str, torch.Tensor]]
        if targeted:
            if not isinstance(layer, LORA_LAYERS) or not isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
                continue
            entries = [(f"base_layer.{k}", v) for k, v in layer.base_layer.state_dict(keep_vars=True).items()]
        elif isinstance(layer, LORA_LAYERS):
            entries = [(f"base_layer.{k}", v) for k, v in layer.base_layer.state_dict(keep_vars=True).items()]
        elif isinstance(layer, TrainableTokensWrapper):
            entries = [(f"{BASE_PREFIX}{k}", v) for k, v in layer.base_layer.state_dict(keep_vars=True).items()]
            if adapter_name in layer.token_indices:
                entries.append((DELTA_KEY, layer.trainable_tokens_delta[adapter_name]))
        elif isinstance(layer, ModulesToSave):
            entries = [(f"original_module.{k}", v) for k, v in layer.original_module.state_dict(keep_vars=True).items()]
            if adapter_name in layer.modules_to_save:
                copy_sd = layer.modules_to_save[adapter_name].state_dict(keep_vars=True)
                entries += [(f"modules_to_save.{k}", v) for k, v in copy_sd.items()]
        else:
            entries = list(layer.state_dict(keep_vars=True).items())
        for k, v in entries:
            if v.is_floating_point():
                out[f"{PREFIX}{name}.{k}"] = v
    return out


def _write_bytes(f, data: bytes) -> None:
    """Write `data` to the open file `f` (one place, so tests can make a write fail midway)."""
    f.write(data)


@functools.cache
def _file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the umask. mkstemp creates its
    files 0o600, which would leave saved adapters unreadable to other users (PEFT's files
    follow the umask). The umask can only be read by setting it, and setting it is
    process-wide (a thread creating a file meanwhile would get mode 0o666), so read it once."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock_fd(path: Path) -> int | None:
    """Take an exclusive flock on `path`/.lorakern-save.lock, waiting for the save that
    holds it; the open descriptor, or None where there is no fcntl (not POSIX) or the file
    system refuses flock. The holder removes the file before it unlocks, so a waiter may
    get the lock of a removed file: it then opens the name again (two saves never both
    hold it)."""
    if fcntl is None:
        return None
    lock = path / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK: this file system has no locks, so nobody holds this one
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:  # removed by the save that held it
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def _save_lock(path: Path):
    """Hold the directory's save lock (see `_lock_fd`) for one save; yields whether it is held."""
    fd = _lock_fd(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path / LOCK_NAME)
            os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of saves that crashed (call it holding the lock: then no save
    is writing one)."""
    prefixes = (f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}.")
    for entry in os.listdir(path):
        if entry.startswith(prefixes) and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path / entry)


def _replace_pair(path: Path, weights: bytes, config: bytes) -> None:
    """Write both files as fsynced temporaries, then rename them into place, weights first."""
    # Write both temporaries before replacing anything, so an error while writing lands
    # neither file. The renames go weights first, config last: once the new config is in
    # place, so are the weights it describes.
    staged: list[tuple[str, Path]] = []
    try:
        for name, blob in ((WEIGHTS_NAME, weights), (CONFIG_NAME, config)):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path)
            staged.append((tmp, path / name))
            with os.fdopen(fd, "wb") as f:
                # Before the fsync, so the mode is as durable as the contents.
                os.chmod(tmp, _file_mode())
                _write_bytes(f, blob)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in staged:
            os.replace(tmp, final)
        staged = []
        _fsync_dir(path)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
) -> None:
    """Save `adapter_name` to directory `path` in PEFT's format (see module docstring).

    save_embedding_layers (PEFT's save_pretrained option, same default and rule): True
    also saves the base model's input and output embedding weights (transformers'
    get_input_embeddings() / get_output_embeddings()), which an adapter trained after
    `resize_token_embeddings` needs; False never does; "auto" saves them, warning as PEFT
    does, when
    - an embedding layer is a LoRA target: target_modules (a list) names "embed_tokens"
      or "lm_head", or (a regex) matches a module whose name ends in one. Then only the
      targeted layers' base weights are saved (``lm_head.base_layer.weight``); or
    - the vocabulary was resized: ``model.config.vocab_size`` differs from vocab_size in
      the config.json of the model it was loaded from (``model.name_or_path``). PEFT reads
      that config from the local directory or from the Hub; lorakern never goes online:
      it reads the local directory, else the Hugging Face cache's copy (at the commit the
      model was loaded from), and when it finds neither it warns and does not save them
      (pass True). A model built from a config has no base to compare with: not saved,
      as in PEFT. (Comparing config.vocab_size with the embedding's rows would detect
      nothing: resize_token_embeddings updates both.)
    The embedding tensors are written under the keys PEFT uses; "not a transformers
    model" (no get_input_embeddings) with True warns and saves none, as PEFT.

    A save holds an exclusive lock on `path` (fcntl.flock on a `.lorakern-save.lock` file
    there, removed when the save ends), so saves to one directory from several threads or
    processes run one after the other and leave one complete pair; holding it, a save also
    removes the temporaries a crashed save left. Both files are fully written and fsynced
    as temporaries before either replaces an existing file; on an error while writing, the
    temporaries are removed and `path` is as before. Then the weights file is renamed into
    place first and adapter_config.json last, and the directory is fsynced. A crash between
    the two renames leaves the new weights beside the old config: the weights record the
    config they were saved with, so `load_adapter` refuses that mix (unless the old config
    describes the same adapter: then it is the new pair) until the next save repairs it.
    Without fcntl (not POSIX), or on a file system without flock, there is no lock; a mix
    that unlocked concurrent saves leave is refused the same way.
    The files get the mode a plain open() would give (0o644 under umask 0o022).
    An adapter zero-padded by `prepare_model_for_compiled_hotswap` is saved at its own
    rank (A[:r], B[:, :r], exact: the padding stays zero), with a config whose r /
    rank_pattern give those ranks (prepare's `config=` argument sets them to its
    target_rank); padding that is not zero is refused (ValueError, nothing written).
    On an FSDP2-sharded model call it on every rank: the shards are gathered into full
    tensors (a collective) and each rank writes the same files.

    Example:
        >>> lorakern.save_adapter(model, "my-adapter")          # doctest: +SKIP
        >>> PeftModel.from_pretrained(base, "my-adapter")       # doctest: +SKIP
    """
    from safetensors.torch import save as st_save

    cfg = adapter_state(model).configs.get(adapter_name)
    # An FSDP2-sharded model holds DTensors: gather full tensors (a collective, so on a
    # sharded model every rank calls save_adapter; each writes the same files).
    tensors = gather_full_tensors(adapter_state_dict(model, adapter_name, save_embedding_layers))
    # safetensors refuses shared or strided storage: give every tensor its own copy.
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    # The config that describes the tensors (their true ranks, see _held_rank).
    peft_dict = _config_as_held(model, adapter_name, cfg).to_peft_dict()
    # The weights record the config written beside them (a deterministic record, not a
    # random id, so every rank and every save of one adapter writes the same bytes).
    weights = st_save(data, metadata={"format": "pt", RECORD_KEY: json.dumps(peft_dict, sort_keys=True)})
    config = (json.dumps(peft_dict, indent=2, sort_keys=True) + "\n").encode()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _save_lock(path) as locked:
        if locked:
            _remove_stale_temporaries(path)
        _replace_pair(path, weights, config)


# ---- load -------------------------------------------------------------------------


class _Files(NamedTuple):
    """What an adapter directory holds."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    mix: str | None  # why the two files are not one save's pair; None when they are (or cannot tell)


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read (config, tensors) from an adapter directory, without touching any model.

    Raises FileNotFoundError when the directory or a file is missing, AdapterLoadError
    for an unreadable / corrupt file, a config for another peft_type, or files that are
    a mix of two saves (see `load_adapter`).
    """
    files = _read(Path(path))
    if files.mix:
        raise AdapterLoadError(files.mix)
    return files.config, files.tensors


def _read(path: Path) -> _Files:
    """read_adapter's reading, the mix reported rather than raised."""
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(cfg_file)!r} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{str(cfg_file)!r} is not valid JSON: {exc}") from None
    except RecursionError:  # json recurses per nesting level: a hostile file can exhaust the stack
        raise AdapterLoadError(f"{str(cfg_file)!r} is nested too deeply to be an adapter config") from None
    try:
        config = LoraConfig.from_peft_dict(raw)
    except (TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{str(cfg_file)!r}: {exc}") from None
    record = None
    st_file, bin_file = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st_file.is_file():
        from safetensors.torch import load as st_load

        data = st_file.read_bytes()
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error type for corrupt headers/data
            raise AdapterLoadError(f"{str(st_file)!r} is not a readable safetensors file: {exc}") from None
        record = _weights_record(data)
    elif bin_file.is_file():
        try:
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"{str(bin_file)!r} cannot be read with torch.load(weights_only=True): {exc}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterLoadError(f"{str(bin_file)!r} does not hold a dict of tensors")
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {str(path)!r}")
    return _Files(config, tensors, _pair_mismatch(path, config, record))


def _weights_record(data: bytes) -> str | None:
    """The config lorakern recorded in a safetensors file's metadata; None in a file that
    lorakern did not write (PEFT's). `data` has been read by safetensors: its header is valid."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    record = metadata.get(RECORD_KEY)
    return record if isinstance(record, str) else None


def _pair_mismatch(path: Path, config: LoraConfig, record: str | None) -> str | None:
    """Why adapter_config.json is not the config the weights were saved with, or None.

    The rule: weights that carry lorakern's record must sit beside a config that describes
    the same adapter (both parsed and compared as lorakern reads them, so formatting, key
    order, keys lorakern ignores and PEFT's bookkeeping such as base_model_name_or_path do
    not count). Only the weights carry a record, and save_adapter renames them first, so
    every state a stopped save leaves is covered: new weights beside the old config,
    whoever wrote that config (lorakern, PEFT, a lorakern older than the record). Weights
    without a record (written by PEFT, by another tool, or rewritten without metadata) say
    nothing, and load beside any config, as before.
    """
    if record is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys: those of the config file were reported
            saved = LoraConfig.from_peft_dict(json.loads(record)).to_peft_dict()
    except (json.JSONDecodeError, TypeError, ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"{str(path / WEIGHTS_NAME)!r}: the config recorded in its metadata is unreadable: {exc!r}") from None
    here = config.to_peft_dict()
    differ = [k for k in sorted(saved.keys() | here.keys()) if saved.get(k) != here.get(k)]
    if not differ:
        return None
    ids = [hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12] for d in (saved, here)]
    shown = "; ".join(f"{k}: {saved.get(k)!r} with the weights, {here.get(k)!r} in the file" for k in differ[:4])
    more = f"; +{len(differ) - 4} more" if len(differ) > 4 else ""
    return (
        f"{str(path)!r} holds a mix of two saves: {WEIGHTS_NAME} was saved with config {ids[0]}, "
        f"{CONFIG_NAME} there is config {ids[1]} ({shown}{more}). A save stopped between its two "
        f"renames leaves this; save the adapter there again. If you edited {CONFIG_NAME} on purpose, "
        f"rewrite {WEIGHTS_NAME} without lorakern's record (metadata={{'format': 'pt'}})."
    )


def _canonical(key: str) -> str:
    """Biases of LoRA-wrapped layers are saved as `<layer>.base_layer.bias`; compare them as `<layer>.bias`."""
    return key[: -len(".base_layer.bias")] + ".bias" if key.endswith(".base_layer.bias") else key


class _Slot(NamedTuple):
    """Where one tensor of the file goes."""

    current: torch.Tensor | None  # the tensor it overwrites; None when the load creates it
    shape: tuple[int, ...]
    module: str  # the module's name
    what: str  # "lora_A", "lora_B", "lora_B_bias" (lora_bias), "lora_magnitude_vector" (DoRA),
    # "lora_embedding_A", "lora_embedding_B" (LoRA on an nn.Embedding), "modules_to_save", "bias" or "embedding"
    dtype: torch.dtype  # the destination's dtype and device, known before anything is created
    device: torch.device
    optional: bool = False  # a key the file may omit (embedding weights: saved only on request)


def _expected(model: nn.Module, config: LoraConfig, adapter_name: str, existing: bool, targets, to_save, tokens=()):
    """{canonical key: _Slot} for loading `config` into `model` (targets / to_save planned
    already), and the names of the saved modules. Changes nothing."""
    exp: dict[str, _Slot] = {}
    for t in targets:
        if isinstance(t.module, (nn.Embedding, LoraEmbedding)):
            _expect_lora_embedding(exp, t, adapter_name, existing)
            continue
        m = bb = None
        if existing:
            a, b = t.module.lora_A[adapter_name].weight, t.module.lora_B[adapter_name].weight
            a_spec, b_spec = (a.dtype, a.device), (b.dtype, b.device)
            if config.use_dora:
                m = t.module.lora_magnitude_vector[adapter_name].weight
            if config.lora_bias:
                bb = t.module.lora_B[adapter_name].bias
        else:
            # LoraLinear / LoraConv.update_layer create A, B (and DoRA's magnitude, lora_B's
            # bias) in adapter_dtype on the base weight's device (LoraParameter: the parameter's).
            a = b = None
            ref = t.module.weight if t.parameter is None else getattr(t.module, t.parameter)
            a_spec = b_spec = (adapter_dtype(ref), ref.device)
        a_shape, b_shape = (t.r, t.in_features), (t.out_features, t.r)
        if t.parameter is not None:  # one rank-r block per expert: A [r·E, in], B [out, r·E]
            experts = t.module.num_experts if isinstance(t.module, LoraParameter) else _experts(getattr(t.module, t.parameter))
            a_shape, b_shape = (t.r * experts, t.in_features), (t.out_features, t.r * experts)
        if isinstance(t.module, (*CONV_TYPES, LoraConv)):  # A: the base's kernel; B: kernel 1
            kernel = t.module.kernel_size
            a_shape, b_shape = (*a_shape, *kernel), (*b_shape, *(1,) * len(kernel))
        exp[f"{t.name}.lora_A.weight"] = _Slot(a, a_shape, t.name, "lora_A", *a_spec)
        exp[f"{t.name}.lora_B.weight"] = _Slot(b, b_shape, t.name, "lora_B", *b_spec)
        if config.use_dora:
            exp[f"{t.name}.lora_magnitude_vector"] = _Slot(m, (t.out_features,), t.name, "lora_magnitude_vector", *b_spec)
        if config.lora_bias:
            exp[f"{t.name}.lora_B.bias"] = _Slot(bb, (t.out_features,), t.name, "lora_B_bias", *b_spec)
    saved_names = [n for n, _ in to_save]
    for name, module in to_save:
        if existing:
            if not isinstance(module, ModulesToSave) or adapter_name not in module.modules_to_save:
                raise AdapterLoadError(f"the file saves module {name!r} but adapter {adapter_name!r} has no copy of it")
            src = module.modules_to_save[adapter_name]
        else:
            src = module.original_module if isinstance(module, ModulesToSave) else module
        # A new copy is a deepcopy of `src`: same dtype and device.
        for k, v in src.state_dict(keep_vars=True).items():
            exp[f"{name}.{k}"] = _Slot(v if existing else None, tuple(v.shape), name, "modules_to_save", v.dtype, v.device)
    if config.bias == "all":
        for pname, p in bias_params(model):
            if any(pname.startswith(s + ".") for s in saved_names):
                continue
            exp[_canonical(pname)] = _Slot(p, tuple(p.shape), pname.rsplit(".", 1)[0], "bias", p.dtype, p.device)
    elif config.bias == "lora_only":
        for t in targets:
            base = t.module.base_layer if hasattr(t.module, "base_layer") else t.module
            bias = getattr(base, "bias", None)  # an nn.Embedding has none
            if bias is not None:
                exp[f"{t.name}.bias"] = _Slot(bias, tuple(bias.shape), t.name, "bias", bias.dtype, bias.device)
    _expect_embeddings(model, exp, {t.name for t in targets}, set(saved_names), {t.name for t in tokens})
    _expect_tokens(exp, tokens, adapter_name, existing)
    return exp, saved_names


def _experts(param: torch.Tensor) -> int:
    """Experts in a targeted parameter: its first dim when 3-D, else 1 (LoraParameter's rule)."""
    return param.shape[0] if param.dim() == 3 else 1


def _expect_lora_embedding(exp: dict[str, _Slot], t, adapter_name: str, existing: bool) -> None:
    """The slots of a LoRA embedding's A [r, num_embeddings] and B [embedding_dim, r], under
    PEFT's keys (``<layer>.lora_embedding_A``, no ``.weight``)."""
    for what, shape in (("lora_embedding_A", (t.r, t.in_features)), ("lora_embedding_B", (t.out_features, t.r))):
        if existing:
            current = getattr(t.module, what)[adapter_name]
            spec = (current.dtype, current.device)
        else:  # LoraEmbedding.update_layer creates them in adapter_dtype on the table's device
            current, spec = None, (adapter_dtype(t.module.weight), t.module.weight.device)
        exp[f"{t.name}.{what}"] = _Slot(current, shape, t.name, what, *spec)


def _expect_embeddings(model: nn.Module, exp: dict[str, _Slot], target_names: set[str], saved_names: set[str],
                       token_names: set[str] = frozenset()) -> None:
    """Add optional slots for the embedding weights PEFT saves with save_embedding_layers:
    each floating-point tensor of the base model's input / output embedding module, keyed
    as a model with just this adapter names it: ``<layer>.base_layer.<k>`` where the
    adapter targets the layer, ``<layer>.original_module.<k>`` where it saves it
    (modules_to_save), ``<layer>.<k>`` otherwise. They load into the base module's own
    tensors (through lorakern's wrappers), as PEFT's load_state_dict does, so tied input
    and output embeddings (one parameter) both change. Keys already expected (a bias
    saved by bias="all" / "lora_only") keep their slot."""
    for name, module in _embedding_modules(model) or []:
        form = "base_layer." if name in target_names else "original_module." if name in saved_names else ""
        if not form and (name in token_names or isinstance(module, TrainableTokensWrapper)):
            form = BASE_PREFIX  # PEFT's key under a trainable-tokens wrapper
        for k, v in _base_of(module).state_dict(keep_vars=True).items():
            ck = _canonical(f"{name}.{form}{k}")
            if v.is_floating_point() and ck not in exp:
                exp[ck] = _Slot(v, tuple(v.shape), name, "embedding", v.dtype, v.device, optional=True)


def _expect_tokens(exp: dict[str, _Slot], tokens, adapter_name: str, existing: bool) -> None:
    """The slots of trainable tokens: ``<module>.token_adapter.trainable_tokens_delta`` [n, dim]
    (PEFT's key). A head tied to the input embedding shares its rows: no slot of its own (see
    `_match`). Refuses a fresh load into a module that holds the adapter already (hotswap_adapter's
    path: hot-swapping trainable tokens is not implemented)."""
    for t in tokens:
        if t.tied_to is not None:
            continue
        held = isinstance(t.module, TrainableTokensWrapper) and adapter_name in t.module.token_indices
        if held and not existing:
            raise AdapterLoadError(
                f"module {t.name!r} holds trainable tokens of adapter {adapter_name!r}: replacing them in place "
                "(hot-swapping) is not implemented; delete the adapter and load the file again"
            )
        W = t.base.weight
        current = t.module.trainable_tokens_delta[adapter_name] if existing else None
        spec = (current.dtype, current.device) if existing else (adapter_dtype(W), W.device)
        exp[f"{t.name}.{DELTA_KEY}"] = _Slot(current, (len(t.indices), W.shape[1]), t.name, "trainable_tokens_delta", *spec)


def _check_token_agreement(model: nn.Module, adapter_name: str, tokens) -> None:
    """An existing adapter's trainable tokens must be the file config's: same modules, ids and ties."""
    have = {n: w for n, w in token_layers(model) if adapter_name in w.token_indices}
    want = {t.name: t for t in tokens}
    if set(have) != set(want):
        raise AdapterLoadError(
            f"adapter {adapter_name!r} has trainable tokens on {sorted(have)[:5]} in the model, the file's config "
            f"on {sorted(want)[:5]}"
        )
    for name, t in want.items():
        w = have[name]
        if w.token_indices[adapter_name] != t.indices or (adapter_name in w.tied_adapters) != (t.tied_to is not None):
            raise AdapterLoadError(
                f"module {name!r}: adapter {adapter_name!r} trains token ids {w.token_indices[adapter_name][:8]} in the "
                f"model, the file's config gives {t.indices[:8]} (tied: {adapter_name in w.tied_adapters} / "
                f"{t.tied_to is not None})"
            )


def _plan_tokens(model: nn.Module, config: LoraConfig, targets, to_save):
    return plan_trainable_tokens(model, config, list(outer_modules(model)), {t.name for t in targets}, {n for n, _ in to_save})


class _Undo:
    """What load_adapter may change, recorded before it changes anything, so that a failure
    partway (an OOM, a KeyboardInterrupt) can put the model back exactly as it was.

    Recorded: the values of the tensors it overwrites, every parameter's requires_grad
    (injection freezes the base, wraps modules whose originals it freezes, marks biases
    trainable), the modules at the places injection may replace, each LoRA layer's and
    saved-module wrapper's adapters and active adapters, and the AdapterState.
    """

    def __init__(self, model: nn.Module, adapter_name: str, overwritten: list[torch.Tensor], places: list[tuple[str, nn.Module]]):
        self.model = model
        self.adapter_name = adapter_name
        self.values = [(t, t.detach().clone()) for t in overwritten]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.places = places  # (name, module there now), in the order injection replaces them
        self.layers = [(m, adapter_name in m.held_adapters(), list(m.active_adapters)) for _, m in lora_layers(model)]
        self.wrappers = [(m, adapter_name in m.modules_to_save, m.active_adapter) for _, m in saved_modules(model)]
        self.tokens = [(m, adapter_name in m.token_indices, list(m.active_adapters)) for _, m in token_layers(model)]
        self.state = getattr(model, "_lorakern", None)
        if isinstance(self.state, AdapterState):
            self.fields = (dict(self.state.configs), list(self.state.active), set(self.state.inference))

    def restore(self) -> None:
        model, name = self.model, self.adapter_name
        # Layers and wrappers that were there before lose the adapter only if they lacked it.
        for layer, had, active in self.layers:
            if not had and name in layer.held_adapters():
                layer.delete_adapter(name)
            layer.active_adapters = active
        for wrapper, had, active in self.wrappers:
            if not had and name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
            wrapper.active_adapter = active
        for w, had, active in self.tokens:
            if not had and name in w.token_indices:
                w.delete_adapter(name)
            w.active_adapters = active
        # Put back the modules injection replaced, the last replaced first (a module wrapped
        # for modules_to_save may contain a LoRA target, replaced before it).
        for place, module in reversed(self.places):
            if model.get_submodule(place) is not module:
                parent, _, child = place.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
        if self.state is None:
            if hasattr(model, "_lorakern"):
                del model._lorakern
        else:
            model._lorakern = self.state
            if isinstance(self.state, AdapterState):
                configs, active, inference = self.fields
                self.state.configs, self.state.active, self.state.inference = dict(configs), list(active), set(inference)
        with torch.no_grad():
            for t, old in self.values:
                t.copy_(old)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def _check_agreement(model: nn.Module, config: LoraConfig, adapter_name: str, targets) -> None:
    """The file's config must describe the adapter already in the model (same modules, r, alpha)."""
    have = {n: layer for n, layer in lora_layers(model) if adapter_name in layer.held_adapters()}
    want = {t.name: t for t in targets}
    if set(have) != set(want):
        only_model = sorted(set(have) - set(want))[:5]
        only_file = sorted(set(want) - set(have))[:5]
        raise AdapterLoadError(
            f"adapter {adapter_name!r} is in different modules than the file's config targets: "
            f"only in the model {only_model}, only in the file {only_file}"
        )
    for name, layer in have.items():
        t = want[name]
        use_dora = layer.use_dora.get(adapter_name, False)
        lora_bias = layer.lora_bias.get(adapter_name, False)
        if (layer.r[adapter_name] != t.r or layer.lora_alpha[adapter_name] != t.alpha
                or layer.use_rslora[adapter_name] != config.use_rslora or use_dora != config.use_dora
                or lora_bias != config.lora_bias):
            raise AdapterLoadError(
                f"module {name!r}: adapter {adapter_name!r} has r={layer.r[adapter_name]}, "
                f"lora_alpha={layer.lora_alpha[adapter_name]}, use_rslora={layer.use_rslora[adapter_name]}, "
                f"use_dora={use_dora}, lora_bias={lora_bias} in the model but the file's config gives r={t.r}, "
                f"lora_alpha={t.alpha}, use_rslora={config.use_rslora}, use_dora={config.use_dora}, "
                f"lora_bias={config.lora_bias} (to replace an adapter's weights with one of another r or "
                "lora_alpha in place, use lorakern.hotswap_adapter)"
            )


def _match(model: nn.Module, path, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str, existing: bool):
    """Plan the load and match the file's tensors to their places: (targets, to_save, exp,
    found {canonical key: file tensor}). Raises AdapterLoadError for a config that does not
    fit the model, missing / unexpected keys, and values of the wrong dtype kind or shape."""
    try:
        targets = plan_targets(model, config)
        to_save = plan_modules_to_save(model, config)
        tokens = _plan_tokens(model, config, targets, to_save)
        if existing:
            _check_agreement(model, config, adapter_name, targets)
            _check_token_agreement(model, adapter_name, tokens)
        exp, saved_names = _expected(model, config, adapter_name, existing, targets, to_save, tokens)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AdapterLoadError):
            raise
        raise AdapterLoadError(f"adapter in {str(path)!r} does not fit this model: {exc}") from None

    tensors = convert_v4_tensors(model, targets, tensors, PREFIX)  # transformers-4 MoE files, as PEFT
    found: dict[str, torch.Tensor] = {}
    file_key: dict[str, str] = {}
    unexpected, problems = [], []
    # Saved modules that are embedding layers: PEFT's save_embedding_layers also writes
    # their copy as `<module>.modules_to_save.<k>`, a key its own load ignores.
    embedding_saved = {s.module for s in exp.values() if s.what == "embedding"} & set(saved_names)
    # A head tied to the input embedding shares its trainable tokens: PEFT writes its key only with
    # save_embedding_layers; accepted when it equals the embedding's.
    tied_keys = {f"{t.name}.{DELTA_KEY}": f"{t.tied_to}.{DELTA_KEY}" for t in tokens if t.tied_to is not None}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        ck = _canonical(key[len(PREFIX):])
        if ck in exp:
            if ck in found and not _same(found[ck], value):  # `<layer>.base_layer.bias` and `<layer>.bias`
                problems.append(f"{file_key[ck]} and {key} load into one tensor of this model but differ in the file")
            found[ck] = value
            file_key[ck] = key
            continue
        # PEFT with bias="all" also writes a saved module's biases as
        # `<module>.modules_to_save.<k>` and `<module>.original_module.<k>`; accept and skip them.
        owner = next((s for s in saved_names if ck.startswith(s + ".modules_to_save.") or ck.startswith(s + ".original_module.")), None)
        if owner is not None and (is_bias(ck) or (owner in embedding_saved and ck.startswith(owner + ".modules_to_save."))):
            continue
        if ck in tied_keys:
            source = tensors.get(PREFIX + tied_keys[ck])
            if source is not None and not _same(source, value):
                problems.append(f"{key} and {PREFIX}{tied_keys[ck]} are one tensor of this model (tied) but differ in the file")
            continue
        unexpected.append(key)
    missing = [k for k in exp if k not in found and not exp[k].optional]
    for ck, value in found.items():
        shape, module_name, what = exp[ck].shape, exp[ck].module, exp[ck].what
        if not value.is_floating_point():
            problems.append(f"{file_key[ck]}: dtype {value.dtype} is not floating point")
        elif tuple(value.shape) != shape and what == "embedding":
            hint = ""
            if value.dim() == len(shape) and value.dim() >= 1 and tuple(value.shape[1:]) == shape[1:]:
                hint = (
                    f" (a vocabulary of {value.shape[0]} tokens in the file, {shape[0]} in the model: the adapter was "
                    f"saved with token embeddings resized to {value.shape[0]}; resize this model's to match, "
                    f"e.g. model.resize_token_embeddings({value.shape[0]}), before loading)"
                )
            problems.append(
                f"{file_key[ck]}: shape {list(value.shape)} in the file, but {list(shape)} for the model's "
                f"embedding layer {module_name!r}{hint}"
            )
        elif tuple(value.shape) != shape:
            hint = ""
            if what in ("lora_A", "lora_embedding_A") and value.dim() == 2 and value.shape[1] == shape[1]:
                hint = f" (rank {value.shape[0]} in the file, r={shape[0]} in the config)"
            elif what in ("lora_B", "lora_embedding_B") and value.dim() == 2 and value.shape[0] == shape[0]:
                hint = f" (rank {value.shape[1]} in the file, r={shape[1]} in the config)"
            problems.append(
                f"module {module_name!r} {what}: expected shape {list(shape)}, found {list(value.shape)}{hint}"
            )
    if missing or unexpected or problems:
        parts = []
        if missing:
            parts.append(f"missing keys {[PREFIX + k for k in missing[:8]]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}" + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        parts.extend(problems[:8])
        raise AdapterLoadError(f"cannot load adapter from {str(path)!r} into {type(model).__name__}: " + "; ".join(parts))
    return targets, to_save, exp, found


# The tensors that carry the rank r: A along dim 0, B along dim 1.
RANK_DIM = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}


def pad_rank(value: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """`value` (rank r) zero-padded along its rank dimension to the shape of the tensor it
    overwrites, `slot.current` (rank R >= r, as prepare_model_for_compiled_hotswap pads
    it): (B_pad A_pad) = B A exactly. Other values, and values of that shape, unchanged."""
    dim = RANK_DIM.get(slot.what)
    if dim is None or slot.current is None or value.shape == slot.current.shape:
        return value
    padded = value.new_zeros(slot.current.shape)
    padded.narrow(dim, 0, value.shape[dim]).copy_(value)
    return padded


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _convert(model: nn.Module, path, exp: dict[str, _Slot], found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value in its destination's dtype and device, checked finite there: a value
    finite in the file can overflow the parameter's dtype (fp64 1e300 in fp32, fp32 1e6 in
    fp16) and would load as inf. Raises AdapterLoadError naming each such key, and for keys
    that load into one tensor of the model (tied input and output embeddings) with
    different values: PEFT would keep whichever it copies last."""
    values = {ck: value.to(dtype=exp[ck].dtype, device=exp[ck].device) for ck, value in found.items()}
    problems = [_not_finite(ck, found[ck], v) for ck, v in values.items() if not torch.isfinite(v).all()]
    if not problems:
        first: dict[int, str] = {}
        for ck in values:
            current = exp[ck].current
            if current is None:
                continue
            other = first.setdefault(id(current), ck)
            if other != ck and not torch.equal(values[other], values[ck]):
                problems.append(
                    f"{PREFIX}{other} and {PREFIX}{ck} load into one tensor of this model (tied weights) "
                    "but the file holds different values for them"
                )
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise AdapterLoadError(f"cannot load adapter from {str(path)!r} into {type(model).__name__}: " + "; ".join(problems[:8]) + more)
    return values


def _not_finite(key: str, source: torch.Tensor, converted: torch.Tensor) -> str:
    """Why `converted` (the file's `source` in its destination's dtype) is not finite."""
    if not torch.isfinite(source).all():
        return f"{PREFIX}{key}: has non-finite values (NaN or inf)"
    count = int((~torch.isfinite(converted)).sum())
    return (
        f"{PREFIX}{key}: {count} value(s) overflow {converted.dtype}, the dtype of the parameter it loads into "
        f"(largest magnitude {float(source.abs().max()):.4g} in the file's {source.dtype}; "
        f"{converted.dtype} holds at most {torch.finfo(converted.dtype).max:.4g})"
    )


def _write_values(model: nn.Module, path, adapter_name: str, exp: dict[str, _Slot], values: dict[str, torch.Tensor],
                  found: dict[str, torch.Tensor]) -> None:
    """Copy each converted value into its place (the layers exist by now)."""
    layers = dict(lora_layers(model))
    wrappers = dict(saved_modules(model))
    for ck, value in values.items():
        module_name, what = exp[ck].module, exp[ck].what
        if what in ("lora_A", "lora_B", "lora_magnitude_vector"):
            dst = getattr(layers[module_name], what)[adapter_name].weight
        elif what in ("lora_embedding_A", "lora_embedding_B"):  # ParameterDict entries
            dst = getattr(layers[module_name], what)[adapter_name]
        elif what == "lora_B_bias":
            dst = layers[module_name].lora_B[adapter_name].bias
        elif what == "trainable_tokens_delta":
            dst = dict(token_layers(model))[module_name].trainable_tokens_delta[adapter_name]
        elif what == "modules_to_save":
            copy_sd = wrappers[module_name].modules_to_save[adapter_name].state_dict(keep_vars=True)
            dst = copy_sd[ck[len(module_name) + 1:]]
        else:
            dst = exp[ck].current
        # Converted already; copy_ would still convert if update_layer's dtype choice
        # changed, so a dtype that differs is checked again (and the load undone).
        dst.copy_(value)
        if dst.dtype != value.dtype and not torch.isfinite(dst).all():
            raise AdapterLoadError(f"cannot load adapter from {str(path)!r}: " + _not_finite(ck, found[ck], dst))


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format adapter from directory `path` into `model` as `adapter_name`.

    If the model has no adapter of that name, LoRA layers are injected from the file's
    config first (the adapter becomes active if it is the model's first, as in PEFT);
    otherwise the file must describe the existing adapter (same modules, r, alpha) and its
    weights are replaced (in an adapter zero-padded by `prepare_model_for_compiled_hotswap`,
    the file's rank-r tensors fill the leading rows of A / columns of B, the rest zeroed:
    the shapes stay; another r or alpha needs `hotswap_adapter`). Everything is validated before the model changes; on any error
    (AdapterLoadError / FileNotFoundError, or an OOM / KeyboardInterrupt while writing the
    weights) the model is exactly as before: values, modules, requires_grad flags.

    Every value is converted to the dtype of the parameter it loads into and must be finite
    there (a value that overflows that dtype is refused like a NaN in the file).

    Embedding weights (PEFT's save_embedding_layers: ``model.embed_tokens.weight``,
    ``lm_head.weight``, ``lm_head.base_layer.weight`` where the adapter targets lm_head,
    ``<layer>.original_module.weight`` where it saves it, ...; the layers are the model's
    get_input_embeddings() / get_output_embeddings()) load into the base model's
    embedding parameters, as PEFT loads them: checked and rolled back like every other key,
    and a vocabulary size that differs from the model's is refused, naming the key and both
    shapes (resize the model's token embeddings first, as for PEFT). Tied input and output
    embeddings are one parameter, so loading either changes both; two keys for one tied
    parameter must hold equal values. `unload` / `delete_adapter` do not restore the
    previous embeddings (nor does PEFT).

    The two files must be one save's pair: weights saved by lorakern record the config they
    were saved with, and beside a config that describes another adapter (another r, alpha,
    targets, ...: new weights beside an old config, as a save stopped between its two
    renames leaves them, whoever wrote that config) they are refused as "a mix of two saves",
    naming the directory and what differs. Formatting, key order, keys lorakern ignores and
    PEFT's bookkeeping (base_model_name_or_path, ...) do not count. Weights without the
    record (saved by PEFT or by another tool) load beside any config, as before. A load that
    runs while a save replaces the files may see the mix and refuse it: load again.

    is_trainable=False (PEFT's default) loads the adapter frozen, for inference.
    An adapter that is merged cannot be loaded into (ValueError, model unchanged):
    `lorakern.unmerge(model)` first.

    Example:
        >>> model = lorakern.load_adapter(model, "peft-adapter-dir")   # doctest: +SKIP
    """
    merged = merged_layers(model, adapter_name)
    if merged:  # new weights under the merged delta: a later unmerge would subtract the wrong one
        raise ValueError(
            f"adapter {adapter_name!r} is merged into {len(merged)} layer(s), e.g. {merged[:3]}; "
            "call lorakern.unmerge(model) before loading new weights into it"
        )
    files = _read(Path(path))
    config, tensors = files.config, files.tensors
    existing = adapter_name in adapter_configs(model)
    try:
        targets, to_save, exp, found = _match(model, path, config, tensors, adapter_name, existing)
    except AdapterLoadError as exc:
        if files.mix:  # the mix is the likely cause: name it first
            raise AdapterLoadError(f"{files.mix} Loading also fails: {exc}") from None
        raise
    if files.mix:
        raise AdapterLoadError(files.mix)

    # Everything checked. Convert every value to its destination's dtype and device first
    # (the step most likely to run out of memory), check it is finite there, and record
    # what the changes below touch, while the model is still untouched; then change it,
    # undoing everything on any error.
    values = _convert(model, path, exp, found)
    if existing:  # an adapter padded by prepare_model_for_compiled_hotswap: rank r in its leading rows / columns
        values = {ck: pad_rank(v, exp[ck]) for ck, v in values.items()}
    tokens = _plan_tokens(model, config, targets, to_save)  # checked by _match already
    places = [(t.name, t.module) for t in targets] + list(to_save) + [(t.name, t.module) for t in tokens]
    overwritten = {id(t): t for t in (exp[ck].current for ck in found) if t is not None}  # tied: once
    undo = _Undo(model, adapter_name, list(overwritten.values()), places)
    try:
        with torch.no_grad():
            if not existing:
                with torch.random.fork_rng(devices=[]):  # do not consume the caller's RNG
                    inject_planned(model, config, adapter_name, targets, to_save, inference=not is_trainable, tokens=tokens)
            _write_values(model, path, adapter_name, exp, values, found)
            if existing:
                st = adapter_state(model)
                if is_trainable:
                    st.inference.discard(adapter_name)
                else:
                    st.inference.add(adapter_name)
                set_adapter(model, st.active)
    except BaseException:  # KeyboardInterrupt included: the model must not stay half-loaded
        undo.restore()
        raise
    return model


