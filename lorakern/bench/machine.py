"""What machine a benchmark ran on: device, card, driver, versions, commit, backend choice.

Everything here is probed lazily (nothing runs at import). Used by `lorakern info` and
recorded in every results file (DESIGN.md §6: card, driver, torch, Triton, commit).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import lorakern
from lorakern import settings
from lorakern.ops import resolve_backend, triton_available
from lorakern.reference import compiled_mask_generator


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; otherwise torch.device(device)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA GPU")
    return dev


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None when it is not there."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()
    return first[0].strip() if first else None


@functools.cache
def git_commit() -> str | None:
    """The commit of the lorakern checkout this package runs from (+ '-dirty'), or None.

    LORAKERN_COMMIT, when set, wins: a copied working tree (a lent GPU machine) can
    carry a stale .git.
    """
    if os.environ.get("LORAKERN_COMMIT"):
        return os.environ["LORAKERN_COMMIT"]
    root = Path(lorakern.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def auto_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why): what backend="auto" resolves to for `dtype` tensors on `device`, and the reason."""
    env = settings.backend
    chosen = resolve_backend("auto", device, dtype)
    if env != "auto":
        return chosen, f"LORAKERN_BACKEND={env} overrides auto"
    ok, triton_why = triton_available()
    if device.type != "cuda":
        return chosen, f"tensors on {device.type}, not CUDA: the pure-PyTorch reference path runs"
    if not ok:
        return chosen, f"CUDA tensors but {triton_why}: the reference path runs"
    return chosen, f"CUDA tensors, Triton {triton_why} imports, {str(dtype).removeprefix('torch.')} supported: fused Triton kernels"


def device_name(device: torch.device) -> str:
    """The card's name on CUDA, the CPU model on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def card_slug(device: torch.device) -> str:
    """A file-name-safe card name, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc'."""
    name = device_name(device)
    if device.type == "cpu":
        name = "cpu " + name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or device.type


def machine_info(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Everything a result needs to be reproduced and compared (JSON-serialisable)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ok, triton_version = triton_available()
    backend, why = auto_backend(device, dtype)
    info = {
        "device": device.type,
        "card": device_name(device),
        "card_slug": card_slug(device),
        "driver": nvidia_driver() if device.type == "cuda" else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version if ok else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "lorakern": lorakern.__version__,
        "commit": git_commit(),
        "auto_backend": backend,
        "auto_backend_reason": why,
        "auto_backend_dtype": str(dtype).removeprefix("torch."),
        "cpu_mask_generator": "compiled (lorakern/_philox.c)" if compiled_mask_generator() else "numpy (C extension not built)",
        "env": {k: v for k, v in os.environ.items() if k.startswith("LORAKERN_")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["l2_cache_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None
    return info
