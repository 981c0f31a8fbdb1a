"""Autocast: a LoraLinear behaves like nn.Linear under torch.autocast (output in the
autocast dtype), fp32 adapters stay fp32 masters with fp32 grads, and no combination of
(x dtype, base dtype, adapter dtype, autocast on/off) raises a dtype error.

Outside autocast, where nn.Linear itself would raise on x / weight dtypes that differ,
LoraLinear computes in the base weight's dtype and answers in x's dtype.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lorakern
from lorakern import op_core, ops
from tests.conftest import requires_cuda
from tests.utils import RTOL, assert_close

K, N, R = 24, 20, 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CASES = list(itertools.product(DTYPES, DTYPES, DTYPES, [False, True]))


def _case_id(case):
    x_dtype, w_dtype, a_dtype, autocast = case
    return f"x{NAMES[x_dtype]}-W{NAMES[w_dtype]}-A{NAMES[a_dtype]}-" + ("autocast" if autocast else "plain")


def _layer(w_dtype, a_dtype, device="cpu", dropout=0.0, backend="reference"):
    base = nn.Linear(K, N).to(device=device, dtype=w_dtype)
    layer = lorakern.LoraLinear(base, r=R, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, backend=backend)
    layer.lora_A["default"].to(a_dtype)
    layer.lora_B["default"].to(a_dtype)
    return layer


def _fp64_reference(x, layer, compute_dtype, dropout_keep=None):
    """y and grads in fp64 from the operands rounded to the compute dtype (the op casts
    x, W, bias and — in registers — the adapters to it)."""
    leaves = [
        x.detach().to(compute_dtype).double().requires_grad_(),
        layer.lora_A["default"].weight.detach().to(compute_dtype).double().requires_grad_(),
        layer.lora_B["default"].weight.detach().to(compute_dtype).double().requires_grad_(),
    ]
    x64, A64, B64 = leaves
    W64 = layer.base_layer.weight.detach().to(compute_dtype).double()
    b64 = layer.base_layer.bias.detach().to(compute_dtype).double()
    y64 = nn.functional.linear(x64, W64, b64) + layer.scaling["default"] * (x64 @ A64.t()) @ B64.t()
    return y64, leaves


# (device, backend): the reference on CPU, and the Triton kernels on CUDA when there is
# one, else in the interpreter on CPU.
TARGETS = [("cpu", "reference")]
if torch.cuda.is_available():
    TARGETS.append(("cuda", "triton"))
elif ops.interpreting():
    TARGETS.append(("cpu", "triton"))


@pytest.mark.parametrize("target", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dtype_matrix(case, target):
    x_dtype, w_dtype, a_dtype, autocast = case
    device, backend = target
    layer = _layer(w_dtype, a_dtype, device=device, backend=backend)
    x = torch.randn(3, 5, K, dtype=x_dtype, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        if autocast or x_dtype == w_dtype:  # where nn.Linear itself runs
            assert y.dtype == layer.base_layer(x).dtype
    compute = torch.bfloat16 if autocast else w_dtype
    assert y.dtype == (torch.bfloat16 if autocast else x_dtype)
    dy = torch.randn_like(y)
    y.backward(dy)

    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == a_dtype and B.dtype == a_dtype, "adapter weights changed dtype"
    assert A.grad.dtype == a_dtype and B.grad.dtype == a_dtype
    assert x.grad.dtype == x_dtype
    assert layer.base_layer.weight.grad is None

    y64, leaves = _fp64_reference(x, layer, compute)
    dx64, dA64, dB64 = torch.autograd.grad(y64, leaves, dy.double())
    # The error budget of the coarsest dtype involved: the compute dtype, y's / dx's dtype
    # (x's, outside autocast) and low-precision adapters (rounded before use).
    tol = max(RTOL[d] for d in (compute, y.dtype, x_dtype, a_dtype))
    assert_close(y, y64, tol, "y")
    assert_close(x.grad, dx64, tol, "dx")
    assert_close(A.grad, dA64, tol, "dA")
    assert_close(B.grad, dB64, tol, "dB")


def test_autocast_functional_keeps_fp32_adapters_in_the_op(monkeypatch):
    """lora_linear under autocast: x / W / bias are cast, fp32 adapters reach the op as fp32."""
    x = torch.randn(6, K)
    W, b = torch.randn(N, K), torch.randn(N)
    A = torch.randn(R, K, requires_grad=True)
    B = torch.randn(N, R, requires_grad=True)
    seen = {}
    real = op_core.implementation

    class Spy:
        def __init__(self, backend):
            self.impl = real(backend)

        def lora_linear_forward(self, x, weight, bias, lora_A, lora_B, *rest):
            seen.update(x=x.dtype, weight=weight.dtype, bias=None if bias is None else bias.dtype, lora_A=lora_A.dtype, lora_B=lora_B.dtype)
            return self.impl.lora_linear_forward(x, weight, bias, lora_A, lora_B, *rest)

        def lora_linear_backward(self, *args):
            return self.impl.lora_linear_backward(*args)

    monkeypatch.setattr(op_core, "implementation", Spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorakern.lora_linear(x, W, b, A, B, 0.5, dropout_p=0.2, seed=7)
    assert seen == dict(x=torch.bfloat16, weight=torch.bfloat16, bias=torch.bfloat16,
                        lora_A=torch.float32, lora_B=torch.float32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    # float64 is not an autocast dtype: left alone, as F.linear leaves it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x64 = torch.randn(2, K, dtype=torch.float64)
        y64 = lorakern.lora_linear(x64, W.double(), None, A.double(), B.double(), 0.5)
    assert y64.dtype == torch.float64 and seen["x"] == seen["lora_A"] == torch.float64


def test_autocast_training_steps_with_dropout():
    """A few SGD steps under autocast with dropout: fp32 masters move, stay fp32 and finite."""
    layer = _layer(torch.bfloat16, torch.float32, dropout=0.1).train()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    A0 = layer.lora_A["default"].weight.detach().clone()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(torch.randn(8, K)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    A = layer.lora_A["default"].weight
    assert A.dtype == torch.float32 and torch.isfinite(A).all() and not torch.equal(A, A0)


@requires_cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["Wf32", "Wbf16"])
def test_cuda_autocast_triton(amp_dtype, w_dtype):
    layer = _layer(w_dtype, torch.float32, device="cuda", backend="triton")
    x = torch.randn(4, 33, K, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=amp_dtype):
        y = layer(x)
        assert y.dtype == layer.base_layer(x).dtype == amp_dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.grad.dtype == B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    y64, leaves = _fp64_reference(x, layer, amp_dtype)
    grads64 = torch.autograd.grad(y64, leaves, dy.double())
    assert_close(y, y64, RTOL[amp_dtype], "y")
    for name, g, g64 in zip(["dx", "dA", "dB"], [x.grad, A.grad, B.grad], grads64, strict=True):
        assert_close(g, g64, RTOL[amp_dtype], name)
