"""The thin LoRA kernels alone: achieved GB/s against the measured copy bandwidth (issue 11).

Around cuBLAS's GEMMs, lorakern's training step runs bandwidth-bound passes; each should
move its bytes at close to the card's copy bandwidth (target: >= 75 % at M = 8192). Each
is timed alone through its public launcher on the suite's largest training M:

    kernel        launcher                                   ideal bytes (e = x's itemsize, a = the adapters')
    shrink        lora_shrink(x, A, p, seed)                 M·K·e + r·K·a + M·r·4 (S)
    dS+dB         lora_backward_dsdb(dY, B, S, s, reduce=False), then dB's partial sum
                                                             M·N·e + N·r·a + 2·M·r·4 (S, dS) + N·r·4 (dB)
    dS+dB split   the same with split_n = dsdb_split_n(...)  (the same ideal bytes)
    dA            lora_backward_da(dS, x, A, p, seed)        M·r·4 + M·K·e + r·K·4
    fwd pass      lora_forward_unfused(x, None, None, S, B)  3·M·N·e + M·r·4 + N·r·a (zero fill, then y += s·S Bᵀ)
    dx pass       lora_backward_dx(dY, None, dS, A, p, seed, fused=False)   3·M·K·e + M·r·4 + r·K·a (same)
    merge W′      lora_merged_weight(W, A, B, s)             2·N·K·e + r·K·a + N·r·a

The two "pass" rows time the LoRA-term-only launchers (the term added to a zero-filled
output) because the accumulate pass is not a launcher of its own; the zero fill is one
more write, counted. Ideal bytes exclude the dS/dB and dA launchers' fp32 partial sums
(their reduction is part of the measured time): a low fraction there says how much the
partials cost. The two dS+dB rows time what lora_linear_backward runs for either grid
dispatch can choose (1-D over row blocks; 2-D with N split, dS left as partials for dx and
dA to add on load): the pass with its partials out, then `sum_partials` on dB's (in the
backward that launch also sums dA's). Where a shape gives one split (`dsdb_split_n` = 1)
the split row runs the 1-D grid too. CUDA only in the suite (these are the Triton
kernels); the tests run the same code under Triton's interpreter for the plumbing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakern.bench.timing import TimerSpec, noisy_spread, spread, time_fn

# The fraction of the measured copy bandwidth each thin kernel should reach at M = 8192.
TARGET_COPY_FRACTION = 0.75


def thin_cases(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout: float, device: torch.device,
               adapter_dtype: torch.dtype = torch.float32) -> list[tuple[str, int, Callable[[], object]]]:
    """(kernel name, ideal bytes, zero-argument call) of every thin kernel at one shape; random
    inputs. Kernels without a dropout mask (dS+dB, merge) are listed only for dropout 0."""
    from lorakern import kernels
    from lorakern.kernels.backward import dsdb_split_n, sum_partials

    g = torch.Generator(device="cpu").manual_seed(M * 7 + K * 3 + N)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    e, a = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=adapter_dtype).element_size()
    x, dy, W = rand(M, K), rand(M, N), rand(N, K, scale=K**-0.5)
    A, B = rand(r, K, dt=adapter_dtype, scale=K**-0.5), rand(N, r, dt=adapter_dtype)
    S, dS = rand(M, r, dt=torch.float32), rand(M, r, dt=torch.float32)
    s, seed = 2.0, 1234
    no_stack = torch.empty((1, 0), device=device)  # sum_partials' other stack, empty: dB's sum alone

    def dsdb(split_n):
        ds, db_partial = kernels.lora_backward_dsdb(dy, B, S, s, reduce=False, split_n=split_n)
        return ds, sum_partials(db_partial, B.dtype, no_stack, torch.float32)[0]

    cases = [
        ("shrink", M * K * e + r * K * a + M * r * 4, lambda: kernels.lora_shrink(x, A, dropout, seed)),
        ("dA", M * r * 4 + M * K * e + r * K * 4, lambda: kernels.lora_backward_da(dS, x, A, dropout, seed)),
        ("dx pass", 3 * M * K * e + M * r * 4 + r * K * a,
         lambda: kernels.lora_backward_dx(dy, None, dS, A, dropout, seed, fused=False)),
    ]
    if dropout == 0.0:
        dsdb_bytes = M * N * e + N * r * a + 2 * M * r * 4 + N * r * 4
        cases += [
            ("dS+dB", dsdb_bytes, lambda: dsdb(1)),
            ("dS+dB split", dsdb_bytes, lambda: dsdb(dsdb_split_n(M, N, r, dtype))),
            ("fwd pass", 3 * M * N * e + M * r * 4 + N * r * a, lambda: kernels.lora_forward_unfused(x, None, None, S, B, s)),
            ("merge W′", 2 * N * K * e + r * K * a + N * r * a, lambda: kernels.lora_merged_weight(W, A, B, s)),
        ]
    return cases


def thin_rows(kn, M: int, ranks, dropouts, dtype: torch.dtype, device: torch.device, spec: TimerSpec,
              copy_gbps: float, tick: Callable[[], None] = lambda: None) -> list[dict]:
    """One row per (thin kernel, K×N, r, dropout) at `M`: median / p20 / p80 ms, ideal bytes,
    GB/s and the fraction of `copy_gbps` (the run's measured copy ceiling); `noisy` when the
    spread is above the timer's limit."""
    rows = []
    limit = noisy_spread(device.type)
    for (K, N), r, p in ((kn_, r_, p_) for kn_ in kn for r_ in ranks for p_ in dropouts):
        for name, nbytes, fn in thin_cases(M, K, N, r, dtype, p, device):
            t = time_fn(fn, device, spec)
            gbps = nbytes / (t.median_ms * 1e-3) / 1e9 if t.median_ms > 0 else None
            rows.append({
                "kernel": name, "K": K, "N": N, "M": M, "r": r, "dropout": p, "dtype": str(dtype).removeprefix("torch."),
                "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "bytes": nbytes, "gbps": gbps,
                "copy_frac": None if gbps is None or not copy_gbps else gbps / copy_gbps,
                "noisy": spread(t.p20_ms, t.p80_ms) > limit,
            })
            tick()
    return rows


def count(kn, ranks, dropouts) -> int:
    """How many rows `thin_rows` makes (for the progress bar)."""
    return sum(3 + (4 if p == 0.0 else 0) for _ in kn for _ in ranks for p in dropouts)
