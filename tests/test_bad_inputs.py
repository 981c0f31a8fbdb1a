"""Empty dimensions, meta tensors, seeds and scalings (issue 10, items 9 and 10): what
F.linear computes, or a TypeError / ValueError naming the bad value — on every backend."""

from __future__ import annotations

import pytest
import torch

import lorakern
from tests.conftest import backend_device, requires_triton

BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def _leaf(*shape, device):
    return torch.randn(*shape, device=device).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N", [(4, 0, 3), (4, 5, 0), (0, 5, 3), (0, 0, 0)], ids=["K0", "N0", "M0", "all0"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_empty_dims_compute_what_f_linear_computes(backend, M, K, N, p):
    device = backend_device(backend)
    x, bias = _leaf(M, K, device=device), _leaf(N, device=device)
    W = torch.randn(N, K, device=device)
    A, B = _leaf(2, K, device=device), _leaf(N, 2, device=device)
    y = lorakern.lora_linear(x, W, bias, A, B, 2.0, dropout_p=p, seed=3, backend=backend)
    expected = torch.nn.functional.linear(x, W, bias)  # the LoRA term of an empty product is 0
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and B.grad.shape == B.shape
    assert bias.grad.shape == bias.shape
    # Empty reductions are zero gradients, not garbage.
    if K == 0 or M == 0:
        assert not A.grad.any() and not B.grad.any()


def test_meta_tensors_give_shapes():
    x, W = torch.randn(4, 5, device="meta"), torch.randn(3, 5, device="meta")
    A, B = torch.randn(2, 5, device="meta"), torch.randn(3, 2, device="meta")
    y = lorakern.lora_linear(x, W, None, A, B, 2.0)
    assert y.shape == (4, 3) and y.device.type == "meta"


def test_x_on_meta_rest_on_cpu_is_a_device_error():
    x = torch.randn(4, 5, device="meta")
    with pytest.raises(ValueError, match="one device"):
        lorakern.lora_linear(x, torch.randn(3, 5), None, torch.randn(2, 5), torch.randn(3, 2), 2.0)


@pytest.mark.parametrize("seed", [1.5, -0.5, "7", True, float("inf"), 7.0])
def test_seed_of_the_wrong_type_is_a_type_error(seed):
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(TypeError, match="seed must be an int"):
        lorakern.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("seed", [-1, 2**63, torch.tensor(-3)])
def test_seed_out_of_range_is_a_value_error(seed):
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        lorakern.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", [1e39, -1e39, float("inf"), float("nan"), torch.tensor([1e39], dtype=torch.float64)],
                         ids=["1e39", "-1e39", "inf", "nan", "tensor1e39"])
def test_scaling_outside_float32_is_refused_on_every_backend(backend, scaling):
    device = backend_device(backend)
    x, W, A, B = (torch.randn(*s, device=device) for s in ((4, 8), (6, 8), (2, 8), (6, 2)))
    with pytest.raises(ValueError, match="scaling must be finite"):
        lorakern.lora_linear(x, W, None, A, B, scaling, backend=backend)


def test_scaling_tensor_that_requires_grad_is_refused():
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    s = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="must not require grad"):
        lorakern.lora_linear(x, W, None, A, B, s)


def test_bogus_backend_refused_at_construction_and_inject():
    with pytest.raises(ValueError, match="backend must be one of"):
        lorakern.LoraLinear(torch.nn.Linear(8, 8), r=2, backend="bogus")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="backend must be one of"):
        lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["0"]), backend="bogus")
    assert [type(m) for m in model.modules()] == before


def test_linear_subclass_with_its_own_forward_is_refused():
    """LoraLinear never calls base_layer.forward: a subclass's forward would be skipped."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="its own forward"):
        lorakern.LoraLinear(Scaled(8, 8), r=2)


def test_linear_subclass_without_its_own_forward_is_accepted():
    class Plain(torch.nn.Linear):
        pass

    layer = lorakern.LoraLinear(Plain(8, 8), r=2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
