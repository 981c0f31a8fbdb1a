"""Merge a PEFT-format LoRA adapter into a local Hugging Face safetensors checkpoint,
shard by shard, and inspect an adapter without a model.

`merge_checkpoint(base_dir, adapter_dir, out_dir)` (the `lorakern merge` command):

- Reads the checkpoint's layout: ``model.safetensors.index.json`` (its ``weight_map``
  names the shard of every tensor) or a single ``model.safetensors``, and each shard's
  safetensors header (names, dtypes, shapes, byte offsets) -- never the whole model.
- Reads the adapter directory with `lorakern.adapters.read_adapter` (so the configs it
  refuses are refused here too, and the PEFT features in ``MERGE_FEATURES_OFF`` --
  ``use_dora``, ``lora_bias``, ``target_parameters``, ... -- whatever lorakern's layers
  support) and matches every tensor to a checkpoint tensor, all before anything is written:
  ``base_model.model.<module>.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r] is a
  delta for ``<module>.weight`` ([out, in]; [in, out] with ``fan_in_fan_out``, GPT-2's
  Conv1D); every other tensor replaces the checkpoint tensor of that name, as PEFT loads
  it into the model before merging (``modules_to_save`` modules' state dicts, the biases
  ``bias="all"`` / ``"lora_only"`` train, base embedding weights written by PEFT's
  ``save_embedding_layers``; ``<layer>.base_layer.<p>`` is ``<layer>.<p>``, and a delta
  goes on top of such a replaced weight). A missing tensor, a wrong shape, a rank that
  disagrees with the config's ``r`` / ``rank_pattern``, a LoRA tensor of a kind this merge
  does not handle (embedding / conv LoRA, DoRA magnitudes, LoRA biases) or a merge target
  that is not a float tensor is refused with a `MergeError` naming the tensor (and both
  shapes). Keys are checked in natural order (layers.2 before layers.10), so the error
  names the same tensor on every run.
- Writes each shard under the same file name with the same header bytes (same tensor
  order, offsets, dtypes, ``__metadata__``): untouched tensors are copied byte for byte
  in chunks, each merged tensor is read alone and written as
  ``(W.float() + (B.float() @ A.float()) * scaling).to(W.dtype)`` -- the delta in fp32
  (fp64 for an fp64 weight), cast once; PEFT's order of operations, so an fp32 merge is
  bit for bit PEFT's -- with scaling = lora_alpha / r (/ sqrt(r) with ``use_rslora``) from
  the config and its ``rank_pattern`` / ``alpha_pattern``. The fp32 sum runs over blocks
  of rows (``MERGE_BLOCK_BYTES``), so at most one tensor of the checkpoint, in its own
  dtype, plus one fp32 block and its delta are in memory at a time, beside the adapter.
- Copies the index file and every other top-level file of ``base_dir`` (config.json,
  generation_config.json, tokenizer files, ...) unchanged; skips sub-directories and
  other weight files (``*.bin``, ``*.pth``, ``*.pt``, ``*.ckpt``, ``*.h5``, ``*.msgpack``,
  ``*.gguf``, safetensors files the checkpoint does not use), which would hold the
  un-merged weights, and lists what it skipped.
- Writes into a temporary directory beside ``out_dir`` and renames it into place at the
  end, so ``out_dir`` is either absent (on any error) or complete. An existing non-empty
  ``out_dir`` is refused unless ``force=True`` (then it is replaced, after the new one is
  complete).

`inspect_adapter(adapter_dir)` (the `lorakern inspect` command): per LoRA module its r,
lora_alpha, scaling, parameter count and the Frobenius norm of its delta
‖s·B A‖_F, computed from r×r products: ‖s·B A‖_F² = s²·Σ (BᵀB) ∘ (A Aᵀ).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakern.adapters import PREFIX, read_adapter
from lorakern.config import LoraConfig
from lorakern.model import is_bias

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files of other weight formats: copying them would put the un-merged weights beside the
# merged ones, so they are skipped (and listed).
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors", ".index.json")
COPY_CHUNK = 16 << 20  # bytes per read when copying an untouched tensor
MERGE_BLOCK_BYTES = 64 << 20  # fp32 bytes of a weight's rows merged at a time

# safetensors dtype -> bytes per element (sub-byte and unknown dtypes are only ever copied).
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "C64": 8,
}
# The dtypes a delta is merged into or a replacement is written as.
_FLOAT = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class MergeError(ValueError):
    """The adapter does not fit the checkpoint (or a directory is not usable); nothing was written."""


# ---- the adapter, without a model -------------------------------------------------------


@dataclass
class LoraModule:
    """One LoRA module of an adapter file."""

    name: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    r: int
    alpha: float
    scaling: float

    @property
    def params(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta_norm(self) -> float:
        """‖scaling · B A‖_F from r×r products: s²·Σ (BᵀB) ∘ (A Aᵀ), in fp64."""
        A, B = self.A.double(), self.B.double()
        sq = float(((B.t() @ B) * (A @ A.t())).sum())
        return abs(self.scaling) * math.sqrt(max(sq, 0.0))


@dataclass
class AdapterTensors:
    """An adapter directory split into LoRA modules and the tensors it replaces whole."""

    config: LoraConfig
    modules: dict[str, LoraModule]  # by module name, in natural order
    replacements: dict[str, torch.Tensor]  # {model tensor name: value}: modules_to_save, trained biases, base weights
    skipped: list[str]  # file keys read and ignored (original_module copies, duplicate wrapper biases)


def _natural(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


def split_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor], where: str = "adapter") -> AdapterTensors:
    """Sort an adapter file's tensors (keys as PEFT saves them) into LoRA modules and whole
    tensors, checking ranks against the config. Raises MergeError for a key lorakern does
    not know how to merge. Keys are taken in natural order, so the first problem reported
    is the same on every run.

    Whole tensors are every other key, as PEFT loads them (into the model tensor of that
    name): a modules_to_save module's state dict, the biases bias="all" / "lora_only" train
    (``<layer>.base_layer.bias`` is ``<layer>.bias``), base embedding weights PEFT's
    save_embedding_layers writes (``lm_head.base_layer.weight`` is ``lm_head.weight``).
    Skipped: ``<module>.original_module.*`` (the base copy of a modules_to_save module,
    which merge_and_unload drops for the trained copy) and the duplicate
    ``<module>.modules_to_save.<bias>`` keys PEFT writes with bias="all".
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key in sorted(tensors, key=_natural):
        value = tensors[key]
        if not key.startswith(PREFIX):
            raise MergeError(f"{where}: key {key!r} does not start with {PREFIX!r} (not a PEFT adapter key)")
        name = key[len(PREFIX):]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                lora.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            if ".lora_" in f".{name}":
                kind = (
                    "an embedding LoRA (lora_embedding_A/B)" if ".lora_embedding_" in f".{name}"
                    else "a DoRA magnitude" if "lora_magnitude_vector" in name
                    else "a LoRA bias (lora_bias)" if name.endswith((".lora_A.bias", ".lora_B.bias"))
                    else "a LoRA tensor of a kind lorakern does not merge"
                )
                raise MergeError(f"{where}: {key!r} is {kind}; lorakern merges only Linear / Conv1D LoRA (lora_A.weight, lora_B.weight)")
            if ".original_module." in f".{name}":
                skipped.append(key)
                continue
            if ".modules_to_save." in f".{name}":
                if is_bias(name):
                    skipped.append(key)
                    continue
                raise MergeError(f"{where}: unexpected key {key!r} (a wrapper's tensor that PEFT does not save)")
            name = name.replace(".base_layer.", ".")
            if name in replacements:
                raise MergeError(f"{where}: two keys give tensor {name!r}")
            replacements[name] = value
    modules: dict[str, LoraModule] = {}
    for name, pair in lora.items():
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            raise MergeError(f"{where}: module {name!r} has {' and '.join(sorted(set(pair)))} but no {missing.pop()}.weight")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2:
            raise MergeError(
                f"{where}: module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} are not matrices "
                "(a Conv LoRA?); lorakern merges only Linear / Conv1D LoRA"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise MergeError(f"{where}: module {name!r}: lora_A / lora_B must be floating point, got {A.dtype} / {B.dtype}")
        if A.shape[0] != B.shape[1]:
            raise MergeError(f"{where}: module {name!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} have different ranks")
        r = config.rank_for(name)
        if A.shape[0] != r:
            raise MergeError(
                f"{where}: module {name!r}: rank {A.shape[0]} in the file (lora_A {list(A.shape)}), "
                f"r={r} in the config (r / rank_pattern)"
            )
        for what, t in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(t).all():
                raise MergeError(f"{where}: {PREFIX}{name}.{what}.weight has non-finite values (NaN or inf)")
        modules[name] = LoraModule(name, A, B, r, config.alpha_for(name), config.scaling_for(name))
    for name, t in replacements.items():
        if not t.is_floating_point():
            raise MergeError(f"{where}: {PREFIX}{name}: dtype {t.dtype} is not floating point")
        if not torch.isfinite(t).all():
            raise MergeError(f"{where}: {PREFIX}{name} has non-finite values (NaN or inf)")
    return AdapterTensors(config, modules, replacements, skipped)


# adapter_config.json keys of PEFT LoRA features that change the merged weight in ways
# this merge does not compute: refused here whatever lorakern's LoraConfig accepts
# (a layer may run DoRA, but merging it needs the column norms of W + s·B A).
MERGE_FEATURES_OFF = (
    "use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
    "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "megatron_config",
)


def read_adapter_tensors(adapter_dir: str | os.PathLike) -> AdapterTensors:
    """`read_adapter` (PEFT's format, refusing configs lorakern does not implement), then
    `split_adapter`; also refuses the features in MERGE_FEATURES_OFF."""
    where = f"adapter {str(adapter_dir)!r}"
    config, tensors = read_adapter(adapter_dir)
    raw = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    for key in MERGE_FEATURES_OFF:
        value = raw.get(key)
        if value not in (None, False, {}, []):
            raise MergeError(f"{where}: adapter_config.json sets {key}={value!r}; lorakern merge does not merge that PEFT feature")
    return split_adapter(config, tensors, where=where)


# ---- inspect ------------------------------------------------------------------------------


def inspect_adapter(adapter_dir: str | os.PathLike) -> dict:
    """What an adapter directory holds, as a JSON-able dict: the config's main keys, one row
    per LoRA module (module, r, alpha, scaling, params, delta_norm = ‖s·B A‖_F), the whole
    tensors it replaces (modules_to_save, trained biases) and totals."""
    path = Path(adapter_dir)
    adapter = read_adapter_tensors(path)
    cfg = adapter.config
    raw = json.loads((path / "adapter_config.json").read_text())
    rows = [
        {"module": m.name, "r": m.r, "alpha": m.alpha, "scaling": m.scaling, "params": m.params,
         "shape": [m.B.shape[0], m.A.shape[1]], "dtype": str(m.A.dtype).removeprefix("torch."),
         "delta_norm": m.delta_norm()}
        for m in adapter.modules.values()
    ]
    whole = [{"tensor": k, "kind": _kind(cfg, k), "shape": list(v.shape), "params": v.numel()}
             for k, v in adapter.replacements.items()]
    lora_params = sum(r["params"] for r in rows)
    whole_params = sum(w["params"] for w in whole)
    return {
        "adapter_dir": str(path),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "config": {
            "r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
            "target_modules": cfg.target_modules, "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern,
            "fan_in_fan_out": cfg.fan_in_fan_out, "bias": cfg.bias, "modules_to_save": cfg.modules_to_save,
        },
        "modules": rows,
        "replaced_tensors": whole,
        "totals": {
            "lora_modules": len(rows),
            "lora_params": lora_params,
            "replaced_params": whole_params,
            "params": lora_params + whole_params,
            # The norm of all deltas together (they are in different tensors): sqrt of the sum of squares.
            "delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in rows)),
        },
    }


def _kind(config: LoraConfig, name: str) -> str:
    """What a whole tensor of an adapter file is (for the table)."""
    if config.module_to_save(name.rsplit(".", 1)[0]):
        return "modules_to_save"
    if is_bias(name) and config.bias != "none":
        return f"bias ({config.bias})"
    return "base weight"  # e.g. an embedding PEFT's save_embedding_layers wrote


def format_inspect(info: dict) -> str:
    """`inspect_adapter`'s dict as the text table `lorakern inspect` prints."""
    cfg = info["config"]
    lines = [f"adapter: {info['adapter_dir']}"]
    if info.get("base_model_name_or_path"):
        lines.append(f"base model: {info['base_model_name_or_path']}")
    lines.append(
        f"r={cfg['r']}  lora_alpha={_num(cfg['lora_alpha'])}  use_rslora={cfg['use_rslora']}  "
        f"fan_in_fan_out={cfg['fan_in_fan_out']}  bias={cfg['bias']}"
    )
    lines.append(f"target_modules: {cfg['target_modules']}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg[key]:
            lines.append(f"{key}: {cfg[key]}")
    if cfg["modules_to_save"]:
        lines.append(f"modules_to_save: {cfg['modules_to_save']}")
    lines.append("")
    header = ("module", "r", "alpha", "scaling", "out×in", "params", "‖s·BA‖_F")
    body = [
        (r["module"], str(r["r"]), _num(r["alpha"]), f"{r['scaling']:.6g}", "×".join(map(str, r["shape"])),
         f"{r['params']:,}", f"{r['delta_norm']:.6g}")
        for r in info["modules"]
    ]
    t = info["totals"]
    total = (f"total ({t['lora_modules']} modules)", "", "", "", "", f"{t['lora_params']:,}", f"{t['delta_norm']:.6g}")
    lines.extend(_table(header, body, total, right={1, 2, 3, 5, 6}))
    if info["replaced_tensors"]:
        lines.append("")
        lines.append("tensors the adapter replaces whole:")
        body = [(w["tensor"], w["kind"], "×".join(map(str, w["shape"])) or "scalar", f"{w['params']:,}")
                for w in info["replaced_tensors"]]
        lines.extend(_table(("tensor", "kind", "shape", "params"), body, ("total", "", "", f"{t['replaced_params']:,}"), right={3}))
    lines.append("")
    lines.append(f"parameters in the adapter: {t['params']:,}")
    return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _table(header, body, total, right: set[int]) -> list[str]:
    rows = [header, *body, total]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(header), rule, *map(fmt, body), rule, fmt(total)]


# ---- the checkpoint ---------------------------------------------------------------------


@dataclass
class TensorInfo:
    shard: str
    dtype: str  # safetensors' dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets in the shard's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Shard:
    name: str
    path: Path
    header_len: int  # 8 + the JSON header's length: where the data section starts
    size: int  # file size in bytes
    tensors: dict[str, TensorInfo]  # in data-offset order


@dataclass
class Checkpoint:
    path: Path
    index: str | None  # the index file's name, or None for a single-file checkpoint
    shards: list[Shard]
    tensors: dict[str, TensorInfo]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _read_header(path: Path) -> tuple[int, dict, int]:
    """(8 + header length, header dict, file size) of a safetensors file, checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MergeError(f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise MergeError(f"{str(path)!r} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MergeError(f"{str(path)!r}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise MergeError(f"{str(path)!r}: unreadable safetensors header")
    return 8 + n, header, size


def _read_shard(path: Path, name: str) -> Shard:
    from safetensors import safe_open

    header_len, header, size = _read_header(path)
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    for key, v in header.items():
        try:
            dtype, shape, (start, end) = v["dtype"], tuple(int(d) for d in v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{str(path)!r}: bad header entry for {key!r}") from None
        itemsize = _ITEMSIZE.get(dtype)
        if not (0 <= start <= end <= size - header_len) or (itemsize is not None and end - start != math.prod(shape) * itemsize):
            raise MergeError(f"{str(path)!r}: header entry for {key!r} has inconsistent offsets {[start, end]}")
        tensors[key] = TensorInfo(name, dtype, shape, start, end)
    # safetensors' own check of the same header (offsets contiguous, sizes, names).
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # safetensors raises its own error type
        raise MergeError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    if keys != set(tensors):
        raise MergeError(f"{str(path)!r}: header parse disagrees with safetensors")
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    return Shard(name, path, header_len, size, ordered)


def _plain_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise MergeError(f"{where}: shard name {name!r} is not a file name in the checkpoint directory")
    return name


def read_checkpoint(base_dir: str | os.PathLike) -> Checkpoint:
    """The layout of a Hugging Face safetensors checkpoint: the index (or single file) and
    every shard's header; no tensor is read."""
    path = Path(base_dir)
    if not path.is_dir():
        raise MergeError(f"checkpoint directory {str(path)!r} does not exist")
    index_name = INDEX_NAME if (path / INDEX_NAME).is_file() else None
    single = SINGLE_NAME if (path / SINGLE_NAME).is_file() else None
    if index_name is None and single is None:
        indexes = sorted(p.name for p in path.glob("*.safetensors.index.json") if p.is_file())
        files = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        if len(indexes) == 1:
            index_name = indexes[0]
        elif not indexes and len(files) == 1:
            single = files[0]
        else:
            raise MergeError(
                f"{str(path)!r} holds no {INDEX_NAME} or {SINGLE_NAME}"
                + (f" (and several candidates: {indexes or files})" if indexes or files else "")
                + "; lorakern merge reads Hugging Face safetensors checkpoints only"
            )
    if index_name is not None:
        where = str(path / index_name)
        try:
            index = json.loads((path / index_name).read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise MergeError(f"{where!r} is not a safetensors index (a JSON object with a weight_map)") from None
        names = list(dict.fromkeys(_plain_name(v, where) for v in weight_map.values()))
    else:
        weight_map, names = None, [single]
    shards, tensors = [], {}
    for name in sorted(names):
        shard_path = path / name
        if not shard_path.is_file():
            raise MergeError(f"checkpoint shard {str(shard_path)!r} (named in {index_name}) is missing")
        shard = _read_shard(shard_path, name)
        for key, info in shard.tensors.items():
            if key in tensors:
                raise MergeError(f"tensor {key!r} is in two shards: {tensors[key].shard} and {name}")
            tensors[key] = info
        shards.append(shard)
    if weight_map is not None:
        for key, shard_name in weight_map.items():
            if key not in tensors or tensors[key].shard != shard_name:
                found = f"found in {tensors[key].shard}" if key in tensors else "in no shard"
                raise MergeError(f"{index_name}: tensor {key!r} is mapped to {shard_name} but is {found}")
    return Checkpoint(path, index_name, shards, tensors)


# ---- the plan: everything checked before anything is written ------------------------------


@dataclass
class Delta:
    key: str  # the checkpoint tensor, "<module>.weight"
    module: LoraModule
    transpose: bool  # the checkpoint stores it [in, out] (fan_in_fan_out)


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    adapter: AdapterTensors
    deltas: dict[str, Delta]  # by checkpoint tensor name
    replacements: dict[str, torch.Tensor]  # by checkpoint tensor name, already in its dtype
    copies: list[str]  # top-level files of base_dir copied unchanged (the index included)
    skipped: list[str]  # files / folders of base_dir not copied


def _shape_str(shape) -> str:
    return str(list(shape))


def plan_merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> MergePlan:
    """Match every adapter tensor to a checkpoint tensor (names, shapes, dtypes, ranks) and
    list the files to copy; raises MergeError on the first misfit, naming the tensor."""
    ckpt = read_checkpoint(base_dir)
    adapter = read_adapter_tensors(adapter_dir)
    fifo = adapter.config.fan_in_fan_out
    keys = list(ckpt.tensors)

    def missing(key: str, what: str) -> MergeError:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f" (closest checkpoint tensor: {close[0]!r})" if close else ""
        return MergeError(
            f"the adapter does not fit the checkpoint: {what} needs tensor {key!r}, which the checkpoint "
            f"in {str(ckpt.path)!r} does not have{hint}"
        )

    deltas: dict[str, Delta] = {}
    for name, m in adapter.modules.items():
        key = f"{name}.weight"
        info = ckpt.tensors.get(key)
        what = f"the LoRA of module {name!r}"
        if info is None:
            raise missing(key, what)
        out_f, in_f = m.B.shape[0], m.A.shape[1]
        want = (in_f, out_f) if fifo else (out_f, in_f)
        if info.shape != want:
            layout = "[in, out] (fan_in_fan_out=true)" if fifo else "[out, in]"
            hint = ""
            if len(info.shape) == 2 and info.shape == want[::-1]:
                hint = (
                    f"; it fits transposed: the checkpoint stores this weight "
                    f"{'[out, in]' if fifo else '[in, out] (a Conv1D)'}, but the adapter config says "
                    f"fan_in_fan_out={str(fifo).lower()}"
                )
            raise MergeError(
                f"the adapter does not fit the checkpoint: tensor {key!r} (in {info.shard}) has shape "
                f"{_shape_str(info.shape)}, but {what} needs {layout} = {_shape_str(want)} "
                f"(lora_A {_shape_str(m.A.shape)}, lora_B {_shape_str(m.B.shape)}){hint}"
            )
        if info.dtype not in _FLOAT:
            raise MergeError(
                f"cannot merge into tensor {key!r} (in {info.shard}): its dtype {info.dtype} is not "
                f"F32 / F16 / BF16 / F64 (a quantized checkpoint? merge into the unquantized one)"
            )
        deltas[key] = Delta(key, m, fifo)
    replacements: dict[str, torch.Tensor] = {}
    for key, value in adapter.replacements.items():
        info = ckpt.tensors.get(key)
        if info is None:
            raise missing(key, f"the adapter's saved tensor {PREFIX + key!r}")
        if info.shape != tuple(value.shape):
            raise MergeError(
                f"the adapter does not fit the checkpoint: tensor {key!r} (in {info.shard}) has shape "
                f"{_shape_str(info.shape)}, the adapter's {PREFIX + key!r} has {_shape_str(value.shape)}"
            )
        if info.dtype not in _FLOAT:
            raise MergeError(f"cannot replace tensor {key!r} (in {info.shard}): its dtype {info.dtype} is not a float dtype")
        converted = value.to(_FLOAT[info.dtype])
        if not torch.isfinite(converted).all():
            raise MergeError(
                f"the adapter's {PREFIX + key!r} overflows {info.dtype}, the dtype of checkpoint tensor {key!r} "
                f"(largest magnitude {float(value.abs().max()):.4g})"
            )
        replacements[key] = converted
    shard_names = {s.name for s in ckpt.shards}
    copies, skipped = [], []
    for entry in sorted(ckpt.path.iterdir(), key=lambda p: p.name):
        if entry.name in shard_names:
            continue
        if entry.name == ckpt.index:
            copies.append(entry.name)
        elif entry.is_file():  # symlinks included (a hub cache snapshot is all symlinks): copied as files
            if entry.name.endswith(SKIPPED_SUFFIXES):
                skipped.append(entry.name)
            else:
                copies.append(entry.name)
        else:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    return MergePlan(ckpt, adapter, deltas, replacements, copies, skipped)


# ---- writing ----------------------------------------------------------------------------


class PeakMeter:
    """Bytes of tensor data the merge holds at once (the adapter, the tensor being merged
    and its fp32 copies, the copy buffer), and the most it held: the number `MergeReport`
    reports and the tests bound."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def sub(self, n: int) -> None:
        self.live -= n


@dataclass
class MergeReport:
    out_dir: Path
    shards: list[str]
    merged: list[str]  # checkpoint tensors a delta was added to
    replaced: list[str]  # checkpoint tensors replaced whole
    copied: list[str]
    skipped: list[str]
    checkpoint_bytes: int  # tensor bytes of the whole checkpoint
    adapter_bytes: int
    largest_shard_bytes: int
    peak_bytes: int  # PeakMeter's peak
    notes: list[str] = field(default_factory=list)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / inf in t: one min/max reduction (NaN propagates), 5x faster than isfinite().all()."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _merge_into(raw: bytearray, info: TensorInfo, delta: Delta, meter: PeakMeter) -> None:
    """raw (W's bytes) <- (W + scaling · B A) in W's dtype, the sum in fp32 (fp64 for an fp64
    W), cast once. Goes through W in blocks of stored rows (MERGE_BLOCK_BYTES of fp32 each),
    so beside W's own bytes only one block and its delta are held."""
    dtype = _FLOAT[info.dtype]
    w = torch.frombuffer(raw, dtype=dtype).reshape(info.shape)  # shares raw's memory
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = delta.module
    A, B = m.A.to(acc), m.B.to(acc)  # copies only for an adapter stored in another dtype
    copies = sum(t.numel() * t.element_size() for t, src in ((A, m.A), (B, m.B)) if t is not src)
    meter.add(copies)
    try:
        _merge_rows(w, A, B, acc, info, delta, meter)
    finally:
        meter.sub(copies)


def _merge_rows(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, acc: torch.dtype, info: TensorInfo,
                delta: Delta, meter: PeakMeter) -> None:
    m = delta.module
    rows, row_len = w.shape
    step = max(1, MERGE_BLOCK_BYTES // (row_len * torch.finfo(acc).bits // 8))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        base_finite = _all_finite(w[i:j])
        block = w[i:j].to(acc, copy=True)
        n = block.numel() * block.element_size()
        meter.add(2 * n)
        try:
            # PEFT's get_delta_weight: (B @ A) * scaling, transposed for fan_in_fan_out.
            d = (B @ A[:, i:j]).t() if delta.transpose else B[i:j] @ A
            d.mul_(m.scaling)
            block.add_(d)
            del d
            w[i:j].copy_(block)  # the one cast
            if base_finite and not _all_finite(w[i:j]):
                raise MergeError(
                    f"merging the LoRA of module {m.name!r} into {info.dtype} tensor {delta.key!r} gives "
                    f"non-finite values (the merged weight overflows {info.dtype})"
                )
        finally:
            meter.sub(2 * n)


def _write_bytes_of(t: torch.Tensor, f) -> None:
    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _copy_range(src, dst, start: int, n: int, meter: PeakMeter) -> None:
    src.seek(start)
    chunk = min(n, COPY_CHUNK)
    meter.add(chunk)
    try:
        while n > 0:
            data = src.read(min(n, COPY_CHUNK))
            if not data:
                raise MergeError(f"{src.name!r} ended early")
            dst.write(data)
            n -= len(data)
    finally:
        meter.sub(chunk)


def _write_shard(plan: MergePlan, shard: Shard, dst: Path, meter: PeakMeter) -> tuple[list[str], list[str]]:
    merged, replaced = [], []
    with open(shard.path, "rb") as src, open(dst, "wb") as out:
        # Same dtypes and shapes, so the same header: same tensor order, offsets and metadata.
        _copy_range(src, out, 0, shard.header_len, meter)
        pos = 0
        for key, info in shard.tensors.items():
            if info.start > pos:  # padding between tensors (safetensors writes none): keep it
                _copy_range(src, out, shard.header_len + pos, info.start - pos, meter)
            if key in plan.deltas and info.nbytes == 0:  # an empty weight: nothing to add
                merged.append(key)
            elif key in plan.deltas:
                if key in plan.replacements:  # a base weight saved with the adapter, the delta on top (as PEFT)
                    raw = bytearray(plan.replacements[key].contiguous().reshape(-1).view(torch.uint8).numpy())
                    meter.add(info.nbytes)
                    replaced.append(key)
                else:
                    raw = bytearray(info.nbytes)
                    meter.add(info.nbytes)
                    src.seek(shard.header_len + info.start)
                    if src.readinto(raw) != info.nbytes:
                        raise MergeError(f"{str(shard.path)!r} ended early")
                try:
                    _merge_into(raw, info, plan.deltas[key], meter)
                    out.write(raw)
                finally:
                    del raw
                    meter.sub(info.nbytes)
                merged.append(key)
            elif key in plan.replacements:
                _write_bytes_of(plan.replacements[key], out)
                replaced.append(key)
            else:
                _copy_range(src, out, shard.header_len + info.start, info.nbytes, meter)
            pos = max(pos, info.end)
        rest = shard.size - shard.header_len - pos
        if rest > 0:
            _copy_range(src, out, shard.header_len + pos, rest, meter)
        out.flush()
        os.fsync(out.fileno())
    if dst.stat().st_size != shard.size:
        raise MergeError(f"wrote {dst.stat().st_size} bytes for {shard.name}, expected {shard.size}")
    return merged, replaced


def _progress(total: int, enabled: bool):
    """A progress bar on stderr: tqdm when installed, else one line per shard."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(total)
    return tqdm(total=total, unit="shard", desc="lorakern merge", file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainBar(_NoBar):
    def __init__(self, total: int) -> None:
        self.total, self.done, self.label = total, 0, ""

    def set_postfix_str(self, s: str) -> None:
        self.label = s

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"lorakern merge: shard {self.done}/{self.total} {self.label}", file=sys.stderr, flush=True)


def _dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_out_dir(out: Path, base: Path, adapter: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise MergeError(f"output {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise MergeError(f"output directory {str(out)!r} exists and is not empty (pass --force / force=True to replace it)")
    o = out.resolve()
    for what, p in (("checkpoint", base.resolve()), ("adapter", adapter.resolve())):
        if o == p or o in p.parents:
            raise MergeError(f"output directory {str(out)!r} is or contains the {what} directory {str(p)!r}")


def merge_checkpoint(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
    meter: PeakMeter | None = None,
    plan: MergePlan | None = None,
    _after_shard: Callable[[str], None] | None = None,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into the checkpoint in `base_dir`, writing the
    merged checkpoint to `out_dir` (see the module docstring). Everything is checked before
    anything is written (MergeError naming the misfit); `out_dir` appears only complete.
    `_after_shard` (tests) is called with each shard's name once it is written."""
    base, adapter_path, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if sys.byteorder != "little":
        raise MergeError("lorakern merge writes safetensors' little-endian bytes from memory: needs a little-endian machine")
    plan = plan if plan is not None else plan_merge(base, adapter_path)
    _check_out_dir(out, base, adapter_path, force)
    meter = meter if meter is not None else PeakMeter()
    adapter_bytes = sum(t.numel() * t.element_size() for m in plan.adapter.modules.values() for t in (m.A, m.B))
    adapter_bytes += sum(t.numel() * t.element_size() for t in plan.adapter.replacements.values())
    # Replacements converted to another dtype by plan_merge are held as well.
    adapter_bytes += sum(t.numel() * t.element_size() for k, t in plan.replacements.items()
                         if t.data_ptr() != plan.adapter.replacements[k].data_ptr())
    meter.add(adapter_bytes)
    ckpt = plan.checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".lorakern-merge", dir=out.parent))
    merged, replaced = [], []
    bar = _progress(len(ckpt.shards), progress)
    try:
        os.chmod(tmp, _dir_mode())
        for shard in ckpt.shards:
            bar.set_postfix_str(shard.name)
            m, r = _write_shard(plan, shard, tmp / shard.name, meter)
            merged += m
            replaced += r
            bar.update(1)
            if _after_shard is not None:
                _after_shard(shard.name)
        for name in plan.copies:
            shutil.copy2(ckpt.path / name, tmp / name)
        _fsync_dir(tmp)
        old = None
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".lorakern-old", dir=out.parent))
                os.rmdir(old)
                os.rename(out, old)
            else:
                out.rmdir()
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    meter.sub(adapter_bytes)
    notes = []
    if plan.adapter.skipped:
        notes.append(f"ignored {len(plan.adapter.skipped)} adapter key(s) that merge_and_unload drops too "
                     f"(modules_to_save originals, duplicate wrapper biases): {', '.join(plan.adapter.skipped[:4])}"
                     + (" ..." if len(plan.adapter.skipped) > 4 else ""))
    return MergeReport(
        out_dir=out, shards=[s.name for s in ckpt.shards], merged=merged, replaced=replaced,
        copied=list(plan.copies), skipped=list(plan.skipped), checkpoint_bytes=ckpt.nbytes,
        adapter_bytes=adapter_bytes, largest_shard_bytes=max(s.size for s in ckpt.shards),
        peak_bytes=meter.peak, notes=notes,
    )


def format_report(report: MergeReport) -> str:
    mib = 1 << 20
    lines = [
        f"wrote {report.out_dir}: {len(report.shards)} shard(s), {len(report.merged)} tensor(s) merged "
        f"(W + s·B A), {len(report.replaced)} replaced whole (modules_to_save / biases / base weights)",
        f"copied: {', '.join(report.copied) or 'nothing'}",
    ]
    if report.skipped:
        lines.append(f"not copied (other weight files / folders): {', '.join(report.skipped)}")
    lines.append(
        f"peak tensor memory {report.peak_bytes / mib:.2f} MiB (adapter {report.adapter_bytes / mib:.2f} MiB, "
        f"largest shard {report.largest_shard_bytes / mib:.2f} MiB, whole checkpoint {report.checkpoint_bytes / mib:.2f} MiB)"
    )
    lines.extend(report.notes)
    return "\n".join(lines)
