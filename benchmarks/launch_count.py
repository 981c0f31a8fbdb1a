"""Kernel launches per LoRA forward and backward on the large-M path, per dispatch variant.

    TRITON_INTERPRET=1 python benchmarks/launch_count.py

Runs on a CPU: every Triton launch is replaced by a counter (nothing computes), each variant
is forced in turn (lorakern.settings.fused_gemm) and one forward + backward of
`lora_linear` (bf16 x / W, fp32 adapters, W frozen, M above the one-pass limit) is traced
with a TorchDispatchMode that lists the aten ops reaching a backend: on a GPU each of those
is (about) one kernel launch too, views and allocations excepted. The issue's budget is
<= 3 launches per forward and <= 5 per backward. Not a test; the numbers go to NOTES.md.
"""

from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lorakern  # noqa: E402
from lorakern import settings  # noqa: E402
from lorakern.kernels import backward, forward, merge, shrink, tma  # noqa: E402

# aten ops that launch nothing on a GPU (metadata, allocation).
_FREE = {"empty", "empty_strided", "view", "_unsafe_view", "reshape", "t", "transpose", "as_strided", "detach",
         "alias", "expand", "permute", "unsqueeze", "squeeze", "select", "slice", "_to_copy_noop", "lift_fresh",
         "new_empty", "new_empty_strided", "is_same_size", "_has_compatible_shallow_copy_type"}


class _Launches(TorchDispatchMode):
    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE:
            self.log.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


def _stub(log: list[str]) -> None:
    class Counted:
        def __init__(self, kernel):
            self.name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(f"triton.{self.name}")

    for module in (forward, shrink, backward, merge, tma):
        module.wrap_triton = lambda kernel, like: Counted(kernel)


def count(variant: str, p: float) -> tuple[list[str], list[str]]:
    settings.fused_gemm = variant
    log: list[str] = []
    _stub(log)
    torch.manual_seed(0)
    M, K, N, r = 128, 64, 64, 16
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.bfloat16)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    dy = torch.randn(M, N, dtype=torch.bfloat16)
    with _Launches(log):
        y = lorakern.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, seed=1, backend="triton")
    fwd = list(log)
    log.clear()
    with _Launches(log):
        y.backward(dy)
    return fwd, list(log)


def main() -> None:
    for variant, label in (("1", "fused"), ("0", "cuBLAS + pass"), ("merged", "merged W′"), ("tma", "TMA fwd")):
        for p in (0.0, 0.1):
            fwd, bwd = count(variant, p)
            print(f"{label:<14} p={p}: forward {len(fwd)} launches {dict(Counter(fwd))}")
            print(f"{'':<14}        backward {len(bwd)} launches {dict(Counter(bwd))}")


if __name__ == "__main__":
    main()
