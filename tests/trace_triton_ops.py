"""Trace the traced-Triton ops as torch.compile would, without a GPU; print a JSON summary.

    python -m tests.trace_triton_ops fake|symbolic|dynamo|graphs      (TRITON_INTERPRET unset)

fake / symbolic: inputs are FakeTensors on "cuda" (a CPU-only torch can make those);
make_fx with the functional decomposition shows the kernel launches Inductor would
compile, static or with a dynamic M. Autograd cannot run on fake CUDA tensors in a
CPU-only torch (no device guard), so there the backward op is traced by a direct call.

dynamo: torch.compile(fullgraph=True) of a tiny LoRA model on CPU tensors, with the
device checks switched off in this process only (compiled Triton kernels cannot run on
a CPU, but they can be traced): dynamo, AOTAutograd's joint graph and partitioner see
the real call path — forward and backward kernels, frames counted across scalar and
shape changes. The compiled graphs are recorded, never run.

graphs: the no-dropout call (decode, p = 0 training) traced with FakeTensor CUDA inputs
and scaling on the device, as LoraLinear passes it under torch.compile: what would make
Inductor skip CUDA graphs (a host op, a CPU value, an op it refuses); the same with a CPU
scaling as the control.
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
            "s_dev": torch.empty(1, dtype=torch.float64, device="cuda"),  # a ScalarDict mirror placed on the device
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


def _summary(graphs) -> dict:
    kernels, in_memory, by_value, dynamic_m, code = [], [], [], False, ""
    for gm in graphs:
        code += gm.code
        for node in gm.graph.nodes:
            if node.op != "call_function" or "triton_kernel_wrapper" not in str(node.target):
                continue
            kernels.append(_kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])))
            args = {**node.kwargs["kwargs"], **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])}
            if "SCALARS_IN_MEMORY" in args or "scaling" in args or "p" in args:  # kernels that read scalars
                in_memory.append(bool(args.get("SCALARS_IN_MEMORY")))
            if "scaling" in args and not isinstance(args["scaling"], torch.fx.Node):  # a constant in the graph
                by_value.append(kernels[-1])
            dynamic_m |= isinstance(args.get("M"), torch.fx.Node)
    return {
        "kernels": kernels,
        "scalars_in_memory": in_memory,
        "scaling_by_value": by_value,
        "dynamic_M": dynamic_m,
        "opaque_lora_op": code.count("lorakern.lora_linear_fwd.default") + code.count("lorakern.lora_linear_bwd.default"),
        "device_scalars": sum(
            node.target is torch.ops.lorakern.device_scalars.default for gm in graphs for node in gm.graph.nodes
        ),
    }


def _no_dropout_step(x, W, A, B, dy, scaling):
    """Decode and p = 0 training as LoraLinear traces them on CUDA: scaling a mirror on x's
    device (or a CPU one, the control), no dropout."""
    y = lorakern.lora_linear(x, W, None, A, B, scaling, backend="triton")
    if scaling.device == x.device:
        values, seed = triton_ops.graph_scalars(scaling, x.device)
    else:
        values, seed = triton_ops.device_scalars(scaling, torch.zeros(1, dtype=torch.float64), None, x.device)
    _, S = triton_ops.lora_linear_fwd_triton(x, W, None, A, B, values, seed, False)
    grads = triton_ops.lora_linear_bwd_triton(dy, x, W, A, B, S, values, seed, False, True, True, True)
    return (y, *grads)


def _cudagraph_blockers(gm) -> dict:
    """What makes Inductor skip CUDA graphs for a graph, as far as an FX graph shows it:
    the first op it refuses (utils.get_first_incompatible_cudagraph_node) and any value
    on the CPU (cudagraph_utils.check_multiple_devices_or_any_cpu_nodes)."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    incompatible = get_first_incompatible_cudagraph_node(gm)
    cpu = [
        node.name for node in gm.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].device.type == "cpu"
    ]
    return {"incompatible_op": None if incompatible is None else str(incompatible.target), "cpu_values": cpu}


def _graphs() -> dict:
    """The no-dropout call traced with scaling on the device (LoraLinear's placed mirror) and,
    as a control, on the CPU: {"device": summary, "cpu": summary}."""
    t = _inputs(False)
    out = {}
    for where in ("device", "cpu"):
        scaling = t["s_dev"] if where == "device" else torch.tensor([0.5], dtype=torch.float64)
        gm = make_fx(dispatch_functionalize(_no_dropout_step), tracing_mode="fake")(
            t["x"], t["W"], t["A"], t["B"], t["dy"], scaling
        )
        out[where] = {**_summary([gm]), **_cudagraph_blockers(gm)}
    return out


def _make_fx(mode: str) -> dict:
    t = _inputs(mode == "symbolic")
    scaling = torch.tensor([0.5], dtype=torch.float64)
    dropout_p = torch.tensor([0.1], dtype=torch.float64)
    gm = make_fx(dispatch_functionalize(_step), tracing_mode=mode)(
        t["x"], t["W"], t["A"], t["B"], t["dy"], scaling, dropout_p
    )
    # The kernels torch finds by reading each op's source: they enter AOTAutograd's
    # compile-cache key, so editing one must invalidate cached graphs.
    from torch._library.triton import get_triton_kernels_for_op

    found = {
        op: sorted({_kernel_name(k) for k in get_triton_kernels_for_op(f"lorakern::{op}")})
        for op in ("lora_linear_fwd_triton", "lora_linear_bwd_triton")
    }
    return {**_summary([gm]), "cache_key_kernels": found}


class _Traced(Exception):
    """Raised instead of running a recorded graph."""


def _dynamo() -> dict:
    import torch._dynamo.testing
    from torch._functorch.aot_autograd import aot_module_simplified

    from lorakern import ops
    from lorakern.kernels import backward, common, forward, shrink
    from tests.training_utils import lora_layers, tiny_lora_model

    for module in (common, shrink, forward, backward):
        module.check_device = lambda name, t: None
    ops.resolve_backend = lambda backend, device, dtype=torch.float32: "triton"
    graphs = []

    def record(gm, _):
        graphs.append(gm)

        def run(*args):
            raise _Traced

        return run

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    model = tiny_lora_model(dropout=0.25, backend="triton").train()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    frames, steps = [], {}
    for change in ("first call", "scaling and dropout changed", "new batch shape", "dropout off"):
        for layer in lora_layers(model):
            if change == "scaling and dropout changed":
                layer.scaling["default"] = 0.3
                layer.lora_dropout["default"] = 0.1
            if change == "dropout off":
                layer.lora_dropout["default"] = 0.0
        x = torch.randn(3, 7, 16) if change == "new batch shape" else torch.randn(2, 5, 16)
        before = len(graphs)
        try:
            compiled(x)
        except _Traced:
            pass
        frames.append(counter.frame_count)
        steps[change] = _summary(graphs[before:])
    # The graphs compiled when dropout went off: scalars built in the graph, no host op
    # (the CPU stands in for the CUDA device here: the mirrors are on x's device).
    summary = {**_summary(graphs), "frames": frames, "dropout_off": steps["dropout off"]}
    # Two active adapters, one with lora_bias, no dropout: the scalings fold into B and the
    # bias sum through the mirrors, still no host op.
    multi = tiny_lora_model(backend="triton").train()
    for layer in lora_layers(multi):
        layer.update_layer("b", 3, 6, lora_bias=True, init_lora_weights=False)
        layer.set_adapter(["default", "b"])
    before = len(graphs)
    try:
        torch.compile(multi, backend=backend, fullgraph=True)(torch.randn(2, 5, 16))
    except _Traced:
        pass
    return {**summary, "two_adapters_lora_bias": _summary(graphs[before:])}


def main(mode: str) -> None:
    run = {"dynamo": _dynamo, "graphs": _graphs}.get(mode)
    print(json.dumps(run() if run else _make_fx(mode)))


if __name__ == "__main__":
    main(sys.argv[1])
