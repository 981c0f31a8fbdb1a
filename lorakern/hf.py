"""Hugging Face `Trainer` (and TRL) integration: adapter-only saves, resume, clear errors.

Two pieces, both explicit:

1. `save_pretrained` writes the adapters. `inject` (and `load_adapter`, which injects)
   on a transformers `PreTrainedModel` gives that model an instance-level
   `save_pretrained` that writes PEFT-format adapter directories, as a PeftModel's does:
   ``adapter_model.safetensors`` + ``adapter_config.json`` (modules_to_save included),
   adapter "default" in the directory itself, any other adapter in a subdirectory named
   after it. `Trainer.save_model()` and every ``checkpoint-N`` go through it, so a
   plain `transformers.Trainer` (or TRL's `SFTTrainer`) writes no base weight. Once the
   model has no adapter left (`lorakern.unload`, the last `delete_adapter`), it is the
   transformers method again; that one stays reachable as
   ``type(model).save_pretrained(model, path)``.

2. `Trainer` (this module's; or `AdapterTrainerMixin` mixed into any Trainer subclass,
   e.g. TRL's `SFTTrainer`) resumes from those checkpoints: transformers' Trainer loads
   adapter-only checkpoints only into a `peft.PeftModel` and fails on them otherwise
   ("Can't find a checkpoint index"). The mixin loads them back with
   `lorakern.load_adapter` (optimizer, scheduler and RNG state are Trainer's, as usual),
   does the same for `load_best_model_at_end`, and before the optimizer is built refuses,
   with a message that says why, a model with no trainable parameter and fp16 trainable
   parameters under `fp16=True` mixed precision (torch's gradient scaler refuses fp16
   gradients: "Attempting to unscale FP16 gradients").

    >>> trainer = lorakern.hf.Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)                              # doctest: +SKIP
    >>> class SFTTrainer(lorakern.hf.AdapterTrainerMixin, trl.SFTTrainer): ...  # doctest: +SKIP

Importing this module does not import transformers; `lorakern.hf.Trainer` does.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

from lorakern import adapters as _adapters
from lorakern.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME, adapter_state_dict, load_adapter, save_adapter
from lorakern.distributed import gather_full_tensors
from lorakern.model import AdapterState, adapter_state, saved_modules

__all__ = [
    "AdapterTrainerMixin", "Trainer", "save_pretrained", "load_pretrained", "check_trainable",
    "upcast_trainable", "install_save_pretrained", "is_injected", "saved_adapters",
]

# transformers' weight files: a checkpoint holding one of these is a full-model checkpoint.
_FULL_WEIGHTS = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
# save_pretrained keywords of transformers that mean nothing for one small adapter file
# (push_to_hub passes max_shard_size); accepted and ignored.
_IGNORED = frozenset({"max_shard_size", "save_peft_format", "save_original_format", "token"})


def is_injected(model: nn.Module) -> bool:
    """Whether `model` has lorakern adapters (`inject` / `load_adapter`)."""
    return isinstance(getattr(model, "_lorakern", None), AdapterState)


# ---- save ---------------------------------------------------------------------------


def _adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where `save_pretrained` puts an adapter: "default" in the directory, others in a subdirectory (PEFT's layout)."""
    return Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    selected_adapters: list[str] | None = None,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    push_to_hub: bool = False,
    **kwargs,
) -> None:
    """Save the model's adapters in PEFT's format, as `PeftModel.save_pretrained` does.

    Adapter "default" goes to `save_directory` itself, every other adapter to
    `save_directory/<name>` (each an ``adapter_model.safetensors`` + ``adapter_config.json``
    pair written by `lorakern.save_adapter`). No base weight is written.

    Args:
        selected_adapters: the adapters to save (default: all, as PEFT).
        is_main_process: False on the other ranks of a distributed run: nothing is written,
            but an FSDP2-sharded model's adapters are still gathered (a collective).
        state_dict: a full state dict of the model (the unwrapped model's key names), as
            Trainer passes under DeepSpeed ZeRO-3 / FSDP FULL_STATE_DICT, where the
            model's own parameters are partitioned: the adapter tensors are taken from it.
        safe_serialization: must be True (lorakern writes safetensors only).
        push_to_hub: not supported here (upload the directory with huggingface_hub).
        kwargs: transformers' `max_shard_size`, `token`, `save_peft_format`,
            `save_original_format` are accepted and ignored; anything else is a TypeError.
    """
    state = adapter_state(model)
    unknown = sorted(set(kwargs) - _IGNORED)
    if unknown:
        raise TypeError(
            f"save_pretrained of a lorakern-injected model writes its adapters and takes no {unknown}; "
            "for the transformers method (every weight) call lorakern.unload(model) first, "
            "or type(model).save_pretrained(model, path, ...)"
        )
    if not safe_serialization:
        raise ValueError("lorakern saves adapters as safetensors only (safe_serialization=False is not supported)")
    if push_to_hub:
        raise NotImplementedError(
            "save_pretrained(push_to_hub=True) is not supported for lorakern adapters: save, then upload the "
            "directory with huggingface_hub.upload_folder"
        )
    names = list(state.configs) if selected_adapters is None else list(selected_adapters)
    missing = [n for n in names if n not in state.configs]
    if missing or not names:
        raise ValueError(f"selected_adapters {names} must name adapters of the model; it has {list(state.configs)}")
    for name in names:
        path = _adapter_dir(save_directory, name)
        if state_dict is not None:
            if is_main_process:
                _save_from_state_dict(model, path, name, state_dict)
        elif is_main_process:
            save_adapter(model, path, name)
        else:  # the gather save_adapter runs on every rank of an FSDP2-sharded model
            gather_full_tensors(adapter_state_dict(model, name))


def _state_key(key: str, available, wrappers: list[str], adapter_name: str) -> str | None:
    """The model state-dict key of an adapter file key (PEFT's keys drop the adapter name)."""
    k = key[len(PREFIX):]
    if k in available:  # biases
        return k
    for w in wrappers:  # a modules_to_save copy: <module>.<k> -> <module>.modules_to_save.<adapter>.<k>
        if k.startswith(w + "."):
            cand = f"{w}.modules_to_save.{adapter_name}.{k[len(w) + 1:]}"
            if cand in available:
                return cand
    head, _, last = k.rpartition(".")  # <layer>.lora_A.weight -> <layer>.lora_A.<adapter>.weight
    for cand in (f"{head}.{adapter_name}.{last}", f"{k}.{adapter_name}"):  # or a ParameterDict entry
        if cand in available:
            return cand
    return None


def _as_held(key: str, value: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A state_dict tensor cut to the shape the model's own tensor has in the file: an
    adapter zero-padded by prepare_model_for_compiled_hotswap is saved at its own rank
    (A's leading rows, B's leading columns), as `save_adapter` saves it. Padding that is not
    zero is refused (the file would hold another adapter than the model runs)."""
    if value.shape == own.shape:
        return value
    dim = 0 if key.endswith(("lora_A.weight", "lora_embedding_A")) else 1
    r = own.shape[dim]
    same_rest = value.dim() == own.dim() and all(value.shape[d] == own.shape[d] for d in range(own.dim()) if d != dim)
    if not same_rest or not key.endswith(("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")):
        raise ValueError(f"state_dict's {key!r} has shape {tuple(value.shape)}; the model's is {tuple(own.shape)}")
    if value.narrow(dim, r, value.shape[dim] - r).any():
        raise ValueError(
            f"cannot save {key!r}: it holds rank {r} zero-padded to {value.shape[dim]} "
            "(prepare_model_for_compiled_hotswap), but the padding in the state_dict is not zero"
        )
    return value.narrow(dim, 0, r)


def _save_from_state_dict(model: nn.Module, path: Path, adapter_name: str, state_dict: dict) -> None:
    """`save_adapter`, with the values taken from `state_dict` rather than the model."""
    from safetensors.torch import save as st_save

    wrappers = [n for n, w in saved_modules(model) if adapter_name in w.modules_to_save]
    tensors, missing = {}, []
    held = adapter_state_dict(model, adapter_name)  # the shapes the file holds (true ranks)
    for key, own in held.items():
        sk = _state_key(key, state_dict, wrappers, adapter_name)
        if sk is None:
            missing.append(key)
        else:
            tensors[key] = _as_held(key, state_dict[sk], own)
    if missing:
        raise ValueError(
            f"state_dict lacks the tensors of adapter {adapter_name!r} for {missing[:4]}"
            + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        )
    cfg = adapter_state(model).configs[adapter_name]
    peft_dict = _adapters._config_as_held(model, adapter_name, cfg).to_peft_dict()
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    weights = st_save(data, metadata={"format": "pt", _adapters.RECORD_KEY: json.dumps(peft_dict, sort_keys=True)})
    config = (json.dumps(peft_dict, indent=2, sort_keys=True) + "\n").encode()
    path.mkdir(parents=True, exist_ok=True)
    with _adapters._save_lock(path) as locked:  # the same atomic, locked write as save_adapter
        if locked:
            _adapters._remove_stale_temporaries(path)
        _adapters._replace_pair(path, weights, config)


class _SavePretrained:
    """The `save_pretrained` an injected PreTrainedModel gets (see the module docstring).

    A callable holding the model weakly (no reference cycle keeps a dropped model alive),
    copied and pickled with the model (`copy.deepcopy`, `torch.save`) as bound to it.
    """

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __call__(self, save_directory: str | os.PathLike, **kwargs) -> None:
        model = self._model()
        if model is None:
            raise ReferenceError("the model this save_pretrained belonged to no longer exists")
        if not is_injected(model):  # unloaded, or its last adapter deleted: a plain model again
            return type(model).save_pretrained(model, save_directory, **kwargs)
        return save_pretrained(model, save_directory, **kwargs)

    __call__.__doc__ = save_pretrained.__doc__

    def __reduce__(self):
        return (_SavePretrained, (self._model(),))

    def __repr__(self) -> str:
        return "<lorakern.hf.save_pretrained: writes the adapters in PEFT's format>"


def install_save_pretrained(model: nn.Module) -> None:
    """Give a transformers PreTrainedModel the adapter-writing `save_pretrained` (see the
    module docstring). Called by `inject`; anything else (not a PreTrainedModel, or a
    model with an instance-level save_pretrained already) is left alone."""
    modeling = sys.modules.get("transformers.modeling_utils")  # a PreTrainedModel means it is imported
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return
    if "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrained(model)


# ---- load ---------------------------------------------------------------------------


def _has_adapter(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and ((path / WEIGHTS_NAME).is_file() or (path / LEGACY_WEIGHTS_NAME).is_file())


def saved_adapters(directory: str | os.PathLike, names=None) -> dict[str, Path]:
    """{adapter name: its directory} for what `save_pretrained` wrote into `directory`:
    "default" in it, other adapters in subdirectories. `names`: look for these adapters
    only (a Trainer's output directory also holds `checkpoint-N` subdirectories, each an
    adapter directory); default: every subdirectory that holds an adapter."""
    directory = Path(directory)
    found = {"default": directory} if _has_adapter(directory) else {}
    if names is not None:
        subs = [directory / n for n in names if n != "default"]
    else:
        subs = sorted(directory.iterdir()) if directory.is_dir() else []
    for sub in subs:
        if sub.is_dir() and _has_adapter(sub):
            found[sub.name] = sub
    if names is not None and "default" not in names:
        found.pop("default", None)
    return found


def load_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load every adapter `save_pretrained` wrote into `directory` into the model's adapters
    of the same names, in place (parameters keep their identity, so an optimizer built on
    them stays valid), each keeping its trainability (frozen if it was loaded for inference).

    Every adapter of the model must be there (ValueError before anything is loaded
    otherwise); other subdirectories are not looked at. Each adapter is validated before
    it is written (see `lorakern.load_adapter`).
    """
    state = adapter_state(model)
    found = saved_adapters(directory, state.configs)
    if not found:
        raise FileNotFoundError(
            f"no adapter of the model ({list(state.configs)}: {CONFIG_NAME} + {WEIGHTS_NAME}) in {str(directory)!r}"
        )
    missing = [n for n in state.configs if n not in found]
    if missing:
        raise ValueError(
            f"{str(directory)!r} holds adapters {sorted(found)} of the model's {list(state.configs)}; "
            f"not saved there: {missing}"
        )
    for name in state.configs:
        load_adapter(model, found[name], adapter_name=name, is_trainable=name not in state.inference)
    return model


# ---- checks -------------------------------------------------------------------------


def check_trainable(model: nn.Module, args=None) -> None:
    """Raise ValueError, saying why and what to do, when training `model` cannot work:
    no parameter requires grad, or (with `args.fp16`, TrainingArguments' fp16 mixed
    precision) a trainable parameter is float16 — torch's gradient scaler refuses to
    unscale fp16 gradients. `lorakern.hf.Trainer` calls it before building the optimizer."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kind = type(model).__name__
    if not trainable:
        state = getattr(model, "_lorakern", None)
        if not isinstance(state, AdapterState):
            hint = "it has no lorakern adapter: call lorakern.inject(model, lorakern.LoraConfig(...)) first"
        else:
            why = []
            loaded = sorted(state.inference)
            if loaded:
                why.append(
                    f"adapter(s) {loaded} were loaded for inference (lorakern.load_adapter's default "
                    "is_trainable=False, as in PEFT): load with is_trainable=True to train them"
                )
            inactive = [n for n in state.configs if n not in state.active and n not in state.inference]
            if inactive:
                why.append(f"adapter(s) {inactive} are inactive: lorakern.set_adapter(model, name) makes one trainable")
            if not why:
                why.append("its adapters' parameters were frozen by hand (requires_grad_(False))")
            hint = "; ".join(why)
        raise ValueError(f"no parameter of {kind} requires grad, so the Trainer has nothing to train: {hint}")
    if args is not None and getattr(args, "fp16", False):
        half = [n for n, p in trainable if p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"TrainingArguments(fp16=True) with {len(half)} float16 trainable parameter(s) of {kind} "
                f"(e.g. {half[0]!r}): fp16 mixed precision needs float32 trainable weights, and torch's "
                "gradient scaler refuses fp16 gradients ('Attempting to unscale FP16 gradients'). lorakern "
                "creates adapters in float32 on a float16 base; casting the model after inject "
                "(model.half(), model.to(torch.float16)) casts them too: call lorakern.hf.upcast_trainable(model)"
            )


@torch.no_grad()
def upcast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Cast every trainable float16 / bfloat16 parameter to `dtype` (default float32) in
    place (the Parameter objects stay; build the optimizer afterwards). The frozen base
    keeps its dtype: lorakern computes with fp32 adapters on an fp16 / bf16 base."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(dtype)
    return model


# ---- Trainer ------------------------------------------------------------------------


def _full_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _FULL_WEIGHTS)


class AdapterTrainerMixin:
    """Mix into a `transformers.Trainer` subclass, first (``class T(AdapterTrainerMixin,
    SFTTrainer)``), for a lorakern-injected model:

    - resuming (`train(resume_from_checkpoint=...)`) from an adapter-only checkpoint loads
      its adapters with `load_pretrained`; Trainer then restores optimizer, scheduler and
      RNG state as usual;
    - `load_best_model_at_end` loads the best checkpoint's adapters the same way;
    - before the optimizer is built, `check_trainable(model, args)`.

    Saving needs nothing here: `Trainer` calls the model's `save_pretrained`. Anything that
    is not a lorakern-injected model with an adapter-only checkpoint is left to Trainer.
    """

    def create_optimizer(self, *args, **kwargs):
        check_trainable(self.model, self.args)
        return super().create_optimizer(*args, **kwargs)

    def _lorakern_model(self, model: nn.Module | None = None) -> nn.Module | None:
        model = self.model if model is None else model
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            model = accelerator.unwrap_model(model, keep_torch_compile=False)
        return model if is_injected(model) else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        inner = self._lorakern_model(model)
        path = Path(resume_from_checkpoint)
        if inner is not None and saved_adapters(path, adapter_state(inner).configs) and not _full_weights(path):
            load_pretrained(inner, path)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        inner = self._lorakern_model()
        best = self.state.best_model_checkpoint
        distributed = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        if (
            inner is not None and best and not distributed
            and saved_adapters(best, adapter_state(inner).configs) and not _full_weights(Path(best))
        ):
            load_pretrained(inner, best)
            return None
        return super()._load_best_model()


_TRAINER = None


def __getattr__(name: str):
    """`Trainer` is built on first use, so importing lorakern.hf does not import transformers' Trainer."""
    global _TRAINER
    if name == "Trainer":
        if _TRAINER is None:
            import transformers

            class Trainer(AdapterTrainerMixin, transformers.Trainer):
                """`transformers.Trainer` with `AdapterTrainerMixin`: resume and best-model loading from
                lorakern's adapter-only checkpoints, and clear errors before training a model that cannot
                train."""

            Trainer.__module__, Trainer.__qualname__ = __name__, "Trainer"
            _TRAINER = Trainer
        return _TRAINER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
