"""Save and load adapters in PEFT's on-disk format, atomically and validated.

A directory holds:
- ``adapter_model.safetensors``: keys ``base_model.model.<module path>.lora_A.weight``
  [r, in] and ``….lora_B.weight`` [out, r] (no adapter name), plus, as PEFT writes them,
  the trainable biases (``bias="all"``: every parameter named ``bias``, PEFT's rule;
  ``"lora_only"``: ``<lora layer>.base_layer.bias``) and each modules_to_save module's
  own state dict under its path; metadata ``{"format": "pt"}`` and ``"lorakern_config"``:
  the config saved beside them, as JSON (PEFT ignores metadata).
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
A legacy ``adapter_model.bin`` is read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lorakern.config import LoraConfig
from lorakern.distributed import gather_full_tensors
from lorakern.model import (
    AdapterState,
    ModulesToSave,
    inject_planned,
    adapter_configs,
    adapter_state,
    lora_layers,
    merged_layers,
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


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded into this model (the model is unchanged)."""


# ---- save -------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter_name`, keyed as in adapter_model.safetensors."""
    state = adapter_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {list(state.configs)}")
    cfg = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.lora_A]
    for name, layer in layers:
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if cfg.bias == "all":
        for name, p in _bias_params(model):
            out[PREFIX + name] = p
    elif cfg.bias == "lora_only":
        for name, layer in layers:
            if layer.base_layer.bias is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{k}"] = v
    return out


def _is_bias(name: str) -> bool:
    """PEFT's test for a bias (bias="all"): the parameter is named `bias`. A substring test
    would also take e.g. T5's `relative_attention_bias.weight`, an embedding table."""
    return name == "bias" or name.endswith(".bias")


def _bias_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, param) of every bias parameter (see `_is_bias`), outside LoRA A/B and
    saved-module wrappers (those are saved as the modules' own state dicts)."""
    skip = {id(p) for _, w in saved_modules(model) for p in w.parameters()}
    for _, layer in lora_layers(model):
        skip.update(id(p) for p in layer.lora_A.parameters())
        skip.update(id(p) for p in layer.lora_B.parameters())
    return [(n, p) for n, p in model.named_parameters() if _is_bias(n) and id(p) not in skip]


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


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save `adapter_name` to directory `path` in PEFT's format (see module docstring).

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
    tensors = gather_full_tensors(adapter_state_dict(model, adapter_name))
    # safetensors refuses shared or strided storage: give every tensor its own copy.
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    peft_dict = cfg.to_peft_dict()
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
    what: str  # "lora_A", "lora_B", "modules_to_save" or "bias"
    dtype: torch.dtype  # the destination's dtype and device, known before anything is created
    device: torch.device


def _expected(model: nn.Module, config: LoraConfig, adapter_name: str, existing: bool, targets, to_save):
    """{canonical key: _Slot} for loading `config` into `model` (targets / to_save planned
    already), and the names of the saved modules. Changes nothing."""
    exp: dict[str, _Slot] = {}
    for t in targets:
        if existing:
            a, b = t.module.lora_A[adapter_name].weight, t.module.lora_B[adapter_name].weight
            a_spec, b_spec = (a.dtype, a.device), (b.dtype, b.device)
        else:
            # LoraLinear.update_layer creates A and B in fp32 on the base weight's device.
            a = b = None
            a_spec = b_spec = (torch.float32, t.module.weight.device)
        exp[f"{t.name}.lora_A.weight"] = _Slot(a, (t.r, t.in_features), t.name, "lora_A", *a_spec)
        exp[f"{t.name}.lora_B.weight"] = _Slot(b, (t.out_features, t.r), t.name, "lora_B", *b_spec)
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
        for pname, p in _bias_params(model):
            if any(pname.startswith(s + ".") for s in saved_names):
                continue
            exp[_canonical(pname)] = _Slot(p, tuple(p.shape), pname.rsplit(".", 1)[0], "bias", p.dtype, p.device)
    elif config.bias == "lora_only":
        for t in targets:
            bias = t.module.base_layer.bias if hasattr(t.module, "base_layer") else t.module.bias
            if bias is not None:
                exp[f"{t.name}.bias"] = _Slot(bias, tuple(bias.shape), t.name, "bias", bias.dtype, bias.device)
    return exp, saved_names


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
        self.layers = [(m, adapter_name in m.lora_A, list(m.active_adapters)) for _, m in lora_layers(model)]
        self.wrappers = [(m, adapter_name in m.modules_to_save, m.active_adapter) for _, m in saved_modules(model)]
        self.state = getattr(model, "_lorakern", None)
        if isinstance(self.state, AdapterState):
            self.fields = (dict(self.state.configs), list(self.state.active), set(self.state.inference))

    def restore(self) -> None:
        model, name = self.model, self.adapter_name
        # Layers and wrappers that were there before lose the adapter only if they lacked it.
        for layer, had, active in self.layers:
            if not had and name in layer.lora_A:
                layer.delete_adapter(name)
            layer.active_adapters = active
        for wrapper, had, active in self.wrappers:
            if not had and name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
            wrapper.active_adapter = active
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
    have = {n: layer for n, layer in lora_layers(model) if adapter_name in layer.lora_A}
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
        if layer.r[adapter_name] != t.r or layer.lora_alpha[adapter_name] != t.alpha or layer.use_rslora[adapter_name] != config.use_rslora:
            raise AdapterLoadError(
                f"module {name!r}: adapter {adapter_name!r} has r={layer.r[adapter_name]}, "
                f"lora_alpha={layer.lora_alpha[adapter_name]}, use_rslora={layer.use_rslora[adapter_name]} in the model "
                f"but the file's config gives r={t.r}, lora_alpha={t.alpha}, use_rslora={config.use_rslora}"
            )


def _match(model: nn.Module, path, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str, existing: bool):
    """Plan the load and match the file's tensors to their places: (targets, to_save, exp,
    found {canonical key: file tensor}). Raises AdapterLoadError for a config that does not
    fit the model, missing / unexpected keys, and values of the wrong dtype kind or shape."""
    try:
        targets = plan_targets(model, config)
        to_save = plan_modules_to_save(model, config)
        if existing:
            _check_agreement(model, config, adapter_name, targets)
        exp, saved_names = _expected(model, config, adapter_name, existing, targets, to_save)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AdapterLoadError):
            raise
        raise AdapterLoadError(f"adapter in {str(path)!r} does not fit this model: {exc}") from None

    found: dict[str, torch.Tensor] = {}
    unexpected, problems = [], []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        ck = _canonical(key[len(PREFIX):])
        if ck in exp:
            found[ck] = value
            continue
        # PEFT with bias="all" also writes a saved module's biases as
        # `<module>.modules_to_save.<k>` and `<module>.original_module.<k>`; accept and skip them.
        owner = next((s for s in saved_names if ck.startswith(s + ".modules_to_save.") or ck.startswith(s + ".original_module.")), None)
        if owner is None or not _is_bias(ck):
            unexpected.append(key)
    missing = [k for k in exp if k not in found]
    for ck, value in found.items():
        shape, module_name, what = exp[ck].shape, exp[ck].module, exp[ck].what
        if not value.is_floating_point():
            problems.append(f"{PREFIX}{ck}: dtype {value.dtype} is not floating point")
        elif tuple(value.shape) != shape:
            hint = ""
            if what == "lora_A" and value.dim() == 2 and value.shape[1] == shape[1]:
                hint = f" (rank {value.shape[0]} in the file, r={shape[0]} in the config)"
            elif what == "lora_B" and value.dim() == 2 and value.shape[0] == shape[0]:
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


def _convert(model: nn.Module, path, exp: dict[str, _Slot], found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value in its destination's dtype and device, checked finite there: a value
    finite in the file can overflow the parameter's dtype (fp64 1e300 in fp32, fp32 1e6 in
    fp16) and would load as inf. Raises AdapterLoadError naming each such key."""
    values = {ck: value.to(dtype=exp[ck].dtype, device=exp[ck].device) for ck, value in found.items()}
    problems = [_not_finite(ck, found[ck], v) for ck, v in values.items() if not torch.isfinite(v).all()]
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


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format adapter from directory `path` into `model` as `adapter_name`.

    If the model has no adapter of that name, LoRA layers are injected from the file's
    config first (the adapter becomes active if it is the model's first, as in PEFT);
    otherwise the file must describe the existing adapter (same modules, r, alpha) and its
    weights are replaced. Everything is validated before the model changes; on any error
    (AdapterLoadError / FileNotFoundError, or an OOM / KeyboardInterrupt while writing the
    weights) the model is exactly as before: values, modules, requires_grad flags.

    Every value is converted to the dtype of the parameter it loads into and must be finite
    there (a value that overflows that dtype is refused like a NaN in the file).

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
    places = [(t.name, t.module) for t in targets] + list(to_save)
    undo = _Undo(model, adapter_name, [exp[ck].current for ck in found if exp[ck].current is not None], places)
    try:
        with torch.no_grad():
            if not existing:
                with torch.random.fork_rng(devices=[]):  # do not consume the caller's RNG
                    inject_planned(model, config, adapter_name, targets, to_save, inference=not is_trainable)
            layers = dict(lora_layers(model))
            wrappers = dict(saved_modules(model))
            for ck, value in values.items():
                module_name, what = exp[ck].module, exp[ck].what
                if what in ("lora_A", "lora_B"):
                    dst = getattr(layers[module_name], what)[adapter_name].weight
                elif what == "modules_to_save":
                    copy_sd = wrappers[module_name].modules_to_save[adapter_name].state_dict(keep_vars=True)
                    dst = copy_sd[ck[len(module_name) + 1:]]
                else:
                    dst = exp[ck].current
                # Converted above; copy_ would still convert if update_layer's fp32 choice
                # changed, so a dtype that differs is checked again (and the load undone).
                dst.copy_(value)
                if dst.dtype != value.dtype and not torch.isfinite(dst).all():
                    raise AdapterLoadError(f"cannot load adapter from {str(path)!r}: " + _not_finite(ck, found[ck], dst))
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


