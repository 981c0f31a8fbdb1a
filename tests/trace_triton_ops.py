"""Trace the traced-Triton ops as AOTAutograd would, without a GPU; print a JSON summary.

    python -m tests.trace_triton_ops fake|symbolic      (TRITON_INTERPRET unset)

Inputs are FakeTensors on "cuda" (a CPU-only torch can make those); make_fx with the
functional decomposition shows the kernel launches Inductor would compile. Backward
autograd itself cannot run on fake CUDA tensors in a CPU-only torch (no device guard),
so the backward op is traced by a direct call; its autograd wiring is tested eagerly.
Used by tests/test_triton_ops.py.
"""

from __future__ import annotations

import json
import sys

import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import lorakern
from lorakern import triton_ops

K, N, R = 64, 48, 8


def _inputs(symbolic: bool):
    with FakeTensorMode():
        real = {
            "x": torch.empty(2, 9, K, dtype=torch.bfloat16, device="cuda"),
            "dy": torch.empty(2, 9, N, dtype=torch.bfloat16, device="cuda"),
            "W": torch.empty(N, K, dtype=torch.bfloat16, device="cuda"),
            "A": torch.empty(R, K, device="cuda"),
            "B": torch.empty(N, R, device="cuda"),
        }
    if not symbolic:
        return real
    mode = FakeTensorMode(shape_env=ShapeEnv())
    leading = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    return {
        name: mode.from_tensor(t, symbolic_context=leading) if name in ("x", "dy") else mode.from_tensor(t)
        for name, t in real.items()
    }


def _step(x, W, A, B, dy, scaling, dropout_p):
    y = lorakern.lora_linear(x, W, None, A, B, scaling, dropout_p=dropout_p, backend="triton")
    values, seed = triton_ops.device_scalars(scaling, dropout_p, None, x.device)
    _, S = triton_ops.lora_linear_fwd_triton(x, W, None, A, B, values, seed, True)
    grads = triton_ops.lora_linear_bwd_triton(dy, x, W, A, B, S, values, seed, True, True, True, True)
    return (y, *grads)


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
    return getattr(fn, "__name__", None) or fn.fn.__name__


def main(mode: str) -> None:
    t = _inputs(mode == "symbolic")
    scaling = torch.tensor([0.5], dtype=torch.float64)
    dropout_p = torch.tensor([0.1], dtype=torch.float64)
    gm = make_fx(dispatch_functionalize(_step), tracing_mode=mode)(
        t["x"], t["W"], t["A"], t["B"], t["dy"], scaling, dropout_p
    )
    kernels, in_memory, dynamic_m = [], [], False
    for node in gm.graph.nodes:
        if node.op != "call_function" or "triton_kernel_wrapper" not in str(node.target):
            continue
        kernels.append(_kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])))
        args = {**node.kwargs["kwargs"], **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])}
        in_memory.append(bool(args.get("SCALARS_IN_MEMORY")))
        dynamic_m |= isinstance(args.get("M"), torch.fx.Node)
    code = gm.code
    print(json.dumps({
        "kernels": kernels,
        "scalars_in_memory": in_memory,
        "dynamic_M": dynamic_m,
        "opaque_lora_op": code.count("lorakern.lora_linear_fwd.default") + code.count("lorakern.lora_linear_bwd.default"),
        "device_scalars": code.count("lorakern.device_scalars.default"),  # lora_linear once, _step once
    }))


if __name__ == "__main__":
    main(sys.argv[1])
