"""Regressions for results that used to come back wrong without an error (issue 10):
a second derivative through lora_linear, and NaN / Inf hidden by scaling == 0."""

from __future__ import annotations

import pytest
import torch

import lorakern
from tests.conftest import backend_device, requires_triton

BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def _inputs(backend, dtype=torch.float32, M=5, K=8, N=6, r=3):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    return rnd(M, K), rnd(N, K), rnd(r, K), rnd(N, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrt", ["x", "A"])
def test_second_order_gradients_raise(backend, wrt):
    """A gradient penalty through a LoRA layer: create_graph=True raises a clear error
    (the reference backend used to return a dA off by ~3e4, treating S as a constant)."""
    x, W, A, B = _inputs(backend)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = lorakern.lora_linear(x, W, None, A, B, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.square().sum(), {"x": x, "A": A}[wrt], create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_gradients_unchanged_by_the_check(backend):
    """create_graph=False (every ordinary backward) is not affected."""
    x, W, A, B = _inputs(backend)
    A.requires_grad_(True)
    y = lorakern.lora_linear(x, W, None, A, B, 0.5, backend=backend)
    (g,) = torch.autograd.grad(y.square().sum(), A)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradgradcheck_raises_on_the_reference_backend():
    x, W, A, B = (t.double() for t in _inputs("reference"))
    args = [t.requires_grad_(True) for t in (x, A, B)]

    def fn(x, A, B):
        return lorakern.lora_linear(x, W, None, A, B, 0.5, backend="reference")

    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["B", "A", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_scaling_zero_keeps_nan_and_inf(backend, where, bad):
    """scaling == 0 (LoraConfig(lora_alpha=0)): 0·(S Bᵀ) is NaN where S Bᵀ is not finite,
    as in PEFT and on every backend (the reference's addmm_(alpha=0) used to skip the
    product and return finite numbers)."""
    x, W, A, B = _inputs(backend)
    {"B": B, "A": A, "x": x}[where][0, 0] = bad
    y = lorakern.lora_linear(x, W, None, A, B, 0.0, backend=backend)
    expected = x @ W.t() + 0.0 * ((x @ A.t()) @ B.t())  # PEFT's arithmetic, in torch
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.isnan(y).any()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(y[finite], expected[finite], rtol=1e-5, atol=1e-5)
