"""Bad inputs raise the promised TypeError / ValueError, naming the offending shapes, dtypes, devices."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lorakern import LoraLinear, lora_linear
from tests.conftest import requires_cuda

M, K, N, R = 3, 8, 5, 2


def inputs(dtype=torch.float32):
    return (
        torch.randn(M, K, dtype=dtype),
        torch.randn(N, K, dtype=dtype),
        torch.randn(N, dtype=dtype),
        torch.randn(R, K, dtype=dtype),
        torch.randn(N, R, dtype=dtype),
    )


def call(x, w, b, A, B, scaling=1.0, **kw):
    kw.setdefault("backend", "reference")
    return lora_linear(x, w, b, A, B, scaling, **kw)


def esc(text: str) -> str:
    return re.escape(text)


# ----------------------------------------------------------------------------- shapes


def test_k_mismatch_x_weight():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=esc("x (3, 10), weight (5, 8)")):
        call(torch.randn(M, 10), w, b, A, B)


def test_k_mismatch_3d_x():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=esc("x (2, 3, 7)")):
        call(torch.randn(2, 3, 7), w, b, A, B)


def test_k_mismatch_lora_A():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 8\].*got \(2, 9\)"):
        call(x, w, b, torch.randn(R, 9), B)


def test_n_mismatch_bias():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"bias must be \[5\], got \(6,\)"):
        call(x, w, torch.randn(6), A, B)


def test_n_mismatch_lora_B():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"lora_B must be \[5, 2\].*got \(6, 2\)"):
        call(x, w, b, A, torch.randn(6, R))


def test_r_mismatch_between_A_and_B():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"lora_B must be \[5, 2\].*lora_A \(2, 8\).*got \(5, 3\)"):
        call(x, w, b, A, torch.randn(N, 3))


def test_lora_A_rank_zero():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"r >= 1, got \(0, 8\)"):
        call(x, w, b, torch.randn(0, K), torch.randn(N, 0))


def test_weight_not_2d():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=esc("weight (40,)")):
        call(x, w.reshape(-1), b, A, B)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_x(dtype):
    _, w, b, A, B = inputs()
    with pytest.raises(TypeError, match=rf"x has dtype {esc(str(dtype))}"):
        call(torch.zeros(M, K, dtype=dtype), w, b, A, B)


def test_weight_dtype_differs_from_x():
    x, w, b, A, B = inputs()
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 must equal x dtype torch.float32"):
        call(x, w.half(), b, A, B)


def test_bias_dtype_differs_from_x():
    x, w, b, A, B = inputs(torch.bfloat16)
    with pytest.raises(TypeError, match=r"bias dtype torch.float32 .*torch.bfloat16"):
        call(x, w, b.float(), A, B)


def test_adapter_dtype_neither_x_nor_fp32():
    x, w, b, A, B = inputs(torch.bfloat16)
    with pytest.raises(TypeError, match=r"lora_A dtype torch.float16 must be x's dtype torch.bfloat16 or float32"):
        call(x, w, b, A.half(), B)


def test_float64_with_triton_backend():
    x, w, b, A, B = inputs(torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton'.*got torch.float64"):
        call(x, w, b, A, B, backend="triton")
    call(x, w, b, A, B, backend="reference")  # fp64 is fine on the reference backend


# ----------------------------------------------------------------------------- scalars and backend


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_unsupported_backend_name(backend):
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=rf"backend must be one of .*got {esc(repr(backend))}"):
        call(x, w, b, A, B, backend=backend)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_bad_dropout_p(p):
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=rf"dropout_p must be in \[0, 1\), got {esc(str(p))}"):
        call(x, w, b, A, B, dropout_p=p, seed=0)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 + 3])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_seed_out_of_range(seed, p):
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*63\), got {seed}"):
        call(x, w, b, A, B, dropout_p=p, seed=seed)


def test_seed_at_range_ends_is_accepted():
    x, w, b, A, B = inputs()
    for seed in (0, 2**63 - 1):
        assert call(x, w, b, A, B, dropout_p=0.5, seed=seed).shape == (M, N)


@pytest.mark.parametrize("scaling", ["0.5", None, [1.0]], ids=["str", "None", "list"])
def test_scaling_not_a_number(scaling):
    x, w, b, A, B = inputs()
    with pytest.raises(TypeError, match=rf"scaling must be a Python number.*got {type(scaling).__name__}"):
        call(x, w, b, A, B, scaling)


def test_non_tensor_input():
    x, w, b, A, B = inputs()
    with pytest.raises(TypeError, match="lora_B must be a torch.Tensor, got list"):
        call(x, w, b, A, B.tolist())


@pytest.mark.parametrize("odd_one", ["weight", "bias", "lora_A", "lora_B"])
def test_tensors_on_different_devices_cpu(odd_one):
    """The device check needs no GPU: one tensor on the meta device is enough."""
    named = dict(zip(("x", "weight", "bias", "lora_A", "lora_B"), inputs(), strict=True))
    named[odd_one] = named[odd_one].to("meta")
    with pytest.raises(ValueError, match=rf"one device.*'{odd_one}': device\(type='meta'\)"):
        lora_linear(*named.values(), 1.0)


@requires_cuda
def test_tensors_on_different_devices():
    x, w, b, A, B = inputs()
    with pytest.raises(ValueError, match=r"one device.*'x': device\(type='cuda'.*'weight': device\(type='cpu'\)"):
        lora_linear(x.cuda(), w, b.cuda(), A.cuda(), B.cuda(), 1.0)


# ----------------------------------------------------------------------------- LoraLinear


@pytest.mark.parametrize("r", [0, -2, 2.0, True], ids=["0", "-2", "float", "bool"])
def test_layer_bad_rank(r):
    with pytest.raises(ValueError, match=rf"r must be an int >= 1, got {esc(repr(r))}"):
        LoraLinear(nn.Linear(K, N), r=r)


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_layer_bad_dropout(p):
    with pytest.raises(ValueError, match=rf"lora_dropout must be in \[0, 1\), got {esc(str(p))}"):
        LoraLinear(nn.Linear(K, N), r=4, lora_dropout=p)


def test_layer_bad_alpha():
    with pytest.raises(ValueError, match="lora_alpha must be finite, got inf"):
        LoraLinear(nn.Linear(K, N), r=4, lora_alpha=float("inf"))


@pytest.mark.parametrize("base", [nn.Conv2d(3, 4, 1), nn.Embedding(10, 4), nn.Bilinear(2, 3, 4)],
                         ids=["Conv2d", "Embedding", "Bilinear"])
def test_layer_base_not_linear(base):
    with pytest.raises(TypeError, match=rf"base_layer must be nn.Linear.*got {type(base).__name__}"):
        LoraLinear(base, r=4)


@pytest.mark.parametrize("init", ["xavier", "Gaussianx", 1, None], ids=["xavier", "typo", "int", "None"])
def test_layer_bad_init(init):
    with pytest.raises(ValueError, match=rf"init_lora_weights must be .*got {esc(repr(init))}"):
        LoraLinear(nn.Linear(K, N), r=4, init_lora_weights=init)


def test_update_layer_bad_args_leave_layer_unchanged():
    layer = LoraLinear(nn.Linear(K, N), r=4, backend="reference")
    before = set(layer.state_dict())
    for kwargs in (dict(r=0), dict(r=2, lora_dropout=1.0), dict(r=2, init_lora_weights="bogus")):
        with pytest.raises(ValueError):
            layer.update_layer("other", lora_alpha=4, **kwargs)
        assert set(layer.state_dict()) == before, kwargs
        assert "other" not in layer.r and layer.active_adapters == ["default"], kwargs


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_layer_non_floating_x(dtype):
    """An integer x is an error (as in nn.Linear), not silently cast in and truncated out."""
    layer = LoraLinear(nn.Linear(K, N), r=4, backend="reference")
    with pytest.raises(TypeError, match=rf"x has dtype {esc(str(dtype))}"):
        layer(torch.ones(M, K, dtype=dtype))
