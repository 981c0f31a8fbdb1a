"""DoRA (use_dora=True): PEFT's numbers on the fused op, the low-rank norm identity, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakern
from lorakern import dora
from tests.conftest import backend_device, requires_triton
from tests.utils import RTOL, assert_close

TARGETS = ["q_proj", "v_proj"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _pair(dropout: float = 0.0):
    """(PEFT DoRA model, lorakern DoRA model) with the same base and adapter weights."""
    import peft

    base = _llama()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False, lora_dropout=dropout))
    ours = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False, lora_dropout=dropout))
    ours.load_state_dict({k.replace("base_model.model.", ""): v for k, v in peft_model.state_dict().items()})
    return peft_model, ours


def _grads(model):
    return {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_matches_peft_logits_and_every_gradient(dropout):
    """Same logits and gradients (lora_A, lora_B, magnitude) as PEFT's use_dora; with dropout
    both draw the mask from torch's generator in the same order, so the same seed gives the same mask."""
    peft_model, ours = _pair(dropout)
    peft_model.train()
    ours.train()
    ids = torch.randint(0, 128, (2, 9))
    torch.manual_seed(5)
    want = peft_model(ids, labels=ids)
    want.loss.backward()
    torch.manual_seed(5)
    got = ours(ids, labels=ids)
    got.loss.backward()
    assert_close(got.logits, want.logits, 1e-6, "logits")
    want_g, got_g = _grads(peft_model), _grads(ours)
    assert sorted(got_g) == sorted(want_g) and any("lora_magnitude_vector" in k for k in got_g)
    for name, g in want_g.items():
        assert_close(got_g[name], g, 1e-5, name)


def test_dora_magnitude_initialised_to_the_row_norms():
    """At init (B = 0) the magnitude is ‖W_n‖, so the layer equals its base exactly."""
    base = nn.Linear(48, 24)
    layer = lorakern.LoraLinear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
    assert_close(layer.lora_magnitude_vector["default"].weight, base.weight.norm(dim=1), 1e-6)
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("scaling", [0.5, 3.0])
def test_low_rank_norm_identity(scaling):
    """‖W + s·B A‖ per row from W Aᵀ and A Aᵀ equals the dense computation (fp64)."""
    W, A, B = torch.randn(40, 72, dtype=torch.float64), torch.randn(6, 72, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    want = torch.linalg.norm(W + scaling * B @ A, dim=1)
    assert_close(dora.weight_norm(W, A, B, scaling), want, 1e-12)
    assert_close(dora.weight_norm(W.t().contiguous().t(), A, B, scaling), want, 1e-12)  # any strides


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_layer_against_plain_pytorch(backend, dtype):
    """The layer's output and gradients against PEFT's formula written in fp64."""
    dev = backend_device(backend)
    base = nn.Linear(72, 40, device=dev, dtype=dtype)
    layer = lorakern.LoraLinear(base, r=5, lora_alpha=10, use_dora=True, init_lora_weights=False, backend=backend)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(40, device=dev) + 0.5)
    x = torch.randn(3, 7, 72, device=dev, dtype=dtype, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    y = layer(x)
    W = base.weight.double()
    norm = torch.linalg.norm(W + s * B.double().detach() @ A.double().detach(), dim=1)
    x64, A64, B64, m64 = (t.double() for t in (x, A, B, m))
    ref = (m64 / norm) * (x64 @ W.t() + s * (x64 @ A64.t()) @ B64.t()) + base.bias.double()
    assert y.dtype == dtype
    assert_close(y, ref, RTOL[dtype], "y")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, m), g)
    want = torch.autograd.grad(ref, (x, A, B, m), g.double())
    for name, a, b in zip(("dx", "dA", "dB", "dm"), got, want):
        assert_close(a, b, RTOL[dtype], name)


def test_dora_merge_unmerge_round_trip():
    peft_model, ours = _pair()
    ours.eval()
    peft_model.eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = ours(ids).logits
        lorakern.merge(ours)
        assert_close(ours(ids).logits, before, 1e-5, "merged")
        peft_merged = peft_model.merge_and_unload()
        assert_close(peft_merged(ids).logits, before, 1e-5, "PEFT merged")
        lorakern.unmerge(ours)
        assert_close(ours(ids).logits, before, 1e-5, "unmerged")


@pytest.mark.parametrize("second_dora", [True, False], ids=["dora+dora", "dora+lora"])
def test_several_active_adapters_with_dora_match_peft(second_dora):
    """PEFT's order: each DoRA adapter scales the running result (base and the adapters
    before it) by its g = m / ‖W + s·B A‖; logits and every gradient, fp64."""
    import peft

    base = _llama().double()
    k1 = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    k2 = dict(r=2, lora_alpha=3, target_modules=["v_proj", "o_proj"], use_dora=second_dora, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**k1))
    pm.add_adapter("other", peft.LoraConfig(**k2))
    ours = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**k1))
    lorakern.inject(ours, lorakern.LoraConfig(**k2), adapter_name="other")
    ours.load_state_dict({k.replace("base_model.model.", ""): v for k, v in pm.state_dict().items()})
    pm.base_model.set_adapter(["default", "other"])
    lorakern.set_adapter(ours, ["default", "other"])
    ids = torch.randint(0, 128, (2, 9))
    want, got = pm(ids, labels=ids), ours(ids, labels=ids)
    assert_close(got.logits, want.logits, 1e-12, "logits")
    lorakern.set_adapter(ours, "default")
    with torch.no_grad():
        assert not torch.allclose(ours(ids).logits, got.logits)  # the second adapter counts
    lorakern.set_adapter(ours, ["default", "other"])
    got = ours(ids, labels=ids)
    want.loss.backward()
    got.loss.backward()
    want_g, got_g = _grads(pm), _grads(ours)
    assert sorted(got_g) == sorted(want_g) and any(".other" in k for k in got_g)
    for name, g in want_g.items():
        assert_close(got_g[name], g, 1e-10, name)


@pytest.mark.parametrize("adapters", [1, 2])
def test_dora_on_quantized_base_is_dora_on_its_dequantised_weight(adapters):
    """QDoRA on lorakern's QuantLinear: the numbers of DoRA on the dense dequantised weight
    (outputs, every gradient), the quantized weight never made dense in the forward."""
    from lorakern.quant import dequantize_weight
    from lorakern.quantized import QuantLinear, quantized_weight

    torch.manual_seed(6)
    q = QuantLinear.from_linear(nn.Linear(64, 32), "nf4")
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(dequantize_weight(quantized_weight(q)))
        dense.bias.copy_(q.bias)
    layers = [lorakern.LoraLinear(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False) for base in (q, dense)]
    if adapters == 2:
        for layer in layers:
            layer.update_layer("other", 2, 3, use_dora=True, init_lora_weights=False)
    layers[1].load_state_dict({k: v for k, v in layers[0].state_dict().items() if "lora_" in k}, strict=False)
    for layer in layers:
        layer.set_adapter(["default", "other"][:adapters])
    x = torch.randn(5, 64)
    ys = [layer(x) for layer in layers]
    assert_close(ys[0], ys[1], 1e-6, "output")
    for y in ys:
        y.square().sum().backward()
    g0 = {n: p.grad for n, p in layers[0].named_parameters() if p.grad is not None}
    g1 = {n: p.grad for n, p in layers[1].named_parameters() if p.grad is not None}
    assert g0.keys() == g1.keys() and any("magnitude" in n for n in g0)
    for n in g0:
        assert_close(g0[n], g1[n], 1e-5, n)


def test_dora_adapter_files_both_ways(tmp_path):
    """PEFT's DoRA file loads into lorakern (magnitude included), lorakern's loads into PEFT."""
    import peft

    peft_model, _ = _pair()
    peft_model.eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(peft_model).unload()  # the same base weights, no LoRA layers
    ours = lorakern.load_adapter(copy.deepcopy(fresh), tmp_path / "peft")
    with torch.no_grad():
        assert_close(ours(ids).logits, want, 1e-6, "lorakern loading PEFT's DoRA file")
    lorakern.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(ids).logits, want, 1e-6, "PEFT loading lorakern's DoRA file")


def test_fp64_base_keeps_fp64_adapters_like_peft(tmp_path):
    import peft

    model = _llama().double()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                           init_lora_weights=False))
    ours = lorakern.inject(copy.deepcopy(model), lorakern.LoraConfig(r=4, target_modules=TARGETS))
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float64
    peft_model.save_pretrained(tmp_path)
    loaded = lorakern.load_adapter(copy.deepcopy(model), tmp_path)
    assert loaded.model.layers[0].self_attn.q_proj.lora_B["default"].weight.dtype == torch.float64
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_model(ids).logits)


def test_dora_adapters_cannot_be_combined():
    model = lorakern.inject(_llama(), lorakern.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        lorakern.add_weighted_adapter(model, ["default"], [1.0], "combined")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patch_peft_runs_peft_dora_layers_with_peft_numbers(dropout):
    """patch_peft takes PEFT's DoRA Linear layers too (lorakern's DoRA on PEFT's own
    parameters, no N×K W + s·BA): PEFT's logits and every gradient, the same dropout draws."""
    peft_model, _ = _pair(dropout)
    peft_model.train()
    ids = torch.randint(0, 128, (2, 9))
    torch.manual_seed(7)
    want = peft_model(ids, labels=ids)
    want.loss.backward()
    want_g = {n: g.clone() for n, g in _grads(peft_model).items()}
    peft_model.zero_grad()
    calls = []
    original = dora.dora_forward
    dora.dora_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        lorakern.patch_peft(peft_model)
        torch.manual_seed(7)
        got = peft_model(ids, labels=ids)
        got.loss.backward()
    finally:
        dora.dora_forward = original
    assert len(calls) == 4  # q_proj and v_proj of both layers
    assert_close(got.logits, want.logits, 1e-6, "logits")
    for name, g in _grads(peft_model).items():
        assert_close(g, want_g[name], 1e-5, name)
