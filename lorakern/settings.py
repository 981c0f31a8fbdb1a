"""Every environment switch lorakern reads, read once when lorakern is imported.

    TRITON_INTERPRET=1       Triton kernels run in Triton's CPU interpreter. Triton itself
                             decides this when a kernel is defined, so it must be set
                             before lorakern (or anything that imports Triton) is imported.
    LORAKERN_BACKEND         auto | triton | reference: what backend="auto" resolves to
                             (auto: Triton for CUDA tensors, the reference otherwise).
    LORAKERN_FUSED_GEMM      auto | 1 | 0 | merged | tma: the measured dispatch (auto), or
                             one variant forced everywhere: 1 the fused Triton GEMMs, 0
                             cuBLAS plus a LoRA pass, merged cuBLAS on W + s·B A, tma the
                             persistent TMA forward GEMM — the last two where a call can
                             take them (else cuBLAS plus a LoRA pass).
    LORAKERN_AUTOTUNE        1 | 0: 0 keeps one GEMM tile (the CUDA tests set it).
    LORAKERN_FAST_LAUNCH     1 | 0: 0 sends every launch through Triton's own launcher.
    LORAKERN_TRITON_OP       1 | 0: 0 makes torch.compile trace the opaque custom op
                             instead of the triton_ops whose kernels the compiler sees.

Hot paths read these module attributes instead of `os.environ` (a dict lookup and a
string compare per switch per call added up on every launch). A program that changes
the environment after import calls `reload()`; tests set the attributes with
monkeypatch. A bad value raises ValueError naming the variable, at import or reload.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

BACKENDS = ("auto", "triton", "reference")

interpret: bool = False
backend: str = "auto"
fused_gemm: str = "auto"
autotune: bool = True
fast_launch: bool = True
triton_op: bool = True


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, default)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def read(env: Mapping[str, str] = os.environ) -> dict:
    """The switches' values in `env`, validated (ValueError naming the variable)."""
    return {
        # Triton treats any other value as off; so does lorakern.
        "interpret": env.get("TRITON_INTERPRET", "0") == "1",
        "backend": _choice(env, "LORAKERN_BACKEND", "auto", BACKENDS),
        "fused_gemm": _choice(env, "LORAKERN_FUSED_GEMM", "auto", ("auto", "1", "0", "merged", "tma")),
        "autotune": _choice(env, "LORAKERN_AUTOTUNE", "1", ("1", "0")) == "1",
        "fast_launch": _choice(env, "LORAKERN_FAST_LAUNCH", "1", ("1", "0")) == "1",
        "triton_op": _choice(env, "LORAKERN_TRITON_OP", "1", ("1", "0")) == "1",
    }


def reload(env: Mapping[str, str] = os.environ) -> None:
    """Re-read every switch from `env`; nothing changes when a value is invalid.

    Switches fixed when the kernels were defined (TRITON_INTERPRET; LORAKERN_AUTOTUNE's
    tile list and LORAKERN_FAST_LAUNCH are read by the kernels modules at import) keep
    their import-time effect there."""
    globals().update(read(env))


reload()
