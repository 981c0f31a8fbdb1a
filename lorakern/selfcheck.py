"""`lorakern check`: the fused Triton path against the reference on this machine.

For a spread of shapes and dtypes it runs forward and backward (x, A, B, bias grads)
on the Triton backend, the reference path in the same dtype, and the reference in
float64, and prints one row per case with the worst relative error of the Triton
path against float64, PyTorch's own error in that dtype, and PASS/FAIL against the
correctness bar of DESIGN.md §5. On a machine without CUDA the kernels run in
Triton's interpreter (small shapes only: it is slow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakern import settings
from lorakern.ops import lora_linear

# The correctness bar (DESIGN.md §5), in one place: the tests use it too.
# Max relative error against float64, per dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_RTOL = 2e-3
# Floor of the "2x PyTorch's own error" part. Tiny outputs (M=1, r=1: one dot product)
# can make PyTorch's error exactly 0 or one ulp by luck of summation order; in fp32 the
# floor is 8 ulp (~5e-7, still 20x under RTOL), in half precision 2 ulp. Accumulation
# is fp32 in every dtype, and a sum that cancels (condition number
# cond = ‖Σ|terms|‖ / ‖Σ terms‖ > 1) has an accumulation error cond times larger relative
# to its result whatever the summation order: callers that know cond pass it, and the
# fp32 floor is scaled by it.
ERROR_FLOOR = {torch.float32: 8 * 2**-24, torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8}


def rtol_for(dtype: torch.dtype) -> float:
    """RTOL of `dtype`; fp32 gets the tf32 bound unless matmul precision is 'highest'."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TF32_RTOL
    return RTOL[dtype]


def error_bound(dtype: torch.dtype, torch_err: float, cond: float = 1.0) -> float:
    """Largest error against fp64 that passes: within RTOL and no worse than twice
    PyTorch's own error in `dtype`, floored at ERROR_FLOOR[dtype] and at the fp32
    accumulation floor times the result's condition number `cond` (>= 1)."""
    floor = max(ERROR_FLOOR[dtype], ERROR_FLOOR[torch.float32] * cond)
    return min(rtol_for(dtype), max(2 * torch_err, floor))

CPU_CASES = [  # (M, K, N, r, dropout_p, bias)
    (1, 45, 37, 7, 0.0, True),
    (130, 64, 96, 16, 0.1, True),
    (77, 33, 130, 64, 0.1, False),
]
CUDA_CASES = [
    (1, 4096, 4096, 16, 0.0, False),
    (512, 4096, 1024, 16, 0.1, True),
    (2048, 4096, 4096, 64, 0.1, False),
    (1000, 1030, 770, 7, 0.05, True),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def _run(inputs: dict, backend: str, dtype: torch.dtype, p: float, dy: torch.Tensor):
    # x, W, bias in `dtype`; adapters stay fp32 (PEFT's default) except in the fp64 oracle.
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {}
    for k, v in inputs.items():
        if v is not None:
            v = v.detach().to(adapter_dtype if k in ("A", "B") else dtype).requires_grad_(k != "W")
        leaves[k] = v
    y = lora_linear(leaves["x"], leaves["W"], leaves["bias"], leaves["A"], leaves["B"], 2.0, dropout_p=p, seed=1234, backend=backend)
    y.backward(dy.to(y.dtype))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and k != "W"}
    return y.detach(), grads


def check_case(M, K, N, r, p, has_bias, dtype, device) -> tuple[float, float, bool, str]:
    """(worst Triton error vs fp64, PyTorch's error on that output, passed, its name).

    Each output (y and every gradient) is judged on its own bound: within RTOL and no
    worse than twice PyTorch's error on the same output, the fp32 floor scaled by that
    output's condition number (‖Σ|terms|‖ / ‖Σ terms‖, from the fp64 reference on the
    inputs' absolute values: the op is multilinear with positive scale and dropout
    factors). Without it a K = 4096 fp32 dot (condition ~ √K) failed a bound meant for
    well-conditioned sums (H200, 2026-11-30)."""
    g = torch.Generator().manual_seed(M * 31 + K)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    inputs = {
        "x": mk(M, K), "W": mk(N, K, scale=K**-0.5), "bias": mk(N) if has_bias else None,
        "A": mk(r, K, scale=K**-0.5), "B": mk(N, r),
    }
    dy = mk(M, N)
    y_t, g_t = _run(inputs, "triton", dtype, p, dy)
    y_r, g_r = _run(inputs, "reference", dtype, p, dy)
    y_64, g_64 = _run(inputs, "reference", torch.float64, p, dy)
    abs_inputs = {k: None if v is None else v.abs() for k, v in inputs.items()}
    y_abs, g_abs = _run(abs_inputs, "reference", torch.float64, p, dy.abs())
    outputs = {"y": (y_t, y_r, y_64, y_abs), **{f"d{k}": (g_t[k], g_r[k], g_64[k], g_abs[k]) for k in g_64}}
    worst, passed = None, True
    for name, (ours_t, torch_t, oracle, abs_oracle) in outputs.items():
        ours, torch_err = _rel(ours_t, oracle), _rel(torch_t, oracle)
        den = oracle.norm().item()
        cond = max(1.0, abs_oracle.norm().item() / den) if den else 1.0
        bound = error_bound(dtype, torch_err, cond)
        finite = bool(torch.isfinite(ours_t).all().item())
        passed &= finite and ours <= bound
        if worst is None or ours / bound > worst[0]:
            worst = (ours / bound, ours, torch_err, name)
    return worst[1], worst[2], passed, worst[3]


def run_selfcheck(print_fn: Callable[[str], None] = print) -> bool:
    """Run every case, print a table, return True when all pass."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not settings.interpret:
        raise RuntimeError("on a machine without CUDA, set TRITON_INTERPRET=1 before importing lorakern")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print_fn(f"lorakern check on {where}: Triton backend vs reference, forward + grads of x, A, B, bias")
    print_fn("each output (y, dx, dA, dB, dbias) against its own bound; the one closest to its bound is shown")
    print_fn(f"{'M':>6} {'K':>6} {'N':>6} {'r':>3} {'p':>5} {'bias':>5} {'dtype':>9} {'output':>6} {'err vs fp64':>12} "
             f"{'torch err':>10}  result")
    all_ok = True
    for M, K, N, r, p, has_bias in CUDA_CASES if device == "cuda" else CPU_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            err, torch_err, ok, output = check_case(M, K, N, r, p, has_bias, dtype, device)
            all_ok &= ok
            print_fn(
                f"{M:>6} {K:>6} {N:>6} {r:>3} {p:>5} {str(has_bias):>5} {str(dtype).removeprefix('torch.'):>9} "
                f"{output:>6} {err:>12.2e} {torch_err:>10.2e}  {'PASS' if ok else 'FAIL'}"
            )
    print_fn("all passed" if all_ok else "SOME CASES FAILED")
    return all_ok
