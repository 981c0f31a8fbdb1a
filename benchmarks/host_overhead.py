"""Host (Python) time of lorakern's Triton path per call, with every kernel launch stubbed out.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py

Runs on a CPU: the Triton launchers are replaced by no-ops (so neither the interpreter
nor Triton's own launch path is timed) and the measured dispatch is fixed to what the
H200 chose at these sizes (one-pass forward at decode, cuBLAS + LoRA pass at large M),
so what is left is lorakern's own Python around the launches, plus the torch ops it
calls (allocations, F.linear, the partial sums) at tiny shapes. Compare numbers from one
run only: a shared machine moves them by 10–20 %. Not a test; the numbers go to
benchmarks/NOTES.md.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import lorakern  # noqa: E402
from lorakern import kernels, ops  # noqa: E402
from lorakern.kernels import backward, forward, shrink  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_launches() -> None:
    stub = _NoLaunch()
    for module in (forward, shrink, backward):
        module.wrap_triton = lambda kernel, like: stub
    kernels.DISPATCH.choose = lambda key, candidates, device, is_traced=False: "fused" if key[0] == "fwd1" else "unfused"


def per_call_us(fn, calls: int = 3000) -> float:
    for _ in range(300):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    _stub_launches()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    K = N = 16
    base = torch.nn.Linear(K, N, bias=False)
    layer = lorakern.LoraLinear(base, r=16, lora_alpha=32, backend="triton")
    W, A, B = base.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_decode = torch.randn(4, K)
    x_train = torch.randn(8, K, requires_grad=True)
    dy = torch.ones(8, N)

    def fwd_bwd(module):
        module(x_train).backward(dy)

    rows = []
    layer.eval()
    with torch.inference_mode():
        rows.append(("decode: nn.Linear", per_call_us(lambda: base(x_decode))))
        rows.append(("decode: LoraLinear", per_call_us(lambda: layer(x_decode))))
        rows.append(("decode: lora_linear", per_call_us(lambda: ops.lora_linear(x_decode, W, None, A, B, 2.0, backend="triton"))))
        rows.append(("decode: kernels.lora_linear_forward", per_call_us(
            lambda: kernels.lora_linear_forward(x_decode, W, None, A, B, 2.0, 0.0, 0))))
    layer.train()
    rows.append(("fwd+bwd: nn.Linear", per_call_us(lambda: fwd_bwd(base), 1000)))
    rows.append(("fwd+bwd: LoraLinear", per_call_us(lambda: fwd_bwd(layer), 1000)))
    rows.append(("fwd: LoraLinear (autograd recording)", per_call_us(lambda: layer(x_train), 1000)))
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.1f} µs")


if __name__ == "__main__":
    main()
