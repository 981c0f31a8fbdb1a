"""The traced Triton path (lorakern/triton_ops.py): the `triton_op`s torch.compile uses
for the Triton backend when the kernels are compiled.

On CPU: their numerics run eagerly in the interpreter (bit-equal to the eager Triton
path, every gradient), the host-side scalar op's seed and validation, and — in a
subprocess without the interpreter — tracing of both ops on FakeTensor CUDA inputs,
static and dynamic shapes, and torch.compile of a LoRA model up to its recorded graphs
(tests/trace_triton_ops.py). On CUDA: opcheck and the compiled graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lorakern
from lorakern import op_core
from tests.conftest import KERNEL_DEVICE, requires_cuda, requires_triton
from tests.utils import RTOL, assert_close

pytestmark = requires_triton

K, N, R = 45, 37, 5


def _triton_ops():
    from lorakern import triton_ops

    return triton_ops


def _inputs(dt, lead=(2, 9), bias=True, weight=True):
    dev = KERNEL_DEVICE
    x = torch.randn(*lead, K, dtype=dt, device=dev, requires_grad=True)
    W = torch.randn(N, K, dtype=dt, device=dev, requires_grad=True) if weight else None
    b = torch.randn(N, dtype=dt, device=dev, requires_grad=True) if bias and weight else None
    A = torch.randn(R, K, device=dev, requires_grad=True)
    B = torch.randn(N, R, device=dev, requires_grad=True)
    return x, W, b, A, B


def _value_and_grads(fn, inputs, dy):
    y = fn()
    wrt = [t for t in inputs if t is not None]
    return [y, *torch.autograd.grad(y, wrt, dy)]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["bias", "no-bias", "2d", "lora-only"])
def test_traced_ops_equal_the_eager_triton_path_bit_for_bit(case, dt, p):
    """y and every gradient (x, W, bias, A, B) through device_scalars + the two triton_ops
    equal the eager Triton path's exactly for the same seed: same kernels, the scalars
    loaded from memory with the same fp32 rounding."""
    t = _triton_ops()
    lead = (11,) if case == "2d" else (2, 9)
    inputs = _inputs(dt, lead, bias=case != "no-bias", weight=case != "lora-only")
    x, W, b, A, B = inputs
    dy = torch.randn(*lead, N, dtype=dt, device=KERNEL_DEVICE)
    eager = _value_and_grads(
        lambda: lorakern.lora_linear(x, W, b, A, B, 0.7, dropout_p=p, seed=77, backend="triton"), inputs, dy
    )
    s, q, seed = op_core.scalar_tensors(0.7, p, 77)
    traced = _value_and_grads(lambda: t.lora_linear_traced(x, W, b, A, B, s, q, seed, p > 0.0), inputs, dy)
    for i, (e, r) in enumerate(zip(eager, traced)):
        assert e.dtype == r.dtype and e.shape == r.shape
        assert torch.equal(e, r), f"output {i} differs (max {(e.float() - r.float()).abs().max()})"


def test_traced_ops_match_the_reference():
    """One case against the reference backend directly (dropout on, bf16, fp32 adapters)."""
    t = _triton_ops()
    x, W, b, A, B = _inputs(torch.bfloat16)
    dy = torch.randn(2, 9, N, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    s, q, seed = op_core.scalar_tensors(0.7, 0.25, 5)
    got = _value_and_grads(lambda: t.lora_linear_traced(x, W, b, A, B, s, q, seed, True), (x, W, b, A, B), dy)
    cpu = [v.detach().cpu().requires_grad_() for v in (x, W, b, A, B)]
    want = _value_and_grads(
        lambda: lorakern.lora_linear(*cpu, 0.7, dropout_p=0.25, seed=5, backend="reference"), cpu, dy.cpu()
    )
    for name, g, w in zip(["y", "dx", "dW", "dbias", "dA", "dB"], got, want):
        assert_close(g.cpu(), w, RTOL[torch.bfloat16], name)


def test_dropout_on_with_p_zero_is_the_identity():
    """has_dropout is static (a tensor p may change without recompiling); when its value
    is 0 the masked kernels must keep every element: equal to the unmasked launch."""
    t = _triton_ops()
    x, W, b, A, B = _inputs(torch.float32)
    s, q, seed = op_core.scalar_tensors(0.7, 0.0, None)
    on = t.lora_linear_traced(x, W, b, A, B, s, q, seed, True)
    off = t.lora_linear_traced(x, W, b, A, B, s, q, seed, False)
    assert torch.equal(on, off)


def test_device_scalars_draws_the_eager_seed_and_validates():
    """seed None: drawn from torch's CPU generator only when p > 0, the draw eager mode
    makes (so compiled and eager masks agree); bad p or seed raise before any launch."""
    t = _triton_ops()
    s, q, _ = op_core.scalar_tensors(0.5, 0.2, None)
    torch.manual_seed(3)
    values, seed = t.device_scalars(s, q, None, torch.device(KERNEL_DEVICE))
    torch.manual_seed(3)
    assert int(seed) == op_core.draw_seed()
    assert values.tolist() == pytest.approx([0.5, 0.2, 1 / 0.8], rel=1e-7)
    assert values.dtype == torch.float32 and seed.dtype == torch.int64
    torch.manual_seed(3)
    _, seed0 = t.device_scalars(s, torch.tensor([0.0], dtype=torch.float64), None, torch.device(KERNEL_DEVICE))
    assert int(seed0) == 0 and op_core.draw_seed() == int(seed)  # p = 0 drew nothing
    with pytest.raises(ValueError, match="dropout_p"):
        t.device_scalars(s, torch.tensor([1.0], dtype=torch.float64), None, torch.device(KERNEL_DEVICE))
    with pytest.raises(ValueError, match="seed"):
        t.device_scalars(s, q, torch.tensor(-1), torch.device(KERNEL_DEVICE))


def test_opcheck_device_scalars():
    t = _triton_ops()
    s, q, seed = op_core.scalar_tensors(0.5, 0.2, 9)
    torch.library.opcheck(t.device_scalars, (s, q, seed, torch.device(KERNEL_DEVICE)))


def _trace(mode: str, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.trace_triton_ops", mode], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the CUDA tests")
@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_traced_ops_decompose_into_kernel_launches(mode):
    """What Inductor gets, traced without a GPU (FakeTensor CUDA inputs, Triton's compiler,
    the functional decomposition AOTAutograd applies): `lora_linear` forward and the
    backward op become triton_kernel_wrapper nodes (shrink, epilogue, dS/dB, dx, dA) around
    cuBLAS mm's, never the opaque lorakern::lora_linear_fwd; the scalars come from the one
    host op, device_scalars. 'symbolic': M dynamic, no specialisation to a number."""
    graph = _trace(mode)
    assert graph["opaque_lora_op"] == 0
    assert graph["device_scalars"] == 2  # one in lora_linear, one before the direct op calls
    kernels = graph["kernels"]
    for name in ("_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dsdb_kernel", "_lora_bwd_dx_kernel", "_lora_bwd_da_kernel"):
        assert name in kernels, f"{name} not launched in the traced graph: {kernels}"
    assert all(kwargs_mem for kwargs_mem in graph["scalars_in_memory"]), graph["scalars_in_memory"]
    if mode == "symbolic":
        assert graph["dynamic_M"], "M was specialised to a number"
    # torch reads the ops' source for wrap_triton(<kernel>) calls to key its compile cache
    # on the kernels' code: every kernel each op can launch must be found.
    assert graph["cache_key_kernels"] == {
        "lora_linear_fwd_triton": ["_lora_fwd_kernel", "_lora_fwd_tma_kernel", "_lora_merge_kernel", "_lora_shrink_kernel"],
        "lora_linear_bwd_triton": ["_lora_bwd_da_kernel", "_lora_bwd_dsdb_kernel", "_lora_bwd_dx_kernel", "_lora_merge_kernel",
                                   "_sum_partials_kernel"],
    }, graph["cache_key_kernels"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the CUDA tests")
def test_compile_of_a_lora_model_traces_the_kernels_fullgraph():
    """torch.compile(fullgraph=True) of a LoRA model on the traced Triton path, as far as
    a CPU goes (device checks off in the subprocess; graphs recorded, not run): one frame,
    the forward and backward kernels in AOTAutograd's graphs with scalars in memory (the
    scaling never a constant), no opaque op; changing scaling and a positive dropout does
    not recompile, a new batch shape recompiles once with M symbolic, dropout turning 0
    recompiles once into graphs without the host op (scalars built in the graph), as two
    active adapters with lora_bias compile without it."""
    graph = _trace("dynamo")
    assert graph["frames"] == [1, 1, 2, 3], graph["frames"]
    assert graph["opaque_lora_op"] == 0 and graph["device_scalars"] >= 2
    for name in ("_lora_fwd_kernel", "_lora_bwd_dsdb_kernel", "_lora_bwd_dx_kernel", "_lora_bwd_da_kernel"):
        assert name in graph["kernels"], f"{name} not in the compiled graphs: {graph['kernels']}"
    assert graph["scaling_by_value"] == [] and graph["dynamic_M"]
    off = graph["dropout_off"]
    assert off["device_scalars"] == 0 and off["scaling_by_value"] == [], off
    assert "_lora_fwd_kernel" in off["kernels"] and "_lora_bwd_da_kernel" in off["kernels"], off["kernels"]
    multi = graph["two_adapters_lora_bias"]  # two active adapters, one with lora_bias, no dropout
    assert multi["device_scalars"] == 0 and "_lora_fwd_kernel" in multi["kernels"], multi


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the CUDA tests")
def test_no_dropout_call_has_nothing_that_stops_cuda_graphs():
    """Item 5 of issue 11, traced without a GPU (FakeTensor CUDA inputs): with scaling on x's
    device (a placed ScalarDict mirror, what LoraLinear passes under torch.compile) and no
    dropout, forward and backward hold no host op, no CPU value and no op Inductor refuses
    under CUDA graphs; the control with a CPU scaling shows the check sees all three kinds."""
    graphs = _trace("graphs")
    device, cpu = graphs["device"], graphs["cpu"]
    assert device["device_scalars"] == 0 and device["cpu_values"] == [] and device["incompatible_op"] is None, device
    assert device["scaling_by_value"] == [] and "_lora_fwd_kernel" in device["kernels"], device
    assert cpu["device_scalars"] == 2 and cpu["cpu_values"], cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the CUDA tests")
def test_lorakern_triton_op_0_compiles_the_opaque_op_instead():
    """LORAKERN_TRITON_OP=0: the same model compiles with the opaque custom op (no kernel
    nodes), still one frame and no recompile on scalar changes (dropout turning 0 included:
    the opaque op reads p on the host)."""
    graph = _trace("dynamo", LORAKERN_TRITON_OP="0")
    assert graph["frames"] == [1, 1, 2, 2], graph["frames"]
    assert graph["opaque_lora_op"] > 0 and graph["kernels"] == [] and graph["device_scalars"] == 0


def test_lorakern_triton_op_must_be_0_or_1(switches):
    with pytest.raises(ValueError, match="LORAKERN_TRITON_OP"):
        switches(LORAKERN_TRITON_OP="yes")


# ----------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_traced_triton_ops(p):
    t = _triton_ops()
    x, W, b, A, B = _inputs(torch.bfloat16)
    values, seed = t.device_scalars(*op_core.scalar_tensors(0.7, p, 11), x.device)
    torch.library.opcheck(t.lora_linear_fwd_triton, (x, W, b, A, B, values, seed, p > 0.0))
    y, S = t.lora_linear_fwd_triton(x, W, b, A, B, values, seed, p > 0.0)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        t.lora_linear_bwd_triton, (dy, x.detach(), W.detach(), A.detach(), B.detach(), S, values, seed, p > 0.0, True, True, True)
    )


@requires_cuda
def test_cuda_compile_sees_the_kernels():
    """Under torch.compile the Triton backend's graph holds the kernels (triton_op), not the
    opaque custom op: AOTAutograd's forward graph has triton_kernel_wrapper nodes."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, example_inputs):
        def record(g, _):
            graphs.append(g)
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    x, W, b, A, B = _inputs(torch.bfloat16)
    fn = torch.compile(lambda x: lorakern.lora_linear(x, W, b, A, B, 0.5, dropout_p=0.1, backend="triton"),
                       backend=backend, fullgraph=True)
    fn(x).float().sum().backward()
    code = "\n".join(g.code for g in graphs)
    assert "triton_kernel_wrapper" in code and "lora_linear_fwd.default" not in code
