"""Which variant runs: the more fused one or the less fused one.

Two choices go through here: the base GEMM (the fused Triton kernel, or cuBLAS + a LoRA
pass over y / dx) and, for small M, the forward as one launch (shrink inside the GEMM)
or two. The fused kernels save passes and launches, but a Triton GEMM can lose to
cuBLAS on some shapes, and dispatch must never pick the slower path (DESIGN.md §3). So
on CUDA the choice is measured: the first call for a shape bucket times both variants
on the real inputs (triton.testing.do_bench) and caches the winner.
LORAKERN_FUSED_GEMM=1 / 0 forces the more / less fused variant everywhere (tests,
benchmarks); under the interpreter the fused variants run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .common import interpreting

# key -> (fused ms, unfused ms) as measured; the choice is fused ms < unfused ms.
_times: dict[tuple, tuple[float, float]] = {}


def fused_gemm_override() -> bool | None:
    value = os.environ.get("LORAKERN_FUSED_GEMM", "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"LORAKERN_FUSED_GEMM must be auto, 0 or 1, got {value!r}")
    return None if value == "auto" else value == "1"


def prefer_fused(
    key: tuple, fused: Callable[[], object], unfused: Callable[[], object], device: torch.device, traced: bool = False
) -> bool:
    """True when the fused variant should run for `key`; measures both once on CUDA.

    traced: the inputs are FakeTensors (torch.compile tracing the triton_op), so nothing
    can be timed: a key not measured before takes cuBLAS.
    """
    forced = fused_gemm_override()
    if forced is not None:
        return forced
    if interpreting() or device.type != "cuda":
        return True
    if key not in _times:
        if traced or torch.cuda.is_current_stream_capturing():
            return False  # cannot time while tracing or inside a CUDA graph capture: cuBLAS, not cached
        _times[key] = _measure(fused, unfused)
    t_fused, t_unfused = _times[key]
    return t_fused < t_unfused


def _measure(fused: Callable[[], object], unfused: Callable[[], object]) -> tuple[float, float]:
    """(fused ms, unfused ms). Two alternating rounds, each variant's best kept: a single
    do_bench per variant once ranked them opposite to their steady-state kernel times
    (H200, 2026-11-26, benchmarks/NOTES.md), so the first measurement of either is not
    trusted alone."""
    from triton.testing import do_bench

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(2):
        for is_fused, fn in ((True, fused), (False, unfused)):
            times[is_fused].append(do_bench(fn, warmup=5, rep=20))
    return min(times[True]), min(times[False])


def recorded_choices() -> dict[tuple, bool]:
    """The measured choices so far (key -> fused?), for benchmarks."""
    return {key: t_fused < t_unfused for key, (t_fused, t_unfused) in _times.items()}


def recorded_times() -> dict[tuple, tuple[float, float]]:
    """The times behind each measured choice (key -> (fused ms, unfused ms))."""
    return dict(_times)
