"""Which variant runs, and the whole forward / backward on 2-D tensors built on that choice.

A call has up to three ways to compute the same thing:
- "fused":   the Triton GEMM with the LoRA term in its epilogue (one pass over y / dx);
             for small M, the forward in one launch (shrink inside the GEMM);
- "unfused": cuBLAS's GEMM, then a LoRA pass that adds into its output;
- "merged":  (dropout 0 only) cuBLAS's GEMM on W + s·B A, built by a small kernel
             (kernels/merge.py): no pass over y / dx, one read and write of W instead;
- "tma":     (forward, sm_90, fp16 / bf16, TMA-able layouts) the fused GEMM as a
             persistent kernel reading x / W through TMA descriptors (kernels/tma.py).
The fused kernels save passes and launches, but a Triton GEMM can lose to cuBLAS on some
shapes, and dispatch must never pick the slower path (DESIGN.md §3). So on CUDA the
choice is measured: the first call for a shape bucket times every candidate on the real
inputs (triton.testing.do_bench) and `DISPATCH` keeps the winner. Under the interpreter
the fused variants run. LORAKERN_FUSED_GEMM (lorakern.settings) forces one variant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .. import settings
from .backward import dsdb_split_n, lora_backward_da, lora_backward_dsdb, lora_backward_dx, sum_partials
from .common import has_dropout, interpreting, rank_pad, traced
from .dequant import dequantize_weight
from .forward import lora_forward_fused, lora_forward_onepass, lora_forward_unfused, m_bucket
from .merge import lora_backward_dx_merged, lora_forward_merged
from .qgemm import dequant_matmul
from .shrink import lora_shrink
from .tma import lora_forward_tma, tma_supported

FUSED, UNFUSED, MERGED, TMA = "fused", "unfused", "merged", "tma"
_FORCED = {"1": FUSED, "0": UNFUSED, "merged": MERGED, "tma": TMA}


class Dispatcher:
    """Measures each call's candidates once per key on CUDA and remembers the fastest.

    `choose(key, candidates, device)` returns a candidate's name. The key holds what
    changes the ranking (M bucket, N, K, rank pad, dropout on/off, dtype, device); the
    candidates are name -> zero-argument function running that variant on the real
    inputs (timing one writes only its own outputs).
    """

    def __init__(self) -> None:
        # key -> {candidate name: best ms}
        self._times: dict[tuple, dict[str, float]] = {}

    def choose(self, key: tuple, candidates: dict[str, Callable[[], object]], device: torch.device,
               is_traced: bool = False) -> str:
        """The candidate to run for `key`. is_traced: the inputs are FakeTensors (torch.compile
        tracing the triton_op), so nothing can be timed: a key not measured before takes
        the unfused variant (cuBLAS), uncached."""
        forced = _FORCED.get(settings.fused_gemm)
        if forced is not None:
            return forced if forced in candidates else UNFUSED
        if interpreting() or device.type != "cuda":
            return FUSED
        times = self._times.get(key)
        if times is None:
            if is_traced or torch.cuda.is_current_stream_capturing():
                return UNFUSED  # cannot time while tracing or inside a CUDA graph capture
            times = self._times[key] = self._measure(candidates)
        return min(times, key=times.get)

    @staticmethod
    def _measure(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Best ms of each candidate over two alternating rounds: a single do_bench per
        variant once ranked them opposite to their steady-state kernel times (H200,
        2026-11-26, benchmarks/NOTES.md), so no first measurement is trusted alone.

        A candidate other than the unfused one (cuBLAS + pass, the reference layout) that
        raises while being timed — a kernel that does not compile for this card or
        Triton — is recorded as never winning (inf) with a warning, not raised: dispatch
        falls back on the variants that run."""
        from triton.testing import do_bench

        times: dict[str, float] = {}
        for _ in range(2):
            for name, fn in candidates.items():
                if times.get(name) == math.inf:
                    continue
                try:
                    ms = do_bench(fn, warmup=5, rep=20)
                except Exception as exc:
                    if name == UNFUSED:
                        raise
                    warnings.warn(f"lorakern dispatch: the {name!r} variant failed and is skipped: "
                                  f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                    ms = math.inf
                times[name] = min(ms, times.get(name, ms))
        return times

    def reset(self) -> None:
        """Forget every measurement (the next call of each key measures again)."""
        self._times.clear()

    def choices(self) -> dict[tuple, str]:
        """key -> the chosen candidate, for every key measured so far."""
        return {key: min(times, key=times.get) for key, times in self._times.items()}

    def times(self) -> dict[tuple, dict[str, float]]:
        """key -> {candidate: best ms}, the measurements behind each choice."""
        return {key: dict(times) for key, times in self._times.items()}


DISPATCH = Dispatcher()


# --- the whole forward / backward, variants chosen by DISPATCH ---------------------------

# Up to this many rows the shrink runs inside the kernel that adds the B-projection
# (each column of programs recomputes S from x, which only pays while x is small).
ONEPASS_MAX_M = 64


def lora_forward(x, weight, bias, S, lora_B, scaling, merged: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """y = x Wᵀ + s·S Bᵀ + bias [M, N] from S, by the fastest of the fused and cuBLAS
    variants, and `merged` (the merged-weight forward, given by callers that know dropout
    is off and hold lora_A) when given."""
    if weight is None:  # the LoRA term alone: nothing to fuse it with
        return lora_forward_unfused(x, weight, bias, S, lora_B, scaling)
    return _forward_gemm("fwd", x, weight, bias, lambda: S, lora_B, scaling, merged)


def _forward_gemm(tag: str, x, weight, bias, get_S: Callable[[], torch.Tensor], lora_B, scaling,
                  merged: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """y by the fastest candidate: fused, unfused, `merged` when given, TMA where it fits.
    get_S() gives S to the candidates that read it: the S already computed ("fwd"), or the
    shrink run inside each timed candidate when no caller needs S ("fwd-noS")."""
    M, K = x.shape
    # Each launcher called by name: torch keys a traced triton_op's compile cache on the
    # kernels it finds by reading the op's call tree for calls, not for functions passed
    # as values (tests/test_triton_ops.py).
    candidates = {FUSED: lambda: lora_forward_fused(x, weight, bias, get_S(), lora_B, scaling),
                  UNFUSED: lambda: lora_forward_unfused(x, weight, bias, get_S(), lora_B, scaling)}
    if merged is not None:
        candidates[MERGED] = merged
    # TMA competes where its layouts fit and the inputs are real (under torch.compile
    # tracing, who supplies its descriptors' scratch is unchecked).
    if not traced(x) and tma_supported(x, weight)[0]:
        candidates[TMA] = lambda: lora_forward_tma(x, weight, bias, get_S(), lora_B, scaling)
    key = (tag, m_bucket(M), weight.shape[0], K, rank_pad(lora_B.shape[1]), MERGED in candidates, TMA in candidates,
           x.dtype, x.device)
    return candidates[DISPATCH.choose(key, candidates, x.device, traced(x))]()


def lora_backward_dx_auto(dy, weight, dS, lora_A, p, seed, merged: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """dx = dY W + D(dS A) [M, K], by the fastest of the fused and cuBLAS variants, and
    `merged` (dY (W + s·B A), dropout 0) when given."""
    M, N = dy.shape
    args = (dy, weight, dS, lora_A, p, seed)
    if weight is None:  # the LoRA term alone
        return lora_backward_dx(*args, fused=False)
    candidates = {FUSED: lambda: lora_backward_dx(*args, fused=True), UNFUSED: lambda: lora_backward_dx(*args, fused=False)}
    if merged is not None:
        candidates[MERGED] = merged
    # p > 0 in the key: the masked epilogue costs more, so it gets its own measurement.
    key = ("dx", m_bucket(M), N, weight.shape[1], rank_pad(dS.shape[-1]), has_dropout(p), MERGED in candidates,
           dy.dtype, dy.device)
    return candidates[DISPATCH.choose(key, candidates, dy.device, traced(dy))]()


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, need_S: bool = True):
    """Whole forward on 2-D x [M, K]: returns (y [M, N], S [M, r] fp32).

    need_S=False (inference: nothing will run the backward): S may come back None, so
    with dropout 0 at larger M the merged-weight variant skips the shrink altogether;
    the candidates are then timed with their shrink included.

    scaling, p, seed: float, float, int; or one DeviceScalars as all three (values the
    host does not read: torch.compile's traced path).

    Small M (decode): one launch (`lora_forward_onepass`, the base GEMM in Triton) or two
    (cuBLAS's GEMM, then one pass computing S and adding s·S Bᵀ), whichever measures
    faster. Larger M, and while torch.compile traces: the shrink kernel, then the GEMM
    (fused, cuBLAS + pass, or with dropout 0 cuBLAS on W + s·B A: `lora_forward`).
    """
    M, K = x.shape
    args = (x, weight, bias, lora_A, lora_B, scaling, p, seed)
    if M <= ONEPASS_MAX_M and weight is not None and not traced(x):
        key = ("fwd1", m_bucket(M), weight.shape[0], K, rank_pad(lora_A.shape[0]), has_dropout(p), x.dtype, x.device)
        candidates = {FUSED: lambda: lora_forward_onepass(*args, need_S=need_S),
                      UNFUSED: lambda: lora_forward_onepass(*args, cublas_base=True, need_S=need_S)}
        return candidates[DISPATCH.choose(key, candidates, x.device)]()
    merged = None
    if weight is not None and not has_dropout(p):  # W + s·B A is the whole term only without a mask
        merged = lambda: lora_forward_merged(x, weight, bias, lora_A, lora_B, scaling)  # noqa: E731
    if merged is not None and not need_S:
        return _forward_gemm("fwd-noS", x, weight, bias, lambda: lora_shrink(x, lora_A, p, seed), lora_B, scaling,
                             merged), None
    S = lora_shrink(x, lora_A, p, seed)
    return lora_forward(x, weight, bias, S, lora_B, scaling, merged), S


def qlora_linear_forward(x, qtensors, meta, bias, lora_A, lora_B, scaling, p, seed):
    """Forward over a quantized weight on 2-D x [M, K]: returns (y [M, N], S [M, r] fp32).

    qtensors: (data, absmax, code, offset, nested_absmax, nested_code) as
    `dequantize_weight` takes them; meta: (quant_type, blocksize, nested_blocksize, N, K).
    Small M (decode): the faster, as measured, of (a) `dequant_matmul` reading the
    quantized weight in its K loop, then one pass adding s·S Bᵀ, and (b) the dense
    weight dequantised into a temporary, then the dense forward. Larger M: (b).
    """
    quant_type, blocksize, nested_blocksize, n, k = meta
    M = x.shape[0]

    def dequantised():
        weight = dequantize_weight(*qtensors, quant_type, blocksize, nested_blocksize, (n, k), x.dtype)
        return lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)

    def fused():
        y = dequant_matmul(x, *qtensors, quant_type, blocksize, nested_blocksize, (n, k), bias)
        return lora_forward_onepass(x, None, None, lora_A, lora_B, scaling, p, seed, base=y)

    if M > ONEPASS_MAX_M or traced(x):
        return dequantised()
    key = ("qfwd1", quant_type, m_bucket(M), n, k, rank_pad(lora_A.shape[0]), has_dropout(p), x.dtype, x.device)
    candidates = {FUSED: fused, UNFUSED: dequantised}
    return candidates[DISPATCH.choose(key, candidates, x.device)]()


def lora_backward_dsdb_auto(dy, lora_B, S, scaling, reduce: bool, da_args: tuple | None = None):
    """lora_backward_dsdb's 1-D grid ("rows") or its 2-D grid ("split", dS as partials
    [P, M, r]), whichever measures faster; the 2-D grid is offered only where its config
    splits N (dsdb_split_n > 1).

    da_args = (x, lora_A, p, seed) when the backward computes dA: each candidate is then
    timed with the dA pass reading its dS, since reading P partials per dS tile (from L2,
    once per column block of K) is that grid's cost and the pass alone would not show it.
    (dx's epilogue reads dS too, once per output tile: small next to its GEMM or pass.)

    For this key the names map as: FUSED = split, UNFUSED = rows. So the interpreter runs
    the split grid wherever it is offered (the whole-backward tests cover it), a traced or
    capturing call with no measurement takes the 1-D grid of before, and LORAKERN_FUSED_GEMM
    = 1 / 0 force split / rows. Candidates run with reduce=False (partials out, no side
    effects)."""
    M, N = dy.shape
    split_n = dsdb_split_n(M, N, S.shape[1], dy.dtype)
    if split_n == 1:
        return lora_backward_dsdb(dy, lora_B, S, scaling, reduce=reduce)

    def candidate(split: int) -> Callable[[], object]:
        def run():
            dS, dB = lora_backward_dsdb(dy, lora_B, S, scaling, reduce=False, split_n=split)
            return dB if da_args is None else lora_backward_da(dS, *da_args, reduce=False)
        return run

    candidates = {FUSED: candidate(split_n), UNFUSED: candidate(1)}
    key = ("dsdb", m_bucket(M), N, rank_pad(S.shape[1]), None if da_args is None else (da_args[0].shape[1], has_dropout(da_args[2])),
           dy.dtype, dy.device)
    if DISPATCH.choose(key, candidates, dy.device, traced(dy)) == FUSED:
        return lora_backward_dsdb(dy, lora_B, S, scaling, reduce=reduce, split_n=split_n)
    return lora_backward_dsdb(dy, lora_B, S, scaling, reduce=reduce)


def lora_linear_backward(dy, x, weight, lora_A, lora_B, S, scaling, p, seed, needs):
    """Whole LoRA backward on 2-D tensors; `needs` = (dx, dA, dB) flags -> (dx, dA, dB).
    dS may come out of the dS/dB pass as fp32 partials [P, M, r] (its 2-D grid): dx and dA
    take them as they are."""
    need_x, need_a, need_b = needs
    # dB's and dA's fp32 partials are summed together by one launch after dA (sum_partials);
    # without dA, the dS/dB launcher reduces its own.
    dS, dB = lora_backward_dsdb_auto(dy, lora_B, S, scaling, reduce=not need_a,
                                     da_args=(x, lora_A, p, seed) if need_a else None)
    dx = None
    if need_x:
        merged = None
        if weight is not None and not has_dropout(p):
            merged = lambda: lora_backward_dx_merged(dy, weight, lora_A, lora_B, scaling)  # noqa: E731
        dx = lora_backward_dx_auto(dy, weight, dS, lora_A, p, seed, merged)
    dA = None
    if need_a:
        dB, dA = sum_partials(dB, lora_B.dtype, lora_backward_da(dS, x, lora_A, p, seed, reduce=False), lora_A.dtype)
    return dx, dA, (dB if need_b else None)
