"""LoraLinear: identity at init, trainable parameters, merge/unmerge, state dict, init, dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakern
from lorakern import LoraLinear
from tests.conftest import backend_device, requires_triton
from tests.utils import RTOL, assert_close, rel_error

K, N = 24, 18


def make_layer(dtype=torch.float32, **kwargs) -> LoraLinear:
    kwargs.setdefault("backend", "reference")
    return LoraLinear(nn.Linear(K, N).to(dtype), **kwargs)


def naive_layer(layer: LoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """fp64 base(x) + s·B A x (no dropout)."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    x = x.double()
    return x @ W.t() + b + layer.scaling[name] * (x @ A.t()) @ B.t()


# ----------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("lead", [(5,), (3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fresh_layer_equals_base(dtype, lead, training):
    layer = make_layer(dtype, r=4, lora_alpha=8, lora_dropout=0.2)
    layer.train(training)
    x = torch.randn(*lead, K, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert torch.equal(y, layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fresh_layer_on_triton_matches_base_to_rounding(dtype):
    """On the Triton backend the base GEMM is the fused kernel's, not nn.Linear's: with
    B = 0 the LoRA term adds exactly 0, so the output differs from the base layer only by
    the GEMM's summation order (bit-exact equality holds on the reference backend)."""
    from lorakern import ops
    from lorakern.selfcheck import error_bound

    if not (torch.cuda.is_available() or ops.interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = LoraLinear(nn.Linear(200, 70).to(device=dev, dtype=dtype), r=4, lora_alpha=8, backend="triton")
    x = torch.randn(130, 200, device=dev, dtype=dtype)
    y, y_base = layer(x), layer.base_layer(x)
    assert y.dtype == dtype
    oracle = x.double() @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()
    assert rel_error(y, oracle) <= error_bound(dtype, rel_error(y_base, oracle))


def test_adapters_are_fp32_on_bf16_base():
    layer = make_layer(torch.bfloat16, r=4)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- trainable parameters


@pytest.mark.parametrize("init", [True, False], ids=["init-default", "init-random"])
def test_grads_reach_only_adapters(init):
    layer = make_layer(r=3, init_lora_weights=init, lora_dropout=0.1)
    layer.train()
    x = torch.randn(6, K)
    layer(x).square().sum().backward()
    base = layer.base_layer
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert base.weight.grad is None and base.bias.grad is None
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.requires_grad and B.requires_grad
    assert A.grad is not None and A.grad.shape == A.shape
    assert B.grad is not None and torch.count_nonzero(B.grad) > 0
    if init is False:  # with B != 0, A's gradient is non-zero too
        assert torch.count_nonzero(A.grad) > 0
    else:  # B == 0 makes dA = s·(dY B)ᵀ D(x) exactly zero
        assert torch.count_nonzero(A.grad) == 0
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}


def test_layer_grads_match_naive():
    layer = make_layer(r=5, lora_alpha=10, init_lora_weights=False)
    x = torch.randn(2, 7, K)
    dy = torch.randn(2, 7, N)
    layer(x).backward(dy)
    A = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.double()
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y_ref = x64 @ W.t() + b + 2.0 * (x64 @ A.t()) @ B.t()
    y_ref.backward(dy.double())
    assert_close(layer.lora_A["default"].weight.grad, A.grad, RTOL[torch.float32], "dA")
    assert_close(layer.lora_B["default"].weight.grad, B.grad, RTOL[torch.float32], "dB")


def test_grad_flows_to_x_through_frozen_layer():
    """A frozen adapter between trainable layers: only dx is needed, and it is right."""
    layer = make_layer(r=3, init_lora_weights=False, lora_dropout=0.2).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 5, K, requires_grad=True)
    dy = torch.randn(4, 5, N)
    layer(x).backward(dy)
    x64 = x.detach().double().requires_grad_()
    naive_layer(layer, x64).backward(dy.double())
    assert_close(x.grad, x64.grad, RTOL[torch.float32], "dx")
    assert all(p.grad is None for p in layer.parameters())


# ----------------------------------------------------------------------------- merge / unmerge


def test_merge_unmerge_fp32():
    layer = make_layer(r=4, lora_alpha=6, init_lora_weights=False).eval()
    x = torch.randn(3, 5, K)
    W0 = layer.base_layer.weight.detach().clone()
    y_unmerged = layer(x)
    assert_close(y_unmerged, naive_layer(layer, x), RTOL[torch.float32], "unmerged")
    assert not layer.merged and layer.merged_adapters == []

    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    delta = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    assert_close(layer.base_layer.weight, W0.double() + delta, 1e-6, "merged W")
    y_merged = layer(x)
    assert torch.equal(y_merged, layer.base_layer(x))  # merged: the base layer alone
    assert rel_error(y_merged, y_unmerged) <= 1e-5

    layer.merge()  # merging twice is a no-op
    assert layer.merged_adapters == ["default"]
    assert_close(layer.base_layer.weight, W0.double() + delta, 1e-6, "merged twice")

    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert rel_error(layer.base_layer.weight, W0) <= 1e-6
    assert_close(layer(x), y_unmerged, 1e-5, "after unmerge")


def test_merge_bf16_base():
    layer = make_layer(torch.bfloat16, r=4, init_lora_weights=False).eval()
    x = torch.randn(6, K, dtype=torch.bfloat16)
    y_ref = naive_layer(layer, x)
    assert_close(layer(x), y_ref, RTOL[torch.bfloat16], "unmerged bf16")
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert_close(layer(x), y_ref, RTOL[torch.bfloat16], "merged bf16")


# ----------------------------------------------------------------------------- state dict


def test_state_dict_keys_and_shapes():
    r = 5
    layer = make_layer(r=r)
    sd = layer.state_dict()
    expected = {
        "base_layer.weight": (N, K),
        "base_layer.bias": (N,),
        "lora_A.default.weight": (r, K),
        "lora_B.default.weight": (N, r),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_second_adapter_adds_its_keys():
    layer = make_layer(r=5)
    layer.update_layer("other", r=2, lora_alpha=4)
    sd = layer.state_dict()
    assert tuple(sd["lora_A.other.weight"].shape) == (2, K)
    assert tuple(sd["lora_B.other.weight"].shape) == (N, 2)
    assert set(sd) == {
        "base_layer.weight", "base_layer.bias",
        "lora_A.default.weight", "lora_B.default.weight",
        "lora_A.other.weight", "lora_B.other.weight",
    }
    assert layer.scaling["other"] == 2.0 and layer.r["other"] == 2


def test_state_dict_round_trip():
    src = make_layer(r=3, init_lora_weights=False).eval()
    dst = make_layer(r=3).eval()
    x = torch.randn(4, K)
    assert not torch.equal(src(x), dst(x))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src(x), dst(x))


# ----------------------------------------------------------------------------- init and scaling


def test_gaussian_init():
    r = 8
    layer = LoraLinear(nn.Linear(1024, N), r=r, init_lora_weights="gaussian", backend="reference")
    A = layer.lora_A["default"].weight.double()
    n = A.numel()  # 8192 draws
    sigma = 1.0 / r
    assert abs(A.mean().item()) <= 5 * sigma / math.sqrt(n)
    # std of the sample std of n normals is sigma / sqrt(2(n-1)).
    assert abs(A.std().item() - sigma) <= 5 * sigma / math.sqrt(2 * (n - 1))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_default_init_kaiming_uniform_A_zero_B():
    layer = make_layer(r=16)
    A = layer.lora_A["default"].weight
    bound = 1.0 / math.sqrt(K)  # kaiming_uniform_(a=sqrt(5)) on fan_in = K
    assert A.abs().max().item() <= bound and A.abs().max().item() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("r,alpha", [(1, 1), (4, 8), (16, 32), (7, 3.5)])
def test_scaling(r, alpha):
    assert make_layer(r=r, lora_alpha=alpha).scaling["default"] == pytest.approx(alpha / r, rel=1e-15)
    rs = make_layer(r=r, lora_alpha=alpha, use_rslora=True)
    assert rs.scaling["default"] == pytest.approx(alpha / math.sqrt(r), rel=1e-15)
    assert rs.use_rslora["default"] is True


def test_scaling_is_applied_in_forward():
    layer = make_layer(r=4, lora_alpha=12, use_rslora=True, init_lora_weights=False).eval()
    x = torch.randn(5, K)
    assert layer.scaling["default"] == pytest.approx(6.0)
    assert_close(layer(x), naive_layer(layer, x), RTOL[torch.float32], "rslora forward")


# ----------------------------------------------------------------------------- dropout


def test_dropout_only_in_training():
    layer = make_layer(r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, K)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(layer(x), y_eval)  # deterministic
    nodrop = make_layer(r=4, lora_dropout=0.0).eval()
    nodrop.load_state_dict(layer.state_dict())
    assert torch.equal(nodrop(x), y_eval)  # eval ignores p
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # Inverted dropout keeps the expectation: the mean over many masks approaches eval.
    mean = torch.stack([layer(x) for _ in range(200)]).mean(0)
    assert rel_error(mean - layer.base_layer(x), y_eval - layer.base_layer(x)) < 0.2


def test_train_mode_dropout_is_reproducible_with_manual_seed():
    layer = make_layer(r=4, lora_dropout=0.3, init_lora_weights=False).train()
    x = torch.randn(8, K)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    assert torch.equal(y1, y2)


def test_train_mode_uses_the_ops_seeded_mask_in_forward_and_backward():
    """Training-mode output and adapter grads equal the naive formula with the mask of the seed
    the op draws (op_core.draw_seed after the same torch.manual_seed)."""
    from lorakern import op_core, reference

    p = 0.4
    layer = make_layer(r=3, lora_alpha=6, lora_dropout=p, init_lora_weights=False).train()
    x = torch.randn(7, K)
    dy = torch.randn(7, N)
    torch.manual_seed(99)
    y = layer(x)
    y.backward(dy)
    torch.manual_seed(99)
    seed = op_core.draw_seed()
    A = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.double()
    xd = x64 * reference.dropout_keep_mask(seed, 7, K, p).double() / (1 - p)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y_ref = x64 @ W.t() + b + 2.0 * (xd @ A.t()) @ B.t()
    y_ref.backward(dy.double())
    assert_close(y, y_ref, RTOL[torch.float32], "y")
    assert_close(layer.lora_A["default"].weight.grad, A.grad, RTOL[torch.float32], "dA")
    assert_close(layer.lora_B["default"].weight.grad, B.grad, RTOL[torch.float32], "dB")


# ----------------------------------------------------------------------------- repr


def test_extra_repr():
    layer = make_layer(r=4, lora_alpha=8, lora_dropout=0.1)
    text = repr(layer)
    assert "r=4" in text and "lora_alpha=8" in text and "lora_dropout=0.1" in text
    assert f"in_features={K}" in text and f"out_features={N}" in text


# ----------------------------------------------------------------------------- training


def test_sgd_steps_reduce_loss():
    torch.manual_seed(1)
    layer = make_layer(r=4, lora_alpha=8)
    # Target: the base plus a rank-2 change, which the adapter can represent.
    with torch.no_grad():
        delta = 0.5 * torch.randn(N, 2) @ torch.randn(2, K) / math.sqrt(K)
        x = torch.randn(64, K)
        target = layer.base_layer(x) + x @ delta.t()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0], losses[:3]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_single_adapter_forward_is_the_op_without_its_argument_handling(backend, monkeypatch):
    """One plain adapter in eager mode: the layer calls the op's eager route directly
    (no-grad forward, or LoraLinearFunction), never `lora_linear` — bit-identical to it in
    value and every gradient, with the same dropout seed draw (same mask after the same
    torch.manual_seed). Bad input still gets the op's error (the general path)."""
    import lorakern.layer as layer_module

    torch.manual_seed(4)
    dev = backend_device(backend)
    layer = LoraLinear(nn.Linear(16, 12), r=4, lora_alpha=6, init_lora_weights=False, lora_dropout=0.2, backend=backend)
    layer = layer.to(dev)
    x = torch.randn(5, 3, 16, device=dev)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    calls = []
    monkeypatch.setattr(layer_module, "lora_linear", lambda *a, **k: calls.append(1) or lorakern.lora_linear(*a, **k))
    for train in (False, True):
        layer.train(train)
        p = 0.2 if train else 0.0
        with torch.no_grad():
            torch.manual_seed(7)
            ref = lorakern.lora_linear(x, W, b, A, B, s, dropout_p=p, backend=backend)
            torch.manual_seed(7)
            assert torch.equal(layer(x), ref)
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(5, 3, 12, device=dev)
        torch.manual_seed(8)
        ref = lorakern.lora_linear(xg, W, b, A, B, s, dropout_p=p, backend=backend)
        want = torch.autograd.grad(ref, (xg, A, B), dy)
        torch.manual_seed(8)
        got_y = layer(xg)
        got = torch.autograd.grad(got_y, (xg, A, B), dy)
        assert torch.equal(got_y, ref)
        for g, r, name in zip(got, want, ("x", "A", "B")):
            assert torch.equal(g, r), name
    assert calls == []  # the layer never went through lora_linear
    with torch.no_grad(), pytest.raises(ValueError, match="last dim"):
        layer.eval()(torch.randn(2, 15, device=x.device))  # bad input: the op's error
    assert len(calls) == 1
