"""Timers and the card's ceilings (DESIGN.md §6).

GPU: CUDA events through `triton.testing.do_bench` (it flushes L2 before every
repetition), median and p20/p80 after warm-up; the first call (autotuning, the
fused-vs-cuBLAS dispatch measurement) is made before timing starts.
CPU: wall clock (`time.perf_counter`) around each call after warm-up calls, median and
p20/p80 over the repetitions. Both report which timer produced the numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over `reps` repetitions."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


@dataclass(frozen=True)
class TimerSpec:
    """How long to warm up and to measure: milliseconds on GPU, seconds-scale budgets on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000
    # CPU: a buffer this large is read and written before every timed call, so weights and
    # inputs start out of the caches as they would inside a model (GPU: do_bench flushes L2).
    cpu_flush_bytes: int = 64 << 20


def timer_description(device: torch.device, spec: TimerSpec) -> str:
    """One line saying which timer measured the results (printed and written to every file)."""
    if device.type == "cuda":
        return (
            f"CUDA events via triton.testing.do_bench (warmup {spec.warmup_ms:g} ms, rep {spec.rep_ms:g} ms, "
            "L2 flushed before each repetition, inputs rotated), quantiles 0.5/0.2/0.8"
        )
    return (
        f"wall clock time.perf_counter per call, providers interleaved call by call (warm-up >= "
        f"{spec.warmup_ms:g} ms and 2 calls each, then >= {spec.rep_ms:g} ms and >= {spec.min_reps} calls each), "
        + (f"a {spec.cpu_flush_bytes >> 20} MiB buffer rewritten before each call to evict the caches; "
           if spec.cpu_flush_bytes else "no cache flush; ")
        + f"median/p20/p80 over calls; {torch.get_num_threads()} CPU threads"
    )


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already-sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]], spec: TimerSpec, grad_to_none: dict[str, Sequence[torch.Tensor]]
) -> dict[str, Timing]:
    """Per-call wall-clock times of several functions, interleaved call by call.

    Each round calls every function once, so all of them are sampled under the same
    load (the machine may be shared); grads in `grad_to_none[name]` are reset before
    each call. Warm-up: >= 2 calls each and spec.warmup_ms per function; then rounds
    until spec.rep_ms per function has passed and each has spec.min_reps calls.
    """
    names = list(fns)
    warm_end = time.perf_counter() + spec.warmup_ms * len(names) / 1e3
    rounds = 0
    while rounds < 2 or time.perf_counter() < warm_end:
        for name in names:
            _zero_grads(grad_to_none.get(name, ()))
            fns[name]()
        rounds += 1
    times: dict[str, list[float]] = {name: [] for name in names}
    flush = torch.zeros(spec.cpu_flush_bytes, dtype=torch.uint8) if spec.cpu_flush_bytes else None
    budget_end = time.perf_counter() + spec.rep_ms * len(names) / 1e3
    rounds = 0
    while rounds < spec.min_reps or (time.perf_counter() < budget_end and rounds < spec.max_reps):
        for name in names:
            _zero_grads(grad_to_none.get(name, ()))
            if flush is not None:
                flush.add_(1)
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = Timing(*(_quantile(ts, q) for q in QUANTILES), reps=len(ts))
    return out


def time_cpu(fn: Callable[[], object], spec: TimerSpec, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Per-call wall-clock times of fn() (grads of `grad_to_none` reset before each call)."""
    return time_cpu_interleaved({"fn": fn}, spec, {"fn": grad_to_none})["fn"]


def _time_cuda_events(fn: Callable[[], object], spec: TimerSpec, grad_to_none: Sequence[torch.Tensor]) -> Timing:
    """CUDA-event timing with an explicit L2 flush, for when Triton is not importable."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm = max(1, int(spec.warmup_ms / estimate))
    n_rep = min(spec.max_reps, max(spec.min_reps, int(spec.rep_ms / estimate)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        _zero_grads(grad_to_none)
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(*(_quantile(times, q) for q in QUANTILES), reps=n_rep)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    spec: TimerSpec,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Timing:
    """Median / p20 / p80 milliseconds of fn() on `device` (see the module docstring)."""
    if device.type != "cuda":
        return time_cpu(fn, spec, grad_to_none)
    fn()  # autotuning and dispatch measurement happen here, outside the timed region
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, spec, grad_to_none)
    med, p20, p80 = do_bench(
        fn, warmup=int(spec.warmup_ms), rep=int(spec.rep_ms), grad_to_none=list(grad_to_none) or None,
        quantiles=list(QUANTILES),
    )
    reps = max(spec.min_reps, int(spec.rep_ms / max(med, 1e-3)))
    return Timing(med, p20, p80, reps=reps)


def time_many(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    spec: TimerSpec,
    grad_to_none: dict[str, Sequence[torch.Tensor]],
) -> dict[str, Timing]:
    """Time each of `fns`: one after another with CUDA events on a GPU, interleaved on CPU."""
    if device.type != "cuda":
        return time_cpu_interleaved(fns, spec, grad_to_none)
    return {name: time_fn(fn, device, spec, grad_to_none.get(name, ())) for name, fn in fns.items()}


def measure_ceilings(device: torch.device, dtype: torch.dtype, spec: TimerSpec) -> dict:
    """The card's copy bandwidth (GB/s) and large-matmul rate (TFLOP/s) in `dtype`, measured now.

    Copy: a device-to-device copy of a buffer much larger than the caches (bytes read +
    written / time). Matmul: a square GEMM large enough to saturate the card. Rates use
    the 20th-percentile time (a ceiling is what the card reaches, not its typical time).
    """
    if device.type == "cuda":
        copy_bytes, n = 1 * 2**30, 8192
    else:
        copy_bytes, n = 256 * 2**20, 2048
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, spec)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = time_fn(lambda: torch.mm(a, b), device, spec)
    return {
        "copy_GBps": 2 * copy_bytes / (t_copy.p20_ms * 1e-3) / 1e9,
        "matmul_TFLOPs": 2 * n**3 / (t_mm.p20_ms * 1e-3) / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bytes": copy_bytes,
        "matmul_n": n,
        "measured": True,
    }

